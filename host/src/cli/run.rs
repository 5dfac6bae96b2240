//! `codex-ml run`: load the config, build the registry, train, report where the results are.

use std::path::PathBuf;

use anyhow::Result;

use super::RunArgs;
use crate::config::Config;
use crate::session::{self, RunOptions};

/// Train as the config describes.
pub fn run(args: RunArgs) -> Result<()> {
    let config = Config::load(&args.config, &args.set)?;
    let registry = super::registry_for(args.manifest.as_deref())?;
    config.check_components(&registry)?;
    session::install_interrupt_handler();
    let options = RunOptions {
        run_dir: args.run_dir,
        runs_root: PathBuf::from("runs"),
        stop: None,
        progress: true,
    };
    let summary = session::run(&config, &registry, &options)?;
    let dir = summary.run_dir.display();
    if let Some(sample) = &summary.sample {
        eprintln!("\n--- sample ---\n{sample}\n--------------");
    }
    if let Some(loss) = summary.val_loss {
        eprintln!("validation loss {loss:.4} (perplexity {:.2})", loss.exp());
    }
    if summary.interrupted {
        eprintln!(
            "stopped by request after step {}; results are in {dir}",
            summary.steps
        );
        if let Some(ckpt) = &summary.last_checkpoint {
            eprintln!("last checkpoint: {}", ckpt.display());
        }
    } else {
        eprintln!("finished {} steps; results are in {dir}", summary.steps);
    }
    Ok(())
}
