//! Sandboxed WebAssembly sinks: the example guests and hostile ones, in real training runs
//! through the `codex-ml` binary and a plugin manifest.
//!
//! The guests are built here for `wasm32-wasip2` (once per test binary, into
//! `target/wasm-guests`, with their committed lock files); the guests of the wrong kind are WAT
//! fixtures. Every hostile case must end the same way: the sink disabled with one warning that
//! names it and the reason, and the run's own `metrics.ndjson` complete.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::Value;

use crate::cli::codex_ml;

const STEPS: u64 = 12;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `target/wasm-guests`, beside this test binary's profile directory.
fn guests_target() -> PathBuf {
    codex_tests::profile_dir()
        .parent()
        .map(|target| target.join("wasm-guests"))
        .expect("the profile directory lives in the target directory")
}

fn build_guest(crate_dir: &str, file: &str) -> Result<PathBuf, String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target = guests_target();
    let status = std::process::Command::new(cargo)
        .args([
            "build",
            "--quiet",
            "--locked",
            "--release",
            "--target",
            "wasm32-wasip2",
        ])
        .arg("--manifest-path")
        .arg(repo().join(crate_dir).join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target)
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err(format!(
            "building {crate_dir} for wasm32-wasip2 failed ({status}); is the target installed \
             (`rustup target add wasm32-wasip2`)?"
        ));
    }
    Ok(target.join("wasm32-wasip2/release").join(file))
}

fn guest(which: &str) -> PathBuf {
    static SUMMARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    static ALERT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    static HOSTILE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let built = match which {
        "summary" => SUMMARY.get_or_init(|| {
            build_guest(
                "plugins/examples/wasm-summary-sink",
                "wasm_summary_sink.wasm",
            )
        }),
        "alert" => ALERT.get_or_init(|| {
            build_guest("plugins/examples/wasm-alert-sink", "wasm_alert_sink.wasm")
        }),
        "hostile" => HOSTILE
            .get_or_init(|| build_guest("tests/fixtures/wasm/hostile", "wasm_hostile_sink.wasm")),
        other => panic!("no guest `{other}`"),
    };
    built.clone().unwrap_or_else(|e| panic!("{e}"))
}

/// A WAT fixture assembled into `dir`.
fn wat_fixture(dir: &Path, name: &str) -> PathBuf {
    let source = repo()
        .join("tests/fixtures/wasm")
        .join(format!("{name}.wat"));
    let bytes = wat::parse_file(&source).unwrap_or_else(|e| panic!("{}: {e}", source.display()));
    let out = dir.join(format!("{name}.wasm"));
    std::fs::write(&out, bytes).expect("write fixture");
    out
}

/// One plugin of a manifest: its name, file and the rest of the entry in RON.
struct Plugin<'a> {
    name: &'a str,
    path: PathBuf,
    rest: &'a str,
}

struct Run {
    dir: tempfile::TempDir,
    stderr: String,
}

impl Run {
    fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// The train-loss steps in `metrics.ndjson`, which must be every step.
    fn assert_ndjson_complete(&self) {
        let path = self.run_dir().join("metrics.ndjson");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}\n{}", path.display(), self.stderr));
        let steps: Vec<u64> = text
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("{l}: {e}")))
            .filter(|v| v["split"] == "train" && v["name"] == "loss")
            .filter_map(|v| v["step"].as_u64())
            .collect();
        assert_eq!(steps, (1..=STEPS).collect::<Vec<_>>(), "{}", self.stderr);
    }

    /// The one hub warning that disabled `sink`.
    fn disabled_warning(&self, sink: &str) -> &str {
        let marker = format!("metric sink `{sink}` disabled for the rest of the run");
        let lines: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| l.contains(&marker))
            .collect();
        assert_eq!(lines.len(), 1, "one warning for `{sink}`:\n{}", self.stderr);
        lines[0]
    }
}

/// Train a tiny model for [`STEPS`] steps with `sinks` (RON list entries) and the manifest
/// `plugins`, plus `args`; the run must succeed whatever the plugins do.
fn train(sinks: &str, plugins: &[Plugin<'_>], args: &[&str], env: &[(&str, &str)]) -> Run {
    let dir = tempfile::tempdir().expect("temp dir");
    let words = [
        "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog",
    ];
    let text: String = (0..400)
        .map(|i| {
            format!(
                "{} {} {}\n",
                words[i % 9],
                words[(i * 7) % 9],
                words[(i * 5) % 9]
            )
        })
        .collect();
    std::fs::write(dir.path().join("data.txt"), text).expect("data");
    let config = format!(
        r#"(
    experiment: "wasm",
    seed: 1,
    data: (train: [Text(paths: ["data.txt"])], val_fraction: 0.1),
    tokenizer: (name: "bytes"),
    model: (name: "gpt2", params: (n_layer: 1, n_head: 2, n_embd: 32, n_positions: 32)),
    optimizer: (name: "adamw", lr: 1e-3),
    train: (max_steps: {STEPS}, seq_len: 32, batch_size: 4, eval_every: 100, log_every: 1,
            checkpoint_every: 100),
    sinks: [{sinks}],
)"#
    );
    std::fs::write(dir.path().join("exp.ron"), config).expect("config");
    let entries: String = plugins
        .iter()
        .map(|p| {
            format!(
                "  (name: {:?}, origin: wasm, path: {:?}, {}),\n",
                p.name,
                p.path.display().to_string(),
                p.rest
            )
        })
        .collect();
    std::fs::write(
        dir.path().join("plugins.ron"),
        format!("(plugins: [\n{entries}])"),
    )
    .expect("manifest");
    let mut cmd = codex_ml();
    cmd.current_dir(dir.path())
        .args([
            "run",
            "exp.ron",
            "--manifest",
            "plugins.ron",
            "--run-dir",
            "run",
        ])
        .args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let output = cmd.output().expect("run codex-ml");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "the run failed:\n{stderr}");
    let run = Run { dir, stderr };
    run.assert_ndjson_complete();
    run
}

/// Run the hostile guest with `params` under `limits`/`capabilities` and return the warning
/// that disabled it, after checking the run is intact.
fn hostile(params: &str, rest: &str) -> (Run, String) {
    let run = train(
        &format!(r#"(name: "hostile", params: {params})"#),
        &[Plugin {
            name: "hostile",
            path: guest("hostile"),
            rest,
        }],
        &[],
        &[],
    );
    let warning = run.disabled_warning("hostile").to_owned();
    (run, warning)
}

fn assert_contains(text: &str, part: &str) {
    assert!(text.contains(part), "expected {part:?} in:\n{text}");
}

#[test]
fn example_sinks_summarise_and_alert_in_a_real_run() {
    let run = train(
        r#"(name: "summary", params: (title: "Tiny run")),
           (name: "alert", params: (spike_factor: 1.5))"#,
        &[
            Plugin {
                name: "summary",
                path: guest("summary"),
                rest: r#"capabilities: (output_file: (path: "reports/summary.md"))"#,
            },
            Plugin {
                name: "alert",
                path: guest("alert"),
                rest: "capabilities: (log_lines: 10)",
            },
        ],
        // A learning rate this high makes the loss jump in the first steps.
        &["--set", "optimizer.lr=5.0"],
        &[],
    );
    assert!(!run.stderr.contains("disabled"), "{}", run.stderr);
    let summary = std::fs::read_to_string(run.run_dir().join("reports/summary.md"))
        .unwrap_or_else(|e| panic!("summary: {e}\n{}", run.stderr));
    assert!(summary.starts_with("# Tiny run\n"), "{summary}");
    let loss_row = summary
        .lines()
        .find(|l| l.starts_with("| train | loss |"))
        .unwrap_or_else(|| panic!("no loss row:\n{summary}"));
    assert!(loss_row.ends_with(&format!("| {STEPS} |")), "{loss_row}");
    assert_contains(&run.stderr, "[alert] ALERT train/loss spiked to");

    // The plugin lock in metadata.json names each guest file with its digest.
    let metadata: serde_json::Value = serde_json::from_slice(
        &std::fs::read(run.run_dir().join("metadata.json")).expect("metadata.json"),
    )
    .expect("metadata is JSON");
    let locked = metadata["plugins"]
        .as_array()
        .expect("a plugin lock")
        .iter()
        .find(|p| p["name"] == "sink/summary")
        .unwrap_or_else(|| panic!("no sink/summary in {metadata}"));
    let digest = codex_host::fsio::sha256_file(&guest("summary")).expect("digest");
    assert_eq!(locked["sha256"], digest.as_str(), "{locked}");
}

#[test]
fn an_infinite_loop_is_stopped_by_the_call_time_limit() {
    let (_run, warning) = hostile(r#"(mode: "loop")"#, "limits: (call_timeout_ms: 100)");
    assert_contains(
        &warning,
        "ran longer than its time limit of 100 ms per call",
    );
    assert_contains(&warning, "limits.call_timeout_ms");
}

#[test]
fn an_infinite_loop_is_stopped_by_fuel_when_metered() {
    let (_run, warning) = hostile(r#"(mode: "loop")"#, "limits: (fuel: 1000000)");
    assert_contains(&warning, "ran out of fuel (1000000 per call)");
}

#[test]
fn a_memory_bomb_hits_the_memory_limit() {
    let (_run, warning) = hostile(r#"(mode: "memory")"#, "limits: (memory_mib: 16)");
    assert_contains(&warning, "tried to grow its memory past 16 MiB");
}

#[test]
fn runaway_recursion_is_a_contained_stack_overflow() {
    let (_run, warning) = hostile(r#"(mode: "recursion")"#, "");
    assert_contains(&warning, "stack");
}

#[test]
fn a_host_file_cannot_be_opened() {
    let secret = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(secret.path(), "host-only-content").expect("write");
    let params = format!(
        r#"(mode: "open-file", when: "init", path: {:?})"#,
        secret.path().display().to_string()
    );
    let (run, warning) = hostile(
        &params,
        r#"capabilities: (output_file: (path: "leak.txt"))"#,
    );
    assert_contains(&warning, "failed to start");
    assert_contains(&warning, "cannot open");
    assert!(!run.run_dir().join("leak.txt").exists());
    assert!(!run.stderr.contains("host-only-content"));
}

#[test]
fn environment_variables_are_hidden_unless_granted() {
    let env = [("CODEX_WASM_SECRET", "s3cret-value")];
    let params =
        r#"(name: "hostile", params: (mode: "env", when: "init", var: "CODEX_WASM_SECRET"))"#;
    let hidden = train(
        params,
        &[Plugin {
            name: "hostile",
            path: guest("hostile"),
            rest: r#"capabilities: (output_file: (path: "env.txt"))"#,
        }],
        &[],
        &env,
    );
    assert_contains(
        hidden.disabled_warning("hostile"),
        "cannot read $CODEX_WASM_SECRET",
    );
    assert!(!hidden.stderr.contains("s3cret-value"));

    let granted = train(
        params,
        &[Plugin {
            name: "hostile",
            path: guest("hostile"),
            rest: r#"capabilities: (output_file: (path: "env.txt"), env: ["CODEX_WASM_SECRET"])"#,
        }],
        &[],
        &env,
    );
    assert!(!granted.stderr.contains("disabled"), "{}", granted.stderr);
    let written = std::fs::read_to_string(granted.run_dir().join("env.txt")).expect("env.txt");
    assert_eq!(written, "s3cret-value");
}

#[test]
fn output_beyond_the_quota_is_cut_and_disables_the_sink() {
    let (run, warning) = hostile(
        r#"(mode: "quota", bytes: 100000)"#,
        r#"capabilities: (output_file: (path: "out.bin", quota_bytes: 10000))"#,
    );
    assert_contains(&warning, "went past its output quota of 10000 bytes");
    let size = std::fs::metadata(run.run_dir().join("out.bin"))
        .map(|m| m.len())
        .expect("out.bin");
    assert_eq!(size, 10000);
}

#[test]
fn output_without_a_grant_disables_the_sink() {
    let (_run, warning) = hostile(r#"(mode: "quota", bytes: 10)"#, "");
    assert_contains(&warning, "no output file is granted");
}

#[test]
fn a_trap_on_the_first_call_disables_the_sink() {
    let (_run, warning) = hostile(r#"(mode: "trap", when: "init")"#, "");
    assert_contains(&warning, "failed to start");
    assert_contains(&warning, "reached `unreachable`");
}

#[test]
fn an_error_returned_by_the_guest_disables_the_sink() {
    let (_run, warning) = hostile(r#"(mode: "error")"#, "");
    assert_contains(
        &warning,
        "`write` returned an error: hostile sink refusing on purpose",
    );
}

#[test]
fn a_slow_sink_misses_records_instead_of_stalling_training() {
    let run = train(
        r#"(name: "hostile", params: (mode: "slow", spins: 20000000))"#,
        &[Plugin {
            name: "hostile",
            path: guest("hostile"),
            rest: "limits: (queue_size: 1, call_timeout_ms: 60000)",
        }],
        &[],
        &[],
    );
    assert!(!run.stderr.contains("disabled"), "{}", run.stderr);
    assert_contains(
        &run.stderr,
        "wasm sink `hostile` fell 1 records behind and missed",
    );
}

fn wrong_kind(fixture: &str, expect: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = wat_fixture(dir.path(), fixture);
    let run = train(
        r#"(name: "odd")"#,
        &[Plugin {
            name: "odd",
            path,
            rest: "",
        }],
        &[],
        &[],
    );
    assert_contains(run.disabled_warning("odd"), expect);
}

#[test]
fn a_core_module_is_refused() {
    wrong_kind("core-module", "is a core wasm module, not a component");
}

#[test]
fn a_component_of_another_world_is_refused() {
    wrong_kind(
        "other-world",
        "is not a metric sink of world `codex:sink/metric-sink@0.1.0`",
    );
}

#[test]
fn a_component_for_another_interface_version_is_refused() {
    wrong_kind(
        "other-version",
        "is not a metric sink of world `codex:sink/metric-sink@0.1.0`",
    );
}

#[test]
fn list_shows_wasm_components_with_grants_and_limits() {
    let dir = tempfile::tempdir().expect("temp dir");
    let core = wat_fixture(dir.path(), "core-module");
    let manifest = dir.path().join("plugins.ron");
    std::fs::write(
        &manifest,
        format!(
            r#"(plugins: [
    (name: "summary", origin: wasm, path: {:?}, limits: (memory_mib: 32),
     capabilities: (output_file: (path: "summary.md", quota_bytes: 4096))),
    (name: "core", origin: wasm, path: {:?}),
])"#,
            guest("summary").display().to_string(),
            core.display().to_string()
        ),
    )
    .expect("manifest");
    let manifest = manifest.to_str().expect("utf-8 path");
    let out = codex_ml()
        .args(["list", "--manifest", manifest, "--kind", "plugin"])
        .output()
        .expect("list");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert_contains(&text, "memory 32 MiB");
    assert_contains(
        &text,
        "output file summary.md in the run directory (up to 4096 bytes)",
    );
    assert_contains(
        &text,
        "component: sink `summary` 0.1.0, world codex:sink/metric-sink@0.1.0",
    );
    assert_contains(&text, "component: cannot be loaded");

    let out = codex_ml()
        .args(["list", "--manifest", manifest, "--json"])
        .output()
        .expect("list");
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).expect("json");
    let summary = rows
        .iter()
        .find(|r| r["kind"] == "plugin" && r["name"] == "summary")
        .expect("summary row");
    assert_eq!(summary["component"]["loads"], true);
    assert_eq!(summary["component"]["sink_version"], "0.1.0");
    let core = rows
        .iter()
        .find(|r| r["kind"] == "plugin" && r["name"] == "core")
        .expect("core row");
    assert_eq!(core["component"]["loads"], false);
}
