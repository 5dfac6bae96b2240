//! Continuing a run: which checkpoint, which config, and restoring what the checkpoint holds.
//!
//! Which checkpoint: a checkpoint directory named explicitly must verify, or the command
//! fails naming the bad file (with the expected and actual hash); a run directory (or
//! `latest`) means its newest checkpoint that verifies, and each newer one skipped is named in
//! a warning. Which config: `resume` uses the one stored in the checkpoint (plus `--set`);
//! `run --resume` uses the config given. Either way it is compared with the checkpoint's by
//! [`Config::resume_differences`]: settings the steps already taken depend on must not
//! change, the rest (how long to train, cadences, sinks) may, and each change is logged.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use codex_engine::{ParamStore, TensorGroup};

use super::{RunError, RunOptions, RunSummary};
use crate::checkpoint;
use crate::config::Config;
use crate::data::TrainBatches;
use crate::plugins::registry::Registry;

/// A verified checkpoint to continue from, and what it holds.
#[derive(Debug, Clone)]
pub struct ResumePoint {
    /// The checkpoint directory (`<run>/checkpoints/step-…`).
    pub checkpoint: PathBuf,
    /// The run directory it belongs to.
    pub run_dir: PathBuf,
    /// Its `trainer_state.json`.
    pub state: checkpoint::HostState,
    /// Its `config.ron`.
    pub config_text: String,
}

impl ResumePoint {
    /// Verify every hash of the checkpoint at `dir`, then read its state and config. Nothing
    /// is read before the whole checkpoint has verified.
    pub fn open(dir: &Path) -> Result<ResumePoint> {
        checkpoint::verify(dir, &checkpoint::CHECKPOINT_FILES)
            .with_context(|| format!("checkpoint {} is not usable", dir.display()))?;
        let state = checkpoint::read_state(dir)?;
        let config_path = dir.join("config.ron");
        let config_text = std::fs::read_to_string(&config_path)
            .with_context(|| format!("reading {}", config_path.display()))?;
        let run_dir = dir
            .parent()
            .and_then(Path::parent)
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Ok(ResumePoint {
            checkpoint: dir.to_path_buf(),
            run_dir,
            state,
            config_text,
        })
    }

    /// The config the checkpoint was written under, with `overrides` applied; relative
    /// paths resolve against the directory of the config the run was started from.
    pub fn saved_config(&self, overrides: &[crate::config::Override]) -> Result<Config> {
        let path = self.checkpoint.join("config.ron");
        let mut config = Config::from_source(&path, &self.config_text, overrides)?;
        config.dir = self.state.config_dir.clone();
        Ok(config)
    }

    /// The step it was written at.
    pub fn step(&self) -> u64 {
        self.state.step
    }
}

/// `codex-ml run CONFIG --resume TARGET`: `latest`, a run directory or a checkpoint.
pub fn continue_config(
    config: &Config,
    registry: &Registry,
    options: &RunOptions,
    target: &Path,
) -> Result<RunSummary> {
    let target = if target == Path::new("latest") {
        match &options.run_dir {
            Some(dir) => dir.clone(),
            None => latest_run(
                &options.runs_root,
                Some(&config.experiment),
                Latest::Resumable,
            )?,
        }
    } else {
        target.to_path_buf()
    };
    if is_restartable(&target) {
        return super::restart(config, registry, options, &target);
    }
    let point = locate(&target)?;
    let saved = point.saved_config(&[])?;
    continue_from(config, &saved, registry, options, &point)
}

/// Continue `point` with `config`, after checking it against the checkpoint's own config
/// `saved`: each allowed change is logged, a forbidden one refused.
pub fn continue_from(
    config: &Config,
    saved: &Config,
    registry: &Registry,
    options: &RunOptions,
    point: &ResumePoint,
) -> Result<RunSummary> {
    let changes = config
        .resume_differences(saved, options.retune)
        .with_context(|| format!("resuming from {}", point.checkpoint.display()))?;
    for change in &changes {
        tracing::info!("resuming with a changed setting: {change}");
    }
    if options.skip_batches > 0 {
        tracing::info!(
            "resuming {} optimizer steps' worth of training batches further on (--skip-batches)",
            options.skip_batches
        );
    }
    let length_changed = changes
        .iter()
        .any(|c| c.starts_with("train.max_steps") || c.starts_with("train.epochs"));
    if length_changed && config.train.schedule.kind != crate::config::ScheduleKind::Constant {
        tracing::warn!(
            "the run's length changed: the learning-rate schedule now decays towards the new last step, so the steps to come differ from those of the original run"
        );
    }
    super::install_interrupt_handler();
    super::resume(config, registry, options, point)
}

/// The checkpoint to continue from: `target` itself if it is one (it must verify), else the
/// newest checkpoint of the run directory `target` that verifies.
pub fn locate(target: &Path) -> Result<ResumePoint> {
    if checkpoint::is_checkpoint_dir(target) {
        return ResumePoint::open(target);
    }
    if !target.is_dir() {
        return Err(RunError::NoSuchRun(target.to_path_buf()).into());
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

/// Whether the run directory `run_dir` has a checkpoint that verifies.
pub(crate) fn has_checkpoint(run_dir: &Path) -> bool {
    let root = run_dir.join("checkpoints");
    matches!(
        checkpoint::latest_valid(&root, &checkpoint::CHECKPOINT_FILES),
        Ok((Some(_), _))
    )
}

/// Whether `target` is the directory of a run that stopped before its first checkpoint (not
/// a checkpoint itself): such a run is started again in place rather than resumed.
pub fn is_restartable(target: &Path) -> bool {
    !checkpoint::is_checkpoint_dir(target)
        && crate::rundir::holds_run(target)
        && !has_checkpoint(target)
}

/// What `latest` stands for in a command that takes a run directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Latest {
    /// The newest run with a valid checkpoint; when none has one, the newest run, to be
    /// started again in place (`resume`, `run --resume`).
    Resumable,
    /// The newest run with a valid checkpoint (`eval`, `generate`).
    WithCheckpoint,
    /// The newest run that has written a checkpoint, valid or not (`verify`).
    WithCheckpoints,
}

/// The run `latest` names: the newest run under `runs_root` (of `experiment`, or of any
/// experiment) that `latest` can use, logging which and the newer runs it passed over.
pub fn latest_run(runs_root: &Path, experiment: Option<&str>, latest: Latest) -> Result<PathBuf> {
    let of = experiment
        .map(|e| format!(" of experiment `{e}`"))
        .unwrap_or_default();
    let dir = experiment.map_or_else(|| runs_root.to_path_buf(), |e| runs_root.join(e));
    let no_runs = |reason: String| RunError::NoRuns {
        of: of.clone(),
        dir: dir.clone(),
        reason,
    };
    let runs =
        crate::rundir::runs(runs_root, experiment).map_err(|e| no_runs(format!(" ({e})")))?;
    let Some(newest) = runs.last().cloned() else {
        return Err(no_runs(String::new()).into());
    };
    let usable = |run: &Path| match latest {
        Latest::Resumable | Latest::WithCheckpoint => has_checkpoint(run),
        Latest::WithCheckpoints => {
            checkpoint::list(&run.join("checkpoints")).is_ok_and(|found| !found.is_empty())
        }
    };
    let name = |run: &Path| {
        run.strip_prefix(runs_root)
            .unwrap_or(run)
            .display()
            .to_string()
    };
    let mut passed = Vec::new();
    for run in runs.iter().rev() {
        if usable(run) {
            let passed = match passed.len() {
                0 => String::new(),
                _ => format!("; newer runs without one: {}", passed.join(", ")),
            };
            tracing::info!(
                "latest: run {} (the newest{of} with a checkpoint{passed})",
                run.display()
            );
            return Ok(run.clone());
        }
        passed.push(name(run));
    }
    match latest {
        Latest::Resumable => {
            tracing::info!(
                "latest: run {}, the newest{of}; no run has a checkpoint, so it starts again",
                newest.display()
            );
            Ok(newest)
        }
        _ => Err(RunError::NoCheckpoints { of, dir }.into()),
    }
}

/// Clear the way for a resumed run's checkpoints: remove what interrupted writes left, and set
/// aside checkpoints newer than the one resumed from (corrupt ones skipped by `latest`, or
/// valid ones when an older checkpoint was named on purpose) so they can be written again.
pub(crate) fn prepare_checkpoints(root: &Path, step: u64) -> Result<()> {
    for dir in checkpoint::remove_stale_writes(root)? {
        tracing::warn!("removed an interrupted checkpoint write: {}", dir.display());
    }
    for (from, to) in checkpoint::set_aside_after(root, step)? {
        tracing::warn!(
            "checkpoint {} is newer than the one resumed from: moved to {}",
            from.display(),
            to.display()
        );
    }
    Ok(())
}

/// Overwrite the freshly built state with the checkpoint's: parameters, optimizer state and
/// the data cursor, moved on by `skip` micro-batches when the user asked to skip some. The trainer's own state travels through [`TrainSession::resume_state`].
pub(crate) fn restore(
    point: &ResumePoint,
    store: &mut ParamStore,
    train: &mut TrainBatches,
    tokenizer_json: Option<&str>,
    base_sha256: Option<&str>,
    skip: u64,
) -> Result<()> {
    check_base(
        &point.checkpoint,
        point.state.base_sha256.as_deref(),
        base_sha256,
    )?;
    let saved_tokenizer = point.checkpoint.join("tokenizer.json");
    if let (Some(now), Ok(then)) = (tokenizer_json, std::fs::read_to_string(&saved_tokenizer)) {
        if now != then {
            bail!(
                "the tokenizer built now differs from {}: the training data or the tokenizer changed since the checkpoint; resume with the same data",
                saved_tokenizer.display()
            );
        }
    }
    store.load_safetensors(
        &point.checkpoint.join("model.safetensors"),
        params_group(base_sha256),
    )?;
    store.load_safetensors(
        &point.checkpoint.join("optimizer.safetensors"),
        TensorGroup::State,
    )?;
    train.seek(point.state.data)?;
    for _ in 0..skip {
        train.next_batch();
    }
    Ok(())
}

/// The parameters a checkpoint holds: only what trains for a LoRA run (one with a base hash).
pub(crate) fn params_group(base_sha256: Option<&str>) -> TensorGroup {
    match base_sha256 {
        Some(_) => TensorGroup::Trainable,
        None => TensorGroup::Params,
    }
}

/// Refuse a checkpoint whose adapters were trained on other base weights than the model has
/// now (`now`, the hash of the frozen parameters, for a LoRA config), or one that does not
/// match the config's kind of run.
pub(crate) fn check_base(checkpoint: &Path, then: Option<&str>, now: Option<&str>) -> Result<()> {
    match (then, now) {
        (None, None) => Ok(()),
        (Some(then), Some(now)) if then == now => Ok(()),
        (Some(then), Some(now)) => Err(RunError::BaseChanged {
            checkpoint: checkpoint.to_owned(),
            then: then.to_owned(),
            now: now.to_owned(),
        }
        .into()),
        (Some(_), None) => bail!(
            "{}: the checkpoint holds a LoRA adapter, but the config has no `adapter` section",
            checkpoint.display()
        ),
        (None, Some(_)) => bail!(
            "{}: the checkpoint holds a whole model, but the config trains a LoRA adapter",
            checkpoint.display()
        ),
    }
}
