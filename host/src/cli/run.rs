//! `codex-ml run`: load the config, build the registry, train (or, with `--resume`, continue
//! an earlier run of the config), report where the results are.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Result;

use super::RunArgs;
use crate::config::Config;
use crate::run::{self as session, RunOptions, RunSummary};

/// Train as the config describes.
pub fn run(args: RunArgs) -> Result<()> {
    // First of all: a scheduler's SIGTERM that comes while the config and plugins load must
    // stop the run at its first step boundary, not kill the process.
    session::install_interrupt_handler();
    let config = Config::load(&args.config, &args.set)?;
    let registry = crate::plugins::registry_for(args.manifest.as_deref())?;
    config.check_components(&registry)?;
    let options = options(
        args.run_dir,
        args.allow_plugin_change,
        args.retune,
        args.skip_batches,
    );
    let summary = match &args.resume {
        Some(target) => session::continue_config(&config, &registry, &options, target)?,
        None => session::run(&config, &registry, &options)?,
    };
    report(&summary, args.json)?;
    stopped(&summary)
}

/// How the command line runs: runs under `runs/`, stopped by signals, with a progress bar.
pub(super) fn options(
    run_dir: Option<PathBuf>,
    allow_plugin_change: bool,
    retune: bool,
    skip_batches: u64,
) -> RunOptions {
    RunOptions {
        run_dir,
        runs_root: PathBuf::from(super::RUNS_ROOT),
        stop: None,
        progress: true,
        allow_plugin_change,
        retune,
        skip_batches,
    }
}

/// A run a signal stopped ends the command with [`super::Stopped`], so that its exit code is
/// 128 + the signal's number.
pub(crate) fn stopped(summary: &RunSummary) -> Result<()> {
    match summary.interrupted {
        true => Err(
            super::Stopped(session::stop_signal().unwrap_or(signal_hook::consts::SIGINT)).into(),
        ),
        false => Ok(()),
    }
}

/// Tell the user how the run ended and where its results are (on stderr), and a script the
/// run directory (alone on stdout, or with `json` as part of one JSON object, whatever the
/// outcome, so `dir=$(codex-ml run …)` works).
pub(crate) fn report(summary: &RunSummary, json: bool) -> Result<()> {
    let dir = summary.run_dir.display();
    if let Some(sample) = &summary.sample {
        super::say!("\n--- sample ---\n{sample}\n--------------");
    }
    if let Some(loss) = summary.val_loss {
        super::say!("validation loss {loss:.4} (perplexity {:.2})", loss.exp());
    }
    let signal = summary
        .interrupted
        .then(|| session::stop_signal().map_or("request", session::signal_name));
    if let Some(by) = signal {
        super::say!(
            "stopped by {by} after step {}; results are in {dir}; continue with `codex-ml resume {dir}`",
            summary.steps
        );
        if let Some(ckpt) = &summary.last_checkpoint {
            super::say!("last checkpoint: {}", ckpt.display());
        }
    } else {
        super::say!("finished {} steps; results are in {dir}", summary.steps);
    }
    if json {
        return super::print_json(&serde_json::json!({
            "run_dir": summary.run_dir,
            "status": if summary.interrupted { "stopped" } else { "finished" },
            "signal": signal,
            "steps": summary.steps,
            "last_checkpoint": summary.last_checkpoint,
            "val_loss": summary.val_loss,
            "val_perplexity": summary.val_loss.map(f64::exp),
            "sample": summary.sample,
        }));
    }
    writeln!(std::io::stdout().lock(), "{dir}")?;
    Ok(())
}
