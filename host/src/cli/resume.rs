//! `codex-ml resume RUN_DIR`: continue a run from its newest valid checkpoint with the config
//! the checkpoint holds (plus `--set`). How a checkpoint is chosen and checked is
//! [`mod@crate::run::resume`]'s business; `codex-ml run CONFIG --resume` goes there too.

use std::path::PathBuf;

use anyhow::Result;

use super::ResumeArgs;
use crate::config::Config;
use crate::run::{continue_from, is_restartable, locate, Latest, RunOptions};

/// `codex-ml resume RUN_DIR`.
pub fn resume(mut args: ResumeArgs) -> Result<()> {
    // A signal while the checkpoint is chosen and verified stops at the first step boundary.
    crate::run::install_interrupt_handler();
    args.run_dir = super::run_target(&args.run_dir, Latest::Resumable)?;
    if is_restartable(&args.run_dir) {
        return restart(args);
    }
    let point = locate(&args.run_dir)?;
    let saved = point.saved_config(&[])?;
    let config = if args.set.is_empty() {
        saved.clone()
    } else {
        point.saved_config(&args.set)?
    };
    let registry = crate::plugins::registry_for(args.manifest.as_deref())?;
    config.check_components(&registry)?;
    let options = options(&args, point.run_dir.clone());
    let summary = continue_from(&config, &saved, &registry, &options, &point)?;
    super::run::report(&summary, args.json)?;
    super::run::stopped(&summary)
}

/// `codex-ml resume RUN_DIR` on a run that stopped before its first checkpoint: start it again
/// in place, with the config it was started with (plus `--set`).
fn restart(args: ResumeArgs) -> Result<()> {
    let config = Config::load(&args.run_dir.join("config.ron"), &args.set)?;
    let registry = crate::plugins::registry_for(args.manifest.as_deref())?;
    config.check_components(&registry)?;
    let options = options(&args, args.run_dir.clone());
    let summary = crate::run::restart(&config, &registry, &options, &args.run_dir)?;
    super::run::report(&summary, args.json)?;
    super::run::stopped(&summary)
}

fn options(args: &ResumeArgs, run_dir: PathBuf) -> RunOptions {
    super::run::options(
        Some(run_dir),
        args.allow_plugin_change,
        args.retune,
        args.skip_batches,
    )
}
