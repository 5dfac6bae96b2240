//! The `mlflow` tracker's file store: the run recorded in a directory, offline, for `mlflow ui`
//! to read.
//!
//! The layout is MLflow's own (`mlflow/store/tracking/file_store.py`):
//!
//! ```text
//! <root>/<experiment_id>/meta.yaml                 name, artifact_location, lifecycle_stage, ...
//! <root>/<experiment_id>/<run_uuid>/meta.yaml      run_id, status, start_time, end_time, ...
//!                                   params/<key>   the raw value, no newline
//!                                   metrics/<key>  "<timestamp_ms> <value> <step>" per line
//!                                   tags/<key>     the raw value, no newline
//!                                   artifacts/     copies of the run's files
//! ```
//!
//! Choices, and why:
//! - **Where.** The store defaults to `mlruns` in the parent of the run directory (beside the
//!   runs of the experiment: `runs/<experiment>/mlruns`); a relative path resolves there too.
//!   A store created here also gets MLflow's `Default` experiment `0` and `.trash`, as MLflow
//!   itself would create them.
//! - **Which run.** Every run is tagged `codex.run_id` (the run directory's name) and
//!   `codex.run_dir`. A resumed codex-ml run continues the MLflow run with the same
//!   `codex.run_id` in the experiment (the one with the same `codex.run_dir` when there are
//!   several), drops its metric points after the resume step (the resumed run records those
//!   steps again) and sets it `RUNNING` again; without one it starts a new MLflow run.
//! - **Metrics** are keyed `<split>/<name>` (`train/loss`, `val/perplexity`); values are
//!   written in their shortest round-trip form, which Python's `float` reads back exactly.
//! - **Params** are written as given; a resumed run whose config changed (a longer
//!   `train.max_steps`, say) overwrites the value, so the run shows the config it ended with.
//!   Keys keep the characters MLflow allows (letters, digits, `_ - . /` and space); any other
//!   character becomes `_`.
//! - **Artifacts** are copied into `artifacts/<path inside the run directory>` when a file is
//!   at most `max_copy_bytes` (default 16 MiB): the run's config, metadata and tokenizer, and
//!   the checkpoints of small models. A larger file is recorded by path instead, in the tag
//!   `codex.artifact.<path inside the run directory>`, so that a store does not double the disk
//!   a large model takes. A file that retention removed before it could be copied is skipped.
//! - **Status** is MLflow's integer enum in `meta.yaml`: `RUNNING` = 1 while the run goes on,
//!   then `FINISHED` = 3, `FAILED` = 4 or `KILLED` = 5 (Ctrl-C), with `end_time`.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use codex_plugin_api::{Error, Record, Result, RunInfo, RunStatus};

use super::{now_ms, percent_encode, rel_key, safe_key, RUN_DIR_TAG, RUN_ID_TAG};
use crate::yaml::{self, Scalar};

const DEFAULT_ROOT: &str = "mlruns";

/// MLflow's `RunStatus` values, as stored in `meta.yaml`.
const RUNNING: i64 = 1;
const FINISHED: i64 = 3;
const FAILED: i64 = 4;
const KILLED: i64 = 5;
/// MLflow's `SourceType.LOCAL`.
const SOURCE_LOCAL: i64 = 4;

/// Records a run in an MLflow file store.
pub(super) struct FileStore {
    root: Option<PathBuf>,
    experiment_name: Option<String>,
    max_copy_bytes: u64,
    run: Option<OpenRun>,
}

/// The MLflow run being written.
struct OpenRun {
    /// `<root>/<experiment_id>/<run_uuid>`.
    dir: PathBuf,
    /// The codex-ml run directory (absolute), to place artifacts relative to it.
    run_dir: PathBuf,
}

fn fail(what: impl std::fmt::Display) -> Error {
    Error::msg(format!("mlflow: {what}"))
}

fn io_fail(action: &str, path: &Path, e: io::Error) -> Error {
    fail(format!("cannot {action} {}: {e}", path.display()))
}

impl FileStore {
    /// A store at `root` (see the module's choices for the default), recording into
    /// `experiment_name` (default: the config's experiment).
    pub(super) fn new(
        root: Option<PathBuf>,
        experiment_name: Option<String>,
        max_copy_bytes: u64,
    ) -> FileStore {
        FileStore {
            root,
            experiment_name,
            max_copy_bytes,
            run: None,
        }
    }

    pub(super) fn start(&mut self, run: &RunInfo) -> Result<()> {
        let experiment = self.experiment(run)?;
        let dir = create_run(&experiment, run)?;
        self.run = Some(OpenRun {
            dir,
            run_dir: PathBuf::from(run.run_dir.as_str()),
        });
        Ok(())
    }

    pub(super) fn resume(&mut self, run: &RunInfo, step: u64) -> Result<()> {
        let experiment = self.experiment(run)?;
        let dir = match find_run(&experiment.dir, run)? {
            Some(dir) => {
                supersede_after(&dir.join("metrics"), step)?;
                let meta = dir.join("meta.yaml");
                update_meta(
                    &meta,
                    &[("status", Scalar::Int(RUNNING)), ("end_time", Scalar::Null)],
                )?;
                dir
            }
            None => create_run(&experiment, run)?,
        };
        write_value(
            &dir.join("tags"),
            "codex.resumed_from_step",
            &step.to_string(),
        )?;
        self.run = Some(OpenRun {
            dir,
            run_dir: PathBuf::from(run.run_dir.as_str()),
        });
        Ok(())
    }

    pub(super) fn log_params(&mut self, params: &[(String, String)]) -> Result<()> {
        let run = self.open("log_params")?;
        let dir = run.dir.join("params");
        for (key, value) in params {
            write_value(&dir, &safe_key(key), value)?;
        }
        Ok(())
    }

    pub(super) fn log_metrics(&mut self, records: &[Record]) -> Result<()> {
        let run = self.open("log_metrics")?;
        let dir = run.dir.join("metrics");
        // One open per metric per batch: records arrive grouped by step, each step naming a
        // handful of metrics, so gather each metric's lines first.
        let mut lines: Vec<(String, String)> = Vec::new();
        for r in records {
            let key = safe_key(&format!("{}/{}", r.split, r.name));
            let line = metric_line(r);
            match lines.iter_mut().find(|(k, _)| *k == key) {
                Some((_, text)) => text.push_str(&line),
                None => lines.push((key, line)),
            }
        }
        for (key, text) in lines {
            let path = dir.join(&key);
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent).map_err(|e| io_fail("create", parent, e))?;
            }
            let mut file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| io_fail("open", &path, e))?;
            file.write_all(text.as_bytes())
                .map_err(|e| io_fail("write", &path, e))?;
        }
        Ok(())
    }

    pub(super) fn log_artifact(&mut self, path: &str) -> Result<()> {
        let limit = self.max_copy_bytes;
        let run = self.open("log_artifact")?;
        let source = PathBuf::from(path);
        let rel = match source.strip_prefix(&run.run_dir) {
            Ok(rel) if !rel.as_os_str().is_empty() => rel.to_path_buf(),
            _ => PathBuf::from(source.file_name().unwrap_or(source.as_os_str())),
        };
        copy_artifact(&source, &rel, &run.dir, limit)
    }

    pub(super) fn finish(&mut self, status: RunStatus) -> Result<()> {
        let run = self.open("finish")?;
        let code = match status {
            RunStatus::Finished => FINISHED,
            RunStatus::Failed => FAILED,
            RunStatus::Killed => KILLED,
        };
        update_meta(
            &run.dir.join("meta.yaml"),
            &[
                ("status", Scalar::Int(code)),
                ("end_time", Scalar::Int(now_ms())),
            ],
        )
    }
}

/// An experiment of the store.
struct Experiment {
    id: String,
    dir: PathBuf,
}

impl FileStore {
    fn open(&self, call: &str) -> Result<&OpenRun> {
        self.run
            .as_ref()
            .ok_or_else(|| fail(format!("{call} before the run started")))
    }

    fn root(&self, run: &RunInfo) -> PathBuf {
        let run_dir = Path::new(run.run_dir.as_str());
        let base = run_dir.parent().unwrap_or(Path::new("."));
        match &self.root {
            Some(root) if root.is_absolute() => root.clone(),
            Some(root) => base.join(root),
            None => base.join(DEFAULT_ROOT),
        }
    }

    /// The experiment to record into, created (with the store) when missing.
    fn experiment(&self, run: &RunInfo) -> Result<Experiment> {
        let root = self.root(run);
        let name = self
            .experiment_name
            .clone()
            .unwrap_or_else(|| run.experiment.to_string());
        if !root.exists() {
            fs::create_dir_all(&root).map_err(|e| io_fail("create", &root, e))?;
            create_experiment(&root, "0", "Default")?;
        }
        let trash = root.join(".trash");
        if !trash.exists() {
            fs::create_dir_all(&trash).map_err(|e| io_fail("create", &trash, e))?;
        }
        if let Some(found) = find_experiment(&root, &name)? {
            return Ok(found);
        }
        // MLflow's ids are random positive integers; retry the rare collision.
        for _ in 0..16 {
            let id = (rand::random::<u64>() >> 2).max(1).to_string();
            if !root.join(&id).exists() {
                return create_experiment(&root, &id, &name);
            }
        }
        Err(fail(format!(
            "no free experiment id under {}; check the directory",
            root.display()
        )))
    }
}

fn create_experiment(root: &Path, id: &str, name: &str) -> Result<Experiment> {
    let dir = root.join(id);
    fs::create_dir(&dir).map_err(|e| io_fail("create", &dir, e))?;
    let now = now_ms();
    let meta = yaml::write(&[
        ("artifact_location", Scalar::Str(file_uri(&dir))),
        ("creation_time", Scalar::Int(now)),
        ("experiment_id", Scalar::Str(id.to_string())),
        ("last_update_time", Scalar::Int(now)),
        ("lifecycle_stage", Scalar::Str("active".into())),
        ("name", Scalar::Str(name.to_string())),
    ]);
    write_file(&dir.join("meta.yaml"), meta.as_bytes())?;
    Ok(Experiment {
        id: id.to_string(),
        dir,
    })
}

/// The active experiment named `name`; a deleted one of that name is an error, as in MLflow.
fn find_experiment(root: &Path, name: &str) -> Result<Option<Experiment>> {
    for entry in fs::read_dir(root).map_err(|e| io_fail("read", root, e))? {
        let entry = entry.map_err(|e| io_fail("read", root, e))?;
        let dir = entry.path();
        let meta_path = dir.join("meta.yaml");
        if entry.file_name().to_string_lossy().starts_with('.') || !meta_path.is_file() {
            continue;
        }
        let text = fs::read_to_string(&meta_path).map_err(|e| io_fail("read", &meta_path, e))?;
        let meta = yaml::read(&text);
        if meta.get("name").cloned().flatten().as_deref() != Some(name) {
            continue;
        }
        if meta.get("lifecycle_stage").cloned().flatten().as_deref() == Some("deleted") {
            return Err(fail(format!(
                "experiment `{name}` is deleted in {}; restore it (`mlflow experiments restore`) or set the tracker's experiment_name",
                root.display()
            )));
        }
        let id = meta
            .get("experiment_id")
            .cloned()
            .flatten()
            .unwrap_or_else(|| entry.file_name().to_string_lossy().into_owned());
        return Ok(Some(Experiment { id, dir }));
    }
    Ok(None)
}

/// A new MLflow run for `run` in `experiment`, `RUNNING`.
fn create_run(experiment: &Experiment, run: &RunInfo) -> Result<PathBuf> {
    let uuid = format!("{:032x}", rand::random::<u128>());
    let dir = experiment.dir.join(&uuid);
    fs::create_dir(&dir).map_err(|e| io_fail("create", &dir, e))?;
    for sub in ["metrics", "params", "tags", "artifacts"] {
        let path = dir.join(sub);
        fs::create_dir(&path).map_err(|e| io_fail("create", &path, e))?;
    }
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("USERNAME"))
        .unwrap_or_else(|_| "codex-ml".to_string());
    let meta = yaml::write(&[
        (
            "artifact_uri",
            Scalar::Str(file_uri(&dir.join("artifacts"))),
        ),
        ("deleted_time", Scalar::Null),
        ("end_time", Scalar::Null),
        ("entry_point_name", Scalar::Str(String::new())),
        ("experiment_id", Scalar::Str(experiment.id.clone())),
        ("lifecycle_stage", Scalar::Str("active".into())),
        ("run_id", Scalar::Str(uuid.clone())),
        ("run_name", Scalar::Str(run.run_id.to_string())),
        ("run_uuid", Scalar::Str(uuid.clone())),
        ("source_name", Scalar::Str(String::new())),
        ("source_type", Scalar::Int(SOURCE_LOCAL)),
        ("source_version", Scalar::Str(String::new())),
        ("start_time", Scalar::Int(now_ms())),
        ("status", Scalar::Int(RUNNING)),
        ("tags", Scalar::EmptyList),
        ("user_id", Scalar::Str(user.clone())),
    ]);
    write_file(&dir.join("meta.yaml"), meta.as_bytes())?;
    let tags = dir.join("tags");
    for (key, value) in [
        ("mlflow.runName", run.run_id.as_str()),
        ("mlflow.user", user.as_str()),
        ("mlflow.source.type", "LOCAL"),
        ("mlflow.source.name", "codex-ml"),
        (RUN_ID_TAG, run.run_id.as_str()),
        (RUN_DIR_TAG, run.run_dir.as_str()),
    ] {
        write_value(&tags, key, value)?;
    }
    Ok(dir)
}

/// The MLflow run an earlier session of `run` wrote, if any.
fn find_run(experiment_dir: &Path, run: &RunInfo) -> Result<Option<PathBuf>> {
    let mut same_id = Vec::new();
    let entries = fs::read_dir(experiment_dir).map_err(|e| io_fail("read", experiment_dir, e))?;
    for entry in entries {
        let dir = entry
            .map_err(|e| io_fail("read", experiment_dir, e))?
            .path();
        let tag = |key: &str| fs::read_to_string(dir.join("tags").join(key)).ok();
        if dir.join("meta.yaml").is_file()
            && tag(RUN_ID_TAG).as_deref() == Some(run.run_id.as_str())
        {
            let same_dir = tag(RUN_DIR_TAG).as_deref() == Some(run.run_dir.as_str());
            same_id.push((same_dir, dir));
        }
    }
    // Prefer the run written from this very directory; else any with the same run id.
    same_id.sort_by_key(|(same_dir, _)| !*same_dir);
    Ok(same_id.into_iter().next().map(|(_, dir)| dir))
}

/// `"<timestamp_ms> <value> <step>\n"`, the value in its shortest round-trip form (`NaN`,
/// `inf` and `-inf` included, all of which Python's `float` reads).
fn metric_line(r: &Record) -> String {
    let ms = (r.time * 1000.0).round();
    let ms = if ms.is_finite() { ms as i64 } else { 0 };
    format!("{ms} {:?} {}\n", r.value, r.step)
}

/// Drop the metric points after `step` in every file under `dir` (the resumed run records
/// them again). A last line without its newline is a write torn by a kill and goes too.
fn supersede_after(dir: &Path, step: u64) -> Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_fail("read", dir, e)),
    };
    for entry in entries {
        let path = entry.map_err(|e| io_fail("read", dir, e))?.path();
        if path.is_dir() {
            supersede_after(&path, step)?;
            continue;
        }
        let text = fs::read_to_string(&path).map_err(|e| io_fail("read", &path, e))?;
        let mut kept = String::with_capacity(text.len());
        for line in text.split_inclusive('\n') {
            if !line.ends_with('\n') {
                continue;
            }
            // `<ts> <value> [<step>]`; MLflow reads a missing step as 0.
            let line_step = match line.split_whitespace().nth(2) {
                Some(s) => s.parse::<u64>().map_err(|_| {
                    fail(format!(
                        "{}: `{}` is not a metric line; fix or remove the file",
                        path.display(),
                        line.trim_end()
                    ))
                })?,
                None => 0,
            };
            if line_step <= step {
                kept.push_str(line);
            }
        }
        if kept.len() != text.len() {
            write_file(&path, kept.as_bytes())?;
        }
    }
    Ok(())
}

/// Copy `source` (a file or a directory, `rel` inside the run directory) into the MLflow
/// run's artifacts, or record it by path when it is larger than `limit`.
fn copy_artifact(source: &Path, rel: &Path, run: &Path, limit: u64) -> Result<()> {
    let meta = match fs::metadata(source) {
        Ok(meta) => meta,
        // Retention may remove a checkpoint before this thread reaches it.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_fail("read", source, e)),
    };
    if meta.is_dir() {
        let entries = match fs::read_dir(source) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_fail("read", source, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| io_fail("read", source, e))?;
            copy_artifact(&entry.path(), &rel.join(entry.file_name()), run, limit)?;
        }
        return Ok(());
    }
    let rel_text = safe_key(&rel_key(rel));
    if meta.len() > limit {
        let absolute = std::path::absolute(source).unwrap_or_else(|_| source.to_path_buf());
        return write_value(
            &run.join("tags"),
            &format!("codex.artifact.{rel_text}"),
            &absolute.to_string_lossy(),
        );
    }
    let dest = run.join("artifacts").join(&rel_text);
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent).map_err(|e| io_fail("create", parent, e))?;
    }
    match fs::copy(source, &dest) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound && !source.exists() => Ok(()),
        Err(e) => Err(io_fail("copy", source, e)),
    }
}

/// Write one param or tag: the raw value, no newline.
fn write_value(dir: &Path, key: &str, value: &str) -> Result<()> {
    let path = dir.join(safe_key(key));
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(|e| io_fail("create", parent, e))?;
    }
    fs::write(&path, value).map_err(|e| io_fail("write", &path, e))
}

/// Replace a file whole: a temporary file beside it, then a rename, so a reader (or a kill)
/// sees the old content or the new, never half.
fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    fs::write(&tmp, bytes).map_err(|e| io_fail("write", &tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| io_fail("replace", path, e))
}

fn update_meta(path: &Path, fields: &[(&str, Scalar)]) -> Result<()> {
    let text = fs::read_to_string(path).map_err(|e| io_fail("read", path, e))?;
    write_file(path, yaml::set_fields(&text, fields).as_bytes())
}

/// `file://` URI of an absolute path, as Python's `Path.as_uri()` writes it.
fn file_uri(path: &Path) -> String {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let text = absolute.to_string_lossy().replace('\\', "/");
    let mut out = String::from("file://");
    if !text.starts_with('/') {
        out.push('/'); // a Windows drive: file:///C:/...
    }
    out.push_str(&percent_encode(&text, b":"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(step: u64, split: &str, name: &str, value: f64) -> Record {
        Record {
            step,
            split: split.into(),
            name: name.into(),
            value,
            time: 1764000000.1234,
        }
    }

    #[test]
    fn metric_lines_are_mlflows() {
        let check = |value: f64, expect: &str| {
            assert_eq!(metric_line(&record(12, "train", "loss", value)), expect);
        };
        check(2.31, "1764000000123 2.31 12\n");
        check(1.0, "1764000000123 1.0 12\n");
        check(1e-7, "1764000000123 1e-7 12\n");
        check(f64::NAN, "1764000000123 NaN 12\n");
        check(f64::NEG_INFINITY, "1764000000123 -inf 12\n");
    }

    #[test]
    fn resuming_drops_points_after_the_step_and_torn_lines() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let metrics = dir.path().join("train");
        fs::create_dir_all(&metrics).unwrap_or_else(|e| panic!("{e}"));
        let file = metrics.join("loss");
        fs::write(&file, "1 2.0 1\n2 1.5 2\n3 1.2 3\n4 1.1").unwrap_or_else(|e| panic!("{e}"));
        supersede_after(dir.path(), 2).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            fs::read_to_string(&file).unwrap_or_default(),
            "1 2.0 1\n2 1.5 2\n"
        );
        fs::write(&file, "1 2.0 one\n").unwrap_or_else(|e| panic!("{e}"));
        let e = supersede_after(dir.path(), 2).map_err(|e| e.to_string());
        assert!(
            matches!(&e, Err(m) if m.contains("not a metric line")),
            "{e:?}"
        );
    }

    #[test]
    fn file_uris_are_percent_encoded() {
        assert_eq!(file_uri(Path::new("/a b/c")), "file:///a%20b/c");
    }
}
