//! Native plugins end to end, through the `codex-ml` binary: the example plugins
//! (`plugins/examples/native-*`) and the failure fixtures (`tests/fixtures/plugins/*`) are
//! built once with this test's profile and target directory, copied into each test's own
//! directory (other builds sharing the target directory may rewrite the originals), pinned by
//! sha256 in a manifest, listed, inspected and used in short training runs. The plugin model
//! (`native-llama`) is also loaded into this process, through the same loader and factory a run
//! uses, so that its causality and every gradient can be checked directly.
//!
//! Every failure must be an exit code of 1 or 2 with a message naming the plugin and the
//! problem: an abort or a signal would show up here as a missing exit code.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;

use codex_plugin_api::{ApiVersion, API_VERSION};
use serde_json::Value;

use codex_tests::{cargo_build, codex_ml, profile_dir};

/// Every plugin crate these tests load, by package name.
const PACKAGES: &[&str] = &[
    "native-lion",
    "native-llama",
    "native-tsv-sink",
    "fixture-not-a-plugin",
    "fixture-api-next",
    "fixture-old-crate",
    "fixture-layout",
    "fixture-panic-register",
    "fixture-twice",
    "fixture-faulty",
];

/// The version of the `codex-plugin-api` crate the host and these plugins are built with.
fn api_crate_version() -> &'static str {
    use codex_plugin_api::abi_stable::library::RootModule;
    <codex_plugin_api::plugin::PluginModuleRef as RootModule>::VERSION_STRINGS
        .version
        .as_str()
}

/// The plugin-API versions this host loads, as errors write them: `2.0`, or `2.0 to 2.3`.
fn loadable() -> String {
    match API_VERSION.minor {
        0 => API_VERSION.to_string(),
        _ => format!("{}.0 to {API_VERSION}", API_VERSION.major),
    }
}

/// Copy the built plugin of `package` into `dir`; returns the copy's path.
pub(crate) fn plugin(dir: &Path, package: &str) -> PathBuf {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    if let Err(e) = BUILT.get_or_init(|| cargo_build(PACKAGES, None)) {
        panic!("{e}");
    }
    let file = format!(
        "{}{}{}",
        std::env::consts::DLL_PREFIX,
        package.replace('-', "_"),
        std::env::consts::DLL_SUFFIX
    );
    let copy = dir.join(&file);
    std::fs::copy(profile_dir().join(&file), &copy)
        .unwrap_or_else(|e| panic!("copying {file}: {e}"));
    copy
}

fn sha256(path: &Path) -> String {
    codex_host::fsio::sha256_file(path).unwrap_or_else(|e| panic!("{e}"))
}

/// One manifest entry: the plugin's name and its file, pinned to its current digest.
pub(crate) fn entry(name: &str, file: &Path) -> String {
    format!(
        "(name: \"{name}\", origin: native, path: \"{}\", sha256: \"{}\"),",
        file.display(),
        sha256(file)
    )
}

pub(crate) fn write_manifest(dir: &Path, entries: &[String]) -> PathBuf {
    let path = dir.join("plugins.ron");
    std::fs::write(&path, format!("(plugins: [\n{}\n])\n", entries.join("\n"))).expect("manifest");
    path
}

/// A tiny built-in model.
const GPT2: &str =
    r#"(name: "gpt2", params: (n_layer: 1, n_head: 2, n_embd: 32, n_positions: 32))"#;

/// The LLaMA-style plugin model at the same size, under the manifest name `llama`.
pub(crate) const LLAMA: &str = r#"(name: "llama/llama", params: (hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, max_position_embeddings: 32))"#;

/// A short training run's config: a tiny `model` (RON) on the byte tokenizer and the test data.
pub(crate) fn write_config(
    dir: &Path,
    model: &str,
    optimizer: &str,
    sinks: &[&str],
    max_steps: u64,
) -> PathBuf {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/data/code/*");
    let sinks: Vec<String> = sinks.iter().map(|s| format!("(name: \"{s}\")")).collect();
    let text = format!(
        r#"(
    experiment: "native",
    seed: 3,
    data: (train: [Text(paths: ["{}"])], val_fraction: 0.2),
    tokenizer: (name: "bytes"),
    model: {model},
    optimizer: {optimizer},
    train: (max_steps: {max_steps}, seq_len: 32, batch_size: 8, log_every: 1, checkpoint_every: 5),
    sinks: [{}],
)
"#,
        data.display(),
        sinks.join(", ")
    );
    let path = dir.join("experiment.ron");
    std::fs::write(&path, text).expect("config");
    path
}

pub(crate) fn run(args: &[&std::ffi::OsStr]) -> Output {
    codex_ml()
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("codex-ml runs")
}

/// `codex-ml run CONFIG --manifest MANIFEST --run-dir RUN_DIR`.
pub(crate) fn run_experiment(config: &Path, manifest: &Path, run_dir: &Path) -> Output {
    run(&[
        "run".as_ref(),
        config.as_os_str(),
        "--manifest".as_ref(),
        manifest.as_os_str(),
        "--run-dir".as_ref(),
        run_dir.as_os_str(),
    ])
}

pub(crate) fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `codex-ml list --manifest MANIFEST` must fail with code 2 and a message containing every
/// one of `expect`; returns stderr.
fn list_fails(manifest: &Path, expect: &[&str]) -> String {
    let out = run(&["list".as_ref(), "--manifest".as_ref(), manifest.as_os_str()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    for e in expect {
        assert!(stderr.contains(e), "missing `{e}` in:\n{stderr}");
    }
    stderr
}

/// `(step, name, value)` of every `train` record in a TSV sink's file.
fn tsv_records(path: &Path) -> Vec<(u64, String, f64)> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("step\tsplit\tname\tvalue\ttime"));
    lines
        .map(|l| l.split('\t').collect::<Vec<_>>())
        .filter(|f| f.get(1) == Some(&"train"))
        .map(|f| {
            (
                f[0].parse().expect("step"),
                f[2].to_owned(),
                f[3].parse().expect("value"),
            )
        })
        .collect()
}

#[test]
fn inspect_shows_what_a_plugin_declares_without_a_manifest() {
    let dir = tempfile::tempdir().expect("temp dir");
    let lion = plugin(dir.path(), "native-lion");
    let out = run(&["plugin".as_ref(), "inspect".as_ref(), lion.as_os_str()]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        stdout.starts_with(&format!("plugin lion 0.1.0 (plugin API {API_VERSION})")),
        "{stdout}"
    );
    assert!(stdout.contains(&sha256(&lion)), "{stdout}");
    assert!(stdout.contains("optimizer  lion  0.1.0  Lion: sign of interpolated momentum"));

    let tsv = plugin(dir.path(), "native-tsv-sink");
    let out = run(&[
        "plugin".as_ref(),
        "inspect".as_ref(),
        tsv.as_os_str(),
        "--json".as_ref(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(report["name"], "tsv");
    assert_eq!(report["api_version"], API_VERSION.to_string());
    assert_eq!(report["sha256"], sha256(&tsv));
    assert_eq!(report["components"][0]["kind"], "sink");
    assert_eq!(report["components"][0]["name"], "tsv");
    assert_eq!(report["components"].as_array().map(Vec::len), Some(1));
}

#[test]
fn list_shows_native_components_with_the_plugin_file_as_origin() {
    let dir = tempfile::tempdir().expect("temp dir");
    let lion = plugin(dir.path(), "native-lion");
    let tsv = plugin(dir.path(), "native-tsv-sink");
    let manifest = write_manifest(dir.path(), &[entry("lion", &lion), entry("tsv", &tsv)]);
    let out = run(&[
        "list".as_ref(),
        "--manifest".as_ref(),
        manifest.as_os_str(),
        "--json".as_ref(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).expect("json array");
    let row = |kind: &str, name: &str| {
        rows.iter()
            .find(|r| r["kind"] == kind && r["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name} in {rows:?}"))
            .clone()
    };
    let optimizer = row("optimizer", "lion/lion");
    assert_eq!(optimizer["origin"], "native");
    assert_eq!(optimizer["path"], lion.display().to_string());
    assert_eq!(optimizer["api_version"], API_VERSION.to_string());
    assert_eq!(row("sink", "tsv/tsv")["path"], tsv.display().to_string());
    let plugin_row = row("plugin", "lion");
    assert_eq!(plugin_row["status"], "loaded");
    assert_eq!(plugin_row["sha256_pinned"], true);
    assert!(
        row("optimizer", "adamw")["origin"] == "built-in",
        "built-ins stay listed"
    );

    let out = run(&["list".as_ref(), "--manifest".as_ref(), manifest.as_os_str()]);
    let table = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(table.contains("lion/lion"), "{table}");
    assert!(table.contains("loaded"), "{table}");
}

#[test]
fn lion_trains_gpt2_and_the_tsv_sink_receives_every_record() {
    let dir = tempfile::tempdir().expect("temp dir");
    let lion = plugin(dir.path(), "native-lion");
    let tsv = plugin(dir.path(), "native-tsv-sink");
    let manifest = write_manifest(dir.path(), &[entry("lion", &lion), entry("tsv", &tsv)]);
    let config = write_config(
        dir.path(),
        GPT2,
        r#"(name: "lion/lion", lr: 3e-3, params: (weight_decay: 0.1))"#,
        &["tsv/tsv"],
        30,
    );
    let run_dir = dir.path().join("run");
    let out = run_experiment(&config, &manifest, &run_dir);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let records = tsv_records(&run_dir.join("metrics.tsv"));
    let losses: Vec<(u64, f64)> = records
        .iter()
        .filter(|(_, name, _)| name == "loss")
        .map(|(step, _, v)| (*step, *v))
        .collect();
    let steps: Vec<u64> = losses.iter().map(|(s, _)| *s).collect();
    assert_eq!(steps, (1..=30).collect::<Vec<u64>>(), "one loss per step");
    let mean = |xs: &[(u64, f64)]| xs.iter().map(|(_, v)| v).sum::<f64>() / xs.len() as f64;
    let (first, last) = (mean(&losses[..5]), mean(&losses[25..]));
    assert!(
        last < first - 0.3,
        "the loss must fall under Lion: first steps {first:.3}, last steps {last:.3}"
    );
    assert!(records.iter().any(|(_, name, _)| name == "lr"));

    // Lion's momentum is host state, so checkpoints carry it by name.
    let checkpoint = run_dir.join("checkpoints");
    let newest = std::fs::read_dir(&checkpoint)
        .expect("checkpoints")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .max()
        .expect("a checkpoint");
    let state = std::fs::read(newest.join("optimizer.safetensors")).expect("optimizer state");
    let header = String::from_utf8_lossy(&state[..state.len().min(64 * 1024)]);
    assert!(
        header.contains("optimizer.transformer.wte.weight.exp_avg"),
        "Lion's momentum is not in the checkpoint"
    );
}

#[test]
fn a_failing_plugin_sink_is_disabled_and_training_goes_on() {
    let dir = tempfile::tempdir().expect("temp dir");
    let faulty = plugin(dir.path(), "fixture-faulty");
    let tsv = plugin(dir.path(), "native-tsv-sink");
    let manifest = write_manifest(dir.path(), &[entry("faulty", &faulty), entry("tsv", &tsv)]);
    let config = write_config(
        dir.path(),
        GPT2,
        r#"(name: "adamw", lr: 1e-3)"#,
        &["faulty/failing", "tsv/tsv"],
        6,
    );
    let run_dir = dir.path().join("run");
    let out = run_experiment(&config, &manifest, &run_dir);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("faulty/failing") && stderr.contains("deliberate write failure"),
        "the disabled sink is reported: {stderr}"
    );
    let losses = tsv_records(&run_dir.join("metrics.tsv"))
        .into_iter()
        .filter(|(_, name, _)| name == "loss")
        .count();
    assert_eq!(losses, 6, "the other sink got every step");
}

#[test]
fn a_plugin_panicking_mid_training_ends_the_run_with_a_usable_checkpoint() {
    let dir = tempfile::tempdir().expect("temp dir");
    let faulty = plugin(dir.path(), "fixture-faulty");
    let manifest = write_manifest(dir.path(), &[entry("faulty", &faulty)]);
    let config = write_config(
        dir.path(),
        GPT2,
        r#"(name: "faulty/panicky", lr: 1e-2, params: (panic_at: 7))"#,
        &[],
        10,
    );
    let run_dir = dir.path().join("run");
    let out = run_experiment(&config, &manifest, &run_dir);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    for expected in [
        "training failed",
        "plugin `faulty`",
        "panic in step",
        "deliberate panic at step 7",
        "the last checkpoint is",
        "step-00000005",
    ] {
        assert!(
            stderr.contains(expected),
            "missing `{expected}` in:\n{stderr}"
        );
    }
    let out = run(&[
        "eval".as_ref(),
        run_dir.as_os_str(),
        "--batches".as_ref(),
        "1".as_ref(),
    ]);
    assert!(
        out.status.success(),
        "the last checkpoint must evaluate: {}",
        text(&out.stderr)
    );
}

#[test]
fn plugins_that_cannot_load_are_refused_with_the_plugin_and_the_problem() {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    let check = |name: &str, package: &str, expect: &[&str]| {
        let manifest = write_manifest(d, &[entry(name, &plugin(d, package))]);
        list_fails(&manifest, expect)
    };
    let next = format!("{}.0", API_VERSION.major + 1);
    let crate_version = format!("crate codex-plugin-api {}", api_crate_version());
    let stderr = check(
        "next",
        "fixture-api-next",
        &[
            "plugin `next`",
            "libfixture_api_next",
            &format!("built against plugin API {next} ({crate_version})"),
            &format!("loads plugin API {}", loadable()),
            &format!("rebuild the plugin against {crate_version}"),
        ],
    );
    assert!(
        !stderr.contains(&format!("codex-plugin-api {API_VERSION}")),
        "a plugin-API version written as a crate version: {stderr}"
    );
    // Refused by abi_stable's crate-version check; its plugin API is read all the same.
    check(
        "old",
        "fixture-old-crate",
        &[
            "plugin `old`",
            "built against plugin API 1.1 (crate codex-plugin-api 0.1.0)",
            &format!("loads plugin API {} ({crate_version})", loadable()),
            &format!("rebuild the plugin against {crate_version}"),
        ],
    );
    check(
        "nothing",
        "fixture-not-a-plugin",
        &[
            "plugin `nothing`",
            "not a codex-ml plugin",
            "export_plugin!",
        ],
    );
    check(
        "boom",
        "fixture-panic-register",
        &[
            "plugin `boom`: registration failed",
            "panic in register: deliberate panic while declaring a component",
        ],
    );
    check(
        "twice",
        "fixture-twice",
        &["plugin `twice`", "declares sink `drop` twice"],
    );

    // A file that is no shared library at all, correctly pinned.
    let junk = d.join("libjunk.so");
    std::fs::write(&junk, b"not a library").expect("junk file");
    list_fails(
        &write_manifest(d, &[entry("junk", &junk)]),
        &[
            "plugin `junk`: cannot load",
            "libjunk.so",
            "shared library (cdylib) built for this platform",
        ],
    );

    // Two manifest entries under one name, even for different files.
    let lion = plugin(d, "native-lion");
    let tsv = plugin(d, "native-tsv-sink");
    list_fails(
        &write_manifest(d, &[entry("dup", &lion), entry("dup", &tsv)]),
        &[
            "plugins[1].name",
            "plugin `dup` is declared twice (plugins[0] and plugins[1]",
            &lion.display().to_string(),
            &tsv.display().to_string(),
        ],
    );
}

/// The manifest keeps plugin names unique, so two loads of one `PLUGIN/NAME` can only meet
/// through the library API; there too the second is refused naming both files, and leaves the
/// registry as it was.
#[test]
fn one_plugin_name_loaded_twice_names_both_files() {
    let dir = tempfile::tempdir().expect("temp dir");
    let first = plugin(dir.path(), "native-lion");
    let copy_dir = dir.path().join("copy");
    std::fs::create_dir(&copy_dir).expect("dir");
    let second = plugin(&copy_dir, "native-lion");
    let mut registry = codex_host::plugins::registry::Registry::with_builtins().expect("built-ins");
    codex_host::plugins::native::load("lion", &first, &mut registry).expect("the first load");
    let before = registry.len();
    let error =
        codex_host::plugins::native::load("lion", &second, &mut registry).expect_err("duplicate");
    let mut chain = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        chain.push_str(&format!("\n{cause}"));
        source = cause.source();
    }
    assert!(
        chain.starts_with(&format!(
            "plugin `lion` ({}): a component",
            second.display()
        )),
        "{chain}"
    );
    assert!(
        chain.contains(&format!(
            "optimizer `lion/lion` is registered twice: by native plugin {} and by native plugin {}",
            first.display(),
            second.display()
        )),
        "{chain}"
    );
    assert_eq!(
        registry.len(),
        before,
        "the refused plugin left nothing behind"
    );
}

#[test]
fn a_layout_mismatch_is_one_line_and_the_full_report_needs_verbose() {
    let dir = tempfile::tempdir().expect("temp dir");
    let layout = plugin(dir.path(), "fixture-layout");
    let manifest = write_manifest(dir.path(), &[entry("shifted", &layout)]);
    let crate_version = format!("crate codex-plugin-api {}", api_crate_version());
    let stderr = list_fails(
        &manifest,
        &[
            "plugin `shifted`",
            "does not match this codex-ml's ABI",
            "the layout of `codex_plugin_api::plugin::PluginModule` differs",
            "mismatched package: expected codex-plugin-api, found fixture-layout",
            &format!("the plugin states plugin API {API_VERSION} ({crate_version})"),
            &format!("this codex-ml has plugin API {API_VERSION} ({crate_version})"),
            &format!("rebuild the plugin against an unmodified {crate_version}"),
            "run with -v",
        ],
    );
    assert!(stderr.len() < 1000, "{} bytes: {stderr}", stderr.len());
    let out = run(&[
        "-v".as_ref(),
        "list".as_ref(),
        "--manifest".as_ref(),
        manifest.as_os_str(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("Layout of expected type"));
}

#[test]
fn missing_files_and_changed_pins_are_refused_before_loading() {
    let dir = tempfile::tempdir().expect("temp dir");
    let lion = plugin(dir.path(), "native-lion");
    let pinned = entry("lion", &lion);
    let manifest = write_manifest(dir.path(), std::slice::from_ref(&pinned));
    std::fs::write(&lion, b"a different file").expect("overwrite");
    list_fails(&manifest, &["plugin `lion`", "sha256 mismatch", "expected"]);
    std::fs::remove_file(&lion).expect("remove");
    list_fails(
        &manifest,
        &["plugin `lion`", "cannot read", "libnative_lion"],
    );
}

#[test]
fn a_component_in_the_wrong_slot_says_what_it_is() {
    let dir = tempfile::tempdir().expect("temp dir");
    let tsv = plugin(dir.path(), "native-tsv-sink");
    let manifest = write_manifest(dir.path(), &[entry("tsv", &tsv)]);
    let config = write_config(dir.path(), GPT2, r#"(name: "tsv/tsv", lr: 1e-3)"#, &[], 2);
    let out = run_experiment(&config, &manifest, &dir.path().join("run"));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "unknown optimizer `tsv/tsv`: `tsv/tsv` is registered as a sink, not as an optimizer"
        ),
        "{stderr}"
    );
}

/// The tensor names and shapes in a safetensors file's header.
fn safetensors_shapes(path: &Path) -> Vec<(String, Vec<u64>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + len]).expect("json header");
    let mut shapes: Vec<(String, Vec<u64>)> = header
        .as_object()
        .expect("object")
        .iter()
        .filter(|(name, _)| *name != "__metadata__")
        .map(|(name, t)| {
            let shape = t["shape"]
                .as_array()
                .expect("shape")
                .iter()
                .map(|d| d.as_u64().expect("dim"))
                .collect();
            (name.clone(), shape)
        })
        .collect();
    shapes.sort();
    shapes
}

#[test]
fn inspect_and_list_show_the_plugin_model() {
    let dir = tempfile::tempdir().expect("temp dir");
    let llama = plugin(dir.path(), "native-llama");
    let out = run(&["plugin".as_ref(), "inspect".as_ref(), llama.as_os_str()]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        stdout.starts_with(&format!("plugin llama 0.1.0 (plugin API {API_VERSION})")),
        "{stdout}"
    );
    assert!(
        stdout.contains("model  llama  0.1.0  LLaMA-style decoder: RMSNorm, rotary positions"),
        "{stdout}"
    );

    let manifest = write_manifest(dir.path(), &[entry("llama", &llama)]);
    let out = run(&[
        "list".as_ref(),
        "--manifest".as_ref(),
        manifest.as_os_str(),
        "--json".as_ref(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).expect("json array");
    let model = rows
        .iter()
        .find(|r| r["kind"] == "model" && r["name"] == "llama/llama")
        .unwrap_or_else(|| panic!("no model llama/llama in {rows:?}"));
    assert_eq!(model["origin"], "native");
    assert_eq!(model["path"], llama.display().to_string());
}

#[test]
fn the_plugin_llama_trains_with_adamw_and_its_checkpoint_evaluates_and_generates() {
    let dir = tempfile::tempdir().expect("temp dir");
    let llama = plugin(dir.path(), "native-llama");
    let tsv = plugin(dir.path(), "native-tsv-sink");
    let manifest = write_manifest(dir.path(), &[entry("llama", &llama), entry("tsv", &tsv)]);
    let config = write_config(
        dir.path(),
        LLAMA,
        r#"(name: "adamw", lr: 1e-2)"#,
        &["tsv/tsv"],
        30,
    );
    let run_dir = dir.path().join("run");
    let out = run_experiment(&config, &manifest, &run_dir);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let losses: Vec<f64> = tsv_records(&run_dir.join("metrics.tsv"))
        .into_iter()
        .filter(|(_, name, _)| name == "loss")
        .map(|(_, _, v)| v)
        .collect();
    assert_eq!(losses.len(), 30, "one loss per step");
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
    let (first, last) = (mean(&losses[..5]), mean(&losses[25..]));
    assert!(
        last < first - 0.3,
        "the loss must fall: first steps {first:.3}, last steps {last:.3}"
    );

    // Hugging Face LLaMA names and `[out, in]` layouts, no biases, an LM head of its own.
    let newest = std::fs::read_dir(run_dir.join("checkpoints"))
        .expect("checkpoints")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .max()
        .expect("a checkpoint");
    let shapes = safetensors_shapes(&newest.join("model.safetensors"));
    let shape = |name: &str| {
        shapes
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s.clone())
            .unwrap_or_else(|| panic!("no {name} in {shapes:?}"))
    };
    let vocab = shape("model.embed_tokens.weight")[0];
    assert_eq!(shape("model.embed_tokens.weight"), [vocab, 32]);
    assert_eq!(shape("lm_head.weight"), [vocab, 32]);
    for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
        assert_eq!(
            shape(&format!("model.layers.0.self_attn.{proj}.weight")),
            [32, 32]
        );
    }
    assert_eq!(shape("model.layers.0.mlp.gate_proj.weight"), [64, 32]);
    assert_eq!(shape("model.layers.0.mlp.up_proj.weight"), [64, 32]);
    assert_eq!(shape("model.layers.0.mlp.down_proj.weight"), [32, 64]);
    assert_eq!(shape("model.layers.0.input_layernorm.weight"), [32]);
    assert_eq!(
        shape("model.layers.0.post_attention_layernorm.weight"),
        [32]
    );
    assert_eq!(shape("model.norm.weight"), [32]);
    assert_eq!(shapes.len(), 12, "{shapes:?}");

    // Without the manifest the checkpoint's model cannot be built: the error says why.
    let out = run(&[
        "eval".as_ref(),
        run_dir.as_os_str(),
        "--batches".as_ref(),
        "1".as_ref(),
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "unknown model `llama/llama`: it comes from plugin `llama`, which is not loaded"
        ) && stderr.contains("--manifest FILE"),
        "{stderr}"
    );

    let out = run(&[
        "eval".as_ref(),
        run_dir.as_os_str(),
        "--batches".as_ref(),
        "2".as_ref(),
        "--manifest".as_ref(),
        manifest.as_os_str(),
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let eval_loss: f64 = stdout
        .strip_prefix("loss ")
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no loss in {stdout}"));
    assert!(
        eval_loss.is_finite() && eval_loss < first,
        "the trained checkpoint evaluates below the first steps' loss: {eval_loss} vs {first}"
    );

    let generate = |seed: &str| {
        let out = run(&[
            "generate".as_ref(),
            run_dir.as_os_str(),
            "--prompt".as_ref(),
            "fn ".as_ref(),
            "--max-tokens".as_ref(),
            "12".as_ref(),
            "--seed".as_ref(),
            seed.as_ref(),
            "--manifest".as_ref(),
            manifest.as_os_str(),
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let first_text = generate("5");
    assert!(first_text.starts_with("fn "), "{first_text}");
    assert!(
        first_text.len() > "fn \n".len(),
        "nothing generated: {first_text:?}"
    );
    assert_eq!(
        generate("5"),
        first_text,
        "the same seed gives the same text"
    );

    // Resuming needs the plugin too, and says so before touching the run.
    let out = run(&["resume".as_ref(), run_dir.as_os_str()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("plugin `llama`, which is not loaded"),
        "{stderr}"
    );
}

#[test]
fn the_plugin_llama_refuses_bad_params_naming_the_field() {
    let dir = tempfile::tempdir().expect("temp dir");
    let llama = plugin(dir.path(), "native-llama");
    let manifest = write_manifest(dir.path(), &[entry("llama", &llama)]);
    let attempt = std::cell::Cell::new(0);
    let fails = |model: &str, expect: &[&str]| {
        attempt.set(attempt.get() + 1);
        let config = write_config(dir.path(), model, r#"(name: "adamw", lr: 1e-3)"#, &[], 1);
        let out = run(&[
            "run".as_ref(),
            config.as_os_str(),
            "--manifest".as_ref(),
            manifest.as_os_str(),
            "--run-dir".as_ref(),
            dir.path()
                .join(format!("run-{}", attempt.get()))
                .as_os_str(),
        ]);
        let stderr = text(&out.stderr);
        assert!(
            matches!(out.status.code(), Some(1 | 2)),
            "an error exit, not a crash: {:?}\n{stderr}",
            out.status
        );
        for e in expect {
            assert!(stderr.contains(e), "missing `{e}` in:\n{stderr}");
        }
    };
    fails(
        r#"(name: "llama/llama", params: (hidden_size: 32, num_attention_heads: 2, num_layers: 1))"#,
        &[
            "plugin `llama`",
            // Found when the config is checked, at its place in the file.
            "experiment.ron:6:",
            "unknown field `num_layers`",
            "num_hidden_layers",
        ],
    );
    fails(
        r#"(name: "llama/llama", params: (hidden_size: 30, num_attention_heads: 4))"#,
        &[
            "plugin `llama`",
            "hidden_size: must be divisible by num_attention_heads (4)",
        ],
    );
    fails(
        r#"(name: "llama/llama", params: (hidden_size: 32, num_attention_heads: 2, rope_theta: 0.5))"#,
        &["rope_theta: must be greater than 1, found 0.5"],
    );
    // The test config trains on 32-token sequences.
    fails(
        r#"(name: "llama/llama", params: (hidden_size: 32, num_attention_heads: 2, num_hidden_layers: 1, max_position_embeddings: 16))"#,
        &[
            "train.seq_len is 32",
            "`llama/llama` accepts at most 16 positions",
            "max_position_embeddings",
        ],
    );
}

/// `docs/plugins-native.md` states the current plugin-API version and a table of which host
/// loads which plugin: both must say what the code does (`API_VERSION`, and
/// `ApiVersion::can_load`, the check `codex_host::plugins::native` applies before registration).
#[test]
fn the_native_plugin_guide_states_the_current_version_and_the_loading_rule() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/plugins-native.md");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let stated = text
        .split_once("The current plugin API version is **")
        .and_then(|(_, rest)| rest.split_once("**"))
        .map(|(version, _)| version)
        .expect("the guide states the current plugin API version");
    assert_eq!(
        stated,
        API_VERSION.to_string(),
        "docs/plugins-native.md states plugin API {stated}; update it"
    );

    let start = text.find("<!-- compat:start -->").expect("start marker");
    let end = text.find("<!-- compat:end -->").expect("end marker");
    let version = |cell: &str| -> ApiVersion {
        let parsed = cell.split_once('.').and_then(|(major, minor)| {
            Some(ApiVersion {
                major: major.parse().ok()?,
                minor: minor.parse().ok()?,
            })
        });
        parsed.unwrap_or_else(|| panic!("`{cell}` is not MAJOR.MINOR"))
    };
    let mut rows = 0;
    let (mut loads, mut refused) = (0, 0);
    for line in text[start..end].lines() {
        let cells: Vec<&str> = line
            .split('|')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect();
        let [host, plugin, verdict] = cells.as_slice() else {
            continue;
        };
        if !host.starts_with(|c: char| c.is_ascii_digit()) {
            continue; // the header and its rule
        }
        let documented = match *verdict {
            "yes" => true,
            "no" => false,
            other => panic!("`{other}` in `{line}`: write yes or no"),
        };
        assert_eq!(
            version(host).can_load(version(plugin)),
            documented,
            "docs/plugins-native.md says `{line}`, the code disagrees"
        );
        rows += 1;
        if documented {
            loads += 1;
        } else {
            refused += 1;
        }
    }
    assert!(
        rows >= 5 && loads >= 2 && refused >= 2,
        "the compatibility table shows both outcomes ({loads} loads, {refused} refused)"
    );
}

/// The plugin's model in this process, through the factory its registration declares — the
/// path a run takes — on a fresh CPU store.
pub(crate) fn build_llama(
    dir: &Path,
    params: &str,
    vocab_size: usize,
    seed: u64,
) -> crate::model::Built {
    use codex_plugin_api::abi_stable::std_types::{RResult, RStr};
    use codex_plugin_api::model::ModelEnv;
    use codex_plugin_api::{ComponentKind, Factory};

    codex_engine::install();
    let file = plugin(dir, "native-llama");
    let mut registry = codex_host::plugins::registry::Registry::new();
    codex_host::plugins::native::load("llama", &file, &mut registry).expect("the plugin loads");
    let entry = registry
        .get(ComponentKind::Model, "llama/llama")
        .expect("registered as a model");
    let decl = entry
        .declaration()
        .expect("a native plugin's model is declared");
    let Factory::Model(factory) = decl.factory else {
        panic!("llama/llama is registered with a factory of another kind");
    };
    let mut store = codex_engine::ParamStore::new(codex_engine::candle::Device::Cpu, seed);
    let env = ModelEnv {
        vocab_size,
        store: store.as_tensor_store(),
    };
    match factory(RStr::from(params), env) {
        RResult::ROk(model) => crate::model::Built { store, model },
        RResult::RErr(e) => panic!("creating the model: {e}"),
    }
}

const SMALL_LLAMA: &str = r#"{"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
    "num_attention_heads": 2, "max_position_embeddings": 12}"#;

fn values(t: &codex_plugin_api::Tensor) -> Vec<f32> {
    t.to_vec_f32().expect("values")
}

#[test]
fn the_plugin_llama_is_causal_and_starts_near_uniform() {
    use crate::model::{batch, EVAL};
    let dir = tempfile::tempdir().expect("temp dir");
    let vocab = 23;
    let built = build_llama(dir.path(), SMALL_LLAMA, vocab, 0);
    assert_eq!(built.model.max_positions(), 12);
    let a: Vec<u32> = vec![1, 2, 3, 4, 5, 6];
    let mut b = a.clone();
    b[4] = 20;
    let la = values(&built.forward(&a, 1, 6, EVAL).expect("forward"));
    let lb = values(&built.forward(&b, 1, 6, EVAL).expect("forward"));
    assert_eq!(la.len(), 6 * vocab);
    let before = 4 * vocab;
    for (x, y) in la[..before].iter().zip(&lb[..before]) {
        assert!(
            (x - y).abs() < 1e-6,
            "a later token changed an earlier position's logits"
        );
    }
    assert!(la[before..]
        .iter()
        .zip(&lb[before..])
        .any(|(x, y)| (x - y).abs() > 1e-4));

    let too_long = batch(1, 13, vocab as u32);
    let error = built
        .forward(&too_long.input, 1, 13, EVAL)
        .expect_err("13 positions");
    assert!(
        error.contains("at most max_position_embeddings = 12"),
        "{error}"
    );

    let data = batch(4, 12, vocab as u32);
    let loss = built.loss(&data, EVAL).to_scalar().expect("scalar");
    let uniform = (vocab as f64).ln();
    assert!(
        (loss - uniform).abs() < 0.05,
        "initial loss {loss}, ln(vocab) {uniform}"
    );
}

/// Every parameter gets a gradient through the host's ops (RMSNorm, rotary, SiLU included),
/// and it is the right one: the directional derivative along the gradient matches a central
/// finite difference of the loss.
#[test]
fn the_plugin_llama_gives_every_parameter_its_true_gradient() {
    let dir = tempfile::tempdir().expect("temp dir");
    let vocab = 23;
    let built = build_llama(dir.path(), SMALL_LLAMA, vocab, 11);
    assert_eq!(
        built.params().len(),
        2 + 2 * 9 + 1,
        "embedding, 9 per layer, norm, lm_head"
    );
    crate::model::assert_true_gradients(&built, &crate::model::batch(2, 8, vocab as u32));
}

/// A native plugin rebuilt since the run's last session (another sha256 than the run's plugin
/// lock) is refused on resume with exit code 2, the plugin and both hashes named, and the
/// run left as it was; `--allow-plugin-change` goes on and records the new hash.
#[test]
fn a_plugin_changed_since_the_run_is_refused_on_resume_unless_allowed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let lion = plugin(dir.path(), "native-lion");
    // Not pinned in the manifest: the manifest would refuse a changed pinned file itself.
    let manifest = write_manifest(
        dir.path(),
        &[format!(
            "(name: \"lion\", origin: native, path: \"{}\"),",
            lion.display()
        )],
    );
    let config = write_config(dir.path(), GPT2, r#"(name: "lion/lion", lr: 3e-3)"#, &[], 5);
    let run_dir = dir.path().join("run");
    let out = run_experiment(&config, &manifest, &run_dir);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let before = sha256(&lion);

    // The same plugin with other bytes, as a rebuild makes it (trailing bytes do not stop an
    // ELF file from loading).
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&lion)
        .expect("open the plugin");
    std::io::Write::write_all(&mut file, b"rebuilt").expect("append");
    drop(file);
    let after = sha256(&lion);

    let resume = |extra: &[&str]| {
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "resume".as_ref(),
            run_dir.as_os_str(),
            "--manifest".as_ref(),
            manifest.as_os_str(),
            "--set".as_ref(),
            "train.max_steps=8".as_ref(),
        ];
        args.extend(extra.iter().map(|a| std::ffi::OsStr::new(*a)));
        run(&args)
    };
    let metadata = || std::fs::read_to_string(run_dir.join("metadata.json")).expect("metadata");
    let metadata_before = metadata();
    let out = resume(&[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    for part in [
        "optimizer `lion/lion` changed since the run's last session",
        &before,
        &after,
        "--allow-plugin-change",
    ] {
        assert!(stderr.contains(part), "missing `{part}` in:\n{stderr}");
    }
    assert_eq!(
        metadata(),
        metadata_before,
        "the refused resume changed the run"
    );

    let out = resume(&["--allow-plugin-change"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let meta: serde_json::Value = serde_json::from_str(&metadata()).expect("json");
    let recorded = meta["resumes"][0]["plugins"]
        .as_array()
        .expect("plugin lock")
        .iter()
        .find(|p| p["name"] == "optimizer/lion/lion")
        .cloned()
        .expect("lion in the lock");
    assert_eq!(recorded["sha256"], after.as_str(), "{meta}");
}

/// Lion's step composed from separate tensor ops: the example as it was written before its
/// step became one element-wise program, kept here as the reference the program must equal.
fn lion_composed(
    p: &codex_plugin_api::Tensor,
    g: &codex_plugin_api::Tensor,
    m: &codex_plugin_api::Tensor,
    [b1, b2]: [f64; 2],
    lr: f64,
    weight_decay: f64,
) -> codex_plugin_api::Result<()> {
    use codex_plugin_api::Tensor;
    let sign = |x: &Tensor| -> codex_plugin_api::Result<Tensor> {
        let zeros = Tensor::full(&x.shape()?, 0.0, x.dtype()?, x)?;
        let is_zero = x.eq(&zeros)?;
        x.div(&x.abs()?)?.masked_fill(&is_zero, 0.0)
    };
    let interpolated = m.affine(b1, 0.0)?.add(&g.affine(1.0 - b1, 0.0)?)?;
    let update = sign(&interpolated)?.affine(lr, 0.0)?;
    let updated = p.affine(1.0 - lr * weight_decay, 0.0)?.sub(&update)?;
    let next = m.affine(b2, 0.0)?.add(&g.affine(1.0 - b2, 0.0)?)?;
    p.assign(&updated)?;
    m.assign(&next)
}

/// The plugin's optimizer steps exactly as the composed ops do: same parameters and momentum,
/// bit for bit, over steps with a changing learning rate, on a parameter large enough for the
/// host to split its update across threads; a frozen parameter gets no state and no update.
#[test]
fn the_plugin_lion_steps_as_the_composed_ops_do_bit_for_bit() {
    use codex_engine::{candle::Device, ParamStore, TensorGroup};
    use codex_plugin_api::abi_stable::std_types::{RResult, RSlice, RStr};
    use codex_plugin_api::optimizer::ParamGrad;
    use codex_plugin_api::{ComponentKind, DType, Factory, Init, OptimStep, ParamRole, Tensor};

    codex_engine::install();
    let dir = tempfile::tempdir().expect("temp dir");
    let file = plugin(dir.path(), "native-lion");
    let mut registry = codex_host::plugins::registry::Registry::new();
    codex_host::plugins::native::load("lion", &file, &mut registry).expect("the plugin loads");
    let entry = registry
        .get(ComponentKind::Optimizer, "lion/lion")
        .expect("registered as an optimizer");
    let decl = entry
        .declaration()
        .expect("a native plugin's optimizer is declared");
    let Factory::Optimizer(factory) = decl.factory else {
        panic!("lion/lion is registered with a factory of another kind");
    };
    let (betas, weight_decay) = ([0.9, 0.99], 0.1);
    let shapes: [(&str, &[usize]); 3] = [("w", &[300, 257]), ("b", &[257]), ("frozen", &[4])];
    let declare = |store: &mut ParamStore| -> Vec<Tensor> {
        let params = shapes
            .iter()
            .map(|(name, shape)| {
                Tensor::from_id(
                    store
                        .declare_param(name, shape, ParamRole::Weight, Init::Normal { std: 0.5 })
                        .expect("param"),
                )
            })
            .collect();
        store.set_trainable("frozen", false).expect("freeze");
        params
    };
    let mut store = ParamStore::new(Device::Cpu, 7);
    let params = declare(&mut store);
    let mut lion = match factory(
        RStr::from(r#"{"betas": [0.9, 0.99], "weight_decay": 0.1}"#),
        store.as_tensor_store(),
    ) {
        RResult::ROk(o) => o,
        RResult::RErr(e) => panic!("creating lion: {e}"),
    };
    assert!(store.handle("optimizer.frozen.exp_avg").is_none());
    let mut reference = ParamStore::new(Device::Cpu, 7);
    let ref_params = declare(&mut reference);
    let momentum: Vec<Tensor> = shapes[..2]
        .iter()
        .map(|(name, shape)| {
            Tensor::from_id(
                reference
                    .declare_state(
                        &format!("optimizer.{name}.exp_avg"),
                        shape,
                        DType::F32,
                        Init::Zeros,
                    )
                    .expect("state"),
            )
        })
        .collect();
    for (step, lr) in [(1u64, 3e-3), (2, 1e-2), (3, 0.0), (4, 5e-3)] {
        let grads: Vec<Tensor> = params[..2]
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let shape = p.shape().expect("shape");
                let n = shape.iter().product::<usize>();
                let v: Vec<f32> = (0..n)
                    .map(|j| match (j + i + step as usize) % 9 {
                        0 => 0.0,
                        k => ((j as f32 * 0.37 + step as f32).sin() * k as f32).powi(3),
                    })
                    .collect();
                Tensor::from_f32(&v, &shape, DType::F32, p).expect("gradient")
            })
            .collect();
        let abi: Vec<ParamGrad> = grads
            .iter()
            .enumerate()
            .map(|(index, g)| ParamGrad {
                index,
                param: params[index].id(),
                grad: g.id(),
            })
            .collect();
        if let RResult::RErr(e) = lion.step(RSlice::from_slice(&abi), OptimStep { lr, step }) {
            panic!("step {step}: {e}");
        }
        for i in 0..2 {
            lion_composed(
                &ref_params[i],
                &grads[i],
                &momentum[i],
                betas,
                lr,
                weight_decay,
            )
            .expect("composed step");
        }
        for group in [TensorGroup::Params, TensorGroup::State] {
            let got = store.export(group).expect("export");
            let want = reference.export(group).expect("export");
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(g.name, w.name);
                assert!(g.bytes == w.bytes, "step {step}: `{}` differs", g.name);
            }
        }
    }
}
