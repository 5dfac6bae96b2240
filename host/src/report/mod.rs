//! Pictures of runs: a run's `loss.svg`, written when its session ends, and the HTML report of
//! `codex-ml report`, which overlays several runs' curves and sets their differing config values
//! side by side.
//!
//! Both read only what a run directory already holds — `metrics.ndjson` (through
//! [`crate::metrics::read_series`]), `status.json` ([`crate::run::read_outcome`]) and
//! `config.ron` — and draw with one renderer (`chart.rs`), so the report's loss chart and a
//! run's `loss.svg` are the same picture. The report is one file with nothing to fetch: charts
//! are inline SVG, the style sheet inline, and there is no script.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::metrics::{read_series, RecordError, RUN_RECORD_FILE};

mod chart;
mod page;

pub use page::html;

/// The picture each run leaves in its directory.
pub const LOSS_SVG: &str = "loss.svg";

/// Why a run cannot be in a report; each names the run and what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    /// A path that does not exist.
    #[error(
        "{}: no such directory; pass a run directory, e.g. runs/<experiment>/<run-id>",
        .0.display()
    )]
    Missing(PathBuf),
    /// A path that holds no run.
    #[error(
        "{}: not a run directory (no config.ron or metadata.json); pass a directory that \
         `codex-ml run` made, e.g. runs/<experiment>/<run-id>",
        .0.display()
    )]
    NotARun(PathBuf),
    /// A run whose record is unreadable or damaged.
    #[error("cannot read the records of run {}", run.display())]
    Record {
        /// The run.
        run: PathBuf,
        /// What is wrong with its record.
        #[source]
        source: RecordError,
    },
    /// Runs that hold no record at all.
    #[error("no records to draw: {runs} wrote no metrics.ndjson yet; a run writes it from its first logged step")]
    NothingToDraw {
        /// The runs, comma-separated.
        runs: String,
    },
}

impl ReportError {
    /// Whether the error is the user's to fix (exit 2) rather than a failure to read (exit 1).
    pub fn is_input(&self) -> bool {
        match self {
            ReportError::Missing(_)
            | ReportError::NotARun(_)
            | ReportError::NothingToDraw { .. } => true,
            ReportError::Record { source, .. } => matches!(source, RecordError::BadLine { .. }),
        }
    }
}

/// One run as the report shows it.
#[derive(Debug, Clone)]
pub struct RunView {
    /// The run directory as given.
    pub dir: PathBuf,
    /// Its name in legends and tables: `<experiment-dir>/<run-id>`, made unique.
    pub label: String,
    /// `finished`, `failed`, `interrupted`, `running`, or `unknown` without a `status.json`.
    pub status: String,
    /// The error or signal that ended it, or the step it reached.
    pub detail: String,
    /// Its config, flattened to `field.path = value`; empty when `config.ron` is unreadable.
    pub config: BTreeMap<String, String>,
    /// Its records, keyed `split/name`.
    pub metrics: BTreeMap<String, Vec<(u64, f64)>>,
    /// What the reader passed over or could not read (a torn last line, a missing file).
    pub notes: Vec<String>,
}

/// Read the run in `dir`. A missing record, status or config, and a torn last line, are notes
/// on the run (a run that has just started, or was killed); a path that holds no run, or a
/// damaged record, is an error.
pub fn load_run(dir: &Path) -> Result<RunView, ReportError> {
    if !dir.exists() {
        return Err(ReportError::Missing(dir.to_path_buf()));
    }
    if !crate::rundir::holds_run(dir) {
        return Err(ReportError::NotARun(dir.to_path_buf()));
    }
    let mut notes = Vec::new();
    let record = dir.join(RUN_RECORD_FILE);
    let metrics = match read_series(&record) {
        Ok(series) => {
            if series.torn_last_line {
                notes.push(format!(
                    "the last line of {RUN_RECORD_FILE} is incomplete (the run is writing it, \
                     or was killed while it did) and was skipped"
                ));
            }
            series.metrics
        }
        Err(RecordError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            notes.push(format!("no {RUN_RECORD_FILE}: the run recorded nothing"));
            BTreeMap::new()
        }
        Err(source) => {
            return Err(ReportError::Record {
                run: dir.to_path_buf(),
                source,
            })
        }
    };
    let (status, detail) = match crate::run::read_outcome(dir) {
        Ok(Some(o)) => {
            let detail = match (&o.error, &o.signal, o.step) {
                (Some(error), _, _) => error.clone(),
                (None, Some(signal), Some(step)) => format!("{signal} after step {step}"),
                (None, Some(signal), None) => signal.clone(),
                (None, None, Some(step)) => format!("step {step}"),
                (None, None, None) => match o.pid {
                    Some(pid) if o.status == "running" => {
                        format!("pid {pid} (if it is gone, the run was killed)")
                    }
                    _ => String::new(),
                },
            };
            (o.status, detail)
        }
        Ok(None) => ("unknown".to_owned(), "no status.json".to_owned()),
        Err(e) => {
            notes.push(format!("{e:#}"));
            ("unknown".to_owned(), String::new())
        }
    };
    let config = match flat_config(&dir.join(crate::rundir::CONFIG)) {
        Ok(config) => config,
        Err(e) => {
            notes.push(e);
            BTreeMap::new()
        }
    };
    Ok(RunView {
        dir: dir.to_path_buf(),
        label: label_of(dir),
        status,
        detail,
        config,
        metrics,
        notes,
    })
}

/// Read every run of `dirs`, in order, with unique labels; at least one must hold records.
pub fn load_runs(dirs: &[PathBuf]) -> Result<Vec<RunView>, ReportError> {
    let mut runs = dirs
        .iter()
        .map(|d| load_run(d))
        .collect::<Result<Vec<_>, _>>()?;
    if runs.iter().all(|r| r.metrics.is_empty()) {
        let names: Vec<String> = runs.iter().map(|r| r.dir.display().to_string()).collect();
        return Err(ReportError::NothingToDraw {
            runs: names.join(", "),
        });
    }
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for run in &mut runs {
        let n = seen.entry(run.label.clone()).or_default();
        *n += 1;
        if *n > 1 {
            run.label = format!("{} ({n})", run.label);
        }
    }
    Ok(runs)
}

/// `parent/name` of a run directory.
fn label_of(dir: &Path) -> String {
    let parts: Vec<String> = dir
        .components()
        .filter(|c| matches!(c, std::path::Component::Normal(_)))
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    match parts.as_slice() {
        [.., parent, name] => format!("{parent}/{name}"),
        [name] => name.clone(),
        [] => dir.display().to_string(),
    }
}

/// The run's `config.ron` as `field.path = value` pairs, values in compact JSON.
fn flat_config(path: &Path) -> Result<BTreeMap<String, String>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let raw = codex_formats::config::parse(path, &text, &[]).map_err(|e| format!("{e}"))?;
    let tree = serde_json::to_value(&raw).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut flat = BTreeMap::new();
    flatten("", &tree, &mut flat);
    Ok(flat)
}

fn flatten(prefix: &str, value: &serde_json::Value, out: &mut BTreeMap<String, String>) {
    use serde_json::Value;
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (key, v) in map {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                flatten(&path, v, out);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            for (i, v) in items.iter().enumerate() {
                flatten(&format!("{prefix}[{i}]"), v, out);
            }
        }
        Value::String(s) => {
            out.insert(prefix.to_owned(), s.clone());
        }
        other => {
            out.insert(prefix.to_owned(), other.to_string());
        }
    }
}

/// The config values that differ between `runs` (or that some of them lack), in path order.
pub fn differing_config(runs: &[RunView]) -> Vec<(String, Vec<Option<String>>)> {
    let keys: std::collections::BTreeSet<&String> =
        runs.iter().flat_map(|r| r.config.keys()).collect();
    keys.into_iter()
        .filter_map(|key| {
            let values: Vec<Option<String>> =
                runs.iter().map(|r| r.config.get(key).cloned()).collect();
            let differs = values.iter().any(|v| v != &values[0]);
            differs.then(|| (key.clone(), values))
        })
        .collect()
}

/// The `loss.svg` of the run whose record is `series`: training and validation loss over the
/// steps. `None` when the run recorded neither.
pub fn loss_svg(metrics: &BTreeMap<String, Vec<(u64, f64)>>) -> Option<Result<String, String>> {
    let empty = Vec::new();
    let train = metrics.get("train/loss").unwrap_or(&empty);
    let val = metrics.get("val/loss").unwrap_or(&empty);
    if train.is_empty() && val.is_empty() {
        return None;
    }
    Some(chart::svg(
        "loss",
        "loss",
        &[
            chart::Curve {
                label: "train/loss",
                colour: 0,
                points: train,
            },
            chart::Curve {
                label: "val/loss",
                colour: 1,
                points: val,
            },
        ],
    ))
}

/// Write `loss.svg` into the run directory `dir` from its record, atomically; `Ok(false)` when
/// there is nothing to draw yet. Called as each session of a run ends, however it ended.
pub fn write_loss_svg(dir: &Path) -> anyhow::Result<bool> {
    use anyhow::Context as _;
    let record = dir.join(RUN_RECORD_FILE);
    let metrics = match read_series(&record) {
        Ok(series) => series.metrics,
        Err(RecordError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Ok(false)
        }
        Err(e) => return Err(e.into()),
    };
    let Some(svg) = loss_svg(&metrics) else {
        return Ok(false);
    };
    let svg = svg.map_err(anyhow::Error::msg)?;
    let path = dir.join(LOSS_SVG);
    crate::fsio::write_atomic(&path, svg.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(label: &str, config: &[(&str, &str)]) -> RunView {
        RunView {
            dir: PathBuf::from(label),
            label: label.to_owned(),
            status: "finished".to_owned(),
            detail: String::new(),
            config: config
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            metrics: BTreeMap::new(),
            notes: Vec::new(),
        }
    }

    #[test]
    fn only_differing_config_values_are_compared() {
        let a = view(
            "a",
            &[("seed", "1"), ("optimizer.lr", "0.001"), ("x", "same")],
        );
        let b = view(
            "b",
            &[
                ("seed", "1"),
                ("optimizer.lr", "0.0003"),
                ("x", "same"),
                ("y", "1"),
            ],
        );
        assert_eq!(
            differing_config(&[a, b]),
            [
                (
                    "optimizer.lr".to_owned(),
                    vec![Some("0.001".to_owned()), Some("0.0003".to_owned())]
                ),
                ("y".to_owned(), vec![None, Some("1".to_owned())]),
            ]
        );
    }

    #[test]
    fn configs_flatten_to_field_paths() {
        let mut out = BTreeMap::new();
        let tree = serde_json::json!({"model": {"name": "gpt2", "params": {"n_layer": 2}}, "sinks": [{"name": "csv"}], "empty": []});
        flatten("", &tree, &mut out);
        let flat: Vec<(&str, &str)> = out.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            flat,
            [
                ("empty", "[]"),
                ("model.name", "gpt2"),
                ("model.params.n_layer", "2"),
                ("sinks[0].name", "csv"),
            ]
        );
    }

    #[test]
    fn labels_are_the_experiment_and_run_id() {
        assert_eq!(
            label_of(Path::new("runs/quickstart/20261204-211500")),
            "quickstart/20261204-211500"
        );
        assert_eq!(label_of(Path::new("./r")), "r");
    }
}
