//! Run trackers: the hub drives them like sinks (off the training thread, disabled on their
//! first error), and the built-in `mlflow` tracker leaves an MLflow file store that matches
//! the run — params, every metric point of `metrics.ndjson`, artifacts and the final status —
//! through fresh, stopped, failed and resumed runs.
//!
//! The hub-level tests use trackers written in this file with the same `Tracker` trait and
//! `declare` a plugin uses; the failure cases that need a separately built library use the
//! `faulty` native fixture through the `codex-ml` binary.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use codex_host::config::Config;
use codex_host::metrics::{HubOptions, MetricsHub, Tracking};
use codex_host::plugins::registry::Registry;
use codex_host::run::{self as session, ResumePoint, RunOptions, RunSummary};
use codex_plugin_api::abi_stable::std_types::RStr;
use codex_plugin_api::tracker::TrackerBox;
use codex_plugin_api::{Describe, Error, Factory, Record, Result, RunInfo, RunStatus, Tracker};

use crate::native::{entry, plugin, run_experiment, text, write_manifest};

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/data/code")
}

/// A tiny experiment with `trackers` (RON list items) and `train` settings spliced in.
fn config_text(train: &str, optimizer: &str, trackers: &str) -> String {
    format!(
        r#"(
    experiment: "tracked",
    seed: 5,
    data: (train: [Text(paths: ["{dir}/*"])], val_fraction: 0.34, cache_dir: "{cache}"),
    tokenizer: (name: "bytes"),
    model: (name: "gpt2", params: (n_layer: 1, n_head: 2, n_embd: 32, n_positions: 32)),
    optimizer: {optimizer},
    train: (seq_len: 32, batch_size: 4, log_every: 1, {train}),
    trackers: [{trackers}],
)"#,
        dir = data_dir().display(),
        cache = codex_tests::token_cache().display(),
    )
}

const ADAMW: &str = r#"(name: "adamw", lr: 6e-4)"#;

fn load(dir: &Path, text: &str, overrides: &[&str]) -> Config {
    let path = dir.join("exp.ron");
    fs::write(&path, text).unwrap_or_else(|e| panic!("{e}"));
    let overrides: Vec<_> = overrides
        .iter()
        .map(|o| o.parse().unwrap_or_else(|e| panic!("{o}: {e}")))
        .collect();
    Config::load(&path, &overrides).unwrap_or_else(|e| panic!("{e}"))
}

fn options(dir: &Path, run_dir: &Path, stop: bool) -> RunOptions {
    RunOptions {
        run_dir: Some(run_dir.to_path_buf()),
        runs_root: dir.join("runs"),
        stop: Some(Arc::new(AtomicBool::new(stop))),
        progress: false,
        allow_plugin_change: false,
        retune: false,
        skip_batches: 0,
    }
}

fn train(dir: &Path, config: &Config, run_dir: &Path, stop: bool) -> RunSummary {
    let registry = Registry::with_builtins().unwrap_or_else(|e| panic!("{e}"));
    session::run(config, &registry, &options(dir, run_dir, stop))
        .unwrap_or_else(|e| panic!("{e:#}"))
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    out.sort();
    out
}

/// The `key: value` lines of a meta.yaml (values as written, quotes included).
fn meta(path: &Path) -> BTreeMap<String, String> {
    read(path)
        .lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The one MLflow run of experiment `name` under `root`: (experiment dir, run dir).
fn only_run(root: &Path, name: &str) -> (PathBuf, PathBuf) {
    let experiments: Vec<PathBuf> = subdirs(root)
        .into_iter()
        .filter(|d| d.join("meta.yaml").is_file())
        .filter(|d| meta(&d.join("meta.yaml")).get("name") == Some(&format!("'{name}'")))
        .collect();
    assert_eq!(
        experiments.len(),
        1,
        "experiments named {name}: {experiments:?}"
    );
    let experiment = experiments[0].clone();
    let runs: Vec<PathBuf> = subdirs(&experiment)
        .into_iter()
        .filter(|d| d.join("meta.yaml").is_file())
        .collect();
    assert_eq!(runs.len(), 1, "runs in {}: {runs:?}", experiment.display());
    (experiment, runs[0].clone())
}

/// `(step, value)` of `split/name` in metrics.ndjson.
fn ndjson_points(run_dir: &Path, split: &str, name: &str) -> Vec<(u64, f64)> {
    read(&run_dir.join("metrics.ndjson"))
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("{e}")))
        .filter(|r| r["split"] == split && r["name"] == name)
        .map(|r| {
            (
                r["step"].as_u64().unwrap_or(u64::MAX),
                r["value"].as_f64().unwrap_or(f64::NAN),
            )
        })
        .collect()
}

/// `(step, value)` of an MLflow metric file; every line must be `<ts_ms> <value> <step>`.
fn mlflow_points(file: &Path) -> Vec<(u64, f64)> {
    read(file)
        .lines()
        .map(|l| {
            let parts: Vec<&str> = l.split(' ').collect();
            assert_eq!(parts.len(), 3, "{l:?}");
            let ts: i64 = parts[0].parse().unwrap_or_else(|e| panic!("{l:?}: {e}"));
            assert!(ts > 1_600_000_000_000, "timestamps are milliseconds: {l:?}");
            let value: f64 = parts[1].parse().unwrap_or_else(|e| panic!("{l:?}: {e}"));
            let step: u64 = parts[2].parse().unwrap_or_else(|e| panic!("{l:?}: {e}"));
            (step, value)
        })
        .collect()
}

fn assert_same_points(mlflow: &[(u64, f64)], ndjson: &[(u64, f64)], what: &str) {
    assert_eq!(
        mlflow.iter().map(|p| p.0).collect::<Vec<_>>(),
        ndjson.iter().map(|p| p.0).collect::<Vec<_>>(),
        "{what}: steps"
    );
    for ((step, a), (_, b)) in mlflow.iter().zip(ndjson) {
        assert!(
            (a - b).abs() <= 1e-12 * b.abs().max(1.0),
            "{what} at step {step}: {a} in mlflow, {b} in metrics.ndjson"
        );
    }
}

/// Every metric of metrics.ndjson is in the MLflow run, point for point.
fn assert_metrics_match(run_dir: &Path, mlflow_run: &Path) {
    for (split, name) in [
        ("train", "loss"),
        ("train", "lr"),
        ("train", "grad_norm"),
        ("val", "loss"),
    ] {
        let expected = ndjson_points(run_dir, split, name);
        assert!(!expected.is_empty(), "{split}/{name} recorded");
        let file = mlflow_run.join("metrics").join(split).join(name);
        assert_same_points(&mlflow_points(&file), &expected, &format!("{split}/{name}"));
    }
}

#[test]
fn a_run_is_recorded_in_the_mlflow_file_store_layout() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let text = config_text(
        "max_steps: 6, checkpoint_every: 3, eval_every: 3",
        ADAMW,
        r#"(name: "mlflow")"#,
    );
    let config = load(dir.path(), &text, &[]);
    let run_dir = dir.path().join("run");
    let summary = train(dir.path(), &config, &run_dir, false);
    assert_eq!(summary.steps, 6);

    // The store sits beside the run directory, with MLflow's default experiment.
    let root = dir.path().join("mlruns");
    let default = meta(&root.join("0/meta.yaml"));
    assert_eq!(default["name"], "'Default'");
    assert!(root.join(".trash").is_dir());
    let (experiment, mlrun) = only_run(&root, "tracked");
    let exp_meta = meta(&experiment.join("meta.yaml"));
    let exp_id = experiment
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    assert_eq!(exp_meta["experiment_id"], format!("'{exp_id}'"));
    assert_eq!(exp_meta["lifecycle_stage"], "'active'");
    assert!(exp_meta["artifact_location"].starts_with("'file:///"));

    let run_meta = meta(&mlrun.join("meta.yaml"));
    let uuid = mlrun
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    assert_eq!(uuid.len(), 32, "{uuid}");
    assert_eq!(run_meta["run_id"], format!("'{uuid}'"));
    assert_eq!(run_meta["run_uuid"], format!("'{uuid}'"));
    assert_eq!(run_meta["experiment_id"], format!("'{exp_id}'"));
    assert_eq!(run_meta["status"], "3", "FINISHED");
    assert_eq!(run_meta["lifecycle_stage"], "'active'");
    assert_eq!(run_meta["run_name"], "'run'");
    let start: i64 = run_meta["start_time"].parse().unwrap_or(0);
    let end: i64 = run_meta["end_time"].parse().unwrap_or(0);
    assert!(
        start > 1_600_000_000_000 && end >= start,
        "{start} .. {end}"
    );
    assert!(
        run_meta["artifact_uri"].starts_with("'file:///")
            && run_meta["artifact_uri"].ends_with(&format!("/{uuid}/artifacts'")),
        "{}",
        run_meta["artifact_uri"]
    );
    for sub in ["metrics", "params", "tags", "artifacts"] {
        assert!(mlrun.join(sub).is_dir(), "{sub}/");
    }

    // Params: the resolved config, flattened; values raw, no newline.
    let params = mlrun.join("params");
    assert_eq!(read(&params.join("optimizer.lr")), "0.0006");
    assert_eq!(read(&params.join("optimizer.name")), "adamw");
    assert_eq!(read(&params.join("seed")), "5");
    assert_eq!(read(&params.join("train.max_steps")), "6");
    assert_eq!(read(&params.join("model.params.n_embd")), "32");
    assert_eq!(read(&params.join("trackers.0.name")), "mlflow");

    let tags = mlrun.join("tags");
    assert_eq!(read(&tags.join("codex.run_id")), "run");
    assert_eq!(read(&tags.join("mlflow.runName")), "run");

    assert_metrics_match(&run_dir, &mlrun);
    let losses = mlflow_points(&mlrun.join("metrics/train/loss"));
    assert_eq!(
        losses.iter().map(|p| p.0).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 6]
    );

    // Artifacts: the run's files and each checkpoint, copied.
    let artifacts = mlrun.join("artifacts");
    assert_eq!(
        read(&artifacts.join("config.ron")),
        read(&run_dir.join("config.ron"))
    );
    assert!(artifacts.join("metadata.json").is_file());
    for step in ["step-00000003", "step-00000006"] {
        let ckpt = artifacts.join("checkpoints").join(step);
        assert!(ckpt.join("trainer_state.json").is_file(), "{step}");
        assert!(ckpt.join("model.safetensors").is_file(), "{step}");
    }
}

#[test]
fn large_artifacts_are_recorded_by_path_and_a_stopped_run_is_killed() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let text = config_text(
        "max_steps: 4",
        ADAMW,
        r#"(name: "mlflow", params: (root: "store", experiment_name: "renamed", max_copy_bytes: 4096))"#,
    );
    let config = load(dir.path(), &text, &[]);
    let run_dir = dir.path().join("run");
    let summary = train(dir.path(), &config, &run_dir, true);
    assert!(summary.interrupted);

    let (_, mlrun) = only_run(&dir.path().join("store"), "renamed");
    assert_eq!(meta(&mlrun.join("meta.yaml"))["status"], "5", "KILLED");
    // config.ron is small: copied. The model is not: recorded by its path.
    assert!(mlrun.join("artifacts/config.ron").is_file());
    let checkpoints = subdirs(&run_dir.join("checkpoints"));
    assert_eq!(checkpoints.len(), 1, "{checkpoints:?}");
    let step = checkpoints[0]
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let model = checkpoints[0].join("model.safetensors");
    assert!(fs::metadata(&model).map(|m| m.len()).unwrap_or(0) > 4096);
    let tag = mlrun.join("tags").join(format!(
        "codex.artifact.checkpoints/{step}/model.safetensors"
    ));
    assert_eq!(
        PathBuf::from(read(&tag)),
        std::path::absolute(&model).unwrap_or(model.clone())
    );
    assert!(!mlrun
        .join("artifacts/checkpoints")
        .join(&step)
        .join("model.safetensors")
        .exists());
}

#[test]
fn a_resumed_run_continues_its_mlflow_run_without_duplicated_steps() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let text = config_text(
        "max_steps: 6, checkpoint_every: 3, eval_every: 3",
        ADAMW,
        r#"(name: "mlflow")"#,
    );
    let config = load(dir.path(), &text, &[]);
    let run_dir = dir.path().join("run");
    train(dir.path(), &config, &run_dir, false);

    // Resume from the step-3 checkpoint (as after a kill there): steps 4-6 are recorded again.
    let point = ResumePoint::open(&run_dir.join("checkpoints/step-00000003"))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let resumed = point.saved_config(&[]).unwrap_or_else(|e| panic!("{e:#}"));
    let registry = Registry::with_builtins().unwrap_or_else(|e| panic!("{e}"));
    let summary = session::resume(
        &resumed,
        &registry,
        &options(dir.path(), &run_dir, false),
        &point,
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(summary.steps, 6);

    let (_, mlrun) = only_run(&dir.path().join("mlruns"), "tracked");
    assert_eq!(
        meta(&mlrun.join("meta.yaml"))["status"],
        "3",
        "FINISHED again"
    );
    assert_eq!(read(&mlrun.join("tags/codex.resumed_from_step")), "3");
    assert_metrics_match(&run_dir, &mlrun);
    let steps: Vec<u64> = mlflow_points(&mlrun.join("metrics/train/loss"))
        .into_iter()
        .map(|p| p.0)
        .collect();
    assert_eq!(steps, [1, 2, 3, 4, 5, 6], "each step once");
}

#[test]
fn bad_tracker_params_stop_the_run_before_it_starts() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let text = config_text(
        "max_steps: 2",
        ADAMW,
        r#"(name: "mlflow", params: (rot: "x"))"#,
    );
    let config = load(dir.path(), &text, &[]);
    let registry = Registry::with_builtins().unwrap_or_else(|e| panic!("{e}"));
    let run_dir = dir.path().join("run");
    let e = match session::run(&config, &registry, &options(dir.path(), &run_dir, false)) {
        Ok(_) => panic!("a tracker with an unknown parameter was accepted"),
        Err(e) => format!("{e:#}"),
    };
    for expected in [
        "tracker `mlflow`",
        "unknown field `rot`",
        "root, experiment_name",
    ] {
        assert!(e.contains(expected), "missing `{expected}` in: {e}");
    }
    assert!(
        !run_dir.join("metadata.json").exists() && !run_dir.join("checkpoints").exists(),
        "the run stopped before any work"
    );
}

/// What a test tracker was told, in order.
static CALLS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Records its calls in [`CALLS`]; with `{"fail": "CALL"}` it fails that call, with
/// `{"panic": "CALL"}` it panics in it.
struct Probe {
    fail: Option<String>,
    panic: Option<String>,
}

impl Describe for Probe {
    const NAME: &'static str = "probe";
    const VERSION: &'static str = "0.0.0";
    const DESCRIPTION: &'static str = "records its calls";
}

impl Probe {
    fn call(&self, what: String) -> Result<()> {
        let name = what.split(' ').next().unwrap_or_default().to_string();
        if let Ok(mut calls) = CALLS.lock() {
            calls.push(what);
        }
        if self.panic.as_deref() == Some(name.as_str()) {
            panic!("probe panics in {name}");
        }
        match self.fail.as_deref() == Some(name.as_str()) {
            true => Err(Error::msg(format!("probe fails in {name}"))),
            false => Ok(()),
        }
    }
}

impl Tracker for Probe {
    fn create(params: &str) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(params)?;
        let field = |k: &str| v[k].as_str().map(str::to_string);
        Ok(Probe {
            fail: field("fail"),
            panic: field("panic"),
        })
    }
    fn start(&mut self, run: &RunInfo) -> Result<()> {
        self.call(format!("start {}", run.run_id))
    }
    fn resume(&mut self, run: &RunInfo, step: u64) -> Result<()> {
        self.call(format!("resume {} {step}", run.run_id))
    }
    fn log_params(&mut self, params: &[(String, String)]) -> Result<()> {
        let text: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        self.call(format!("log_params {}", text.join(",")))
    }
    fn log_metrics(&mut self, records: &[Record]) -> Result<()> {
        let steps: Vec<String> = records.iter().map(|r| r.step.to_string()).collect();
        self.call(format!("log_metrics {}", steps.join(",")))
    }
    fn log_artifact(&mut self, path: &str) -> Result<()> {
        self.call(format!("log_artifact {path}"))
    }
    fn finish(&mut self, status: RunStatus) -> Result<()> {
        self.call(format!("finish {status:?}"))
    }
}

fn probe(params: &str) -> TrackerBox {
    let decl = codex_plugin_api::tracker::declare::<Probe>();
    let Factory::Tracker(f) = decl.factory else {
        panic!("not a tracker factory");
    };
    f(RStr::from(params))
        .into_result()
        .unwrap_or_else(|e| panic!("{}", e.message))
}

fn rec(step: u64) -> Record {
    Record {
        step,
        split: "train".into(),
        name: "loss".into(),
        value: 1.0 / step as f64,
        time: 1764000000.0,
    }
}

/// Run a hub with one probe tracker through `steps` records, an artifact, and `status`;
/// returns the calls the probe saw and the hub's report.
fn probe_session(
    dir: &Path,
    params: &str,
    resume: Option<u64>,
    status: RunStatus,
) -> (Vec<String>, codex_host::metrics::HubReport) {
    let run_id = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tracking = Tracking {
        run: RunInfo {
            experiment: "e".into(),
            run_id: run_id.as_str().into(),
            run_dir: dir.to_string_lossy().as_ref().into(),
        },
        params: vec![("optimizer.lr".into(), "0.0006".into())],
        trackers: vec![("probe".into(), probe(params))],
    };
    let hub = MetricsHub::start_tracked(HubOptions::new(dir, resume), vec![], Some(tracking))
        .unwrap_or_else(|e| panic!("{e}"));
    let recorder = hub.recorder();
    let first = resume.map_or(1, |s| s + 1);
    for step in first..first + 3 {
        recorder.send(rec(step));
    }
    recorder.artifact(&dir.join("config.ron"));
    let report = hub.finish_as(status);
    let calls = CALLS.lock().map(|c| c.clone()).unwrap_or_default();
    (merge_batches(calls), report)
}

/// Consecutive `log_metrics` calls as one: how records are batched depends on timing.
fn merge_batches(calls: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for call in calls {
        match (out.last_mut(), call.strip_prefix("log_metrics ")) {
            (Some(last), Some(steps)) if last.starts_with("log_metrics ") => {
                last.push(',');
                last.push_str(steps);
            }
            _ => out.push(call),
        }
    }
    out
}

/// The probe's calls are global: tests that read them take turns, clearing them first.
static PROBE_LOCK: Mutex<()> = Mutex::new(());

fn clear_calls() {
    if let Ok(mut calls) = CALLS.lock() {
        calls.clear();
    }
}

#[test]
fn the_hub_drives_a_tracker_through_the_run_lifecycle() {
    let base = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let dir = base.path().join("lifecycle-run");
    fs::create_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
    let _turn = PROBE_LOCK.lock();
    clear_calls();
    let (calls, report) = probe_session(&dir, "{}", None, RunStatus::Killed);
    let artifact = std::path::absolute(dir.join("config.ron")).unwrap_or_default();
    assert_eq!(
        calls,
        [
            "start lifecycle-run".to_string(),
            "log_params optimizer.lr=0.0006".to_string(),
            "log_metrics 1,2,3".to_string(),
            format!("log_artifact {}", artifact.display()),
            "finish Killed".to_string(),
        ]
    );
    let t = report
        .tracker("probe")
        .unwrap_or_else(|| panic!("{report:?}"));
    assert_eq!((t.written, t.disabled.as_deref()), (3, None));

    // A resumed hub says `resume` with the step instead of `start`.
    clear_calls();
    let (calls, _) = probe_session(&dir, "{}", Some(7), RunStatus::Finished);
    assert_eq!(calls[0], "resume lifecycle-run 7");
    assert_eq!(calls[2], "log_metrics 8,9,10");
    assert_eq!(calls.last().map(String::as_str), Some("finish Finished"));
}

#[test]
fn a_failing_or_panicking_tracker_is_disabled_and_the_sinks_get_everything() {
    for (params, reason) in [
        (
            r#"{"fail": "log_params"}"#,
            ["log_params failed", "probe fails in log_params"],
        ),
        (
            r#"{"panic": "log_metrics"}"#,
            ["panicked in log_metrics", "probe panics in log_metrics"],
        ),
        (
            r#"{"fail": "start"}"#,
            ["start failed", "probe fails in start"],
        ),
    ] {
        let base = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let dir = base.path().join("failing-run");
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
        let _turn = PROBE_LOCK.lock();
        clear_calls();
        let (calls, report) = probe_session(&dir, params, None, RunStatus::Finished);
        let t = report
            .tracker("probe")
            .unwrap_or_else(|| panic!("{report:?}"));
        assert!(
            t.disabled
                .as_deref()
                .is_some_and(|d| reason.iter().all(|r| d.contains(r))),
            "{params}: {:?}",
            t.disabled
        );
        assert!(
            !calls.iter().any(|c| c.starts_with("finish")),
            "{params}: a disabled tracker is not called again: {calls:?}"
        );
        let ndjson = report.sink("ndjson").map(|s| s.written);
        assert_eq!(ndjson, Some(3), "{params}: metrics.ndjson is complete");
        assert_eq!(read(&dir.join("metrics.ndjson")).lines().count(), 3);
    }
}

/// A config for the `codex-ml` binary, with `trackers` and `optimizer` spliced in.
fn write_cli_config(dir: &Path, optimizer: &str, trackers: &str, max_steps: u64) -> PathBuf {
    let text = config_text(
        &format!("max_steps: {max_steps}, checkpoint_every: 5"),
        optimizer,
        trackers,
    );
    let path = dir.join("experiment.ron");
    fs::write(&path, text).unwrap_or_else(|e| panic!("{e}"));
    path
}

#[test]
fn a_native_tracker_that_fails_is_disabled_with_a_warning_and_training_goes_on() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let faulty = plugin(dir.path(), "fixture-faulty");
    let manifest = write_manifest(dir.path(), &[entry("faulty", &faulty)]);
    let config = write_cli_config(
        dir.path(),
        ADAMW,
        r#"(name: "faulty/flaky", params: (panic: true)), (name: "mlflow")"#,
        6,
    );
    let run_dir = dir.path().join("run");
    let out = run_experiment(&config, &manifest, &run_dir);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // (An info line may say the run waits for the tracker's thread, still busy printing the
    // panic on a loaded machine.)
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("faulty/flaky") && l.contains("WARN"))
        .collect();
    assert_eq!(warnings.len(), 1, "one warning: {stderr}");
    assert!(
        warnings[0].contains("panicked in log_metrics")
            && warnings[0].contains("deliberate tracker panic"),
        "the warning names the call and the reason: {}",
        warnings[0]
    );
    assert_eq!(ndjson_points(&run_dir, "train", "loss").len(), 6);
    let (_, mlrun) = only_run(&dir.path().join("mlruns"), "tracked");
    assert_metrics_match(&run_dir, &mlrun);
    assert_eq!(meta(&mlrun.join("meta.yaml"))["status"], "3");
}

#[test]
fn a_run_ended_by_an_error_is_failed_in_mlflow() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let faulty = plugin(dir.path(), "fixture-faulty");
    let manifest = write_manifest(dir.path(), &[entry("faulty", &faulty)]);
    let config = write_cli_config(
        dir.path(),
        r#"(name: "faulty/panicky", lr: 1e-2, params: (panic_at: 7))"#,
        r#"(name: "mlflow")"#,
        10,
    );
    let run_dir = dir.path().join("run");
    let out = run_experiment(&config, &manifest, &run_dir);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let (_, mlrun) = only_run(&dir.path().join("mlruns"), "tracked");
    let run_meta = meta(&mlrun.join("meta.yaml"));
    assert_eq!(run_meta["status"], "4", "FAILED");
    assert_ne!(run_meta["end_time"], "null");
    let steps: Vec<u64> = mlflow_points(&mlrun.join("metrics/train/loss"))
        .into_iter()
        .map(|p| p.0)
        .collect();
    assert_eq!(steps, [1, 2, 3, 4, 5, 6], "the steps before the failure");
    assert!(mlrun
        .join("artifacts/checkpoints/step-00000005/trainer_state.json")
        .is_file());
}
