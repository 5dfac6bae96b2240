//! The metric sinks, the metrics hub and the run directory, through their public APIs.
//!
//! File formats are compared byte for byte; the hub's robustness is shown with test sinks
//! that fail, panic or block, built with the same `Sink` trait and `declare` a plugin uses.
//! Nothing here asserts on elapsed time: a blocked sink is shown not to block recording by
//! counting the records it missed.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use codex_host::metrics::{open_sink, HubOptions, MetricsError, MetricsHub, MAX_BATCH};
use codex_host::rundir::{Metadata, MetadataInput, PluginLock, RunDir, RunDirError};
use codex_plugin_api::sink::{declare, SinkBox};
use codex_plugin_api::{bail, ComponentDecl, Describe, Record, Result, Sink};

fn builtin(name: &str) -> ComponentDecl {
    codex_plugin_api::component::builtins()
        .map(|b| (b.declare)())
        .find(|d| d.name.as_str() == name)
        .unwrap_or_else(|| panic!("built-in `{name}` is not registered"))
}

fn sink(name: &str, decl: &ComponentDecl, dir: &Path, resume: Option<u64>) -> (String, SinkBox) {
    let s = open_sink(name, decl, "", dir, resume).unwrap_or_else(|e| panic!("{e}"));
    (name.to_string(), s)
}

fn rec(step: u64, name: &str, value: f64) -> Record {
    Record {
        step,
        split: "train".into(),
        name: name.into(),
        value,
        time: 1764000000.123,
    }
}

fn start(dir: &Path, resume: Option<u64>, sinks: Vec<(String, SinkBox)>) -> MetricsHub {
    MetricsHub::start(HubOptions::new(dir, resume), sinks).unwrap_or_else(|e| panic!("{e}"))
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn steps_ndjson(path: &Path) -> Vec<u64> {
    read(path)
        .lines()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}"));
            v["step"]
                .as_u64()
                .unwrap_or_else(|| panic!("no step in {l:?}"))
        })
        .collect()
}

#[test]
fn ndjson_lines_have_the_documented_form() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start(dir.path(), None, vec![]);
    let r = hub.recorder();
    r.send(rec(120, "loss", 2.31));
    r.send(Record {
        split: "val".into(),
        ..rec(120, "perplexity", f64::NAN)
    });
    r.send(rec(121, "grad_norm", f64::INFINITY));
    let report = hub.finish();
    assert_eq!(report.sink("ndjson").map(|s| s.written), Some(3));
    assert_eq!(
        read(&dir.path().join("metrics.ndjson")),
        concat!(
            "{\"step\":120,\"split\":\"train\",\"name\":\"loss\",\"value\":2.31,\"time\":1764000000.123}\n",
            "{\"step\":120,\"split\":\"val\",\"name\":\"perplexity\",\"value\":null,\"time\":1764000000.123}\n",
            "{\"step\":121,\"split\":\"train\",\"name\":\"grad_norm\",\"value\":null,\"time\":1764000000.123}\n",
        )
    );
}

/// The records of a TFRecord file (`u64` length, masked CRC-32C of it, data, masked CRC-32C
/// of the data), read here independently of the sink, every CRC checked.
fn tfrecords(bytes: &[u8]) -> Vec<Vec<u8>> {
    let masked = |b: &[u8]| {
        crc32c::crc32c(b)
            .rotate_right(15)
            .wrapping_add(0xa282_ead8)
            .to_le_bytes()
    };
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
        assert_eq!(rest[8..12], masked(&rest[..8]), "length CRC");
        let data = &rest[12..12 + len];
        assert_eq!(rest[12 + len..16 + len], masked(data), "data CRC");
        out.push(data.to_vec());
        rest = &rest[16 + len..];
    }
    out
}

#[test]
fn tensorboard_event_files_are_framed_records() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.ron"), "(seed: 7)\n").unwrap();
    let hub = start(
        dir.path(),
        None,
        vec![sink(
            "tensorboard",
            &builtin("tensorboard"),
            dir.path(),
            None,
        )],
    );
    hub.recorder().send(rec(120, "loss", 2.31));
    hub.recorder().send(rec(121, "lr", 3e-7));
    let report = hub.finish();
    assert_eq!(report.sink("tensorboard").map(|s| s.written), Some(2));
    let files: Vec<_> = fs::read_dir(dir.path().join("tensorboard"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let name = files[0].file_name().unwrap().to_str().unwrap().to_string();
    assert!(name.starts_with("events.out.tfevents."), "{name}");
    let records = tfrecords(&fs::read(&files[0]).unwrap());
    // file_version, the config text, two scalars.
    assert_eq!(records.len(), 4);
    let has = |record: &[u8], text: &[u8]| record.windows(text.len()).any(|w| w == text);
    assert!(has(&records[0], b"brain.Event:2"));
    assert!(has(&records[1], b"    (seed: 7)") && has(&records[1], b"text"));
    assert!(has(&records[2], b"train/loss") && has(&records[2], &2.31f32.to_le_bytes()));
    assert!(has(&records[3], b"train/lr") && has(&records[3], &3e-7f32.to_le_bytes()));
}

#[test]
fn csv_rows_have_the_documented_form() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start(
        dir.path(),
        None,
        vec![sink("csv", &builtin("csv"), dir.path(), None)],
    );
    hub.recorder().send(rec(120, "loss", 2.31));
    hub.recorder().send(rec(121, "lr", 3e-7));
    hub.finish();
    assert_eq!(
        read(&dir.path().join("metrics.csv")),
        "step,split,name,value,time\n120,train,loss,2.31,1764000000.123\n121,train,lr,3e-7,1764000000.123\n"
    );
}

#[test]
fn resume_supersedes_later_steps_in_both_files() {
    let dir = tempfile::tempdir().unwrap();
    let csv = builtin("csv");
    let hub = start(dir.path(), None, vec![sink("csv", &csv, dir.path(), None)]);
    for step in 1..=10 {
        hub.recorder().send(rec(step, "loss", step as f64));
    }
    hub.finish();

    let hub = start(
        dir.path(),
        Some(5),
        vec![sink("csv", &csv, dir.path(), Some(5))],
    );
    for step in 6..=8 {
        hub.recorder().send(rec(step, "loss", step as f64));
    }
    hub.finish();

    assert_eq!(
        steps_ndjson(&dir.path().join("metrics.ndjson")),
        [1, 2, 3, 4, 5, 6, 7, 8]
    );
    let csv_text = read(&dir.path().join("metrics.csv"));
    let mut lines = csv_text.lines();
    assert_eq!(lines.next(), Some("step,split,name,value,time"));
    let steps: Vec<&str> = lines.map(|l| l.split(',').next().unwrap_or("")).collect();
    assert_eq!(steps, ["1", "2", "3", "4", "5", "6", "7", "8"]);
}

#[test]
fn a_fresh_run_refuses_an_existing_metrics_file() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("metrics.ndjson"), "").unwrap();
    match MetricsHub::start(HubOptions::new(dir.path(), None), vec![]) {
        Err(MetricsError::Open { name, message }) => {
            assert_eq!(name, "ndjson");
            assert!(message.contains("already exists"), "{message}");
        }
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("an existing metrics.ndjson was accepted for a fresh run"),
    }
}

#[test]
fn metrics_ndjson_is_always_written_and_never_twice() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start(
        dir.path(),
        None,
        vec![sink("csv", &builtin("csv"), dir.path(), None)],
    );
    assert_eq!(hub.sink_names(), ["ndjson", "csv"]);
    hub.record(1, "train", "loss", 1.5);
    hub.finish();
    assert_eq!(steps_ndjson(&dir.path().join("metrics.ndjson")), [1]);

    let dir = tempfile::tempdir().unwrap();
    let hub = start(
        dir.path(),
        None,
        vec![sink("ndjson", &builtin("ndjson"), dir.path(), None)],
    );
    assert_eq!(hub.sink_names(), ["ndjson"]);
    hub.record(1, "train", "loss", 1.5);
    hub.finish();
    assert_eq!(steps_ndjson(&dir.path().join("metrics.ndjson")), [1]);
}

#[test]
fn sync_makes_recorded_metrics_visible_before_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start(dir.path(), None, vec![]);
    for step in 1..=3 {
        hub.record(step, "train", "loss", 1.0);
    }
    assert!(hub.sync(Duration::from_secs(60)));
    assert_eq!(steps_ndjson(&dir.path().join("metrics.ndjson")), [1, 2, 3]);
    hub.finish();
}

#[test]
fn open_sink_refuses_a_declaration_of_another_kind() {
    let decl = codex_plugin_api::trainer::declare::<codex_trainer_probe::Probe>();
    let dir = tempfile::tempdir().unwrap();
    match open_sink("probe", &decl, "", dir.path(), None) {
        Err(MetricsError::NotASink { found, .. }) => assert_eq!(found, "trainer"),
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("a trainer was opened as a sink"),
    }
}

/// A trainer that is never run: only its declaration's kind matters.
mod codex_trainer_probe {
    use codex_plugin_api::trainer::{Session, TrainOutcome, Trainer};
    use codex_plugin_api::{bail, Describe, Result};

    pub(super) struct Probe;
    impl Describe for Probe {
        const NAME: &'static str = "probe";
        const VERSION: &'static str = "0";
        const DESCRIPTION: &'static str = "declaration-kind probe";
    }
    impl Trainer for Probe {
        fn create(_: &str) -> Result<Self> {
            Ok(Probe)
        }
        fn train(&mut self, _: &mut Session<'_, '_>) -> Result<TrainOutcome> {
            bail!("not runnable")
        }
    }
}

/// Fails on its second batch.
struct Failing {
    calls: u32,
}
impl Describe for Failing {
    const NAME: &'static str = "failing";
    const VERSION: &'static str = "0";
    const DESCRIPTION: &'static str = "fails on its second write";
}
impl Sink for Failing {
    fn create(_: &str, _: &str, _: Option<u64>) -> Result<Self> {
        Ok(Failing { calls: 0 })
    }
    fn write(&mut self, _: &[Record]) -> Result<()> {
        self.calls += 1;
        if self.calls >= 2 {
            bail!("disk on fire");
        }
        Ok(())
    }
}

/// Panics on its first batch.
struct Panicking;
impl Describe for Panicking {
    const NAME: &'static str = "panicking";
    const VERSION: &'static str = "0";
    const DESCRIPTION: &'static str = "panics on write";
}
impl Sink for Panicking {
    fn create(_: &str, _: &str, _: Option<u64>) -> Result<Self> {
        Ok(Panicking)
    }
    fn write(&mut self, _: &[Record]) -> Result<()> {
        panic!("index out of bounds in a plugin")
    }
}

fn run_with_broken(
    name: &str,
    broken: &ComponentDecl,
) -> (codex_host::metrics::HubReport, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let sinks = vec![
        sink(name, broken, dir.path(), None),
        sink("csv", &builtin("csv"), dir.path(), None),
    ];
    let hub = start(dir.path(), None, sinks);
    for step in 1..=50 {
        hub.record(step, "train", "loss", 1.0);
        // Separate batches, so that the failing sink meets its second write.
        assert!(hub.sync(Duration::from_secs(60)));
    }
    (hub.finish(), dir)
}

fn assert_others_complete(report: &codex_host::metrics::HubReport, dir: &Path) {
    for name in ["ndjson", "csv"] {
        let s = report
            .sink(name)
            .unwrap_or_else(|| panic!("no report for {name}"));
        assert_eq!(
            (s.written, s.dropped, s.disabled.as_deref(), s.finished),
            (50, 0, None, true),
            "{name}"
        );
    }
    assert_eq!(
        steps_ndjson(&dir.join("metrics.ndjson")),
        (1..=50).collect::<Vec<u64>>()
    );
    assert_eq!(read(&dir.join("metrics.csv")).lines().count(), 51);
}

#[test]
fn a_failing_sink_is_disabled_and_the_others_complete() {
    let (report, dir) = run_with_broken("failing", &declare::<Failing>());
    let failing = report
        .sink("failing")
        .unwrap_or_else(|| panic!("no report"));
    let reason = failing.disabled.as_deref().unwrap_or_default();
    assert!(
        reason.contains("disk on fire") && reason.contains("write"),
        "{reason}"
    );
    assert_eq!(failing.written, 1);
    assert_others_complete(&report, dir.path());
}

/// A failing sink is only disabled; the run's record failing is reported to the training side,
/// which stops the run on it.
#[test]
fn only_the_runs_record_failing_is_reported_to_the_training_side() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start(
        dir.path(),
        None,
        vec![sink("failing", &declare::<Failing>(), dir.path(), None)],
    );
    for step in 1..=3 {
        hub.record(step, "train", "loss", 1.0);
        assert!(hub.sync(Duration::from_secs(60)));
    }
    assert_eq!(hub.recorder().record_failed(), None);
    hub.finish();

    let dir = tempfile::tempdir().unwrap();
    let hub = start(
        dir.path(),
        None,
        vec![sink("ndjson", &declare::<Failing>(), dir.path(), None)],
    );
    hub.record(1, "train", "loss", 1.0);
    assert!(hub.sync(Duration::from_secs(60)));
    assert_eq!(
        hub.recorder().record_failed(),
        None,
        "the first write works"
    );
    hub.record(2, "train", "loss", 1.0);
    assert!(hub.sync(Duration::from_secs(60)));
    let reason = hub.recorder().record_failed().expect("the record failed");
    assert!(reason.contains("disk on fire"), "{reason}");
    hub.finish();
}

#[test]
fn a_panicking_sink_is_disabled_and_the_others_complete() {
    let (report, dir) = run_with_broken("panicking", &declare::<Panicking>());
    let panicking = report
        .sink("panicking")
        .unwrap_or_else(|| panic!("no report"));
    let reason = panicking.disabled.as_deref().unwrap_or_default();
    assert!(
        reason.contains("panicked") && reason.contains("index out of bounds"),
        "{reason}"
    );
    assert_eq!(panicking.written, 0);
    assert_others_complete(&report, dir.path());
}

/// Blocks every write until [`GATE`] opens.
struct Gated {
    seen: u64,
}
static GATE: (Mutex<bool>, Condvar) = (Mutex::new(false), Condvar::new());
static GATED_SEEN: Mutex<u64> = Mutex::new(0);

impl Describe for Gated {
    const NAME: &'static str = "gated";
    const VERSION: &'static str = "0";
    const DESCRIPTION: &'static str = "blocks until the test opens its gate";
}
impl Sink for Gated {
    fn create(_: &str, _: &str, _: Option<u64>) -> Result<Self> {
        Ok(Gated { seen: 0 })
    }
    fn write(&mut self, records: &[Record]) -> Result<()> {
        let (lock, cv) = &GATE;
        let mut open = lock
            .lock()
            .map_err(|_| codex_plugin_api::Error::msg("gate poisoned"))?;
        while !*open {
            open = cv
                .wait(open)
                .map_err(|_| codex_plugin_api::Error::msg("gate poisoned"))?;
        }
        self.seen += records.len() as u64;
        Ok(())
    }
    fn finish(&mut self) -> Result<()> {
        *GATED_SEEN
            .lock()
            .map_err(|_| codex_plugin_api::Error::msg("poisoned"))? = self.seen;
        Ok(())
    }
}

#[test]
fn a_blocked_sink_does_not_block_recording_and_its_losses_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = HubOptions::new(dir.path(), None);
    options.capacity = 4;
    let gated = sink("gated", &declare::<Gated>(), dir.path(), None);
    let hub = MetricsHub::start(options, vec![gated]).unwrap_or_else(|e| panic!("{e}"));
    // The gated thread can hold at most one batch plus its queue; everything else must be
    // dropped for it, since recording never waits.
    let total = 3 * MAX_BATCH as u64;
    for step in 1..=total {
        hub.record(step, "train", "loss", 1.0);
    }
    let recorder = hub.recorder();
    assert!(
        recorder.dropped() >= total - MAX_BATCH as u64 - 4,
        "dropped {}",
        recorder.dropped()
    );

    {
        let (lock, cv) = &GATE;
        *lock.lock().unwrap() = true;
        cv.notify_all();
    }
    let report = hub.finish();
    let g = report.sink("gated").unwrap_or_else(|| panic!("no report"));
    assert!(g.finished && g.disabled.is_none());
    assert_eq!(g.written + g.dropped, total);
    assert_eq!(*GATED_SEEN.lock().unwrap(), g.written);
    // The built-in sink is not held up by the blocked one beyond its own queue: whatever it
    // accepted is in the file, and nothing is unaccounted for.
    let n = report.sink("ndjson").unwrap_or_else(|| panic!("no report"));
    assert_eq!(n.written + n.dropped, total);
    assert_eq!(
        steps_ndjson(&dir.path().join("metrics.ndjson")).len() as u64,
        n.written
    );
}

fn started() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_795_551_300)
}

#[test]
fn run_ids_are_unique_within_a_second() {
    let root = tempfile::tempdir().unwrap();
    let ids: Vec<String> = (0..3)
        .map(|_| {
            RunDir::create_new(root.path(), "tiny", started())
                .unwrap_or_else(|e| panic!("{e}"))
                .run_id()
                .to_string()
        })
        .collect();
    assert_eq!(
        ids,
        ["20261124-201500", "20261124-201500-2", "20261124-201500-3"]
    );
    for id in &ids {
        assert!(root.path().join("tiny").join(id).is_dir());
    }
}

fn metadata_for(run: &RunDir) -> Metadata {
    Metadata::collect(
        run,
        MetadataInput {
            started: started(),
            threads: 2,
            device: "cpu".to_string(),
            seeds: BTreeMap::from([("run".to_string(), 1234)]),
            plugins: vec![
                PluginLock {
                    name: "adamw".to_string(),
                    origin: "builtin".to_string(),
                    sha256: None,
                },
                PluginLock {
                    name: "mine/lion".to_string(),
                    origin: "plugins/libmine.so".to_string(),
                    sha256: Some("ab".repeat(32)),
                },
            ],
            data: None,
        },
    )
}

#[test]
fn metadata_json_holds_the_facts_of_the_run() {
    let root = tempfile::tempdir().unwrap();
    let run = RunDir::create_new(root.path(), "tiny", started()).unwrap_or_else(|e| panic!("{e}"));
    let written = run
        .write_metadata(&metadata_for(&run))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(written, run.metadata_path());
    let v: serde_json::Value =
        serde_json::from_str(&read(&written)).unwrap_or_else(|e| panic!("{e}"));

    assert_eq!(v["experiment"], "tiny");
    assert_eq!(v["run_id"], "20261124-201500");
    assert_eq!(v["started"], "2026-11-24T20:15:00Z");
    assert_eq!(v["tool"]["name"], "codex-ml");
    assert_eq!(v["tool"]["version"], env!("CARGO_PKG_VERSION"));
    let commit = v["tool"]["git_commit"].as_str().unwrap_or_default();
    assert!(
        commit == "unknown"
            || (commit.len() >= 40 && commit.chars().all(|c| c.is_ascii_hexdigit())),
        "{commit}"
    );
    for dep in ["candle-core", "tokenizers", "safetensors", "abi_stable"] {
        let version = v["dependencies"][dep].as_str().unwrap_or_default();
        assert!(
            version.chars().next().is_some_and(|c| c.is_ascii_digit()),
            "{dep}: {version:?}"
        );
    }
    assert_eq!(v["os"]["name"], std::env::consts::OS);
    assert!(v["cpu"]["model"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(v["cpu"]["logical_cores"].as_u64().is_some_and(|n| n >= 1));
    assert_eq!(v["threads"], 2);
    assert_eq!(v["device"], "cpu");
    assert_eq!(v["seeds"]["run"], 1234);
    assert_eq!(v["plugins"][0]["sha256"], serde_json::Value::Null);
    assert_eq!(v["plugins"][1]["origin"], "plugins/libmine.so");
    assert_eq!(v["plugins"][1]["sha256"], "ab".repeat(32));
}

#[test]
fn an_explicit_run_dir_is_created_or_must_be_empty() {
    let root = tempfile::tempdir().unwrap();
    let fresh = root.path().join("a").join("b");
    let run = RunDir::create_at(&fresh, "tiny").unwrap_or_else(|e| panic!("{e}"));
    assert!(fresh.is_dir());
    assert_eq!(run.run_id(), "b");

    let empty = root.path().join("empty");
    fs::create_dir(&empty).unwrap();
    assert!(RunDir::create_at(&empty, "tiny").is_ok());

    let other = root.path().join("other");
    fs::create_dir(&other).unwrap();
    fs::write(other.join("notes.txt"), "keep me").unwrap();
    assert!(matches!(
        RunDir::create_at(&other, "tiny"),
        Err(RunDirError::NotEmpty { .. })
    ));
    assert_eq!(read(&other.join("notes.txt")), "keep me");

    let file = root.path().join("file");
    fs::write(&file, "x").unwrap();
    assert!(matches!(
        RunDir::create_at(&file, "tiny"),
        Err(RunDirError::NotADirectory { .. })
    ));
}

#[test]
fn an_earlier_run_is_reopened_only_to_resume_and_never_clobbered() {
    let root = tempfile::tempdir().unwrap();
    let path = root.path().join("run");
    let run = RunDir::create_at(&path, "tiny").unwrap_or_else(|e| panic!("{e}"));
    run.write_config("(seed: 1)")
        .unwrap_or_else(|e| panic!("{e}"));
    run.write_metadata(&metadata_for(&run))
        .unwrap_or_else(|e| panic!("{e}"));

    match RunDir::create_at(&path, "tiny") {
        Err(e @ RunDirError::ExistingRun { .. }) => {
            assert!(e.to_string().contains("--resume"), "{e}")
        }
        other => panic!("expected ExistingRun, got {other:?}"),
    }
    assert!(matches!(
        RunDir::create_at(&path, "other"),
        Err(RunDirError::NotEmpty { .. })
    ));
    assert!(matches!(
        RunDir::open_existing(&path, "other"),
        Err(RunDirError::OtherExperiment { .. })
    ));
    assert!(matches!(
        RunDir::open_existing(root.path(), "tiny"),
        Err(RunDirError::NotARun { .. })
    ));

    // While the first holds the directory, it cannot be reopened (see the lock tests in
    // resume.rs); the first session ends here.
    assert!(matches!(
        RunDir::open_existing(&path, "tiny"),
        Err(RunDirError::InUse { .. })
    ));
    drop(run);
    let resumed = RunDir::open_existing(&path, "tiny").unwrap_or_else(|e| panic!("{e}"));
    assert!(resumed.resumed());
    let second = resumed
        .write_config("(seed: 2)")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(second, path.join("config.resume-1.ron"));
    assert_eq!(read(&path.join("config.ron")), "(seed: 1)");
    assert_eq!(read(&second), "(seed: 2)");
    let meta = resumed
        .write_metadata(&metadata_for(&resumed))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(meta, path.join("metadata.resume-1.json"));
    let v: serde_json::Value = serde_json::from_str(&read(&meta)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(v["resumed"], true);
    // No temporary files are left behind.
    let names: Vec<String> = fs::read_dir(&path)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(names.is_empty(), "{names:?}");
}
