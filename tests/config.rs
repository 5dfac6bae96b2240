//! The experiment config: strict parsing with positions, `--set` overrides, resolution,
//! validation and the RON written back into run directories.

use std::path::{Path, PathBuf};

use codex_host::config::{Config, ConfigError, Override, ScheduleKind};
use codex_host::data::Source;
use codex_host::diagnostics::Position;
use serde_json::{json, Value};

const QUICKSTART: &str = r#"(
    experiment: "quickstart",
    seed: 7,
    data: (train: [Text(paths: ["../src/**/*.rs"])], val_fraction: 0.1),
    tokenizer: (name: "bpe", params: (vocab_size: 1024)),
    model: (name: "gpt2", params: (n_layer: 2, n_head: 4, n_embd: 128, n_positions: 128)),
    optimizer: (name: "adamw", lr: 1e-3, params: {"weight_decay": 0.1}),
    train: (
        max_steps: 200,
        seq_len: 64,
        batch_size: 16,
        eval_every: 50,
        schedule: (kind: cosine, warmup_steps: 20, min_lr: 1e-4),
    ),
    sinks: [(name: "csv"), (name: "console")],
    kernel: "cpu",
    generate: (prompt: "fn ", max_tokens: 120, temperature: 0.8, top_k: 40),
)
"#;

/// A config file at `<tmp>/configs/experiment.ron`.
struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    configs: PathBuf,
}

fn fixture(source: &str) -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let configs = dir.path().join("configs");
    std::fs::create_dir(&configs).expect("configs dir");
    let path = configs.join("experiment.ron");
    std::fs::write(&path, source).expect("config");
    let configs = std::fs::canonicalize(&configs).expect("canonical");
    Fixture {
        _dir: dir,
        path,
        configs,
    }
}

fn overrides(args: &[&str]) -> Vec<Override> {
    args.iter()
        .map(|a| a.parse().unwrap_or_else(|e| panic!("{a}: {e}")))
        .collect()
}

fn load_with(source: &str, args: &[&str]) -> (Fixture, Result<Config, ConfigError>) {
    let f = fixture(source);
    let result = Config::load(&f.path, &overrides(args));
    (f, result)
}

fn load_ok(source: &str, args: &[&str]) -> Config {
    let (_f, result) = load_with(source, args);
    result.unwrap_or_else(|e| panic!("{e}"))
}

/// The quickstart with `from` replaced by `to` (which must occur once).
fn edit(from: &str, to: &str) -> String {
    assert_eq!(
        QUICKSTART.matches(from).count(),
        1,
        "`{from}` must occur once"
    );
    QUICKSTART.replace(from, to)
}

/// Loading must fail with an error whose text contains every part.
fn check_error(source: &str, args: &[&str], parts: &[&str]) {
    let (_f, result) = load_with(source, args);
    let text = result.expect_err("the config is invalid").to_string();
    for part in parts {
        assert!(text.contains(part), "`{part}` missing from: {text}");
    }
}

/// Parsing must fail at `line:col` on `field`, with `message` in the text.
fn check_parse_error(source: &str, line: usize, col: usize, field: &str, message: &str) {
    let (f, result) = load_with(source, &[]);
    let d = match result {
        Err(ConfigError::Invalid(d)) => d,
        Err(other) => panic!("expected a diagnostic, got: {other}"),
        Ok(c) => panic!("expected an error, got {c:?}"),
    };
    assert_eq!(d.start, Some(Position { line, col }), "{d}");
    assert_eq!(d.field.as_deref(), Some(field), "{d}");
    assert!(d.message.contains(message), "{d}");
    let rendered = d.to_string();
    assert!(
        rendered.starts_with(&format!("{}:{line}:{col}: {field}: ", f.path.display())),
        "{rendered}"
    );
    assert!(rendered.contains('^'), "{rendered}");
}

#[test]
fn the_quickstart_loads_with_defaults_filled() {
    let (f, result) = load_with(QUICKSTART, &[]);
    let c = result.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.path, f.path);
    assert_eq!(c.dir, f.configs);
    assert_eq!(c.experiment, "quickstart");
    assert_eq!(c.seed, 7);
    assert_eq!(c.device, "cpu");
    let src = f.configs.parent().expect("parent").join("src/**/*.rs");
    assert_eq!(
        c.data.train,
        vec![Source::Text {
            paths: vec![src.display().to_string()],
            exclude: vec![],
        }]
    );
    assert_eq!(c.tokenizer.params, json!({"vocab_size": 1024}));
    assert_eq!(c.model.params["n_layer"], json!(2));
    assert_eq!(c.optimizer.name, "adamw");
    assert!((c.optimizer.lr - 1e-3).abs() < 1e-15);
    assert_eq!(c.optimizer.params, json!({"weight_decay": 0.1}));
    assert_eq!(c.trainer.name, "default");
    assert_eq!(c.trainer.params, json!({}));
    assert_eq!(c.train.max_steps, Some(200));
    assert_eq!(c.train.epochs, None);
    assert_eq!(
        (c.train.seq_len, c.train.batch_size, c.train.grad_accum),
        (64, 16, 1)
    );
    assert_eq!(
        (
            c.train.eval_every,
            c.train.eval_batches,
            c.train.checkpoint_every,
            c.train.log_every
        ),
        (50, 16, 0, 10)
    );
    assert!((c.train.clip_norm - 1.0).abs() < 1e-12);
    assert_eq!(c.train.schedule.kind, ScheduleKind::Cosine);
    assert_eq!(c.train.schedule.warmup_steps, 20);
    let sinks: Vec<&str> = c.sinks.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        sinks,
        ["ndjson", "csv", "console"],
        "ndjson is always written"
    );
    assert!(c.trackers.is_empty());
    assert_eq!(c.kernel.as_deref(), Some("cpu"));
    let g = c.generate.expect("generate section");
    assert_eq!(
        (g.prompt.as_str(), g.max_tokens, g.top_k, g.top_p),
        ("fn ", 120, Some(40), None)
    );
    assert!((g.temperature - 0.8).abs() < 1e-12);
}

#[test]
fn a_minimal_config_takes_every_default() {
    let c = load_ok(
        r#"(
            experiment: "min",
            data: (train: [Jsonl(path: "d.jsonl", field: "text")]),
            tokenizer: (name: "bytes"),
            model: (name: "gpt2"),
            optimizer: (name: "sgd", lr: 0.1),
            train: (epochs: 1),
        )"#,
        &[],
    );
    assert_eq!(c.seed, 1337);
    assert_eq!(c.device, "cpu");
    assert!((c.data.val_fraction - 0.1).abs() < 1e-12);
    assert_eq!(c.train.max_steps, None);
    assert_eq!(c.train.epochs, Some(1));
    assert_eq!((c.train.seq_len, c.train.batch_size), (128, 8));
    assert_eq!(c.train.schedule.kind, ScheduleKind::Constant);
    assert_eq!(c.train.schedule.warmup_steps, 0);
    assert_eq!(c.model.params, json!({}));
    assert_eq!(
        c.kernel.as_deref(),
        Some("cpu"),
        "the fused kernel on the CPU"
    );
    assert_eq!(c.generate, None);
    let sinks: Vec<&str> = c.sinks.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(sinks, ["ndjson"]);
    let settings = c.train.settings(c.seed, c.optimizer.lr, 42, u32::MAX);
    assert_eq!(
        (settings.total_steps, settings.batch_size, settings.seq_len),
        (42, 8, 128)
    );
}

#[test]
fn explicit_some_and_none_are_accepted() {
    let c = load_ok(
        &edit("max_steps: 200,", "max_steps: Some(200), epochs: None,"),
        &[],
    );
    assert_eq!(c.train.max_steps, Some(200));
}

/// A CPU run gets the fused kernel unless it says `kernel: "none"`; stored configs say which.
#[test]
fn the_cpu_kernel_is_the_default_and_none_switches_it_off() {
    let c = load_ok(&edit("kernel: \"cpu\",", ""), &[]);
    assert_eq!(c.kernel.as_deref(), Some("cpu"));
    let (_f, result) = load_with(&edit("kernel: \"cpu\",", "kernel: None,"), &[]);
    let e = result
        .expect_err("None is neither off nor the default")
        .to_string();
    assert!(e.contains("kernel"), "{e}");
    let off = load_ok(&edit("kernel: \"cpu\",", "kernel: \"none\","), &[]);
    assert_eq!(off.kernel, None);
    assert!(
        off.to_ron().contains("kernel: \"none\""),
        "{}",
        off.to_ron()
    );
    let c = load_ok(QUICKSTART, &["kernel=\"none\""]);
    assert_eq!(c.kernel, None);
}

/// `precision` is f32 unless set; bf16 and f16 need a kernel; anything else is refused with
/// the field named; a stored config says which precision it used, and f16 its loss scaling.
#[test]
fn precision_is_f32_by_default_and_half_precisions_need_a_kernel() {
    use codex_engine::Precision;
    let c = load_ok(QUICKSTART, &[]);
    assert_eq!(c.precision, Precision::F32);
    assert_eq!(c.loss_scale, None);
    assert!(c.to_ron().contains("precision: \"f32\""), "{}", c.to_ron());
    assert!(c.to_ron().contains("loss_scale: None"), "{}", c.to_ron());
    let c = load_ok(QUICKSTART, &["precision=bf16"]);
    assert_eq!(c.precision, Precision::Bf16);
    assert!(c.to_ron().contains("precision: \"bf16\""), "{}", c.to_ron());
    for (args, needle) in [
        (&["precision=fp8"][..], "not a precision"),
        (&["precision=bf16", "kernel=\"none\""][..], "kernel"),
        (&["precision=f16", "kernel=\"none\""][..], "kernel"),
    ] {
        let (_f, result) = load_with(QUICKSTART, args);
        let e = result.expect_err("refused").to_string();
        assert!(
            e.contains("precision") && e.contains(needle),
            "{args:?}: {e}"
        );
    }
}

/// f16 scales the loss with GradScaler's defaults unless told otherwise; the settings are
/// checked, and refused without f16.
#[test]
fn f16_has_loss_scaling_with_gradscalers_defaults() {
    use codex_engine::Precision;
    let c = load_ok(QUICKSTART, &["precision=f16"]);
    assert_eq!(c.precision, Precision::F16);
    assert_eq!(c.loss_scale, Some(codex_plugin_api::LossScaling::default()));
    let ron = c.to_ron();
    assert!(ron.contains("precision: \"f16\""), "{ron}");
    assert!(
        ron.contains("init_scale: 65536.0") && ron.contains("growth_interval: 2000"),
        "{ron}"
    );
    let c = load_ok(
        QUICKSTART,
        &[
            "precision=f16",
            "loss_scale.init_scale=1024",
            "loss_scale.growth_interval=5",
        ],
    );
    let scaling = c.loss_scale.expect("loss scaling");
    assert_eq!((scaling.init_scale, scaling.growth_interval), (1024.0, 5));
    assert_eq!((scaling.growth_factor, scaling.backoff_factor), (2.0, 0.5));
    for (args, field, needle) in [
        (
            &["precision=f16", "loss_scale.init_scale=0"][..],
            "loss_scale.init_scale",
            "positive",
        ),
        (
            &["precision=f16", "loss_scale.init_scale=-2"][..],
            "loss_scale.init_scale",
            "positive",
        ),
        (
            &["precision=f16", "loss_scale.init_scale=1e300"][..],
            "loss_scale.init_scale",
            "f32",
        ),
        (
            &["precision=f16", "loss_scale.growth_interval=0"][..],
            "loss_scale.growth_interval",
            "at least 1",
        ),
        (
            &["precision=bf16", "loss_scale.init_scale=8"][..],
            "loss_scale",
            "f16",
        ),
    ] {
        let (_f, result) = load_with(QUICKSTART, args);
        let e = result.expect_err("refused").to_string();
        assert!(e.contains(field) && e.contains(needle), "{args:?}: {e}");
    }
}

#[test]
fn each_kind_of_override_applies() {
    let check =
        |args: &[&str], probe: &dyn Fn(&Config) -> serde_json::Value, expect: serde_json::Value| {
            let c = load_ok(QUICKSTART, args);
            assert_eq!(probe(&c), expect, "{args:?}");
        };
    check(&["seed=42"], &|c| json!(c.seed), json!(42));
    check(
        &["train.max_steps=500"],
        &|c| json!(c.train.max_steps),
        json!(500),
    );
    check(
        &["train.batch_size=4"],
        &|c| json!(c.train.batch_size),
        json!(4),
    );
    check(
        &["optimizer.lr=3e-4"],
        &|c| json!(c.optimizer.lr),
        json!(3e-4),
    );
    check(&["optimizer.lr=1"], &|c| json!(c.optimizer.lr), json!(1.0));
    check(
        &["model.params.n_layer=4"],
        &|c| c.model.params["n_layer"].clone(),
        json!(4),
    );
    check(
        &["model.params.dropout=0.2"],
        &|c| c.model.params["dropout"].clone(),
        json!(0.2),
    );
    check(
        &["trainer.name=default", "trainer.params.fused=true"],
        &|c| c.trainer.params.clone(),
        json!({"fused": true}),
    );
    check(
        &["train.schedule.kind=linear"],
        &|c| json!(c.train.schedule.kind == ScheduleKind::Linear),
        json!(true),
    );
    check(&["train.epochs=3"], &|c| json!(c.train.epochs), json!(3));
    check(
        &["train.epochs=None"],
        &|c| json!(c.train.epochs),
        json!(null),
    );
    check(&["kernel=\"none\""], &|c| json!(c.kernel), json!(null));
    check(
        &["experiment=\"2024\""],
        &|c| json!(c.experiment),
        json!("2024"),
    );
    check(&["device=cuda:1"], &|c| json!(c.device), json!("cuda:1"));
    check(
        &["sinks[0].name=tensorboard"],
        &|c| json!(c.sinks[1].name),
        json!("tensorboard"),
    );
    check(
        &["sinks.1.name=csv2"],
        &|c| json!(c.sinks[2].name),
        json!("csv2"),
    );
    check(
        &["sinks[2]=(name: \"tensorboard\")"],
        &|c| json!(c.sinks.len()),
        json!(4),
    );
    check(
        &["trackers=[(name: \"mlflow\")]"],
        &|c| json!(c.trackers[0].name),
        json!("mlflow"),
    );
    check(
        &["generate.prompt=\"def \""],
        &|c| json!(c.generate.as_ref().map(|g| g.prompt.clone())),
        json!("def "),
    );
    check(
        &["generate=None"],
        &|c| json!(c.generate.is_none()),
        json!(true),
    );
    check(
        &["data.train=[{\"Jsonl\": (path: \"d.jsonl\", field: \"text\")}]"],
        &|c| json!(matches!(&c.data.train[0], Source::Jsonl { field, .. } if field == "text")),
        json!(true),
    );
    // Later overrides win.
    check(&["seed=1", "seed=2"], &|c| json!(c.seed), json!(2));
}

#[test]
fn overrides_can_fill_sections_the_file_left_out() {
    let source = edit("    kernel: \"cpu\",\n", "");
    let source = source.replace(
        "    generate: (prompt: \"fn \", max_tokens: 120, temperature: 0.8, top_k: 40),\n",
        "",
    );
    let c = load_ok(
        &source,
        &["generate.prompt=hello", "trainer.name=fast", "kernel=cpu"],
    );
    assert_eq!(c.generate.map(|g| g.prompt), Some("hello".to_owned()));
    assert_eq!(c.trainer.name, "fast");
    assert_eq!(c.kernel.as_deref(), Some("cpu"));
}

#[test]
fn unknown_field_in_the_file() {
    check_parse_error(
        &edit("        max_steps: 200,", "        max_step: 200,"),
        9,
        9,
        "train.max_step",
        "unknown field `max_step`, did you mean `max_steps`?",
    );
    check_parse_error(
        &edit("    seed: 7,", "    sed: 7,"),
        3,
        5,
        "sed",
        "did you mean `seed`?",
    );
}

#[test]
fn wrong_type_in_the_file() {
    check_parse_error(
        &edit("batch_size: 16,", "batch_size: \"sixteen\","),
        11,
        21,
        "train.batch_size",
        "expected integer",
    );
    check_parse_error(
        &edit("kind: cosine,", "kind: cosin,"),
        13,
        26,
        "train.schedule.kind",
        "unknown variant `cosin`, did you mean `cosine`?",
    );
}

#[test]
fn missing_field_in_the_file() {
    check_parse_error(
        &edit("(name: \"adamw\", lr: 1e-3,", "(name: \"adamw\","),
        7,
        61,
        "optimizer.lr",
        "missing field `lr`",
    );
}

#[test]
fn unknown_override_paths_are_refused_with_a_suggestion() {
    check_error(
        QUICKSTART,
        &["train.max_step=5"],
        &[
            "--set train.max_step=5",
            "unknown field `train.max_step`, did you mean `train.max_steps`?",
        ],
    );
    check_error(
        QUICKSTART,
        &["sed=5"],
        &["unknown field `sed`, did you mean `seed`?"],
    );
    check_error(
        QUICKSTART,
        &["sinks[7].name=x"],
        &["`sinks[7]` is out of range", "2 entries"],
    );
    check_error(QUICKSTART, &["seed.value=1"], &["`seed` is a single value"]);
    check_error(
        QUICKSTART,
        &["sinks.name=x"],
        &["`sinks` is a list", "sinks[0]"],
    );
    check_error(
        QUICKSTART,
        &["train[0]=1"],
        &["`train` is a section, not a list"],
    );
    // Keys inside a section that the file left out are checked when the section is read.
    let no_generate = edit(
        "    generate: (prompt: \"fn \", max_tokens: 120, temperature: 0.8, top_k: 40),\n",
        "",
    );
    check_error(
        &no_generate,
        &["generate.promt=x"],
        &["generate.promt", "unknown field `promt`"],
    );
    check_error(
        QUICKSTART,
        &["trainer.params.fused=true"],
        &["trainer: missing field `name` (from --set trainer.params.fused=true)"],
    );
}

#[test]
fn bad_override_values_name_the_path() {
    check_error(
        QUICKSTART,
        &["train.batch_size=abc"],
        &[
            "train.batch_size: invalid type: string \"abc\", expected a non-negative integer",
            "--set train.batch_size=abc",
        ],
    );
    check_error(
        QUICKSTART,
        &["seed=-1"],
        &["seed: invalid value: integer `-1`, expected a non-negative integer"],
    );
    check_error(
        QUICKSTART,
        &["train.schedule.kind=exp"],
        &["train.schedule.kind: unknown variant `exp`"],
    );
    check_error(
        QUICKSTART,
        &["optimizer.lr=fast"],
        &["optimizer.lr: invalid type: string \"fast\", expected a number"],
    );
}

#[test]
fn validation_errors_name_the_field() {
    let file = |s: &str| s.to_owned();
    for (source, args, parts) in [
        (
            file(QUICKSTART),
            vec!["train.batch_size=0"],
            vec![
                "train.batch_size: must be at least 1",
                "(value from --set train.batch_size=0)",
            ],
        ),
        (
            edit("max_steps: 200,", ""),
            vec![],
            vec!["train: neither `max_steps` nor `epochs` is set"],
        ),
        (
            file(QUICKSTART),
            vec!["data.val_fraction=1.0"],
            vec!["data.val_fraction: 1 is outside [0, 1)"],
        ),
        (
            file(QUICKSTART),
            vec!["data.val_fraction=-0.1"],
            vec!["data.val_fraction"],
        ),
        (
            file(QUICKSTART),
            vec!["optimizer.lr=0"],
            vec!["optimizer.lr: learning rate 0 must be positive"],
        ),
        (
            file(QUICKSTART),
            vec!["train.schedule.min_lr=0.5"],
            vec!["train.schedule.min_lr", "optimizer.lr"],
        ),
        (
            file(QUICKSTART),
            vec!["train.schedule.warmup_steps=500"],
            vec!["train.schedule.warmup_steps", "exceed train.max_steps"],
        ),
        (
            file(QUICKSTART),
            vec!["train.seq_len=0"],
            vec!["train.seq_len: must be at least 1"],
        ),
        (
            file(QUICKSTART),
            vec!["train.max_steps=0"],
            vec!["train.max_steps: must be at least 1"],
        ),
        (
            file(QUICKSTART),
            vec!["experiment=\"../up\""],
            vec!["experiment:", "cannot name a run directory"],
        ),
        (
            file(QUICKSTART),
            vec!["device=tpu"],
            vec!["device: unknown device `tpu`"],
        ),
        (
            file(QUICKSTART),
            vec!["model.params=3"],
            vec!["model.params: expected a struct of parameters"],
        ),
        (
            file(QUICKSTART),
            vec!["sinks[1].name=csv"],
            vec!["sinks[1].name: sink `csv` is listed twice"],
        ),
        (
            file(QUICKSTART),
            vec!["generate.top_p=1.5"],
            vec!["generate.top_p: 1.5 is outside (0, 1]"],
        ),
        (
            file(QUICKSTART),
            vec!["data.train=[]"],
            vec!["data.train: no training sources"],
        ),
    ] {
        let (f, result) = load_with(&source, &args);
        let text = result.expect_err("invalid").to_string();
        assert!(
            text.starts_with(&f.path.display().to_string()),
            "the file is not named: {text}"
        );
        for part in parts {
            assert!(
                text.contains(part),
                "{args:?}: `{part}` missing from: {text}"
            );
        }
    }
}

#[test]
fn to_ron_round_trips_wherever_it_is_stored() {
    for args in [
        vec![],
        vec![
            "model.params.name=\"with \\\"quotes\\\"\"",
            "trackers=[(name: \"mlflow\", params: {\"a b\": [1, None]})]",
        ],
        vec![
            "generate=None",
            "kernel=\"none\"",
            "train.epochs=2",
            "data.cache_dir=\"cache\"",
        ],
    ] {
        let original = load_ok(QUICKSTART, &args);
        let text = original.to_ron();
        // Stored elsewhere, as a run directory does: paths must not depend on its location.
        let elsewhere = tempfile::tempdir().expect("temp dir");
        let stored = elsewhere.path().join("config.ron");
        std::fs::write(&stored, &text).expect("write");
        let mut reloaded = Config::load(&stored, &[]).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(
            reloaded.dir,
            std::fs::canonicalize(elsewhere.path()).expect("canonical")
        );
        reloaded.path = original.path.clone();
        reloaded.dir = original.dir.clone();
        assert_eq!(reloaded, original, "through:\n{text}");
        assert_eq!(reloaded.to_ron(), text, "writing is stable");
    }
}

#[test]
fn to_ron_writes_params_as_ron_structs() {
    let text = load_ok(QUICKSTART, &[]).to_ron();
    let model_params = text
        .lines()
        .find(|l| l.trim_start().starts_with("params: (") && l.contains("n_layer: 2"))
        .unwrap_or_else(|| panic!("no struct-form model params in:\n{text}"));
    assert!(model_params.contains("n_positions: 128"), "{model_params}");
    assert!(text.contains("max_steps: 200,"), "implicit Some: {text}");
    assert!(text.contains("kind: cosine"), "{text}");
}

#[test]
fn components_are_checked_against_the_registry() {
    use codex_host::plugins::registry::Registry;
    let c = load_ok(QUICKSTART, &[]);
    let error = c
        .check_components(&Registry::new())
        .expect_err("empty registry");
    let text = error.to_string();
    assert!(
        text.contains("tokenizer.name: unknown tokenizer `bpe`"),
        "{text}"
    );
}

#[test]
fn unreadable_config_names_the_path() {
    let error = Config::load(Path::new("/nonexistent/x.ron"), &[]).expect_err("no such file");
    assert!(error.to_string().contains("/nonexistent/x.ron"), "{error}");
}

/// The run's record is listed first whatever the file says: added when the file leaves it out,
/// moved when the file lists it elsewhere, and joined by a copy when `ndjson` has a `file`. A
/// bad parameter is still reported at its place in the file, and the written config reads
/// back the same.
#[test]
fn the_runs_record_comes_first_and_keeps_positions_in_the_file() {
    use codex_host::plugins::registry::Registry;
    let names = |c: &Config| -> Vec<(String, Value)> {
        c.sinks
            .iter()
            .map(|s| (s.name.clone(), s.params.clone()))
            .collect()
    };
    let cases: [(&str, Vec<(&str, Value)>); 3] = [
        (
            r#"sinks=[(name: "csv"), (name: "ndjson")]"#,
            vec![("ndjson", json!({})), ("csv", json!({}))],
        ),
        (
            r#"sinks=[(name: "csv"), (name: "ndjson", params: (file: "copy.ndjson"))]"#,
            vec![
                ("ndjson", json!({})),
                ("csv", json!({})),
                ("ndjson", json!({"file": "copy.ndjson"})),
            ],
        ),
        (
            r#"sinks=[(name: "ndjson", params: (file: "copy.ndjson")), (name: "ndjson")]"#,
            vec![
                ("ndjson", json!({})),
                ("ndjson", json!({"file": "copy.ndjson"})),
            ],
        ),
    ];
    for (set, expected) in cases {
        let c = load_ok(QUICKSTART, &[set]);
        let expected: Vec<(String, Value)> = expected
            .into_iter()
            .map(|(n, p)| (n.to_owned(), p))
            .collect();
        assert_eq!(names(&c), expected, "{set}");
        let elsewhere = tempfile::tempdir().expect("temp dir");
        let stored = elsewhere.path().join("config.ron");
        std::fs::write(&stored, c.to_ron()).expect("write");
        let reloaded = Config::load(&stored, &[]).unwrap_or_else(|e| panic!("{set}: {e}"));
        assert_eq!(names(&reloaded), expected, "{set}, read back");
    }

    // Two copies are two listings of one sink; the record beside a copy is not.
    check_error(
        QUICKSTART,
        &[
            r#"sinks=[(name: "ndjson", params: (file: "a")), (name: "ndjson", params: (file: "b"))]"#,
        ],
        &["sinks[1].name: sink `ndjson` is listed twice"],
    );
    check_error(
        QUICKSTART,
        &[r#"sinks=[(name: "ndjson"), (name: "csv"), (name: "ndjson")]"#],
        &["sinks[2].name: sink `ndjson` is listed twice"],
    );

    // A bad parameter is reported where the file has it, though the record moved before it.
    let registry = Registry::with_builtins().expect("built-ins");
    let c = load_ok(
        QUICKSTART,
        &[r#"sinks=[(name: "csv"), (name: "ndjson"), (name: "console", params: (every: 1))]"#],
    );
    let text = c
        .check_components(&registry)
        .expect_err("unknown parameter")
        .to_string();
    assert!(text.contains("sinks[2].params"), "{text}");
    let c = load_ok(
        QUICKSTART,
        &[r#"sinks=[(name: "ndjson", params: (file: "metrics.ndjson"))]"#],
    );
    let text = c
        .check_components(&registry)
        .expect_err("a copy over the record")
        .to_string();
    assert!(
        text.contains("sinks[0].params") && text.contains("is the run's record"),
        "{text}"
    );
}
