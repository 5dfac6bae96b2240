//! Pictures of runs: the `loss.svg` every run leaves however it ended, and `codex-ml report`,
//! one HTML file that overlays runs' curves, fetches nothing, and refuses what is not a run.
//!
//! Charts are read back as XML: each curve is one `<polyline>` in its run's (or, in
//! `loss.svg`, its metric's) colour, the axes are black.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use codex_tests::{codex_ml, codex_ml_path, token_cache};

/// The colours of the first curves, as the charts write them.
const FIRST: &str = "#1F77B4";
const SECOND: &str = "#D62728";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/data/code")
}

/// A directory with `tiny.ron`, a run of `steps` steps that logs and evaluates often.
fn experiment(steps: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"(
    experiment: "tiny",
    seed: 7,
    data: (train: [Text(paths: ["{data}/*"])], val_fraction: 0.34),
    tokenizer: (name: "bytes"),
    model: (name: "gpt2", params: (n_layer: 1, n_head: 2, n_embd: 32, n_positions: 32)),
    optimizer: (name: "adamw", lr: 1e-3),
    train: (max_steps: {steps}, seq_len: 16, batch_size: 4, log_every: 1, eval_every: 3,
            checkpoint_every: 3),
    sinks: [],
)"#,
        data = fixtures().display()
    );
    std::fs::write(dir.path().join("tiny.ron"), text).unwrap();
    dir
}

/// `codex-ml ARGS` in `dir`: exit code, stdout, stderr.
fn codex(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut cmd = codex_ml();
    cmd.current_dir(dir).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run codex-ml");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
    )
}

fn train(dir: &Path, run: &str, sets: &[&str]) {
    let mut args = vec!["run", "tiny.ron", "--run-dir", run, "-q"];
    for s in sets {
        args.extend(["--set", s]);
    }
    let (code, _, stderr) = codex(dir, &args, &[]);
    assert_eq!(code, Some(0), "{stderr}");
}

/// The stroke colour of each curve (coloured `<polyline>`) of the SVG document `svg`, and its
/// legend labels (every `<text>`).
fn curves(svg: &str) -> (Vec<String>, Vec<String>) {
    let doc = roxmltree::Document::parse(svg).unwrap_or_else(|e| panic!("not SVG: {e}\n{svg}"));
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let strokes = doc
        .descendants()
        .filter(|n| n.has_tag_name("polyline"))
        .filter_map(|n| n.attribute("stroke"))
        .filter(|s| *s != "#000000")
        .map(str::to_owned)
        .collect();
    let texts = doc
        .descendants()
        .filter(|n| n.has_tag_name("text"))
        .filter_map(|n| n.text())
        .map(|t| t.trim().to_owned())
        .collect();
    (strokes, texts)
}

/// `(metric, declared curves, the chart's SVG if drawn)` of each figure of a report.
fn figures(page: &str) -> Vec<(String, usize, Option<String>)> {
    page.split("<figure class=\"chart\" data-metric=\"")
        .skip(1)
        .map(|f| {
            let body = f.split("</figure>").next().unwrap();
            let metric = body.split('"').next().unwrap().to_owned();
            let declared = body
                .split("data-curves=\"")
                .nth(1)
                .and_then(|s| s.split('"').next())
                .and_then(|n| n.parse().ok())
                .expect("data-curves");
            let svg = body.find("<svg").map(|at| {
                let end = body.find("</svg>").expect("a closed svg") + "</svg>".len();
                body[at..end].to_owned()
            });
            (metric, declared, svg)
        })
        .collect()
}

fn loss_svg_of(run: &Path) -> (Vec<String>, Vec<String>) {
    let path = run.join("loss.svg");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    curves(&text)
}

#[test]
fn a_report_overlays_runs_side_by_side_and_needs_nothing_else() {
    let fx = experiment(6);
    let dir = fx.path();
    train(dir, "a", &[]);
    // No validation split: this run has no val/loss at all.
    train(dir, "b", &["optimizer.lr=3e-3", "data.val_fraction=0.0"]);

    // Each run drew its loss: train and val for `a`, train alone for `b`.
    let (strokes, texts) = loss_svg_of(&dir.join("a"));
    assert_eq!(strokes, [FIRST, SECOND], "{texts:?}");
    assert!(texts.iter().any(|t| t == "train/loss") && texts.iter().any(|t| t == "val/loss"));
    let (strokes, _) = loss_svg_of(&dir.join("b"));
    assert_eq!(strokes, [FIRST]);

    let (code, stdout, stderr) = codex(dir, &["report", "a", "b", "-o", "cmp.html"], &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, "cmp.html\n");
    assert!(
        stderr.contains("b: no validation loss recorded"),
        "{stderr}"
    );
    let page = std::fs::read_to_string(dir.join("cmp.html")).unwrap();

    // Nothing to fetch: no script, no external style sheet, image or font.
    let lower = page.to_lowercase();
    for external in ["src=", "href=", "url(", "@import", "<script", "<link"] {
        assert!(!lower.contains(external), "`{external}` in the report");
    }

    let figures = figures(&page);
    let metric = |m: &str| {
        figures
            .iter()
            .find(|f| f.0 == m)
            .unwrap_or_else(|| panic!("no chart of {m}"))
    };
    for (name, expected) in [
        ("train/loss", vec![FIRST, SECOND]),
        ("val/loss", vec![FIRST]),
        ("train/lr", vec![FIRST, SECOND]),
        ("train/tokens_per_s", vec![FIRST, SECOND]),
        ("sys/rss_mib", vec![FIRST, SECOND]),
        ("sys/step_ms", vec![FIRST, SECOND]),
    ] {
        let (_, declared, svg) = metric(name);
        let (strokes, texts) = curves(svg.as_deref().expect("a chart"));
        assert_eq!(strokes, expected, "{name}");
        assert_eq!(*declared, expected.len(), "{name}");
        assert!(texts.iter().any(|t| t == "a"), "{name}: legend {texts:?}");
    }
    // Every chart's coloured polylines are its declared curves.
    for (name, declared, svg) in &figures {
        let drawn = svg.as_deref().map_or(0, |s| curves(s).0.len());
        assert_eq!(drawn, *declared, "{name}");
    }
    assert!(page.contains("No <code>val/loss</code> records in b."));
    assert!(page.contains("<td class=\"status finished\">finished</td>"));
    // The config values that differ, and only those.
    for field in ["optimizer.lr", "data.val_fraction"] {
        assert!(
            page.contains(&format!("<td class=\"value\">{field}</td>")),
            "{field}"
        );
    }
    assert!(!page.contains("<td class=\"value\">seed</td>"));

    // The loss chart of the report is the run's picture, overlaid.
    assert_eq!(metric("train/loss").1, 2);
}

#[test]
fn failed_and_interrupted_runs_leave_their_loss_too() {
    let fx = experiment(9);
    let dir = fx.path();

    // The record fills the (simulated) disk after a few steps: the run fails, the picture of
    // what it recorded stays.
    let (code, _, stderr) = codex(
        dir,
        &["run", "tiny.ron", "--run-dir", "failed", "-q"],
        &[("CODEX_ML_TEST_RECORD_FULL_AFTER", "3000")],
    );
    assert_eq!(code, Some(1), "{stderr}");
    let (strokes, _) = loss_svg_of(&dir.join("failed"));
    assert_eq!(strokes.first().map(String::as_str), Some(FIRST));

    // Ctrl-C while the checkpoint at step 3 is being written: the run stops after step 3.
    let mut child = std::process::Command::new(codex_ml_path())
        .current_dir(dir)
        .args(["run", "tiny.ron", "--run-dir", "stopped", "-q"])
        .env("CODEX_ML_CACHE", token_cache())
        .env("CODEX_ML_TEST_CHECKPOINT_PAUSE", "3:model.safetensors:5")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn codex-ml");
    let mut stderr = BufReader::new(child.stderr.take().expect("piped"));
    let mut seen = String::new();
    while !seen.contains("checkpoint test hook: paused after") {
        let n = stderr.read_line(&mut seen).expect("read stderr");
        assert!(n > 0, "the run ended before its checkpoint:\n{seen}");
    }
    let kill = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(kill.success());
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(130));
    let (strokes, _) = loss_svg_of(&dir.join("stopped"));
    assert_eq!(strokes, [FIRST, SECOND]);

    // Both in one report, each with how it ended.
    let (code, _, stderr) = codex(dir, &["report", "failed", "stopped"], &[]);
    assert_eq!(code, Some(0), "{stderr}");
    let page = std::fs::read_to_string(dir.join("report.html")).unwrap();
    assert!(page.contains("<td class=\"status failed\">failed</td>"));
    assert!(page.contains("<td class=\"status interrupted\">interrupted</td>"));
    assert!(page.contains("SIGINT after step 3"));
    assert!(
        page.contains("could not be written"),
        "the failed run's error"
    );
}

#[test]
fn bad_input_gets_clear_errors_and_a_torn_record_is_not() {
    let fx = experiment(4);
    let dir = fx.path();
    train(dir, "a", &[]);
    let record = std::fs::read_to_string(dir.join("a/metrics.ndjson")).unwrap();

    let refused = |args: &[&str], expect: &[&str]| {
        let (code, stdout, stderr) = codex(dir, args, &[]);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert_eq!(stdout, "", "{args:?}");
        for e in expect {
            assert!(stderr.contains(e), "expected `{e}` in:\n{stderr}");
        }
    };
    refused(&["report"], &["RUN_DIR"]);
    refused(&["report", "nowhere"], &["nowhere: no such directory"]);
    std::fs::create_dir(dir.join("empty")).unwrap();
    refused(
        &["report", "a", "empty"],
        &["empty: not a run directory (no config.ron or metadata.json)"],
    );
    refused(
        &["report", "a", "-o", "missing/r.html"],
        &["directory missing does not exist"],
    );
    refused(&["report", "a", "-o", "a"], &["-o a: is a directory"]);

    // A run that has not recorded anything yet.
    std::fs::create_dir(dir.join("new")).unwrap();
    std::fs::copy(dir.join("a/config.ron"), dir.join("new/config.ron")).unwrap();
    refused(
        &["report", "new"],
        &["no records to draw: new wrote no metrics.ndjson"],
    );
    // ...is shown beside one that has.
    let (code, _, stderr) = codex(dir, &["report", "a", "new", "-o", "two.html"], &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("new: no metrics.ndjson"), "{stderr}");

    // A run killed in the middle of a line: the line is skipped, and said so.
    std::fs::create_dir(dir.join("torn")).unwrap();
    std::fs::copy(dir.join("a/config.ron"), dir.join("torn/config.ron")).unwrap();
    let torn = record.clone() + "{\"step\":5,\"split\":\"train\",\"name\":\"loss\",\"val";
    std::fs::write(dir.join("torn/metrics.ndjson"), torn).unwrap();
    let (code, _, stderr) = codex(dir, &["report", "torn", "-o", "torn.html"], &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("the last line of metrics.ndjson is incomplete"),
        "{stderr}"
    );
    let page = std::fs::read_to_string(dir.join("torn.html")).unwrap();
    assert!(page.contains("is incomplete"));
    assert!(page.contains("no status.json"));

    // A damaged line in the middle is an error naming the file and line.
    let mut lines: Vec<&str> = record.lines().collect();
    lines[1] = "{\"step\":";
    std::fs::write(dir.join("torn/metrics.ndjson"), lines.join("\n") + "\n").unwrap();
    refused(
        &["report", "a", "torn"],
        &[
            "cannot read the records of run torn",
            "metrics.ndjson:2: not a metric record",
        ],
    );
}
