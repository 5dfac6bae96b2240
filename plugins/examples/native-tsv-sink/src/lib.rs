//! A metric sink writing tab-separated values, as a native codex-ml plugin depending on
//! `codex-plugin-api` only (serde for its parameters).
//!
//! One line per record, `step split name value time`, under a header line, in
//! `<run dir>/<file>` (default `metrics.tsv`). Tab-separated text reads straight into
//! spreadsheets, `awk` and `pandas.read_csv(sep="\t")`, and needs no quoting: metric names and
//! splits never contain tabs or newlines (the sink refuses a record that does rather than write
//! a broken line). When a run resumes, lines after the resumed step are dropped, as the host
//! asks of every sink.
//!
//! Build it with `cargo build --release -p native-tsv-sink`; with the manifest name `tsv` the
//! sink is `tsv/tsv`.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Component, Path, PathBuf};

use codex_plugin_api::{bail, Describe, Error, Record, Result, Sink};
use serde::Deserialize;

codex_plugin_api::export_plugin! {
    name: "tsv",
    version: env!("CARGO_PKG_VERSION"),
    components: [codex_plugin_api::sink::declare::<TsvSink>],
}

const HEADER: &str = "step\tsplit\tname\tvalue\ttime";

/// The sink's params, as written in the config.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct Params {
    /// The file, relative to the run directory. Default `metrics.tsv`.
    #[serde(default = "default_file")]
    file: String,
}

fn default_file() -> String {
    "metrics.tsv".to_owned()
}

/// Writes records as tab-separated lines (registry name `tsv`).
pub struct TsvSink {
    path: PathBuf,
    out: BufWriter<File>,
}

impl Describe for TsvSink {
    const NAME: &'static str = "tsv";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "metric records as tab-separated values in the run directory";
}

/// The lines of an earlier run's file up to `resume_step`, header first.
fn kept_lines(path: &Path, resume_step: u64) -> Result<Vec<String>> {
    let file = File::open(path).map_err(|e| Error::msg(format!("{}: {e}", path.display())))?;
    let mut kept = vec![HEADER.to_owned()];
    for line in BufReader::new(file).lines().skip(1) {
        let line = line.map_err(|e| Error::msg(format!("{}: {e}", path.display())))?;
        let step = line.split('\t').next().and_then(|s| s.parse::<u64>().ok());
        if step.is_some_and(|s| s <= resume_step) {
            kept.push(line);
        }
    }
    Ok(kept)
}

fn field(text: &str, what: &str) -> Result<()> {
    if text.contains(['\t', '\n', '\r']) {
        bail!("a record's {what} `{text}` contains a tab or a line break");
    }
    Ok(())
}

impl Sink for TsvSink {
    fn create(params: &str, run_dir: &str, resume_step: Option<u64>) -> Result<Self> {
        let text = if params.trim().is_empty() {
            "{}"
        } else {
            params
        };
        let params: Params =
            serde_json::from_str(text).map_err(|e| Error::msg(format!("sink params: {e}")))?;
        let relative = Path::new(&params.file);
        if params.file.is_empty()
            || !relative
                .components()
                .all(|c| matches!(c, Component::Normal(_)))
        {
            bail!(
                "sink params: file `{}` must be a relative path inside the run directory",
                params.file
            );
        }
        let path = Path::new(run_dir).join(relative);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::msg(format!("{}: {e}", dir.display())))?;
        }
        let earlier = match resume_step {
            Some(step) if path.exists() => kept_lines(&path, step)?,
            _ => vec![HEADER.to_owned()],
        };
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| Error::msg(format!("{}: {e}", path.display())))?;
        let mut out = BufWriter::new(file);
        for line in earlier {
            writeln!(out, "{line}")?;
        }
        Ok(TsvSink { path, out })
    }

    fn write(&mut self, records: &[Record]) -> Result<()> {
        for r in records {
            field(r.split.as_str(), "split")?;
            field(r.name.as_str(), "name")?;
            writeln!(
                self.out,
                "{}\t{}\t{}\t{}\t{:.3}",
                r.step,
                r.split.as_str(),
                r.name.as_str(),
                r.value,
                r.time
            )
            .map_err(|e| Error::msg(format!("{}: {e}", self.path.display())))?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        self.out
            .flush()
            .map_err(|e| Error::msg(format!("{}: {e}", self.path.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(step: u64, name: &str, value: f64) -> Record {
        Record {
            step,
            split: "train".into(),
            name: name.into(),
            value,
            time: 1.5,
        }
    }

    fn run_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "native-tsv-sink-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    #[test]
    fn writes_a_header_then_one_line_per_record_and_resumes() {
        let dir = run_dir();
        let dir_text = dir.to_str().expect("utf-8 temp dir");
        let mut sink = TsvSink::create("", dir_text, None).expect("opens");
        sink.write(&[record(1, "loss", 2.5), record(2, "loss", 2.0)])
            .expect("writes");
        sink.finish().expect("finishes");
        let text = std::fs::read_to_string(dir.join("metrics.tsv")).expect("written");
        assert_eq!(
            text,
            "step\tsplit\tname\tvalue\ttime\n1\ttrain\tloss\t2.5\t1.500\n2\ttrain\tloss\t2\t1.500\n"
        );

        let mut sink = TsvSink::create("{}", dir_text, Some(1)).expect("reopens");
        sink.write(&[record(2, "loss", 1.75)]).expect("writes");
        sink.finish().expect("finishes");
        let text = std::fs::read_to_string(dir.join("metrics.tsv")).expect("written");
        assert_eq!(
            text,
            "step\tsplit\tname\tvalue\ttime\n1\ttrain\tloss\t2.5\t1.500\n2\ttrain\tloss\t1.75\t1.500\n"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn refuses_paths_outside_the_run_dir_and_broken_fields() {
        let dir = run_dir();
        let dir_text = dir.to_str().expect("utf-8 temp dir");
        for file in ["../x.tsv", "/tmp/x.tsv", ""] {
            let params = format!(r#"{{"file": "{file}"}}"#);
            let err = TsvSink::create(&params, dir_text, None)
                .err()
                .expect("refused");
            assert!(
                err.to_string().contains("inside the run directory"),
                "{err}"
            );
        }
        let mut sink = TsvSink::create("", dir_text, None).expect("opens");
        let err = sink
            .write(&[record(1, "a\tb", 1.0)])
            .expect_err("tab in a name");
        assert!(err.to_string().contains("tab"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
