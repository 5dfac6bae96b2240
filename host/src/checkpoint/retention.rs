//! Which checkpoints to keep: a pure policy over what is on disk, and the removal that
//! executes it.

use std::fs;
use std::path::Path;

use super::{io_err, CheckpointError, TMP_PREFIX};
use crate::fsio;

/// Delete the checkpoint directory `dir`. It is first renamed to a temporary name, so a crash
/// halfway through deleting leaves nothing that looks like a (corrupt) checkpoint.
pub fn remove(dir: &Path) -> Result<(), CheckpointError> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let doomed = dir.with_file_name(format!("{TMP_PREFIX}delete-{name}"));
    fs::rename(dir, &doomed).map_err(io_err(dir))?;
    if let Some(parent) = dir.parent() {
        fsio::fsync_dir(parent).map_err(io_err(parent))?;
    }
    fs::remove_dir_all(&doomed).map_err(io_err(&doomed))
}

/// What the retention policy knows of one checkpoint on disk.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// Its step.
    pub step: u64,
    /// Whether every hash matched when it was last checked.
    pub valid: bool,
    /// The validation loss recorded at its step, if the run evaluated there.
    pub val_loss: Option<f64>,
}

/// The retention policy: the steps of the checkpoints to delete so that the newest `keep_last`
/// valid ones and the valid one with the lowest validation loss remain (`keep_last` 0 keeps
/// everything). The newest valid checkpoint is always kept, whatever `keep_last` says, and a
/// checkpoint that does not verify is never deleted here: it is evidence to inspect (`codex-ml
/// verify`), and it may be newer than anything valid. The result is sorted by step.
pub fn retention(checkpoints: &[Summary], keep_last: usize) -> Vec<u64> {
    if keep_last == 0 {
        return Vec::new();
    }
    let mut valid: Vec<&Summary> = checkpoints.iter().filter(|c| c.valid).collect();
    valid.sort_by_key(|c| std::cmp::Reverse(c.step));
    valid.dedup_by_key(|c| c.step);
    let best = valid
        .iter()
        .filter_map(|c| Some((c.val_loss.filter(|l| l.is_finite())?, c.step)))
        // Ties go to the newer checkpoint: `valid` is newest first and `min_by` keeps the first.
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, step)| step);
    let mut doomed: Vec<u64> = valid
        .iter()
        .skip(keep_last)
        .map(|c| c.step)
        .filter(|&step| Some(step) != best)
        .collect();
    doomed.sort_unstable();
    doomed
}
