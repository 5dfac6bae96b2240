//! What a checkpoint of a run holds besides tensors: the file list and `trainer_state.json`,
//! the host's record of where every stream of the run stands, around the trainer's own state.
//!
//! The tensors themselves are `model.safetensors` (parameters) and `optimizer.safetensors`
//! (optimizer state), written by the engine's parameter store. The format of the state file
//! is `codex_formats::checkpoint`'s; this module finds checkpoints on disk.

use std::path::{Path, PathBuf};

pub use codex_formats::checkpoint::{
    read_state, HostState, RngStreams, ScheduleState, StateError, CHECKPOINT_FILES,
    HOST_STATE_VERSION, STATE_FILE,
};

use super::{latest_valid, parse_step, verify, SUMS};

/// True when `path` names a checkpoint directory rather than a run directory.
pub fn is_checkpoint_dir(path: &Path) -> bool {
    path.join(SUMS).exists()
        || path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(parse_step)
            .is_some()
}

/// The newest valid checkpoint of a run directory, or the checkpoint itself.
pub fn resolve(target: &Path) -> anyhow::Result<PathBuf> {
    use anyhow::{bail, Context};
    if is_checkpoint_dir(target) {
        verify(target, &CHECKPOINT_FILES)
            .with_context(|| format!("checkpoint {} is not usable", target.display()))?;
        return Ok(target.to_path_buf());
    }
    let root = target.join("checkpoints");
    if !target.is_dir() {
        bail!("{}: no such run or checkpoint directory", target.display());
    }
    let (found, skipped) = latest_valid(&root, &CHECKPOINT_FILES)?;
    for (dir, why) in &skipped {
        tracing::warn!("skipping checkpoint {}: {why}", dir.display());
    }
    match found {
        Some((_, dir)) => Ok(dir),
        None => bail!(
            "{}: no valid checkpoint under {} (a run writes one at train.checkpoint_every and at its end)",
            target.display(),
            root.display()
        ),
    }
}
