//! `tensorboard`: metric records as TensorBoard event files, for `tensorboard --logdir`.
//!
//! Each session of a run (the first one, then each resume) writes one new event file,
//! `events.out.tfevents.<secs>.<host>.<pid>`, in a folder of the run directory (`tensorboard`
//! unless `dir` names another). A file holds, in order:
//!
//! 1. the `file_version` event (`brain.Event:2`), as every TensorBoard writer starts;
//! 2. on a resumed session, a `SessionLog` `START` event at the first step the session trains;
//! 3. the resolved config (`config.ron` of the run directory) as a text summary tagged
//!    `config`, for TensorBoard's Text tab, at that same step;
//! 4. one scalar summary per record, tagged `<split>/<name>` (`train/loss`, `val/perplexity`,
//!    the keys the `mlflow` tracker uses), at the record's step and wall time. Values are
//!    32-bit floats, as TensorBoard stores scalars.
//!
//! Resumed runs, and why two mechanisms: a run killed after its last checkpoint may have
//! written records for steps the resumed session trains again. As the other file sinks do
//! (module [`crate::resume`]), the resumed sink rewrites the earlier event files without the
//! events after the resume step, so a reader that opens the folder afterwards sees one curve.
//! A TensorBoard that was already open has those points in memory, though; for it, the
//! `SessionLog` `START` event at step `resume_step + 1` makes its loader drop every point at
//! or after that step (TensorBoard's `purge_orphaned_data`, on by default). The file's
//! `<secs>` is moved past the previous file's if need be, so that the new file sorts after it:
//! TensorBoard reads a folder's event files in name order.
//!
//! The messages are the few fields of TensorFlow's `Event`, `Summary` and `TensorProto` that
//! these files use, declared with `prost`'s derive (in `proto.rs`); the framing is TFRecord's
//! ([`record`]).

mod proto;
pub mod record;

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use codex_plugin_api::{Describe, Error, Record, Result, Sink};
use prost::Message;
use serde::Deserialize;

use crate::params;
use proto::{Event, What};

/// The folder inside the run directory when `dir` is not given.
pub const DEFAULT_DIR: &str = "tensorboard";

/// What every event file's name starts with.
const FILE_PREFIX: &str = "events.out.tfevents.";

/// The tag of the resolved config's text summary.
pub const CONFIG_TAG: &str = "config";

/// Parameters of the `tensorboard` sink.
#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields, default)]
struct TensorboardParams {
    /// Folder inside the run directory for the event files. Default: `tensorboard`.
    dir: Option<String>,
}

/// Writes event files into `<run_dir>/tensorboard/`.
pub struct TensorboardSink {
    path: PathBuf,
    out: BufWriter<File>,
    frame: Vec<u8>,
}

impl Describe for TensorboardSink {
    const NAME: &'static str = "tensorboard";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "metric records and the resolved config as TensorBoard event files (tensorboard/)";

    fn check_params(params: &str) -> Result<()> {
        let p = codex_plugin_api::strict::parse_params::<TensorboardParams>(params)?;
        match &p.dir {
            Some(dir) => params::check_dir_name(Self::NAME, dir),
            None => Ok(()),
        }
    }
}

impl Sink for TensorboardSink {
    fn create(params: &str, run_dir: &str, resume_step: Option<u64>) -> Result<Self> {
        let p: TensorboardParams = params::parse(Self::NAME, params)?;
        let dir_name = p.dir.unwrap_or_else(|| DEFAULT_DIR.to_string());
        params::check_dir_name(Self::NAME, &dir_name)?;
        let run_dir = Path::new(run_dir);
        let dir = run_dir.join(&dir_name);
        fs::create_dir_all(&dir).map_err(|e| {
            Error::msg(format!(
                "sink `{}`: cannot create {}: {e}",
                Self::NAME,
                dir.display()
            ))
        })?;
        let earlier = event_files(&dir)?;
        match resume_step {
            Some(step) => {
                for (_, path) in &earlier {
                    record::truncate_after(path, step)?;
                }
            }
            None if !earlier.is_empty() => {
                return Err(Error::msg(format!(
                    "sink `{}`: {} already holds event files in a run that is not resumed; resume that run or start a new run directory",
                    Self::NAME,
                    dir.display()
                )))
            }
            None => {}
        }

        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        // A later session's file must sort after the earlier ones (see the module docs).
        let secs = earlier
            .iter()
            .map(|(secs, _)| secs + 1)
            .fold(now as u64, u64::max);
        let path = dir.join(format!(
            "{FILE_PREFIX}{secs:010}.{}.{}",
            host_name(),
            std::process::id()
        ));
        let file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&path)
            .map_err(|e| {
                Error::msg(format!(
                    "sink `{}`: cannot create {}: {e}",
                    Self::NAME,
                    path.display()
                ))
            })?;
        let mut sink = TensorboardSink {
            path,
            out: BufWriter::new(file),
            frame: Vec::new(),
        };

        sink.event(&Event::new(
            now,
            0,
            What::FileVersion("brain.Event:2".into()),
        ))?;
        let first_step = resume_step.map_or(0, |s| s.saturating_add(1));
        if resume_step.is_some() {
            sink.event(&Event::new(now, first_step, What::session_start()))?;
        }
        // The host writes the resolved config before it opens sinks; a sink opened elsewhere
        // (a test, a tool) may find none, and then records only the metrics.
        let config_path = run_dir.join("config.ron");
        match fs::read_to_string(&config_path) {
            Ok(config) => {
                let text = What::text(CONFIG_TAG, &markdown_code(&config));
                sink.event(&Event::new(now, first_step, text))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Error::msg(format!(
                    "sink `{}`: cannot read {}: {e}",
                    Self::NAME,
                    config_path.display()
                )))
            }
        }
        sink.flush()?;
        Ok(sink)
    }

    fn write(&mut self, records: &[Record]) -> Result<()> {
        for r in records {
            let tag = format!("{}/{}", r.split, r.name);
            // TensorBoard keeps scalars as 32-bit floats.
            let event = Event::new(r.time, r.step, What::scalar(&tag, r.value as f32));
            self.event(&event)?;
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

impl TensorboardSink {
    fn event(&mut self, event: &Event) -> Result<()> {
        self.frame.clear();
        record::frame(&event.encode_to_vec(), &mut self.frame);
        self.out
            .write_all(&self.frame)
            .map_err(|e| Error::msg(format!("cannot write {}: {e}", self.path.display())))
    }
}

/// The event files in `dir`, with the seconds their names start with (0 when a name has
/// none), in name order.
fn event_files(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries =
        fs::read_dir(dir).map_err(|e| Error::msg(format!("cannot read {}: {e}", dir.display())))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::msg(format!("cannot read {}: {e}", dir.display())))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name.strip_prefix(FILE_PREFIX) else {
            continue;
        };
        let secs = rest
            .split('.')
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        files.push((secs, entry.path()));
    }
    files.sort_by(|a, b| a.1.cmp(&b.1));
    Ok(files)
}

/// The machine's name for event file names, kept to characters that are safe in one; a name
/// that cannot be read is `localhost`.
fn host_name() -> String {
    let name = fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let name: String = name
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .collect();
    if name.is_empty() {
        "localhost".to_string()
    } else {
        name
    }
}

/// `text` as a Markdown code block (four spaces before every line): TensorBoard renders text
/// summaries as Markdown, which would otherwise reflow the config.
pub fn markdown_code(text: &str) -> String {
    text.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::proto::Kind;
    use super::*;

    fn rec(step: u64, split: &str, name: &str, value: f64) -> Record {
        Record {
            step,
            split: split.into(),
            name: name.into(),
            value,
            time: 1764000000.5 + step as f64,
        }
    }

    /// Every event of every file in `dir`, in file name order, as
    /// `(step, tag or kind, value)`.
    fn events(dir: &Path) -> Vec<(i64, String, String)> {
        let mut out = Vec::new();
        for (_, path) in event_files(dir).unwrap() {
            let bytes = fs::read(&path).unwrap();
            for r in record::records(&bytes).unwrap() {
                let e = Event::decode(r.data).unwrap();
                let (what, value) = match e.what.unwrap() {
                    What::FileVersion(v) => ("file_version".to_string(), v),
                    What::SessionLog(l) => ("session_log".to_string(), l.status.to_string()),
                    What::Summary(mut s) => {
                        let v = s.value.remove(0);
                        let value = match v.kind.unwrap() {
                            Kind::SimpleValue(x) => x.to_string(),
                            Kind::Tensor(t) => String::from_utf8(t.string_val[0].clone()).unwrap(),
                        };
                        (v.tag, value)
                    }
                };
                out.push((e.step, what, value));
            }
        }
        out
    }

    fn ev(step: i64, what: &str, value: &str) -> (i64, String, String) {
        (step, what.to_string(), value.to_string())
    }

    #[test]
    fn a_run_then_a_resume_reads_as_one_series() {
        let run = tempfile::tempdir().unwrap();
        fs::write(run.path().join("config.ron"), "(\n  seed: 7,\n)\n").unwrap();
        let run_dir = run.path().to_str().unwrap();
        let mut sink = TensorboardSink::create("", run_dir, None).unwrap();
        let first: Vec<Record> = (1..=4).map(|s| rec(s, "train", "loss", s as f64)).collect();
        sink.write(&first).unwrap();
        sink.write(&[rec(3, "val", "loss", 0.25)]).unwrap();
        sink.finish().unwrap();
        drop(sink);
        let dir = run.path().join(DEFAULT_DIR);
        let config = "    (\n      seed: 7,\n    )";
        assert_eq!(
            events(&dir),
            [
                ev(0, "file_version", "brain.Event:2"),
                ev(0, "config", config),
                ev(1, "train/loss", "1"),
                ev(2, "train/loss", "2"),
                ev(3, "train/loss", "3"),
                ev(4, "train/loss", "4"),
                ev(3, "val/loss", "0.25"),
            ]
        );

        // A fresh run must not find event files of an earlier one.
        let e = TensorboardSink::create("", run_dir, None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("already holds event files"), "{e}");

        // Resumed at step 2: steps 3 and 4 of the first session are superseded.
        let mut sink = TensorboardSink::create("{}", run_dir, Some(2)).unwrap();
        sink.write(&[rec(3, "train", "loss", 30.0)]).unwrap();
        sink.finish().unwrap();
        drop(sink);
        assert_eq!(
            events(&dir),
            [
                ev(0, "file_version", "brain.Event:2"),
                ev(0, "config", config),
                ev(1, "train/loss", "1"),
                ev(2, "train/loss", "2"),
                ev(0, "file_version", "brain.Event:2"),
                ev(3, "session_log", "1"),
                ev(3, "config", config),
                ev(3, "train/loss", "30"),
            ]
        );
        assert_eq!(event_files(&dir).unwrap().len(), 2);
    }

    #[test]
    fn a_damaged_file_stops_the_resume_with_its_name() {
        let run = tempfile::tempdir().unwrap();
        let run_dir = run.path().to_str().unwrap();
        let mut sink = TensorboardSink::create(r#"{"dir": "tb"}"#, run_dir, None).unwrap();
        sink.write(&[rec(1, "train", "loss", 1.0)]).unwrap();
        sink.finish().unwrap();
        drop(sink);
        let (_, path) = event_files(&run.path().join("tb")).unwrap().remove(0);
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 6;
        bytes[last] ^= 0xff;
        fs::write(&path, &bytes).unwrap();
        let e = TensorboardSink::create(r#"{"dir": "tb"}"#, run_dir, Some(0))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("is damaged") && e.contains("move the file"),
            "{e}"
        );
    }

    #[test]
    fn params_are_checked_strictly() {
        for (params, expect) in [
            (r#"{"dri": "x"}"#, "dri"),
            (r#"{"dir": "../x"}"#, "invalid `dir`"),
            (r#"{"dir": 3}"#, "invalid type"),
        ] {
            let e = TensorboardSink::check_params(params)
                .unwrap_err()
                .to_string();
            assert!(e.contains(expect), "{params}: {e}");
        }
        assert!(TensorboardSink::check_params(r#"{"dir": "tb"}"#).is_ok());
    }

    #[test]
    fn config_becomes_a_code_block() {
        assert_eq!(
            markdown_code("(\n  a: 1,\n)\n"),
            "    (\n      a: 1,\n    )"
        );
    }

    #[test]
    fn host_names_are_safe_in_file_names() {
        let h = host_name();
        assert!(!h.is_empty() && !h.contains('/') && !h.contains('.'), "{h}");
    }
}
