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
    static ROGUE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
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
        "rogue" => {
            ROGUE.get_or_init(|| build_guest("tests/fixtures/wasm/rogue", "wasm_rogue_sink.wasm"))
        }
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

/// `data.txt` and `exp.ron`, a tiny model trained for [`STEPS`] steps with `sinks`, in `dir`.
fn write_experiment(dir: &Path, sinks: &str) {
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
    std::fs::write(dir.join("data.txt"), text).expect("data");
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
    std::fs::write(dir.join("exp.ron"), config).expect("config");
}

/// Train a tiny model for [`STEPS`] steps with `sinks` (RON list entries) and the manifest
/// `plugins`, plus `args`; the run must succeed whatever the plugins do.
fn train(sinks: &str, plugins: &[Plugin<'_>], args: &[&str], env: &[(&str, &str)]) -> Run {
    let dir = tempfile::tempdir().expect("temp dir");
    write_experiment(dir.path(), sinks);
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
fn a_failure_is_blamed_on_the_guest_call_that_failed() {
    // The guest fails in `write`; the hub learns of it on its next call (a flush, or the
    // next write), which must not be the call the warning names.
    let (_run, warning) = hostile(r#"(mode: "loop")"#, "limits: (call_timeout_ms: 100)");
    assert_contains(&warning, "`write` ran longer than its time limit");
    assert!(!warning.contains("flush failed"), "{warning}");
    assert!(!warning.contains("write failed"), "{warning}");
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
    let warning = wrong_kind_warning(fixture);
    assert_contains(&warning, expect);
    // Refused when it was loaded, and said so: not blamed on the first record.
    assert_contains(&warning, "wasm plugin `odd` cannot be loaded: ");
    assert!(!warning.contains("write failed"), "{warning}");
}

fn wrong_kind_warning(fixture: &str) -> String {
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
    run.disabled_warning("odd").to_owned()
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

// --- The rogue guest: what surrounds the sandbox rather than its limits. ---

/// The manifest entry's limits and capabilities for the rogue guest: `limits`, and
/// `capabilities` besides the variables that make it sleep.
fn rogue_rest(limits: &str, capabilities: &str) -> String {
    format!(
        "limits: ({limits}), capabilities: (env: [\"ROGUE_SLEEP_IN\", \"ROGUE_SLEEP_MS\"], \
         {capabilities})"
    )
}

/// The rogue guest under `rest` (see [`rogue_rest`]).
fn rogue(rest: &str) -> Plugin<'_> {
    Plugin {
        name: "rogue",
        path: guest("rogue"),
        rest,
    }
}

/// `codex-ml list --manifest` over `plugins`, with `env`; the output and how long it took.
fn list(
    plugins: &[Plugin<'_>],
    args: &[&str],
    env: &[(&str, &str)],
) -> (std::process::Output, std::time::Duration) {
    let dir = tempfile::tempdir().expect("temp dir");
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
    let manifest = dir.path().join("plugins.ron");
    std::fs::write(&manifest, format!("(plugins: [\n{entries}])")).expect("manifest");
    let mut cmd = codex_ml();
    cmd.arg("list").arg("--manifest").arg(&manifest).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let start = std::time::Instant::now();
    let output = cmd.output().expect("list");
    (output, start.elapsed())
}

/// Bytes a terminal would act on rather than show: ESC, a right-to-left override, an isolate.
fn assert_inert(text: &str) {
    for bad in ['\u{1b}', '\u{202e}', '\u{2066}', '\u{2067}', '\u{7}'] {
        assert!(!text.contains(bad), "{bad:?} reached the output:\n{text}");
    }
    assert!(
        !text
            .lines()
            .any(|l| l.trim_start().starts_with("FORGED LINE")),
        "a forged line reached the output:\n{text}"
    );
}

#[test]
fn a_guest_without_the_clock_grant_cannot_sleep_in_any_call() {
    for call in ["init", "write", "flush", "finish"] {
        let start = std::time::Instant::now();
        let run = train(
            r#"(name: "rogue")"#,
            &[rogue(&rogue_rest("call_timeout_ms: 200", ""))],
            &[],
            &[("ROGUE_SLEEP_IN", call)],
        );
        // The guest asks for 60 s; the run does not wait for it.
        assert!(
            start.elapsed().as_secs() < 40,
            "{call}: {:?}",
            start.elapsed()
        );
        let warning = run.disabled_warning("rogue");
        assert_contains(warning, &format!("`{call}` tried to wait on the clock"));
        assert_contains(warning, "capabilities.clock");
    }
}

#[test]
fn a_guest_without_the_clock_grant_cannot_sleep_while_it_is_listed() {
    for call in ["name", "version"] {
        let (out, took) = list(
            &[rogue(&rogue_rest("call_timeout_ms: 200", ""))],
            &["--kind", "plugin"],
            &[("ROGUE_SLEEP_IN", call)],
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        assert!(took.as_secs() < 20, "{call}: list took {took:?}");
        assert_contains(&text, "cannot be loaded");
        assert_contains(&text, &format!("`{call}` tried to wait on the clock"));
    }
}

#[test]
fn a_guest_with_the_clock_grant_waits_no_longer_than_its_call_limit() {
    // Asleep while being described: `list` waits about the limit, not the 60 s asked for.
    let (out, took) = list(
        &[rogue(&rogue_rest("call_timeout_ms: 300", "clock: true"))],
        &["--kind", "plugin"],
        &[("ROGUE_SLEEP_IN", "name")],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(took.as_secs() < 20, "list took {took:?}");
    assert_contains(
        &text,
        "`name` waited past its time limit of 300 ms per call",
    );

    // Asleep in `init` and in `write`: the run starts and trains on without the sink.
    for call in ["init", "write"] {
        let start = std::time::Instant::now();
        let run = train(
            r#"(name: "rogue")"#,
            &[rogue(&rogue_rest("call_timeout_ms: 300", "clock: true"))],
            &[],
            &[("ROGUE_SLEEP_IN", call)],
        );
        assert!(
            start.elapsed().as_secs() < 40,
            "{call}: {:?}",
            start.elapsed()
        );
        assert_contains(
            run.disabled_warning("rogue"),
            &format!("`{call}` waited past its time limit of 300 ms per call"),
        );
    }
}

fn refused_grant(entries: &str, expect: &[&str]) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = guest("summary").display().to_string();
    let manifest = dir.path().join("plugins.ron");
    std::fs::write(
        &manifest,
        format!(
            "(plugins: [{}])",
            entries.replace("GUEST", &format!("{path:?}"))
        ),
    )
    .expect("manifest");
    write_experiment(dir.path(), "");
    for args in [&["list"][..], &["run", "exp.ron"][..]] {
        let out = codex_ml()
            .current_dir(dir.path())
            .args(args)
            .arg("--manifest")
            .arg(&manifest)
            .output()
            .expect("codex-ml");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        for part in expect {
            assert_contains(&stderr, part);
        }
    }
}

#[test]
fn an_output_grant_may_not_name_a_file_the_host_writes() {
    for (path, what) in [
        ("metrics.ndjson", "the run's record of metrics"),
        ("./config.ron", "the run's resolved config"),
        ("checkpoints", "the checkpoints directory"),
        (
            "checkpoints/step-00000010/model.safetensors",
            "the checkpoints directory",
        ),
        ("log.txt", "the run's log"),
        ("tokenizer.json", "the run's tokenizer"),
    ] {
        refused_grant(
            &format!(
                "(name: \"summary\", origin: wasm, path: GUEST, \
                 capabilities: (output_file: (path: {path:?})))"
            ),
            &[
                "plugins[0].capabilities.output_file.path",
                &format!("`{path}` names {what}, which codex-ml writes in the run directory"),
            ],
        );
    }
}

#[test]
fn two_plugins_may_not_share_an_output_file() {
    refused_grant(
        r#"(name: "one", origin: wasm, path: GUEST,
            capabilities: (output_file: (path: "reports/summary.md"))),
           (name: "two", origin: wasm, path: GUEST,
            capabilities: (output_file: (path: "./reports/summary.md")))"#,
        &[
            "plugins[1].capabilities.output_file.path",
            "is also granted to plugin `one`",
        ],
    );
    // Nor write inside the other's directory.
    refused_grant(
        r#"(name: "one", origin: wasm, path: GUEST,
            capabilities: (output_file: (path: "reports"))),
           (name: "two", origin: wasm, path: GUEST,
            capabilities: (output_file: (path: "reports/two.md")))"#,
        &["is also granted to plugin `one`"],
    );
}

#[test]
fn guest_names_are_printed_inert_in_text_and_in_json() {
    let (out, _) = list(&[rogue(&rogue_rest("", ""))], &["--kind", "plugin"], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert_inert(&text);
    assert_contains(&text, r"rogue\u{1b}[31mred");

    let (out, _) = list(&[rogue(&rogue_rest("", ""))], &["--json"], &[]);
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).expect("json");
    let row = rows
        .iter()
        .find(|r| r["kind"] == "plugin" && r["name"] == "rogue")
        .expect("rogue row");
    let name = row["component"]["sink_name"].as_str().expect("a name");
    assert!(name.starts_with("rogue"), "{name}");
    assert!(!name.contains('\u{1b}') && !name.contains('\n'), "{name:?}");
}

#[test]
fn guest_log_lines_are_escaped_and_cut_before_they_are_copied() {
    let forty_mib = (40 << 20).to_string();
    let params = format!(r#"(name: "rogue", params: (mode: "log", bytes: {forty_mib}))"#);
    let run = train(
        &params,
        &[rogue(&rogue_rest("memory_mib: 256", "log_lines: 10"))],
        &[],
        &[],
    );
    assert!(!run.stderr.contains("disabled"), "{}", run.stderr);
    assert_inert(&run.stderr);
    assert_contains(
        &run.stderr,
        r"[rogue] line one\u{1b}[31mred\u{1b}[0m\nFORGED LINE \u{202e}",
    );
    assert_contains(
        &run.stderr,
        r"\u{202e}gnp.exe\u{202c} and \u{2067}isolate\u{2069} and bell\u{7}",
    );
    assert_contains(&run.stderr, "(cut, 41943040 bytes in all)");
    let longest = run.stderr.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 4096, "a log line of {longest} bytes");
    let log = std::fs::read_to_string(run.run_dir().join("log.txt")).expect("log.txt");
    assert_inert(&log);
    assert_contains(&log, "(cut, 41943040 bytes in all)");
}

#[test]
fn guest_errors_cannot_forge_lines() {
    let run = train(
        r#"(name: "rogue", params: (mode: "error"))"#,
        &[rogue(&rogue_rest("", ""))],
        &[],
        &[],
    );
    assert_inert(&run.stderr);
    let warning = run.disabled_warning("rogue");
    assert_contains(warning, r"`write` returned an error: refused\u{1b}[31mred");
    assert_contains(warning, r"\nWARN codex_host: all good");
    assert!(
        !run.stderr
            .lines()
            .any(|l| l.starts_with("WARN codex_host: all good")),
        "{}",
        run.stderr
    );
    let log = std::fs::read_to_string(run.run_dir().join("log.txt")).expect("log.txt");
    assert_inert(&log);
}

#[test]
fn the_example_manifest_in_configs_loads_every_example_plugin() {
    // A copy of the repository's layout, as far as the manifest and the demo look: the plugins
    // where the documented build commands put them, and some Rust sources to train on.
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path();
    let configs = root.join("configs");
    std::fs::create_dir_all(&configs).expect("configs");
    for file in ["plugins.ron", "plugins-demo.ron"] {
        std::fs::copy(repo().join("configs").join(file), configs.join(file)).expect(file);
    }
    let release = root.join("target/release");
    std::fs::create_dir_all(&release).expect("target/release");
    for package in ["native-llama", "native-lion", "native-tsv-sink"] {
        let built = crate::native::plugin(root, package);
        let name = built.file_name().expect("a file name");
        std::fs::rename(&built, release.join(name)).expect("move the plugin");
    }
    for (which, crate_dir, file) in [
        ("summary", "wasm-summary-sink", "wasm_summary_sink.wasm"),
        ("alert", "wasm-alert-sink", "wasm_alert_sink.wasm"),
    ] {
        let to = root
            .join("plugins/examples")
            .join(crate_dir)
            .join("target/wasm32-wasip2/release");
        std::fs::create_dir_all(&to).expect("wasm target dir");
        std::fs::copy(guest(which), to.join(file)).expect("copy the guest");
    }
    for source in ["greet.rs", "window.rs"] {
        std::fs::copy(
            repo().join("tests/fixtures/data/code").join(source),
            root.join("plugins").join(source),
        )
        .expect("data");
    }

    let out = codex_ml()
        .current_dir(root)
        .args(["list", "--manifest", "configs/plugins.ron", "--json"])
        .output()
        .expect("list");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).expect("json");
    let plugins: Vec<(&str, &str)> = rows
        .iter()
        .filter(|r| r["kind"] == "plugin")
        .map(|r| {
            (
                r["name"].as_str().unwrap_or_default(),
                r["status"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        plugins,
        [
            ("llama", "loaded"),
            ("lion", "loaded"),
            ("tsv", "loaded"),
            ("summary", "compiled and checked"),
            ("alert", "compiled and checked"),
        ]
    );

    // The demo experiment runs with them.
    let out = codex_ml()
        .current_dir(root)
        .args([
            "run",
            "configs/plugins-demo.ron",
            "--manifest",
            "configs/plugins.ron",
            "--run-dir",
            "run",
            "--set",
            "train.max_steps=3",
            "--set",
            "train.seq_len=32",
        ])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("disabled"), "{stderr}");
    let summary = std::fs::read_to_string(root.join("run/summary/summary.md"))
        .unwrap_or_else(|e| panic!("summary: {e}\n{stderr}"));
    assert!(summary.starts_with("# Plugins demo\n"), "{summary}");
    assert!(root.join("run/metrics.tsv").exists(), "{stderr}");
}
