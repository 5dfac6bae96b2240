//! `codex-ml report RUN_DIR... [-o FILE]`: one self-contained HTML page of the runs' curves,
//! statuses and differing config values (the page itself is built by [`crate::report`]).
//!
//! stdout gets the path of the page written, alone, so `open "$(codex-ml report …)"` works;
//! what was skipped (a torn last record, a run with no validation loss) is said on stderr.

use std::io::Write as _;
use std::path::Path;

use anyhow::{Context as _, Result};

use super::{ReportArgs, UsageError};
use crate::report;

/// Write the report that `args` asks for.
pub fn report(args: ReportArgs) -> Result<()> {
    check_output(&args.output)?;
    let runs = report::load_runs(&args.runs)?;
    for run in &runs {
        for note in &run.notes {
            tracing::warn!("{}: {note}", run.dir.display());
        }
        if !run.metrics.is_empty() && !run.metrics.contains_key("val/loss") {
            tracing::info!(
                "{}: no validation loss recorded (no evaluation yet, or none configured: \
                 train.eval_every)",
                run.dir.display()
            );
        }
    }
    let page = report::html(&runs).map_err(anyhow::Error::msg)?;
    crate::fsio::write_atomic(&args.output, page.as_bytes())
        .with_context(|| format!("writing {}", args.output.display()))?;
    tracing::info!(
        "wrote the report of {} run{} to {}",
        runs.len(),
        if runs.len() == 1 { "" } else { "s" },
        args.output.display()
    );
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", args.output.display())?;
    out.flush()?;
    Ok(())
}

/// The page goes to a file in a directory that exists.
fn check_output(output: &Path) -> Result<()> {
    if output.is_dir() {
        return Err(UsageError(format!(
            "-o {}: is a directory; name the HTML file to write, e.g. {}",
            output.display(),
            output.join("report.html").display()
        ))
        .into());
    }
    match output.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => Err(UsageError(format!(
            "-o {}: directory {} does not exist; create it first",
            output.display(),
            dir.display()
        ))
        .into()),
        _ => Ok(()),
    }
}
