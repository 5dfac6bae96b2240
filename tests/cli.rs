//! The `codex-ml` binary: help text, exit codes and `codex-ml list`.
//!
//! The binary is built by [`codex_tests::codex_ml`] on first use. The registry linked into
//! this test binary is the oracle for what `list` must show: both link the same built-in
//! crates.

use std::collections::BTreeSet;
use std::path::PathBuf;

use codex_host::plugins::registry::Registry;
use codex_plugin_api::ComponentKind;
use predicates::prelude::*;
use serde_json::Value;

pub(crate) use codex_tests::codex_ml;

fn stdout_of(args: &[&str]) -> String {
    let output = codex_ml()
        .args(args)
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    String::from_utf8(output).expect("utf-8 output")
}

fn json_of(args: &[&str]) -> Vec<Value> {
    let text = stdout_of(args);
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Array(rows)) => rows,
        other => panic!(
            "`codex-ml {}` printed no JSON array: {other:?}\n{text}",
            args.join(" ")
        ),
    }
}

fn builtins() -> Registry {
    Registry::with_builtins().unwrap_or_else(|e| panic!("{e}"))
}

/// `(kind, [names])` for each group of the human listing.
fn groups(text: &str) -> Vec<(String, Vec<String>)> {
    text.split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .map(|block| {
            let mut lines = block.lines();
            let header = lines.next().unwrap_or_default();
            let kind = header
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned();
            let names = lines
                .filter(|l| {
                    l.starts_with("  ") && !l.starts_with("   ") && !l.trim_start().starts_with('(')
                })
                .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
                .collect();
            (kind, names)
        })
        .collect()
}

#[test]
fn list_groups_every_component_by_kind() {
    let registry = builtins();
    let listed = groups(&stdout_of(&["list"]));
    let kinds: Vec<&str> = listed.iter().map(|(k, _)| k.as_str()).collect();
    let all: Vec<&str> = ComponentKind::ALL.iter().map(|k| k.as_str()).collect();
    assert_eq!(kinds, all, "one group per kind, in order");
    for (kind, names) in &listed {
        let kind = ComponentKind::parse(kind).expect("a component kind");
        let expected: Vec<&str> = registry.of_kind(kind).map(|e| e.name.as_str()).collect();
        assert_eq!(names, &expected, "{}", kind.as_str());
    }
}

#[test]
fn list_json_has_every_field() {
    let rows = json_of(&["list", "--json"]);
    let mut seen = BTreeSet::new();
    for row in &rows {
        for field in [
            "kind",
            "name",
            "origin",
            "source",
            "path",
            "version",
            "api_version",
            "description",
            "status",
        ] {
            assert!(row.get(field).is_some(), "`{field}` missing from {row}");
        }
        assert_eq!(row["origin"], "built-in", "{row}");
        assert_eq!(row["status"], "registered", "{row}");
        assert!(
            row["api_version"].is_string() && row["version"].is_string(),
            "{row}"
        );
        let kind = row["kind"].as_str().unwrap_or_default().to_owned();
        let name = row["name"].as_str().unwrap_or_default().to_owned();
        seen.insert((kind, name));
    }
    let expected: BTreeSet<(String, String)> = builtins()
        .entries()
        .map(|e| (e.kind.as_str().to_owned(), e.name.clone()))
        .collect();
    assert_eq!(seen, expected);
}

#[test]
fn list_kind_filters() {
    let listed = groups(&stdout_of(&["list", "--kind", "model"]));
    let kinds: Vec<&str> = listed.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(kinds, ["model"]);
    for row in json_of(&["list", "--kind", "sink", "--json"]) {
        assert_eq!(row["kind"], "sink", "{row}");
    }
}

#[test]
fn list_unknown_kind_is_a_usage_error() {
    codex_ml()
        .args(["list", "--kind", "modle"])
        .assert()
        .code(2)
        .stdout("")
        .stderr(
            predicate::str::contains("modle").and(predicate::str::contains(
                "tokenizer, model, optimizer, sink, tracker, trainer, kernel, plugin",
            )),
        );
}

/// A manifest declaring one wasm plugin whose file is not a component, in a temporary directory.
fn manifest_fixture() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("sink.wasm"), b"wasm").expect("wasm");
    let manifest = dir.path().join("plugins.ron");
    std::fs::write(
        &manifest,
        r#"(plugins: [
    (name: "sink", origin: wasm, path: "sink.wasm", limits: (memory_mib: 16),
     capabilities: (log_lines: 50, clock: true)),
])"#,
    )
    .expect("manifest");
    (dir, manifest)
}

/// A wasm plugin that cannot be loaded does not fail `list` (a run naming it warns and trains
/// on): it is listed with the reason, its limits and its grants.
#[test]
fn list_shows_an_unloadable_wasm_plugin_with_its_reason_and_grants() {
    let (_dir, manifest) = manifest_fixture();
    let manifest = manifest.to_str().expect("utf-8 path");
    let text = stdout_of(&["list", "--manifest", manifest, "--kind", "plugin"]);
    assert!(text.starts_with("plugin (declared in"), "{text}");
    assert!(text.contains("sink") && text.contains("wasm"), "{text}");
    assert!(text.contains("component: cannot be loaded"), "{text}");
    assert!(
        text.contains("memory 16 MiB") && text.contains("50 log lines; clock"),
        "{text}"
    );

    let rows = json_of(&["list", "--manifest", manifest, "--json"]);
    let plugins: Vec<&Value> = rows.iter().filter(|r| r["kind"] == "plugin").collect();
    assert_eq!(plugins.len(), 1);
    let sink = plugins[0];
    assert_eq!(sink["origin"], "wasm");
    assert_eq!(sink["status"], "cannot be loaded");
    assert_eq!(sink["sha256"].as_str().map(str::len), Some(64));
    assert_eq!(sink["sha256_pinned"], false);
    assert_eq!(sink["component"]["loads"], false);
    assert_eq!(sink["limits"]["memory_mib"], 16);
    assert_eq!(sink["limits"]["call_timeout_ms"], 1000);
    assert_eq!(sink["capabilities"]["clock"], true);
    assert_eq!(sink["capabilities"]["env"], Value::Array(vec![]));
    let registered = rows
        .iter()
        .find(|r| r["kind"] == "sink" && r["name"] == "sink")
        .expect("the sink is registered under the plugin's name");
    assert_eq!(registered["origin"], "wasm");
}

#[test]
fn list_with_a_bad_manifest_exits_2_with_the_position() {
    let dir = tempfile::tempdir().expect("temp dir");
    let manifest = dir.path().join("plugins.ron");
    std::fs::write(&manifest, "(plugins: [(name: \"x\", orign: native)])").expect("manifest");
    codex_ml()
        .args(["list", "--manifest"])
        .arg(&manifest)
        .assert()
        .code(2)
        .stdout("")
        .stderr(
            predicate::str::starts_with("error: invalid plugin manifest")
                .and(predicate::str::contains(format!(
                    "{}:1:24: plugins[0].orign",
                    manifest.display()
                )))
                .and(predicate::str::contains("did you mean `origin`?")),
        );
}

#[test]
fn help_for_each_command_mentions_its_arguments() {
    for (command, mentions) in [
        ("list", &["--kind", "--json", "--manifest"][..]),
        (
            "run",
            &["CONFIG", "--set", "PATH=VALUE", "--run-dir", "--manifest"][..],
        ),
        (
            "eval",
            &["RUN_OR_CHECKPOINT", "--data", "FILE_OR_GLOB", "--batches"][..],
        ),
        (
            "generate",
            &[
                "RUN_OR_CHECKPOINT",
                "--prompt",
                "--max-tokens",
                "--temperature",
                "--top-k",
                "--top-p",
                "--seed",
            ][..],
        ),
        (
            "bench",
            &[
                "--config",
                "tiny",
                "small",
                "medium",
                "all",
                "--precision",
                "bf16",
                "f16",
                "--profile",
                "--warmup",
                "--windows",
                "--steps",
                "--threads",
            ][..],
        ),
    ] {
        let text = stdout_of(&[command, "--help"]);
        for mention in mentions {
            assert!(
                text.contains(mention),
                "`codex-ml {command} --help` does not mention {mention}:\n{text}"
            );
        }
        assert!(
            text.contains("--verbose") && text.contains("--quiet"),
            "{command}: global flags"
        );
    }
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &[][..],
        &["frobnicate"][..],
        &["-v", "-q", "list"][..],
        &["run"][..],
        &["run", "c.ron", "--set", "no-equals-sign"][..],
        &["generate", "run-dir"][..],
        &["generate", "run-dir", "--prompt", "x", "--top-p", "2"][..],
        &["bench", "--precision", "fp8"][..],
        &["bench", "--precision", "bf16", "--no-kernel"][..],
        &["bench", "--precision", "f16", "--no-kernel"][..],
    ] {
        codex_ml()
            .args(args)
            .assert()
            .code(2)
            .stderr(predicate::str::is_empty().not());
    }
}

#[test]
fn version_and_verbosity_flags_work() {
    codex_ml()
        .arg("--version")
        .assert()
        .success()
        .stdout(predicate::str::starts_with("codex-ml "));
    codex_ml().args(["-vv", "list"]).assert().success();
    codex_ml().args(["list", "-q"]).assert().success();
}

/// A component's parameters are checked with the config, before any data is read or any run
/// directory made: a misspelt one is named at its line and column in the user's file (or by
/// the `--set` that gave it), with exit code 2.
#[test]
fn bad_component_parameters_are_config_errors_at_their_place() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.ron");
    std::fs::write(
        &config,
        r#"(
    experiment: "params",
    // No such data: the parameters must be refused before the data is looked for.
    data: (train: [Text(paths: ["missing/**/*.rs"])]),
    tokenizer: (name: "bytes"),
    model: (name: "gpt2", params: (n_layer: 1, n_emb: 32)),
    optimizer: (name: "adamw", lr: 1e-3, params: (betas: [0.9, "high"])),
    train: (max_steps: 1),
    sinks: [(name: "csv", params: (file: "../outside.csv"))],
)"#,
    )
    .unwrap();
    let run = |sets: &[&str]| {
        let mut cmd = codex_ml();
        cmd.current_dir(dir.path()).arg("run").arg("bad.ron");
        for s in sets {
            cmd.arg("--set").arg(s);
        }
        let out = cmd.assert().code(2).get_output().stderr.clone();
        String::from_utf8(out).expect("utf-8")
    };
    let cases: [(&[&str], &str, &str); 5] = [
        (
            &[],
            "bad.ron:6:48: model.params.n_emb: unknown field `n_emb`",
            "^^^^^",
        ),
        (
            &["model.params=(n_layer: 1)"],
            "bad.ron:7:64: optimizer.params.betas[1]: invalid type: string \"high\", expected a number",
            "^",
        ),
        (
            &[
                "model.params=(n_layer: 1)",
                "optimizer.params.betas=[0.9, 0.95]",
            ],
            "bad.ron:9:35: sinks[0].params: invalid `file` for sink `csv`",
            "^",
        ),
        (
            // Checks across fields are the model's too, and made as early.
            &[
                "model.params=(n_layer: 1, n_embd: 30, n_head: 4)",
                "optimizer.params.betas=[0.9, 0.95]",
            ],
            "bad.ron: model.params.n_embd: must be divisible by n_head (4), found 30",
            "(value from --set model.params=",
        ),
        (
            &["model.params.dropout=0.1"],
            "bad.ron: model.params.dropout: unknown field `dropout`",
            "(value from --set model.params.dropout=0.1)",
        ),
    ];
    for (sets, first_line, also) in cases {
        let stderr = run(sets);
        assert!(
            stderr.starts_with(&format!("error: {first_line}")),
            "{sets:?}:\n{stderr}"
        );
        assert!(stderr.contains(also), "{sets:?}:\n{stderr}");
        assert!(
            !stderr.contains(" at line "),
            "a position in the host's JSON: {stderr}"
        );
    }
    assert!(
        !dir.path().join("runs").exists(),
        "a refused config made a run directory"
    );
}

/// A component that cannot be built from what the config names (a broken `tokenizer.json`) is
/// the user's to fix: exit 2, naming the component, and the run directory says it failed.
#[test]
fn a_component_that_cannot_be_built_from_its_files_is_an_input_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("broken.json"), "{\"model\": {\"type\": ").unwrap();
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/data/code/*");
    std::fs::write(
        dir.path().join("hf.ron"),
        format!(
            r#"(
    experiment: "hf",
    data: (train: [Text(paths: ["{}"])]),
    tokenizer: (name: "hf", params: (path: "broken.json")),
    model: (name: "gpt2", params: (n_layer: 1, n_head: 2, n_embd: 32, n_positions: 32)),
    optimizer: (name: "adamw", lr: 1e-3),
    train: (max_steps: 1, seq_len: 16, batch_size: 2),
)"#,
            data.display()
        ),
    )
    .unwrap();
    let out = codex_ml()
        .current_dir(dir.path())
        .args(["run", "hf.ron", "--run-dir", "hf-run", "--json"])
        .env("CODEX_ML_CACHE", codex_tests::token_cache())
        .assert()
        .code(2)
        .get_output()
        .clone();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("tokenizer `hf` (built-in")
            && stderr.contains("could not be created")
            && stderr.contains("broken.json: not a valid tokenizer.json"),
        "{stderr}"
    );
    let failure: Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!(failure["exit_code"], 2, "{failure}");
    let status: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("hf-run/status.json")).expect("status.json"),
    )
    .unwrap();
    assert_eq!(status["status"], "failed", "{status}");
}

#[test]
fn malformed_configs_get_short_errors_in_plain_words() {
    let dir = tempfile::tempdir().unwrap();
    let deep = format!("{}{}", "[".repeat(50_000), "]".repeat(50_000));
    let files = [
        ("number.ron", "5".to_owned()),
        ("list.ron", "[1, 2, 3]".to_owned()),
        ("named.ron", "Config(experiment: \"x\")".to_owned()),
        (
            "deep.ron",
            format!("(experiment: \"x\", model: (name: \"gpt2\", params: (a: {deep})))"),
        ),
        (
            "long.ron",
            format!("(experiment: \"{}\", seed: \"x\")", "e".repeat(100_000)),
        ),
    ];
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
        let out = codex_ml()
            .current_dir(dir.path())
            .args(["run", name])
            .assert()
            .code(2)
            .get_output()
            .stderr
            .clone();
        let stderr = String::from_utf8(out).expect("utf-8");
        assert!(stderr.starts_with(&format!("error: {name}:1:")), "{stderr}");
        assert!(
            stderr.len() < 1500,
            "{name}: {} bytes:\n{stderr}",
            stderr.len()
        );
        assert!(stderr.lines().count() <= 6, "{name}:\n{stderr}");
        for internal in [
            "Raw",
            "ron::",
            "recursion_limit",
            "serde_stacker",
            "u64",
            "struct ",
        ] {
            assert!(
                !stderr.contains(internal),
                "{name}: `{internal}` in:\n{stderr}"
            );
        }
    }
}
