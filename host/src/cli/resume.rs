//! `codex-ml resume RUN_DIR` and `codex-ml run CONFIG --resume latest|PATH`: find the
//! checkpoint to continue from, decide which config applies, and hand both to the session.
//!
//! Which checkpoint: a checkpoint directory named explicitly must verify, or the command
//! fails naming the bad file (with the expected and actual hash); a run directory (or
//! `latest`) means its newest checkpoint that verifies, and each newer one skipped is named in
//! a warning. Which config: `resume` uses the one stored in the checkpoint (plus `--set`);
//! `run --resume` uses the config given. Either way it is compared with the checkpoint's by
//! [`Config::resume_differences`]: settings the steps already taken depend on must not
//! change, the rest (how long to train, cadences, sinks) may, and each change is logged.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};

use super::{ResumeArgs, UsageError};
use crate::checkpoint;
use crate::config::Config;
use crate::registry::Registry;
use crate::session::{self, ResumePoint, RunOptions, RunSummary};

/// `codex-ml resume RUN_DIR`.
pub fn resume(args: ResumeArgs) -> Result<()> {
    let point = locate(&args.run_dir)?;
    let saved = point.saved_config(&[])?;
    let config = if args.set.is_empty() {
        saved.clone()
    } else {
        point.saved_config(&args.set)?
    };
    let registry = super::registry_for(args.manifest.as_deref())?;
    config.check_components(&registry)?;
    let options = RunOptions {
        run_dir: Some(point.run_dir.clone()),
        runs_root: PathBuf::from("runs"),
        stop: None,
        progress: true,
    };
    let summary = continue_from(&config, &saved, &registry, &options, &point)?;
    super::run::report(&summary);
    Ok(())
}

/// `codex-ml run CONFIG --resume TARGET`: `latest`, a run directory or a checkpoint.
pub(crate) fn continue_config(
    config: &Config,
    registry: &Registry,
    options: &RunOptions,
    target: &Path,
) -> Result<RunSummary> {
    let point = if target == Path::new("latest") {
        let run_dir = match &options.run_dir {
            Some(dir) => dir.clone(),
            None => newest_run(&options.runs_root, &config.experiment)?,
        };
        locate(&run_dir)?
    } else {
        locate(target)?
    };
    let saved = point.saved_config(&[])?;
    continue_from(config, &saved, registry, options, &point)
}

fn continue_from(
    config: &Config,
    saved: &Config,
    registry: &Registry,
    options: &RunOptions,
    point: &ResumePoint,
) -> Result<RunSummary> {
    let changes = config.resume_differences(saved)?;
    for change in &changes {
        tracing::info!("resuming with a changed setting: {change}");
    }
    let length_changed = changes
        .iter()
        .any(|c| c.starts_with("train.max_steps") || c.starts_with("train.epochs"));
    if length_changed && config.train.schedule.kind != crate::config::ScheduleKind::Constant {
        tracing::warn!(
            "the run's length changed: the learning-rate schedule now decays towards the new last step, so the steps to come differ from those of the original run"
        );
    }
    session::install_interrupt_handler();
    session::resume(config, registry, options, point)
}

/// True when `path` names a checkpoint rather than a run.
fn is_checkpoint(path: &Path) -> bool {
    path.join(checkpoint::SUMS).exists()
        || path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(checkpoint::parse_step)
            .is_some()
}

/// The checkpoint to continue from: `target` itself if it is one (it must verify), else the
/// newest checkpoint of the run directory `target` that verifies.
pub fn locate(target: &Path) -> Result<ResumePoint> {
    if is_checkpoint(target) {
        return ResumePoint::open(target);
    }
    if !target.is_dir() {
        return Err(UsageError(format!(
            "{}: no such run or checkpoint directory; pass a run directory (runs/<experiment>/<run-id>) or one of its checkpoints",
            target.display()
        ))
        .into());
    }
    let root = target.join("checkpoints");
    let mut skipped = 0usize;
    for (_, dir) in checkpoint::list(&root)? {
        match ResumePoint::open(&dir) {
            Ok(point) => {
                if skipped > 0 {
                    tracing::warn!(
                        "resuming from {}, the newest valid checkpoint ({skipped} newer skipped)",
                        dir.display()
                    );
                }
                return Ok(point);
            }
            Err(e) => {
                skipped += 1;
                tracing::warn!("skipping checkpoint {}: {e:#}", dir.display());
            }
        }
    }
    Err(anyhow!(
        "{}: no valid checkpoint to resume from under {}{}; start the run again",
        target.display(),
        root.display(),
        if skipped > 0 {
            format!(" ({skipped} corrupt or incomplete, see the warnings above)")
        } else {
            String::new()
        }
    ))
}

/// The newest run of `experiment` under `runs_root` (run ids sort by start time).
fn newest_run(runs_root: &Path, experiment: &str) -> Result<PathBuf> {
    let parent = runs_root.join(experiment);
    let mut runs: Vec<(String, PathBuf)> = std::fs::read_dir(&parent)
        .map_err(|e| {
            UsageError(format!(
                "--resume latest: no runs of experiment `{experiment}` under {} ({e}); pass --run-dir or a path to --resume",
                parent.display()
            ))
        })?
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.path().join("metadata.json").is_file())
        .map(|entry| (entry.file_name().to_string_lossy().into_owned(), entry.path()))
        .collect();
    // `20261124-201500-2` sorts after `20261124-201500`, as it started later.
    runs.sort_by_key(|(id, _)| run_id_key(id));
    runs.pop().map(|(_, path)| path).ok_or_else(|| {
        UsageError(format!(
            "--resume latest: no runs of experiment `{experiment}` under {}; pass --run-dir or a path to --resume",
            parent.display()
        ))
        .into()
    })
}

/// `(timestamp, suffix)` of a run id, so `-10` sorts after `-9`.
fn run_id_key(id: &str) -> (String, u32) {
    match id.get(..15).zip(id.get(15..)) {
        Some((stamp, rest)) => (
            stamp.to_string(),
            rest.strip_prefix('-')
                .and_then(|n| n.parse().ok())
                .unwrap_or(if rest.is_empty() { 1 } else { 0 }),
        ),
        None => (id.to_string(), 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_sort_by_start_then_suffix() {
        let mut ids = vec![
            "20261124-201500-10",
            "20261124-201500-2",
            "20261124-201500",
            "20261123-235959",
            "20261124-201501",
        ];
        ids.sort_by_key(|id| run_id_key(id));
        assert_eq!(
            ids,
            [
                "20261123-235959",
                "20261124-201500",
                "20261124-201500-2",
                "20261124-201500-10",
                "20261124-201501",
            ]
        );
    }
}
