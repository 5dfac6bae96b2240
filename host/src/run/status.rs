//! `status.json`: how a run's latest session stands — `running`, `finished`, `failed` or
//! `interrupted` — with when it started and ended, the error or signal that ended it, the step
//! it reached, its last and best checkpoints and final metrics, so that a run directory says
//! how the run ended without reading its log.
//!
//! It is written atomically when the session starts (status `running`, with the pid) and
//! again when it ends. A run killed with `kill -9`, or a machine that lost power, leaves
//! `running` with a pid that is no longer alive; the run directory is then resumable or
//! restartable as ever. Paths are relative to the run directory, so it can be moved.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::RunSummary;
use crate::rundir::{rfc3339, unix_seconds, RunDir};

/// The file's name in the run directory.
pub(crate) const STATUS_FILE: &str = "status.json";

/// The contents of `status.json`.
#[derive(Debug, Clone, Serialize)]
struct Status {
    /// `running`, `finished`, `failed` or `interrupted`.
    status: &'static str,
    /// The process that runs (or ran) the session.
    pid: u32,
    /// When the session started (RFC 3339, UTC), and as Unix seconds.
    started: String,
    started_unix: f64,
    /// When the session ended; `null` while it runs.
    ended: Option<String>,
    ended_unix: Option<f64>,
    /// Seconds from start to end.
    wall_seconds: Option<f64>,
    /// The last optimizer step completed (for a failed run, the last step recorded).
    step: Option<u64>,
    /// The signal that stopped an interrupted run (`SIGINT`, `SIGTERM`, `SIGHUP`).
    signal: Option<&'static str>,
    /// The error that ended a failed run, causes included.
    error: Option<String>,
    /// The newest checkpoint this session wrote.
    last_checkpoint: Option<PathBuf>,
    /// The kept checkpoint with the lowest validation loss.
    best_checkpoint: Option<PathBuf>,
    /// The lowest validation loss recorded, and its step.
    best_val_loss: Option<f64>,
    best_val_loss_step: Option<u64>,
    /// Target tokens trained on over every session: the last `train/tokens_seen` record.
    tokens_seen: Option<u64>,
    /// The last value of each metric in `metrics.ndjson`, keyed `split/name`.
    final_metrics: BTreeMap<String, f64>,
}

/// How a run stands, as its `status.json` says: what `codex-ml report` shows of it.
#[derive(Debug, Clone, Deserialize)]
pub struct Outcome {
    /// `running`, `finished`, `failed` or `interrupted`.
    pub status: String,
    /// The process that runs (or ran) the latest session.
    #[serde(default)]
    pub pid: Option<u32>,
    /// The last step completed or recorded.
    #[serde(default)]
    pub step: Option<u64>,
    /// The signal that stopped an interrupted run.
    #[serde(default)]
    pub signal: Option<String>,
    /// The error that ended a failed run.
    #[serde(default)]
    pub error: Option<String>,
}

/// Read the `status.json` of the run in `run_dir`: `None` when there is none (a run from before
/// the file existed, or one stopped before its session began), an error naming the file when
/// it cannot be read or is not a status.
pub fn read_outcome(run_dir: &Path) -> Result<Option<Outcome>> {
    use anyhow::Context as _;
    let path = run_dir.join(STATUS_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    serde_json::from_str(&text)
        .map(Some)
        .with_context(|| format!("{}: not a run status", path.display()))
}

/// The status file of one session of `run`, which started at `started`: written `running` by
/// [`Session::running`] once the session may change the run directory, then once more by
/// [`Session::end`].
pub(crate) struct Session {
    path: PathBuf,
    run_dir: PathBuf,
    record: PathBuf,
    started: SystemTime,
    written: bool,
}

impl Session {
    /// The session of `run` that started at `started`; nothing is written yet.
    pub(crate) fn new(run: &RunDir, started: SystemTime) -> Session {
        Session {
            path: run.path().join(STATUS_FILE),
            run_dir: run.path().to_path_buf(),
            record: run.metrics_ndjson_path(),
            started,
            written: false,
        }
    }

    /// When the session started.
    pub(crate) fn started(&self) -> SystemTime {
        self.started
    }

    /// Say that the run is running.
    pub(crate) fn running(&mut self) -> Result<()> {
        self.write(&self.status("running"))?;
        self.written = true;
        Ok(())
    }

    /// Whether [`Session::running`] said so, so that the end is to be said too.
    pub(crate) fn is_running(&self) -> bool {
        self.written
    }

    /// Say how the session ended, if it said it was running. A failure to write is a
    /// warning: the run's own outcome is what the command reports.
    pub(crate) fn end(&self, result: &Result<RunSummary>) {
        if !self.written {
            return;
        }
        let ended = SystemTime::now();
        let mut status = self.status("finished");
        status.ended = Some(rfc3339(ended));
        status.ended_unix = Some(unix_seconds(ended));
        status.wall_seconds = ended
            .duration_since(self.started)
            .ok()
            .map(|d| d.as_secs_f64());
        let finals = crate::metrics::finals(&self.record).unwrap_or_default();
        status.tokens_seen = finals.last.get("train/tokens_seen").map(|&n| n as u64);
        status.final_metrics = finals.last;
        status.best_val_loss = finals.best_val_loss.map(|(_, loss)| loss);
        status.best_val_loss_step = finals.best_val_loss.map(|(step, _)| step);
        match result {
            Ok(summary) => {
                if summary.interrupted {
                    status.status = "interrupted";
                    status.signal =
                        Some(super::stop_signal().map_or("request", super::signal_name));
                }
                status.step = Some(summary.steps);
                status.last_checkpoint =
                    summary.last_checkpoint.as_deref().map(|p| self.relative(p));
                status.best_checkpoint =
                    summary.best_checkpoint.as_deref().map(|p| self.relative(p));
            }
            Err(e) => {
                status.status = "failed";
                status.error = Some(format!("{e:#}"));
                status.step = finals.last_step;
            }
        }
        if let Err(e) = self.write(&status) {
            tracing::warn!("{e:#}");
        }
    }

    fn status(&self, status: &'static str) -> Status {
        Status {
            status,
            pid: std::process::id(),
            started: rfc3339(self.started),
            started_unix: unix_seconds(self.started),
            ended: None,
            ended_unix: None,
            wall_seconds: None,
            step: None,
            signal: None,
            error: None,
            last_checkpoint: None,
            best_checkpoint: None,
            best_val_loss: None,
            best_val_loss_step: None,
            tokens_seen: None,
            final_metrics: BTreeMap::new(),
        }
    }

    fn relative(&self, path: &Path) -> PathBuf {
        path.strip_prefix(&self.run_dir)
            .unwrap_or(path)
            .to_path_buf()
    }

    fn write(&self, status: &Status) -> Result<()> {
        use anyhow::Context as _;
        let mut text = serde_json::to_string_pretty(status)?;
        text.push('\n');
        crate::fsio::write_atomic(&self.path, text.as_bytes())
            .with_context(|| format!("writing {}", self.path.display()))
    }
}
