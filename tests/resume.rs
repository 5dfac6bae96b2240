//! Checkpoints you can trust and exact resume, end to end through the real binary.
//!
//! Every test trains a tiny GPT-2 (bytes tokenizer, one layer, n_embd 32, dropout on, two
//! micro-batches per step, several epochs) for 12 steps, which takes well under a second, and
//! compares the interrupted-and-resumed run with the uninterrupted one bit for bit: the bytes
//! of `model.safetensors` and every metric record except the wall-clock ones (throughput and
//! the `sys` split). Kills are
//! real `kill -9`s; the checkpoint writer's test hook (`CODEX_ML_TEST_CHECKPOINT_PAUSE`) only
//! holds the process still at a chosen file so the kill lands mid-write.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use codex_tests::{codex_ml, codex_ml_path, token_cache};
use serde_json::Value;

const STEPS: u64 = 12;

/// A temporary directory holding the tiny experiment config; runs go under it.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    /// `schedule` is the schedule kind; `train_extra` more fields of the `train` section.
    fn new(schedule: &str, train_extra: &str) -> Fixture {
        Fixture::with_top(schedule, train_extra, "")
    }

    /// As [`Fixture::new`], with `top_extra` more top-level fields (`kernel: "cpu",`).
    fn with_top(schedule: &str, train_extra: &str, top_extra: &str) -> Fixture {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/data/code/*");
        let config = format!(
            r#"(
    experiment: "tiny",
    seed: 7,
    {top_extra}
    data: (train: [Text(paths: ["{data}"])], val_fraction: 0.34),
    tokenizer: (name: "bytes"),
    model: (name: "gpt2", params: (n_layer: 1, n_head: 2, n_embd: 32, n_positions: 32,
        embd_pdrop: 0.1, resid_pdrop: 0.1)),
    optimizer: (name: "adamw", lr: 1e-2),
    train: (max_steps: {STEPS}, seq_len: 32, batch_size: 4, grad_accum: 2, checkpoint_every: 3,
        eval_every: 3, log_every: 1, {train_extra}
        schedule: (kind: {schedule}, warmup_steps: 2, min_lr: 1e-3)),
    sinks: [(name: "csv")],
)
"#,
            data = data.display()
        );
        std::fs::write(dir.path().join("tiny.ron"), config).expect("write config");
        Fixture { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Run `codex-ml ARGS` in the fixture directory.
    fn codex(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = codex_ml();
        cmd.current_dir(self.dir.path()).args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("run codex-ml")
    }

    /// Run and insist on success.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.codex(args, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "codex-ml {} failed:\n{stderr}",
            args.join(" ")
        );
        stderr
    }

    /// Run, insist on failure with `code`, return stderr.
    fn fails(&self, args: &[&str], code: i32) -> String {
        let out = self.codex(args, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(code),
            "codex-ml {} should fail with {code}:\n{stderr}",
            args.join(" ")
        );
        stderr
    }

    /// A whole uninterrupted run into `run_dir`.
    fn straight(&self, run_dir: &str) {
        self.ok(&["run", "tiny.ron", "--run-dir", run_dir, "-q"]);
    }

    /// Start a run with the checkpoint hook at `hook` (`step:file`), wait until the writer
    /// pauses there, and `kill -9` it.
    fn kill_at(&self, run_dir: &str, hook: &str) {
        let mut child = std::process::Command::new(codex_ml_path())
            .current_dir(self.dir.path())
            .args(["run", "tiny.ron", "--run-dir", run_dir, "-q"])
            .env("CODEX_ML_TEST_CHECKPOINT_PAUSE", hook)
            .env("CODEX_ML_CACHE", token_cache())
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn codex-ml");
        let stderr = child.stderr.take().expect("piped stderr");
        let mut paused = false;
        let mut seen = Vec::new();
        for line in BufReader::new(stderr).lines() {
            let line = line.unwrap_or_default();
            if line.starts_with("checkpoint test hook: paused after") {
                paused = true;
                break;
            }
            seen.push(line);
        }
        child.kill().expect("kill -9");
        let status = child.wait().expect("wait");
        assert!(
            paused,
            "the run never paused at {hook} ({status}):\n{}",
            seen.join("\n")
        );
    }

    fn model_bytes(&self, run_dir: &str, step: u64) -> Vec<u8> {
        let path = self
            .path(run_dir)
            .join(format!("checkpoints/step-{step:08}/model.safetensors"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }
}

/// `(step, split, name, value bits)` of every record but the wall-clock ones, checking on the
/// way that steps never go backwards and no record is repeated.
fn records(run_dir: &Path) -> Vec<(u64, String, String, u64)> {
    let text = std::fs::read_to_string(run_dir.join("metrics.ndjson")).expect("metrics.ndjson");
    let mut out: Vec<(u64, String, String, u64)> = Vec::new();
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        let step = v["step"].as_u64().expect("step");
        let split = v["split"].as_str().expect("split").to_string();
        let name = v["name"].as_str().expect("name").to_string();
        if let Some(last) = out.last() {
            assert!(last.0 <= step, "step {step} after {}: {line}", last.0);
        }
        assert!(
            !out.iter()
                .any(|r| r.0 == step && r.1 == split && r.2 == name),
            "duplicate record {line}"
        );
        // Wall-clock figures differ between any two runs.
        if name != "tokens_per_s" && split != "sys" {
            // `null` is a value that was not finite (an f16 step's overflowed gradient norm).
            let value = match &v["value"] {
                Value::Null => u64::MAX,
                x => x.as_f64().expect("value").to_bits(),
            };
            out.push((step, split, name, value));
        }
    }
    out
}

/// `run_dir` ended where the uninterrupted `reference` did, bit for bit.
fn assert_same_as(fx: &Fixture, reference: &str, run_dir: &str) {
    assert!(
        fx.model_bytes(reference, STEPS) == fx.model_bytes(run_dir, STEPS),
        "{run_dir}: the final parameters differ from the uninterrupted run's"
    );
    let (a, b) = (records(&fx.path(reference)), records(&fx.path(run_dir)));
    assert_eq!(a.len(), b.len(), "{run_dir}: record counts differ");
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x, y, "{run_dir}: records differ");
    }
    let csv = std::fs::read_to_string(fx.path(run_dir).join("metrics.csv")).expect("csv");
    let losses = csv.lines().filter(|l| l.contains(",train,loss,")).count();
    assert_eq!(losses as u64, STEPS, "{run_dir}: metrics.csv\n{csv}");
}

fn sums_of(dir: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(dir.join("SHA256SUMS"))
        .expect("SHA256SUMS")
        .lines()
        .map(|l| {
            let (hash, name) = l.split_once("  ").expect("sha256sum line");
            (name.to_string(), hash.to_string())
        })
        .collect()
}

#[test]
fn half_then_resume_is_bitwise_identical_to_straight() {
    // A constant schedule after warmup does not depend on the run's length, so stopping at
    // half by max_steps and raising it on resume must change nothing.
    let fx = Fixture::new("constant", "");
    fx.straight("straight");
    let half = (STEPS / 2).to_string();
    fx.ok(&[
        "run",
        "tiny.ron",
        "--run-dir",
        "halves",
        "-q",
        "--set",
        &format!("train.max_steps={half}"),
    ]);
    fx.ok(&[
        "run",
        "tiny.ron",
        "--run-dir",
        "halves",
        "--resume",
        "latest",
    ]);
    assert_same_as(&fx, "straight", "halves");

    // The same through `codex-ml resume`, with the run's own stored config.
    fx.ok(&[
        "run",
        "tiny.ron",
        "--run-dir",
        "own",
        "-q",
        "--set",
        &format!("train.max_steps={half}"),
    ]);
    fx.ok(&[
        "resume",
        "own",
        "--set",
        &format!("train.max_steps={STEPS}"),
    ]);
    assert_same_as(&fx, "straight", "own");

    // metadata.json is updated, not clobbered: the first session's facts and one resume.
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(fx.path("own/metadata.json")).expect("metadata"),
    )
    .expect("json");
    assert_eq!(meta["experiment"], "tiny");
    assert_eq!(meta["resumed"], false);
    let resumes = meta["resumes"].as_array().expect("resumes list");
    assert_eq!(resumes.len(), 1, "{meta}");
    assert_eq!(resumes[0]["from_step"], STEPS / 2);
    for key in [
        "tool",
        "os",
        "cpu",
        "threads",
        "seeds",
        "plugins",
        "dependencies",
    ] {
        assert!(!resumes[0][key].is_null(), "{key} missing in {meta}");
    }
    assert!(!fx.path("own/metadata.resume-1.json").exists());
    assert!(fx.path("own/config.resume-1.ron").exists());
}

/// The fused kernel's parallel ops split work the same way every time, so a run using it
/// resumes bitwise too (the quickstart uses it).
#[test]
fn with_the_fused_kernel_a_killed_run_resumes_bitwise() {
    let fx = Fixture::with_top("cosine", "", r#"kernel: "cpu","#);
    fx.straight("straight");
    fx.kill_at("killed", "9:model.safetensors");
    fx.ok(&[
        "run",
        "tiny.ron",
        "--run-dir",
        "killed",
        "--resume",
        "latest",
    ]);
    assert_same_as(&fx, "straight", "killed");
}

/// Mixed precision keeps f32 master weights in the checkpoint and rounds the same way every
/// time, so a bf16 run killed during a checkpoint write resumes bitwise too; its precision is
/// part of the steps already taken, so a resume cannot change it.
#[test]
fn in_bf16_a_killed_run_resumes_bitwise_and_keeps_its_precision() {
    let fx = Fixture::with_top("cosine", "", r#"kernel: "cpu", precision: "bf16","#);
    fx.straight("straight");
    fx.kill_at("killed", "9:model.safetensors");
    let refused = fx.fails(
        &[
            "run",
            "tiny.ron",
            "--run-dir",
            "killed",
            "--resume",
            "latest",
            "--set",
            "precision=f32",
        ],
        2,
    );
    assert!(refused.contains("precision"), "{refused}");
    fx.ok(&[
        "run",
        "tiny.ron",
        "--run-dir",
        "killed",
        "--resume",
        "latest",
    ]);
    assert_same_as(&fx, "straight", "killed");
    // Where the CPU multiplies in bf16, the run is not the f32 run.
    if crate::precision::bf16_here() {
        let f32_run = Fixture::with_top("cosine", "", r#"kernel: "cpu","#);
        f32_run.straight("straight");
        assert!(
            fx.model_bytes("straight", STEPS) != f32_run.model_bytes("straight", STEPS),
            "the bf16 run ended with the f32 run's parameters"
        );
    }
}

/// f16 with dynamic loss scaling: the scaler's state (scale, growth count, steps skipped) is
/// part of the checkpoint, so a run killed mid-checkpoint resumes bitwise — with a scale that
/// overflows at first and a growth interval short enough that it overflows again after the
/// checkpoint, so the restored state decides what the resumed steps do.
#[test]
fn in_f16_a_killed_run_resumes_bitwise_with_its_loss_scaler() {
    let fx = Fixture::with_top(
        "cosine",
        "",
        r#"kernel: "cpu", precision: "f16", loss_scale: (init_scale: 16777216.0, growth_interval: 2),"#,
    );
    fx.straight("straight");
    let skipped: Vec<(u64, f64)> = std::fs::read_to_string(fx.path("straight/metrics.ndjson"))
        .expect("metrics")
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("json"))
        .filter(|r| r["name"] == "skipped_steps")
        .map(|r| {
            (
                r["step"].as_u64().expect("step"),
                r["value"].as_f64().expect("value"),
            )
        })
        .collect();
    // Steps were skipped both before and after the checkpoint the kill leaves (step 6).
    let at = |step: u64| skipped.iter().find(|r| r.0 == step).map_or(0.0, |r| r.1);
    assert!(at(6) > 0.0 && at(STEPS) > at(6), "{skipped:?}");
    fx.kill_at("killed", "9:model.safetensors");
    fx.ok(&[
        "run",
        "tiny.ron",
        "--run-dir",
        "killed",
        "--resume",
        "latest",
    ]);
    assert_same_as(&fx, "straight", "killed");
}

#[test]
fn kill_nine_anywhere_then_resume_latest_matches() {
    let fx = Fixture::new("cosine", "keep_checkpoints: 2,");
    fx.straight("straight");
    for (i, hook) in [
        "6:model.safetensors", // half written
        "6:optimizer.safetensors",
        "6:SHA256SUMS",         // complete but not yet renamed into place
        "9:trainer_state.json", // steps 7 and 8 recorded after the last checkpoint
        "12:config.ron",        // the final checkpoint
    ]
    .iter()
    .enumerate()
    {
        let run = format!("killed-{i}");
        fx.kill_at(&run, hook);
        let stderr = fx.ok(&["run", "tiny.ron", "--run-dir", &run, "--resume", "latest"]);
        assert!(
            stderr.contains("removed an interrupted checkpoint write"),
            "{hook}: {stderr}"
        );
        assert_same_as(&fx, "straight", &run);
        let leftovers: Vec<String> = std::fs::read_dir(fx.path(&run).join("checkpoints"))
            .expect("checkpoints")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "{hook}: {leftovers:?}");
    }
}

/// A run killed before its first checkpoint is complete has nothing to resume, and is not
/// stuck: resuming it (by `--resume latest` with its `--run-dir`, by `codex-ml resume`, or
/// starting it again with `run --run-dir`) starts it again in place, its partial records
/// superseded, and it ends exactly where an uninterrupted run does.
#[test]
fn kill_before_any_checkpoint_restarts_in_place() {
    let fx = Fixture::new("cosine", "");
    fx.straight("straight");
    let ways: [&[&str]; 3] = [
        &[
            "run",
            "tiny.ron",
            "--run-dir",
            "early",
            "--resume",
            "latest",
            "-q",
        ],
        &["resume", "early", "-q"],
        &["run", "tiny.ron", "--run-dir", "early", "-q"],
    ];
    for (i, way) in ways.iter().enumerate() {
        if i > 0 {
            std::fs::remove_dir_all(fx.path("early")).expect("clean");
        }
        fx.kill_at("early", "3:model.safetensors");
        let verify = fx.codex(&["verify", "early"], &[]);
        assert_eq!(verify.status.code(), Some(1));
        let stdout = String::from_utf8_lossy(&verify.stdout);
        assert!(stdout.contains("incomplete"), "{stdout}");

        let out = fx.codex(way, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{way:?}:\n{stderr}");
        assert!(
            stderr.contains("stopped before its first checkpoint: starting it again in place"),
            "{way:?}:\n{stderr}"
        );
        assert_same_as(&fx, "straight", "early");
        let meta: Value = serde_json::from_str(
            &std::fs::read_to_string(fx.path("early/metadata.json")).expect("metadata"),
        )
        .expect("json");
        assert_eq!(meta["resumes"][0]["from_step"], 0, "{meta}");
        assert_eq!(meta["resumes"][0]["checkpoint"], Value::Null, "{meta}");
    }
}

/// `--resume latest` without `--run-dir` takes the newest run that has a checkpoint, and says
/// which, rather than a newer run that died before its first one.
#[test]
fn resume_latest_passes_over_runs_without_a_checkpoint() {
    let fx = Fixture::new("constant", "");
    fx.straight("straight");
    let half = (STEPS / 2).to_string();
    fx.ok(&[
        "run",
        "tiny.ron",
        "-q",
        "--set",
        &format!("train.max_steps={half}"),
    ]);
    // A newer run of the experiment, killed before its first checkpoint.
    let mut child = fx.spawn(
        &["run", "tiny.ron"],
        &[("CODEX_ML_TEST_CHECKPOINT_PAUSE", "3:model.safetensors")],
    );
    let _rest = wait_for_pause(&mut child);
    child.kill().expect("kill -9");
    child.wait().expect("wait");

    let mut runs: Vec<String> = std::fs::read_dir(fx.path("runs/tiny"))
        .expect("runs")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    runs.sort();
    assert_eq!(runs.len(), 2, "{runs:?}");
    let stderr = fx.ok(&["run", "tiny.ron", "--resume", "latest"]);
    assert!(
        stderr.contains(&format!("runs/tiny/{} (the newest of experiment `tiny` with a checkpoint; newer runs without one: tiny/{})", runs[0], runs[1])),
        "{stderr}"
    );
    assert_same_as(&fx, "straight", &format!("runs/tiny/{}", runs[0]));
}

#[test]
fn sha256sum_accepts_a_real_checkpoint() {
    let fx = Fixture::new("cosine", "");
    fx.straight("run");
    let dir = fx.path("run/checkpoints/step-00000012");
    let out = std::process::Command::new("sha256sum")
        .args(["-c", "SHA256SUMS"])
        .current_dir(&dir)
        .output()
        .expect("coreutils sha256sum");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let names: Vec<String> = sums_of(&dir).into_iter().map(|(n, _)| n).collect();
    for file in [
        "config.ron",
        "model.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
    ] {
        assert!(names.iter().any(|n| n == file), "{file} not in {names:?}");
        assert!(stdout.contains(&format!("{file}: OK")), "{stdout}");
    }
    // The trainer state names every random stream, the cursor, the schedule and the best.
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("trainer_state.json")).expect("state"),
    )
    .expect("json");
    assert_eq!(state["step"], STEPS);
    assert_eq!(state["micro_step"], 0);
    for key in [
        "data_order_seed",
        "data_order_epoch",
        "dropout_seed",
        "init_seed",
    ] {
        assert!(state["rng"][key].is_u64(), "{key}: {state}");
    }
    assert!(
        state["data"]["epoch"].as_u64().is_some_and(|e| e >= 1),
        "{state}"
    );
    assert_eq!(state["schedule"]["total_steps"], STEPS);
    assert!(state["trainer"]["best_val_loss"].is_f64(), "{state}");

    let verify = fx.codex(&["verify", "run"], &[]);
    let stdout = String::from_utf8_lossy(&verify.stdout);
    assert!(verify.status.success(), "{stdout}");
    assert_eq!(stdout.lines().filter(|l| l.starts_with("valid")).count(), 3);
}

/// Each way a checkpoint can be damaged: an explicit resume fails naming the file, `latest`
/// skips it with a warning and continues exactly from the checkpoint before.
#[test]
fn damaged_checkpoints_are_named_or_skipped() {
    type Damage = fn(&Path);
    let cases: [(&str, Damage, &str); 6] = [
        (
            "flipped byte",
            |d| flip_byte(&d.join("model.safetensors")),
            "model.safetensors",
        ),
        (
            "truncated file",
            |d| truncate(&d.join("optimizer.safetensors")),
            "optimizer.safetensors",
        ),
        (
            "missing file",
            |d| remove(&d.join("trainer_state.json")),
            "trainer_state.json: listed in SHA256SUMS but missing",
        ),
        (
            "missing sums",
            |d| remove(&d.join("SHA256SUMS")),
            "no SHA256SUMS",
        ),
        (
            "edited sums",
            |d| {
                let path = d.join("SHA256SUMS");
                let text = std::fs::read_to_string(&path).expect("sums");
                let edited = text.replacen(&text[..4], "0000", 1);
                std::fs::write(&path, edited).expect("write sums");
            },
            "config.ron: sha256 mismatch",
        ),
        (
            "unlisted required file",
            |d| {
                let path = d.join("SHA256SUMS");
                let text = std::fs::read_to_string(&path).expect("sums");
                let kept: String = text
                    .lines()
                    .filter(|l| !l.ends_with("model.safetensors"))
                    .map(|l| format!("{l}\n"))
                    .collect();
                std::fs::write(&path, kept).expect("write sums");
            },
            "required file model.safetensors is not listed",
        ),
    ];
    let fx = Fixture::new("cosine", "keep_checkpoints: 0,");
    fx.straight("straight");
    for (i, (what, damage, message)) in cases.iter().enumerate() {
        // Stop at step 9's checkpoint write, so steps 3, 6 are whole; damage step 6.
        let run = format!("damaged-{i}");
        fx.kill_at(&run, "9:model.safetensors");
        let six = fx.path(&run).join("checkpoints/step-00000006");
        let expected_hash = sums_of(&six)
            .into_iter()
            .find(|(n, _)| n == "model.safetensors")
            .map(|(_, h)| h);
        damage(&six);

        let explicit = six.to_string_lossy().into_owned();
        let stderr = fx.fails(&["run", "tiny.ron", "--resume", &explicit], 1);
        assert!(stderr.contains(message), "{what}: {stderr}");
        if *what == "flipped byte" {
            let expected = expected_hash.expect("hash of model.safetensors");
            assert!(
                stderr.contains(&format!("expected {expected}, found ")),
                "{what}: {stderr}"
            );
        }
        let verify = fx.codex(&["verify", &run], &[]);
        let stdout = String::from_utf8_lossy(&verify.stdout);
        assert_eq!(verify.status.code(), Some(1), "{what}: {stdout}");
        assert!(
            stdout.contains("corrupt  ")
                && stdout.contains("step-00000006")
                && stdout.contains(message),
            "{what}: {stdout}"
        );
        assert!(stdout.contains("valid    "), "{what}: {stdout}");

        let stderr = fx.ok(&["run", "tiny.ron", "--run-dir", &run, "--resume", "latest"]);
        assert!(
            stderr.contains("skipping checkpoint") && stderr.contains("step-00000006"),
            "{what}: {stderr}"
        );
        assert_same_as(&fx, "straight", &run);
        // The damaged one is kept aside for inspection, never loaded nor deleted.
        assert!(
            fx.path(&run)
                .join("checkpoints/step-00000006.superseded")
                .is_dir(),
            "{what}"
        );
    }
}

#[test]
fn config_changes_that_alter_past_steps_are_refused() {
    let fx = Fixture::new("cosine", "");
    fx.ok(&[
        "run",
        "tiny.ron",
        "--run-dir",
        "run",
        "-q",
        "--set",
        "train.max_steps=6",
    ]);
    for (set, field) in [
        ("model.params.n_embd=64", "model"),
        ("seed=8", "seed"),
        ("train.batch_size=2", "train.batch_size"),
        ("optimizer.lr=0.02", "optimizer"),
    ] {
        let stderr = fx.fails(
            &[
                "run",
                "tiny.ron",
                "--run-dir",
                "run",
                "--resume",
                "latest",
                "--set",
                set,
            ],
            2,
        );
        assert!(
            stderr.contains(field) && stderr.contains("cannot change on resume"),
            "{set}: {stderr}"
        );
        // The checkpoint chosen is named, and a plain value is shown both ways.
        assert!(
            stderr.contains("resuming from run/checkpoints/step-00000006"),
            "{stderr}"
        );
        if set == "seed=8" {
            assert!(stderr.contains("(8 here, 7 in the checkpoint)"), "{stderr}");
        }
    }
    let stderr = fx.fails(&["resume", "run"], 2);
    assert!(stderr.contains("raise train.max_steps"), "{stderr}");
    let stderr = fx.ok(&["resume", "run", "--set", "train.max_steps=9"]);
    assert!(stderr.contains("train.max_steps: 6 -> 9"), "{stderr}");
    assert!(fx.path("run/checkpoints/step-00000009").is_dir());
}

#[test]
fn retention_keeps_the_newest_and_the_best() {
    let fx = Fixture::new("cosine", "keep_checkpoints: 1,");
    fx.straight("one");
    let kept: Vec<String> = std::fs::read_dir(fx.path("one/checkpoints"))
        .expect("checkpoints")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(kept.iter().any(|n| n == "step-00000012"), "{kept:?}");
    assert!(!kept.is_empty() && kept.len() <= 2, "{kept:?}");
    let verify = fx.codex(&["verify", "one"], &[]);
    assert!(verify.status.success());

    let fx = Fixture::new("cosine", "keep_checkpoints: 0,");
    fx.straight("all");
    let all = std::fs::read_dir(fx.path("all/checkpoints"))
        .expect("checkpoints")
        .count();
    assert_eq!(all, 4);
}

fn flip_byte(path: &Path) {
    let mut bytes = std::fs::read(path).expect("read");
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(path, bytes).expect("write");
}

fn truncate(path: &Path) {
    let bytes = std::fs::read(path).expect("read");
    std::fs::write(path, &bytes[..bytes.len() / 3]).expect("write");
}

fn remove(path: &Path) {
    std::fs::remove_file(path).expect("remove");
}

/// Send `signal` (`TERM`, `HUP`, `INT`) to process `pid` with the system's `kill`.
fn send(signal: &str, pid: u32) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid}: {status}");
}

impl Fixture {
    /// Start `codex-ml ARGS` in the fixture directory with its stderr piped.
    fn spawn(&self, args: &[&str], env: &[(&str, &str)]) -> std::process::Child {
        let mut cmd = std::process::Command::new(codex_ml_path());
        cmd.current_dir(self.dir.path())
            .args(args)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.spawn().expect("spawn codex-ml")
    }
}

/// Read `child`'s stderr up to the checkpoint hook's pause; the rest of stderr is returned by
/// the second element once the process has ended.
fn wait_for_pause(child: &mut std::process::Child) -> BufReader<std::process::ChildStderr> {
    let mut stderr = BufReader::new(child.stderr.take().expect("piped stderr"));
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        let n = stderr.read_line(&mut line).expect("read stderr");
        assert!(
            n > 0,
            "the run ended before its checkpoint hook paused:\n{seen}"
        );
        if line.starts_with("checkpoint test hook: paused after") {
            return stderr;
        }
        seen.push_str(&line);
    }
}

/// The exit code and the rest of stderr of a child whose stderr is `rest`.
fn finish(mut child: std::process::Child, mut rest: impl BufRead) -> (Option<i32>, String) {
    let mut text = String::new();
    std::io::Read::read_to_string(&mut rest, &mut text).expect("read stderr");
    let status = child.wait().expect("wait");
    (status.code(), text)
}

/// SIGTERM (what a scheduler sends before SIGKILL) in the middle of a checkpoint write: the
/// write completes, the run stops at the step boundary with a checkpoint, says how to go on,
/// and exits 143; resuming then ends exactly where the uninterrupted run does. SIGHUP does
/// the same with 129.
#[test]
fn sigterm_during_a_checkpoint_write_stops_gracefully_and_resumes_exactly() {
    let fx = Fixture::new("cosine", "");
    fx.straight("straight");
    for (signal, code) in [("TERM", 143), ("HUP", 129)] {
        let run = format!("signalled-{signal}");
        let mut child = fx.spawn(
            &["run", "tiny.ron", "--run-dir", &run, "-q"],
            &[("CODEX_ML_TEST_CHECKPOINT_PAUSE", "6:model.safetensors:2")],
        );
        let rest = wait_for_pause(&mut child);
        send(signal, child.id());
        let (status, stderr) = finish(child, rest);
        assert_eq!(status, Some(code), "SIG{signal}:\n{stderr}");
        assert!(
            stderr.contains(&format!("stopped by SIG{signal} after step"))
                && stderr.contains(&format!("continue with `codex-ml resume {run}`")),
            "{stderr}"
        );
        let last = std::fs::read_dir(fx.path(&run).join("checkpoints"))
            .expect("checkpoints")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("step-"))
            .max()
            .expect("a checkpoint");
        assert!(last.as_str() >= "step-00000006", "{last}");
        fx.ok(&["verify", &run]);
        fx.ok(&["resume", &run, "-q"]);
        assert_same_as(&fx, "straight", &run);
    }
}

/// SIGTERM between checkpoints, while steps run: the run still stops after a whole step with
/// a checkpoint at that step, and resumes exactly.
#[test]
fn sigterm_during_a_step_stops_at_its_boundary_and_resumes_exactly() {
    let fx = Fixture::new("constant", "");
    let long = [
        "--set",
        "train.max_steps=1500",
        "--set",
        "train.checkpoint_every=1000",
    ];
    let args = |run: &'static str| {
        let mut a = vec!["run", "tiny.ron", "--run-dir", run, "-q"];
        a.extend(long);
        a
    };
    fx.ok(&args("straight-long"));
    let child = fx.spawn(&args("signalled"), &[]);
    // Wait for the first records, so that the signal lands among the steps.
    let metrics = fx.path("signalled/metrics.ndjson");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !std::fs::read_to_string(&metrics).is_ok_and(|t| t.contains("\"step\":3,")) {
        assert!(
            std::time::Instant::now() < deadline,
            "no step 3 in {}",
            metrics.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    send("TERM", child.id());
    let mut child = child;
    let rest = BufReader::new(child.stderr.take().expect("stderr"));
    let (status, stderr) = finish(child, rest);
    assert_eq!(status, Some(143), "{stderr}");
    let stopped_at: u64 = stderr
        .split("stopped by SIGTERM after step ")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no stop message:\n{stderr}"));
    assert!(
        stopped_at < 1500,
        "the run finished before the signal: {stderr}"
    );
    assert!(
        fx.path(&format!("signalled/checkpoints/step-{stopped_at:08}"))
            .is_dir(),
        "no checkpoint at the stop step {stopped_at}"
    );
    fx.ok(&["resume", "signalled", "-q"]);
    let final_model = |run: &str| {
        std::fs::read(
            fx.path(run)
                .join("checkpoints/step-00001500/model.safetensors"),
        )
        .unwrap_or_else(|e| panic!("{run}: {e}"))
    };
    assert!(
        final_model("straight-long") == final_model("signalled"),
        "the resumed run's final parameters differ from the uninterrupted run's"
    );
}

/// A second signal leaves at once, mid-write, with the same exit code; the checkpoint before
/// stands, and resuming from it ends where the uninterrupted run does.
#[test]
fn a_second_signal_exits_at_once_and_the_last_checkpoint_stands() {
    let fx = Fixture::new("cosine", "");
    fx.straight("straight");
    let mut child = fx.spawn(
        &["run", "tiny.ron", "--run-dir", "twice", "-q"],
        &[("CODEX_ML_TEST_CHECKPOINT_PAUSE", "6:model.safetensors")],
    );
    let mut rest = wait_for_pause(&mut child);
    send("INT", child.id());
    // Once the first signal is acknowledged, the second ends the process while the writer is
    // still paused.
    let mut seen = String::new();
    while !seen.contains("SIGINT: stopping at the end of this step") {
        let n = rest.read_line(&mut seen).expect("read stderr");
        assert!(n > 0, "the first signal was not acknowledged:\n{seen}");
    }
    // The same signal within a second is the same request (see the next test).
    std::thread::sleep(std::time::Duration::from_millis(1200));
    send("INT", child.id());
    let (status, stderr) = finish(child, rest);
    assert_eq!(status, Some(130), "{stderr}");
    assert!(stderr.contains("SIGINT again: exiting"), "{stderr}");
    fx.ok(&["resume", "twice", "-q"]);
    assert_same_as(&fx, "straight", "twice");
}

/// One request delivered twice — `timeout` signals the command and then its process group, a
/// terminal's Ctrl-C reaches the whole foreground group — is one request: the run still stops
/// at the end of its step with a checkpoint.
#[test]
fn the_same_signal_twice_at_once_is_one_request() {
    let fx = Fixture::new("constant", "");
    let mut child = fx.spawn(
        &[
            "run",
            "tiny.ron",
            "--run-dir",
            "doubled",
            "-q",
            "--set",
            "train.max_steps=100000",
        ],
        &[],
    );
    let metrics = fx.path("doubled/metrics.ndjson");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !std::fs::read_to_string(&metrics).is_ok_and(|t| t.contains("\"step\":3,")) {
        assert!(std::time::Instant::now() < deadline, "no step 3");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    send("TERM", child.id());
    send("TERM", child.id());
    let rest = BufReader::new(child.stderr.take().expect("stderr"));
    let (status, stderr) = finish(child, rest);
    assert_eq!(status, Some(143), "{stderr}");
    assert!(!stderr.contains("again: exiting"), "{stderr}");
    let stopped_at: u64 = stderr
        .split("stopped by SIGTERM after step ")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no stop message:\n{stderr}"));
    assert!(
        fx.path(&format!("doubled/checkpoints/step-{stopped_at:08}"))
            .is_dir(),
        "no checkpoint at the stop step {stopped_at}"
    );
}

/// Every file under `dir` but the lock, with its bytes, for comparing a directory before and
/// after.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("entry").path())
            .collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                walk(root, &path, out);
            } else if path.file_name().is_some_and(|n| n != "run.lock") {
                let bytes = std::fs::read(&path).expect("read");
                out.push((
                    path.strip_prefix(root).expect("inside").to_path_buf(),
                    bytes,
                ));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out
}

/// A resume refused after the run directory was opened changes nothing in it: not the
/// checkpoints newer than the one named (they used to be set aside first), not the configs,
/// not the log.
#[test]
fn a_refused_resume_leaves_the_run_directory_byte_identical() {
    let fx = Fixture::new("cosine", "");
    fx.straight("done");
    let before = snapshot(&fx.path("done"));
    // Nothing left to train: the run is finished.
    let stderr = fx.fails(&["resume", "done"], 2);
    assert!(stderr.contains("nothing left to train"), "{stderr}");
    // An older checkpoint named on purpose, with a length that leaves nothing to do from it.
    let stderr = fx.fails(
        &[
            "resume",
            "done/checkpoints/step-00000006",
            "--set",
            "train.max_steps=6",
        ],
        2,
    );
    assert!(stderr.contains("nothing left to train"), "{stderr}");
    let after = snapshot(&fx.path("done"));
    let names = |s: &[(PathBuf, Vec<u8>)]| s.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>();
    assert_eq!(names(&before), names(&after), "files were added or removed");
    for ((path, a), (_, b)) in before.iter().zip(&after) {
        assert!(a == b, "{} changed", path.display());
    }
}

/// Two processes on one run directory: while a run holds it, a resume of it is refused with
/// the holder's pid and changes nothing; once the holder is gone, the resume goes ahead.
#[test]
fn a_second_process_is_refused_while_a_run_holds_its_directory() {
    let fx = Fixture::new("cosine", "");
    fx.straight("straight");
    let mut child = fx.spawn(
        &["run", "tiny.ron", "--run-dir", "held", "-q"],
        &[("CODEX_ML_TEST_CHECKPOINT_PAUSE", "6:model.safetensors")],
    );
    let _rest = wait_for_pause(&mut child);
    let before = snapshot(&fx.path("held"));
    let stderr = fx.fails(&["resume", "held"], 1);
    assert!(
        stderr.contains("is in use by another codex-ml process")
            && stderr.contains(&format!("pid {}", child.id())),
        "{stderr}"
    );
    assert!(
        before == snapshot(&fx.path("held")),
        "the refused resume changed the run"
    );
    child.kill().expect("kill -9");
    child.wait().expect("wait");
    // The kernel released the lock with the process: the run resumes, exactly.
    fx.ok(&["resume", "held", "-q"]);
    assert_same_as(&fx, "straight", "held");
}

/// The run's record meeting a full disk (simulated: the record's writes fail once it has
/// written a set number of bytes) stops the run at the next step boundary with a checkpoint,
/// exit code 1 and a message saying what happened and how to go on; once there is room
/// again, the run resumes and ends exactly where an uninterrupted run does.
#[test]
fn a_full_disk_under_the_record_stops_the_run_and_it_resumes_exactly() {
    let fx = Fixture::new("cosine", "");
    fx.straight("straight");
    let out = fx.codex(
        &["run", "tiny.ron", "--run-dir", "full", "-q"],
        &[("CODEX_ML_TEST_RECORD_FULL_AFTER", "2500")],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("metrics.ndjson, the run's record, could not be written")
            && stderr.contains("no storage space")
            && stderr.contains("continue with `codex-ml resume full`"),
        "{stderr}"
    );
    let written = records(&fx.path("full"))
        .last()
        .map(|r| r.0)
        .expect("records");
    assert!(written < STEPS, "the record was full at step {written}");
    fx.ok(&["resume", "full", "-q"]);
    let model = |run: &str| fx.model_bytes(run, STEPS);
    assert!(
        model("straight") == model("full"),
        "the resumed run differs"
    );
}

/// For scripts: `run` prints the run directory alone on stdout, and a closed stderr (`2>&1 |
/// head`) neither crashes a run nor changes its exit code.
#[test]
fn run_prints_its_directory_on_stdout_and_survives_a_closed_stderr() {
    let fx = Fixture::new("cosine", "");
    let out = fx.codex(&["run", "tiny.ron", "--run-dir", "scripted", "-q"], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "scripted\n");

    let mut child = std::process::Command::new(codex_ml_path())
        .current_dir(fx.path(""))
        .args(["run", "tiny.ron", "--run-dir", "closed"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn codex-ml");
    // The reader goes away at once, as `head` does once it has its lines.
    drop(child.stderr.take());
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(fx.path("closed/checkpoints/step-00000012").is_dir());
}

/// The way out of a divergence: `--retune` lets a resume lower the learning rate of the steps
/// still to come (refused without it, with a message naming the flag), leaving the steps taken
/// as they were; `--skip-batches` moves past some data, deterministically.
#[test]
fn retune_changes_only_the_steps_to_come_and_skip_batches_moves_the_data_on() {
    let fx = Fixture::new("constant", "");
    fx.straight("straight");
    let half = format!("train.max_steps={}", STEPS / 2);
    for run in ["retuned", "skipped", "skipped-again"] {
        fx.ok(&["run", "tiny.ron", "--run-dir", run, "-q", "--set", &half]);
    }
    let full = format!("train.max_steps={STEPS}");
    let stderr = fx.fails(
        &[
            "resume",
            "retuned",
            "--set",
            &full,
            "--set",
            "optimizer.lr=0.002",
        ],
        2,
    );
    assert!(
        stderr.contains("optimizer.lr") && stderr.contains("--retune"),
        "{stderr}"
    );
    let stderr = fx.ok(&[
        "resume",
        "retuned",
        "--retune",
        "--set",
        &full,
        "--set",
        "optimizer.lr=0.002",
    ]);
    assert!(stderr.contains("optimizer.lr: 0.01 -> 0.002"), "{stderr}");
    let lr_at = |run: &str, step: u64| -> f64 {
        let text = std::fs::read_to_string(fx.path(run).join("metrics.ndjson")).expect("records");
        text.lines()
            .map(|l| serde_json::from_str::<Value>(l).expect("json"))
            .find(|v| v["step"] == step && v["name"] == "lr")
            .and_then(|v| v["value"].as_f64())
            .unwrap_or_else(|| panic!("no lr at step {step} in {run}"))
    };
    let half_step = STEPS / 2;
    assert_eq!(lr_at("retuned", half_step), lr_at("straight", half_step));
    assert_eq!(lr_at("retuned", half_step + 1), 0.002);
    let straight = records(&fx.path("straight"));
    let retuned = records(&fx.path("retuned"));
    let upto = |r: &[(u64, String, String, u64)]| -> Vec<(u64, String, String, u64)> {
        r.iter().filter(|x| x.0 <= half_step).cloned().collect()
    };
    assert_eq!(upto(&straight), upto(&retuned), "the steps taken changed");
    assert!(
        fx.model_bytes("straight", STEPS) != fx.model_bytes("retuned", STEPS),
        "the new learning rate changed nothing"
    );

    for run in ["skipped", "skipped-again"] {
        fx.ok(&["resume", run, "--skip-batches", "2", "--set", &full, "-q"]);
    }
    assert!(
        fx.model_bytes("skipped", STEPS) == fx.model_bytes("skipped-again", STEPS),
        "skipping is not deterministic"
    );
    assert!(
        fx.model_bytes("skipped", STEPS) != fx.model_bytes("straight", STEPS),
        "skipping batches changed nothing"
    );
}

/// Parse stdout as exactly one JSON document.
fn one_json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON document ({e}):\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// For scripts: `latest` wherever a run directory goes, each command's `--json` document, and
/// a failure's document with its exit code; a batch larger than the data says what it trains on.
#[test]
fn latest_and_json_work_in_every_command_that_takes_a_run() {
    let fx = Fixture::new("constant", "");
    let out = fx.codex(&["eval", "latest", "--json"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let failure = one_json(&out);
    assert_eq!(failure["exit_code"], 2, "{failure}");
    assert!(
        failure["error"]
            .as_str()
            .unwrap()
            .starts_with("latest: no runs under runs"),
        "{failure}"
    );
    let stderr = fx.fails(&["generate", "no-such-run", "--prompt", "x"], 2);
    assert!(stderr.contains("no-such-run: no such run"), "{stderr}");

    let out = fx.codex(&["run", "tiny.ron", "-q", "--json"], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first = one_json(&out);
    assert_eq!(first["status"], "finished", "{first}");
    assert_eq!(first["signal"], Value::Null, "{first}");
    assert_eq!(first["steps"], STEPS, "{first}");
    let first_dir = first["run_dir"].as_str().unwrap().to_owned();
    assert!(first_dir.starts_with("runs/tiny/"), "{first}");
    assert_eq!(
        first["last_checkpoint"],
        format!("{first_dir}/checkpoints/step-{STEPS:08}"),
        "{first}"
    );
    let loss = first["val_loss"].as_f64().unwrap();
    assert!((first["val_perplexity"].as_f64().unwrap() - loss.exp()).abs() < 1e-9);

    // A newer run, half as long, with a batch larger than the data: it says what it uses.
    let half = format!("train.max_steps={}", STEPS / 2);
    let out = fx.codex(
        &[
            "run",
            "tiny.ron",
            "--set",
            &half,
            "--set",
            "train.batch_size=100000",
            "--json",
        ],
        &[],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("train.batch_size is 100000 but the training data holds only"),
        "{stderr}"
    );
    assert!(!stderr.contains("of 100000 x"), "{stderr}");
    assert!(stderr.contains("each of 2 micro-batches of "), "{stderr}");
    let second = one_json(&out)["run_dir"].as_str().unwrap().to_owned();
    assert!(
        second > first_dir,
        "{second} should be newer than {first_dir}"
    );

    let out = fx.codex(&["eval", "latest", "--json", "-q"], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let eval = one_json(&out);
    assert_eq!(
        eval["checkpoint"],
        format!("{second}/checkpoints/step-{:08}", STEPS / 2),
        "{eval}"
    );
    assert_eq!(eval["data"], Value::Null);
    assert!(eval["tokens"].as_u64().unwrap() > 0 && eval["accuracy"].as_f64().unwrap() <= 1.0);

    let gen = [
        "generate",
        "latest",
        "--prompt",
        "fn ",
        "--max-tokens",
        "5",
        "--temperature",
        "0",
    ];
    let out = fx.codex(&[&gen[..], &["--json"]].concat(), &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let generated = one_json(&out);
    let text = generated["text"].as_str().unwrap();
    assert_eq!(
        text,
        format!("fn {}", generated["completion"].as_str().unwrap())
    );
    assert!(generated["tokens"].as_u64().unwrap() <= 5, "{generated}");
    assert_eq!(generated["seed"], 7);
    let plain = fx.codex(&gen, &[]);
    assert_eq!(String::from_utf8_lossy(&plain.stdout), format!("{text}\n"));

    let out = fx.codex(&["verify", "latest", "--json"], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let verified = one_json(&out);
    assert_eq!(verified["path"], second, "{verified}");
    assert_eq!(verified["corrupt"], 0, "{verified}");
    let listed = verified["checkpoints"].as_array().unwrap().clone();
    assert!(
        listed
            .iter()
            .any(|c| c["step"] == STEPS / 2 && c["valid"] == true),
        "{verified}"
    );
    let oldest = listed.iter().min_by_key(|c| c["step"].as_u64()).unwrap()["path"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(
        oldest,
        format!("{second}/checkpoints/step-{:08}", STEPS / 2)
    );
    flip_byte(&fx.path(&oldest).join("model.safetensors"));
    let out = fx.codex(&["verify", "latest", "--json"], &[]);
    assert_eq!(out.status.code(), Some(1));
    let verified = one_json(&out);
    assert_eq!(verified["corrupt"], 1, "{verified}");
    let entry = verified["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["path"] == oldest.as_str())
        .cloned()
        .unwrap();
    assert_eq!(entry["valid"], false, "{verified}");
    assert!(
        entry["problem"]
            .as_str()
            .unwrap()
            .contains("model.safetensors"),
        "{entry}"
    );

    // `resume latest` continues the newest run, to the end of the first one's length.
    let full = format!("train.max_steps={STEPS}");
    let out = fx.codex(&["resume", "latest", "--set", &full, "--json"], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "latest: run {second} (the newest with a checkpoint)"
        )),
        "{stderr}"
    );
    let resumed = one_json(&out);
    assert_eq!(resumed["run_dir"], second, "{resumed}");
    assert_eq!(resumed["steps"], STEPS, "{resumed}");
}

/// What a scheduler does: `timeout --signal=TERM`, as Slurm, Kubernetes or systemd would,
/// ends a long run with a checkpoint at the step it stopped after, exit code 143 and a `--json`
/// document that says so; the run then continues from there. The signal comes after 15 s, so
/// that even a loaded machine has started training by then.
#[test]
fn a_run_under_timeout_signal_term_stops_with_a_checkpoint_and_continues() {
    let fx = Fixture::new("constant", "");
    let out = std::process::Command::new("timeout")
        .current_dir(fx.path(""))
        .args([
            "--preserve-status",
            "--signal=TERM",
            "--kill-after=60",
            "15",
        ])
        .arg(codex_ml_path())
        .args(["run", "tiny.ron", "--run-dir", "scheduled", "-q", "--json"])
        .args(["--set", "train.max_steps=10000000"])
        .env("CODEX_ML_CACHE", token_cache())
        .env_remove("RUST_LOG")
        .output()
        .expect("run timeout");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(143), "{stderr}");
    let stopped = one_json(&out);
    assert_eq!(stopped["status"], "stopped", "{stopped}");
    assert_eq!(stopped["signal"], "SIGTERM", "{stopped}");
    let steps = stopped["steps"].as_u64().expect("steps");
    assert!(steps > 0, "{stopped}\n{stderr}");
    let checkpoint = format!("scheduled/checkpoints/step-{steps:08}");
    assert_eq!(stopped["last_checkpoint"], checkpoint.as_str(), "{stopped}");
    fx.ok(&["verify", "scheduled"]);
    let status = status_of(&fx, "scheduled");
    assert_eq!(status["status"], "interrupted", "{status}");
    assert_eq!(status["signal"], "SIGTERM", "{status}");
    assert_eq!(status["step"], steps, "{status}");
    let log = std::fs::read_to_string(fx.path("scheduled/log.txt")).expect("log.txt");
    assert!(
        log.trim_end()
            .ends_with(&format!("stopped by SIGTERM after step {steps}")),
        "{log}"
    );
    let more = format!("train.max_steps={}", steps + 2);
    let stderr = fx.ok(&["resume", "scheduled", "--set", &more]);
    assert!(
        stderr.contains(&format!("finished {} steps", steps + 2)),
        "{stderr}"
    );
}

/// `status.json` of a run directory.
fn status_of(fx: &Fixture, run: &str) -> Value {
    let path = fx.path(run).join("status.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("status.json is JSON")
}

/// A finished run and a failed one each leave a directory that says how the run ended, and a
/// `log.txt` that holds its steps, validations and checkpoints under `-q` and ends with the
/// outcome (the interrupted run is the `timeout` test's).
#[test]
fn the_run_directory_says_how_the_run_ended() {
    let fx = Fixture::new("constant", "");
    fx.straight("finished");
    let status = status_of(&fx, "finished");
    assert_eq!(status["status"], "finished", "{status}");
    assert_eq!(status["step"], STEPS, "{status}");
    assert_eq!(status["error"], Value::Null, "{status}");
    assert_eq!(
        status["last_checkpoint"],
        format!("checkpoints/step-{STEPS:08}"),
        "{status}"
    );
    assert!(
        status["ended_unix"].as_f64() >= status["started_unix"].as_f64(),
        "{status}"
    );
    assert!(status["tokens_seen"].as_u64().unwrap() > 0, "{status}");
    let records = records(&fx.path("finished"));
    let last = |split: &str, name: &str| {
        records
            .iter()
            .rev()
            .find(|r| r.1 == split && r.2 == name)
            .map(|r| f64::from_bits(r.3))
            .expect("a record")
    };
    assert_eq!(status["final_metrics"]["train/loss"], last("train", "loss"));
    assert_eq!(status["final_metrics"]["val/loss"], last("val", "loss"));
    assert_eq!(
        status["tokens_seen"].as_f64(),
        Some(last("train", "tokens_seen"))
    );
    let best = records
        .iter()
        .filter(|r| r.1 == "val" && r.2 == "loss")
        .map(|r| f64::from_bits(r.3))
        .fold(f64::INFINITY, f64::min);
    assert_eq!(status["best_val_loss"], best, "{status}");
    // System metrics at every record step, with plausible values.
    let text = std::fs::read_to_string(fx.path("finished/metrics.ndjson")).expect("records");
    let sys: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("json"))
        .filter(|v| v["split"] == "sys" && v["step"] == STEPS)
        .collect();
    let at = |name: &str| {
        sys.iter()
            .find(|v| v["name"] == name)
            .and_then(|v| v["value"].as_f64())
            .unwrap_or_else(|| panic!("no sys/{name} at step {STEPS}: {sys:?}"))
    };
    assert!(at("cpu_percent") >= 0.0);
    assert!(at("rss_mib") > 1.0 && at("peak_rss_mib") >= at("rss_mib"));
    let parts = at("forward_ms") + at("backward_ms") + at("optimizer_ms");
    assert!(at("forward_ms") > 0.0 && at("backward_ms") > 0.0 && at("optimizer_ms") > 0.0);
    assert!(at("step_ms") >= parts - 1e-6, "{sys:?}");
    assert_eq!(
        status["final_metrics"]["sys/step_ms"],
        at("step_ms"),
        "{status}"
    );
    let best_checkpoint = status["best_checkpoint"]
        .as_str()
        .expect("a best checkpoint");
    assert!(
        fx.path("finished").join(best_checkpoint).is_dir(),
        "{status}"
    );
    let log = std::fs::read_to_string(fx.path("finished/log.txt")).expect("log.txt");
    for line in [
        &format!("step {STEPS}/{STEPS} loss"),
        "validation loss",
        "checkpoint: ",
    ] {
        assert!(
            log.contains(line),
            "no `{line}` in log.txt under -q:\n{log}"
        );
    }
    assert!(
        log.trim_end().ends_with(&format!("finished {STEPS} steps")),
        "{log}"
    );

    let out = fx.codex(
        &["run", "tiny.ron", "--run-dir", "failed", "-q"],
        &[("CODEX_ML_TEST_RECORD_FULL_AFTER", "2500")],
    );
    assert_eq!(out.status.code(), Some(1));
    let status = status_of(&fx, "failed");
    assert_eq!(status["status"], "failed", "{status}");
    let error = status["error"].as_str().expect("an error");
    assert!(
        error.contains("metrics.ndjson, the run's record, could not be written"),
        "{status}"
    );
    assert!(status["step"].as_u64().unwrap() < STEPS, "{status}");
    let log = std::fs::read_to_string(fx.path("failed/log.txt")).expect("log.txt");
    let last_line = log.trim_end().lines().last().unwrap_or_default();
    assert!(
        last_line.contains("the run failed: ") && last_line.contains("metrics.ndjson"),
        "{log}"
    );
}
