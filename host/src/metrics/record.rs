//! The run's record: `metrics.ndjson`, one JSON object per metric record, written for every
//! run whatever its config lists.
//!
//! Each line is exactly
//! `{"step":120,"split":"train","name":"loss","value":2.31,"time":1764000000.123}`: keys in
//! that order, numbers in their shortest round-trip form. JSON has no NaN or infinity, so a
//! non-finite `value` (or `time`) is written as `null`: the line stays valid JSON and readers
//! see "no number" rather than a parse error.
//!
//! The record is the host's own, not a plugin's: [`super::MetricsHub`] opens it unless it is
//! handed a lane named [`RUN_RECORD`] already, and the config resolver lists it among the
//! sinks so that a run's `config.ron` says so. It is also registered as the sink `ndjson`, the
//! way every component is, so that a config can list it (to place it, or with `file`, to
//! write a copy of the record under another name) and `codex-ml list` shows it.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use codex_plugin_api::{Describe, Error, Record, Result, Sink};
use serde::{Deserialize, Serialize};

use codex_sinks::params;
use codex_sinks::resume::{open_for_append, LineFormat};

/// The registry name of the run's record, and its lane in the metrics hub.
pub const RUN_RECORD: &str = RunRecord::NAME;

/// The record's file in the run directory.
pub const RUN_RECORD_FILE: &str = "metrics.ndjson";

/// Parameters of the `ndjson` sink.
#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields, default)]
struct NdjsonParams {
    /// File name inside the run directory, for a copy of the record. Default: the record
    /// itself, `metrics.ndjson`.
    file: Option<String>,
}

/// Writes `<run_dir>/metrics.ndjson`, or a copy of it under another name.
pub struct RunRecord {
    path: PathBuf,
    out: BufWriter<File>,
    line: Vec<u8>,
    /// Room left on a simulated full disk (tests only, see [`FULL_AFTER_HOOK`]).
    room: Option<u64>,
}

/// For tests only: `CODEX_ML_TEST_RECORD_FULL_AFTER=<bytes>` makes the record's writes fail as
/// on a full disk once it has written that many bytes, so that a test can watch a run meet a
/// full disk without filling one.
const FULL_AFTER_HOOK: &str = "CODEX_ML_TEST_RECORD_FULL_AFTER";

impl Describe for RunRecord {
    const NAME: &'static str = "ndjson";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "metric records as JSON lines in the run directory (metrics.ndjson)";

    fn check_params(params: &str) -> codex_plugin_api::Result<()> {
        let p = codex_plugin_api::strict::parse_params::<NdjsonParams>(params)?;
        match &p.file {
            Some(file) => check_copy_name(file),
            None => Ok(()),
        }
    }
}

/// A copy goes to a plain file name of its own: naming the record's file would open it twice.
fn check_copy_name(file: &str) -> Result<()> {
    params::check_file_name(RunRecord::NAME, file)?;
    if file == RUN_RECORD_FILE {
        return Err(Error::msg(format!(
            "invalid `file` for sink `{}`: `{RUN_RECORD_FILE}` is the run's record, written \
             for every run; leave `file` out, or name another file for a copy",
            RunRecord::NAME
        )));
    }
    Ok(())
}

#[derive(Serialize)]
struct Line<'a> {
    step: u64,
    split: &'a str,
    name: &'a str,
    value: Option<f64>,
    time: Option<f64>,
}

#[derive(Deserialize)]
struct StepOnly {
    step: u64,
}

struct Format;

impl LineFormat for Format {
    fn header(&self) -> Option<&str> {
        None
    }
    fn step_of(&self, line: &str) -> Option<u64> {
        serde_json::from_str::<StepOnly>(line).ok().map(|s| s.step)
    }
}

/// What a run's record says at its end: the last value of each `split/name`, and the lowest
/// validation loss with its step.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Finals {
    /// The last finite value of each metric, keyed `split/name` (`train/loss`, `val/loss`).
    pub last: std::collections::BTreeMap<String, f64>,
    /// The lowest `val/loss` and the step it was recorded at.
    pub best_val_loss: Option<(u64, f64)>,
    /// The highest step recorded.
    pub last_step: Option<u64>,
}

/// Read the run's record at `path` for [`Finals`]. The record holds no superseded lines (a
/// resume drops them), so the last line of each metric is its final value. A torn last line
/// is skipped, as resume would drop it.
pub fn finals(path: &Path) -> std::io::Result<Finals> {
    #[derive(Deserialize)]
    struct Entry {
        step: u64,
        split: String,
        name: String,
        value: Option<f64>,
    }
    let text = std::fs::read_to_string(path)?;
    let mut finals = Finals::default();
    for line in text.lines() {
        let Ok(entry) = serde_json::from_str::<Entry>(line) else {
            continue;
        };
        finals.last_step = finals.last_step.max(Some(entry.step));
        let Some(value) = entry.value else { continue };
        if entry.split == "val"
            && entry.name == "loss"
            && finals.best_val_loss.is_none_or(|(_, best)| value < best)
        {
            finals.best_val_loss = Some((entry.step, value));
        }
        finals
            .last
            .insert(format!("{}/{}", entry.split, entry.name), value);
    }
    Ok(finals)
}

/// A run's record read back for charts: the finite values of each metric, in record order.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Series {
    /// `(step, value)` of each metric, keyed `split/name`; `null` values are left out.
    pub metrics: std::collections::BTreeMap<String, Vec<(u64, f64)>>,
    /// Whether the last line was skipped because it does not end with a newline: the run is
    /// still writing it, or was killed in the middle of it.
    pub torn_last_line: bool,
}

/// Why a run's record could not be read back.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// The file is missing or unreadable.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The record.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// A whole line that is not a record.
    #[error(
        "{}:{line}: not a metric record ({message}); the file was changed by something other \
         than codex-ml: restore it, or leave this run out",
        path.display()
    )]
    BadLine {
        /// The record.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        message: String,
    },
}

/// Read every record of the run's record at `path`. A last line without its newline is a
/// record still being written (the sink's buffer reaches the file in pieces) or cut short by
/// a kill: it is skipped, and said so, never read as a number it may not be. Any other line
/// that is not a record is an error.
pub fn read_series(path: &Path) -> std::result::Result<Series, RecordError> {
    #[derive(Deserialize)]
    struct Entry {
        step: u64,
        split: String,
        name: String,
        value: Option<f64>,
    }
    let text = std::fs::read_to_string(path).map_err(|source| RecordError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let (whole, torn) = match text.rfind('\n') {
        Some(end) => (&text[..=end], &text[end + 1..]),
        None => ("", text.as_str()),
    };
    let mut series = Series {
        torn_last_line: !torn.is_empty(),
        ..Series::default()
    };
    for (i, line) in whole.lines().enumerate() {
        let entry = serde_json::from_str::<Entry>(line).map_err(|e| RecordError::BadLine {
            path: path.to_path_buf(),
            line: i + 1,
            message: e.to_string(),
        })?;
        if let Some(value) = entry.value.filter(|v| v.is_finite()) {
            series
                .metrics
                .entry(format!("{}/{}", entry.split, entry.name))
                .or_default()
                .push((entry.step, value));
        }
    }
    Ok(series)
}

fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// Append `record` to `buf` as one JSON line.
fn encode(record: &Record, buf: &mut Vec<u8>) -> Result<()> {
    let line = Line {
        step: record.step,
        split: record.split.as_str(),
        name: record.name.as_str(),
        value: finite(record.value),
        time: finite(record.time),
    };
    serde_json::to_writer(&mut *buf, &line)?;
    buf.push(b'\n');
    Ok(())
}

impl Sink for RunRecord {
    fn create(params: &str, run_dir: &str, resume_step: Option<u64>) -> Result<Self> {
        let p: NdjsonParams = params::parse(Self::NAME, params)?;
        let file = match p.file {
            Some(file) => {
                check_copy_name(&file)?;
                file
            }
            None => RUN_RECORD_FILE.to_owned(),
        };
        let path = Path::new(run_dir).join(file);
        let out = open_for_append(Self::NAME, &path, resume_step, &Format)?;
        let room = std::env::var(FULL_AFTER_HOOK)
            .ok()
            .and_then(|b| b.parse().ok());
        Ok(RunRecord {
            path,
            out: BufWriter::new(out),
            line: Vec::with_capacity(128),
            room,
        })
    }

    fn write(&mut self, records: &[Record]) -> Result<()> {
        for r in records {
            self.line.clear();
            encode(r, &mut self.line)?;
            if let Some(room) = &mut self.room {
                *room = room.checked_sub(self.line.len() as u64).ok_or_else(|| {
                    let full = std::io::Error::from(std::io::ErrorKind::StorageFull);
                    Error::msg(format!("cannot write {}: {full}", self.path.display()))
                })?;
            }
            self.out
                .write_all(&self.line)
                .map_err(|e| Error::msg(format!("cannot write {}: {e}", self.path.display())))?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        self.out
            .flush()
            .map_err(|e| Error::msg(format!("cannot write {}: {e}", self.path.display())))
    }

    fn finish(&mut self) -> Result<()> {
        self.flush()?;
        self.out
            .get_ref()
            .sync_all()
            .map_err(|e| Error::msg(format!("cannot sync {}: {e}", self.path.display())))
    }
}

codex_plugin_api::builtin!(codex_plugin_api::sink::declare::<RunRecord>);

#[cfg(test)]
mod tests {
    use super::*;

    fn record(step: u64, value: f64) -> Record {
        Record {
            step,
            split: "train".into(),
            name: "loss".into(),
            value,
            time: 1764000000.123,
        }
    }

    fn check(r: Record, expect: &str) {
        let mut buf = Vec::new();
        encode(&r, &mut buf).map_err(|e| e.to_string()).unwrap();
        assert_eq!(String::from_utf8_lossy(&buf), expect);
    }

    #[test]
    fn encodes_the_documented_line() {
        check(
            record(120, 2.31),
            "{\"step\":120,\"split\":\"train\",\"name\":\"loss\",\"value\":2.31,\"time\":1764000000.123}\n",
        );
        check(
            record(1, 1.0),
            "{\"step\":1,\"split\":\"train\",\"name\":\"loss\",\"value\":1.0,\"time\":1764000000.123}\n",
        );
    }

    #[test]
    fn non_finite_values_become_null() {
        for v in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            check(
                record(3, v),
                "{\"step\":3,\"split\":\"train\",\"name\":\"loss\",\"value\":null,\"time\":1764000000.123}\n",
            );
        }
    }

    #[test]
    fn reads_the_step_back() {
        assert_eq!(
            Format.step_of(r#"{"step":7,"split":"val","name":"x","value":null,"time":1.0}"#),
            Some(7)
        );
        assert_eq!(Format.step_of("{\"step\":"), None);
    }

    #[test]
    fn series_skip_a_torn_last_line_and_refuse_a_damaged_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(RUN_RECORD_FILE);
        let line = |step: u64, name: &str, value: &str| {
            format!(
                "{{\"step\":{step},\"split\":\"train\",\"name\":\"{name}\",\"value\":{value},\"time\":1.0}}\n"
            )
        };
        let whole = line(1, "loss", "3.5") + &line(1, "lr", "0.001") + &line(2, "loss", "null");
        std::fs::write(&path, &whole).unwrap();
        let series = read_series(&path).unwrap();
        assert_eq!(series.metrics["train/loss"], [(1, 3.5)]);
        assert_eq!(series.metrics["train/lr"], [(1, 0.001)]);
        assert!(!series.torn_last_line);

        // Cut inside a number: `2.31` must not be read as `2.3`.
        let torn = whole.clone() + &line(3, "loss", "2.31")[..51];
        std::fs::write(&path, &torn).unwrap();
        let series = read_series(&path).unwrap();
        assert_eq!(series.metrics["train/loss"], [(1, 3.5)]);
        assert!(series.torn_last_line);

        std::fs::write(&path, "not json\n".to_string() + &whole).unwrap();
        let e = read_series(&path).unwrap_err().to_string();
        assert!(e.contains("metrics.ndjson:1: not a metric record"), "{e}");

        let e = read_series(&dir.path().join("missing")).unwrap_err();
        assert!(matches!(e, RecordError::Io { .. }), "{e}");
    }

    #[test]
    fn a_copy_may_not_take_the_records_name() {
        let e = RunRecord::check_params(r#"{"file": "metrics.ndjson"}"#).unwrap_err();
        assert!(
            e.message().contains("is the run's record"),
            "{}",
            e.message()
        );
        assert!(RunRecord::check_params(r#"{"file": "copy.ndjson"}"#).is_ok());
        assert!(RunRecord::check_params(r#"{"file": "../x.ndjson"}"#).is_err());
        assert!(RunRecord::check_params("").is_ok());
    }
}
