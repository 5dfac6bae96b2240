//! `csv`: the same records as the run's `metrics.ndjson`, as a spreadsheet-friendly table.
//!
//! Header `step,split,name,value,time`; numbers in their shortest round-trip form. A
//! non-finite value is written as `NaN`, `inf` or `-inf`, which pandas and spreadsheets read
//! back as floats. Resumed runs drop superseded rows as `metrics.ndjson` does.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use codex_plugin_api::{Describe, Error, Record, Result, Sink};
use serde::Deserialize;

use crate::params;
use crate::resume::{open_for_append, LineFormat};

const HEADER: &str = "step,split,name,value,time";

/// Parameters of the `csv` sink.
#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields, default)]
struct CsvParams {
    /// File name inside the run directory. Default: `metrics.csv`.
    file: Option<String>,
}

/// Writes `<run_dir>/metrics.csv`.
pub struct CsvSink {
    path: PathBuf,
    out: csv::Writer<BufWriter<File>>,
}

impl Describe for CsvSink {
    const NAME: &'static str = "csv";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "metric records as a CSV table in the run directory (metrics.csv)";

    fn check_params(params: &str) -> codex_plugin_api::Result<()> {
        let p = codex_plugin_api::strict::parse_params::<CsvParams>(params)?;
        match &p.file {
            Some(file) => params::check_file_name(Self::NAME, file),
            None => Ok(()),
        }
    }
}

struct Format;

impl LineFormat for Format {
    fn header(&self) -> Option<&str> {
        Some(HEADER)
    }
    fn step_of(&self, line: &str) -> Option<u64> {
        // The step is an unquoted integer in the first column, whatever the other columns hold.
        line.split(',').next()?.parse().ok()
    }
}

/// Shortest round-trip text of a float (`{:?}` keeps `1.0` a float and uses exponents for
/// very small or large values, where `{}` would print long runs of zeros).
pub(crate) fn number(x: f64) -> String {
    format!("{x:?}")
}

impl Sink for CsvSink {
    fn create(params: &str, run_dir: &str, resume_step: Option<u64>) -> Result<Self> {
        let p: CsvParams = params::parse(Self::NAME, params)?;
        let file = p.file.unwrap_or_else(|| "metrics.csv".to_string());
        params::check_file_name(Self::NAME, &file)?;
        let path = Path::new(run_dir).join(file);
        let f = open_for_append(Self::NAME, &path, resume_step, &Format)?;
        let empty = f
            .metadata()
            .map_err(|e| Error::msg(format!("cannot read {}: {e}", path.display())))?
            .len()
            == 0;
        let mut out = BufWriter::new(f);
        if empty {
            writeln!(out, "{HEADER}")
                .map_err(|e| Error::msg(format!("cannot write {}: {e}", path.display())))?;
        }
        let out = csv::WriterBuilder::new()
            .has_headers(false)
            .from_writer(out);
        Ok(CsvSink { path, out })
    }

    fn write(&mut self, records: &[Record]) -> Result<()> {
        for r in records {
            let step = r.step.to_string();
            let value = number(r.value);
            let time = number(r.time);
            self.out
                .write_record([
                    step.as_str(),
                    r.split.as_str(),
                    r.name.as_str(),
                    &value,
                    &time,
                ])
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
            .get_ref()
            .sync_all()
            .map_err(|e| Error::msg(format!("cannot sync {}: {e}", self.path.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_round_trip_shortest() {
        for (x, s) in [
            (2.31, "2.31"),
            (1.0, "1.0"),
            (1764000000.123, "1764000000.123"),
            (1e-10, "1e-10"),
            (f64::NAN, "NaN"),
            (f64::INFINITY, "inf"),
            (f64::NEG_INFINITY, "-inf"),
        ] {
            assert_eq!(number(x), s);
        }
    }

    #[test]
    fn step_is_the_first_column() {
        assert_eq!(Format.step_of("12,train,loss,2.0,1.0"), Some(12));
        assert_eq!(Format.step_of("x,train"), None);
    }
}
