//! What a checkpoint of a run holds besides tensors: the file list and `trainer_state.json`,
//! the host's record of where every stream of the run stands, around the trainer's own state.
//!
//! The tensors themselves are `model.safetensors` (parameters) and `optimizer.safetensors`
//! (optimizer state), written by the engine's parameter store. Writing, verifying and choosing
//! checkpoints is the host's; this module is the format only.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::ScheduleKind;

/// Files every checkpoint holds; `verify` insists they are covered by `SHA256SUMS`.
pub const CHECKPOINT_FILES: [&str; 4] = [
    "model.safetensors",
    "optimizer.safetensors",
    "trainer_state.json",
    "config.ron",
];

/// The version of `trainer_state.json` this build writes and reads.
pub const HOST_STATE_VERSION: u32 = 2;

/// `trainer_state.json`: the host's part of a checkpoint (what the trainer cannot know) around
/// the trainer's own state.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostState {
    /// Format version of this file.
    pub version: u32,
    /// Optimizer steps completed.
    pub step: u64,
    /// Micro-batches of the next optimizer step already consumed. Always 0: checkpoints are
    /// taken between optimizer steps, never inside gradient accumulation.
    pub micro_step: u64,
    /// Where the training data stands.
    pub data: DataCursor,
    /// The run seed.
    pub seed: u64,
    /// Every random stream and where it stands.
    pub rng: RngStreams,
    /// The learning-rate schedule the steps so far followed.
    pub schedule: ScheduleState,
    /// A LoRA run's checkpoint: the sha256 of the frozen base weights its adapters were
    /// trained on (`model.safetensors` then holds only what trains). Absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_sha256: Option<String>,
    /// The validation loss recorded at this step, if the run evaluated here; retention keeps
    /// the checkpoint with the lowest one.
    pub val_loss: Option<f64>,
    /// The directory of the config file the run was started from: relative paths in
    /// component parameters resolve against it when the run is resumed from its own config.
    pub config_dir: PathBuf,
    /// The trainer's own state (opaque JSON; the built-in trainer keeps its step, tokens seen,
    /// best validation loss and last evaluation step there).
    pub trainer: serde_json::Value,
}

/// Where the training stream stands: the next window to serve is `position` in the order of
/// `epoch`. Saved in checkpoints; restoring it in the host's batch iterator continues exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct DataCursor {
    /// The epoch, from 0.
    pub epoch: u64,
    /// Windows of this epoch already served.
    pub position: u64,
}

/// The random streams of a run. None is a running generator: each value is a pure function
/// of the run seed and a position that the checkpoint already holds, which is why resuming
/// needs no generator state and replays nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RngStreams {
    /// Parameter initialisation: drawn from this seed when the model declares its
    /// parameters. Used once; a resumed run overwrites the drawn values with the saved ones.
    pub init_seed: u64,
    /// Order of the training windows: `window_order(data_order_seed, epoch)`, a fresh
    /// permutation per epoch; the position inside the epoch is `data.position`.
    pub data_order_seed: u64,
    /// The epoch whose permutation is being served.
    pub data_order_epoch: u64,
    /// Dropout masks: the trainer derives the seed of micro-step `m` of step `s` as a
    /// function of (`dropout_seed`, `s`, `m`).
    pub dropout_seed: u64,
    /// The step whose dropout seeds come next.
    pub dropout_next_step: u64,
}

/// The schedule as resolved for the run that wrote the checkpoint. The learning rate is a
/// pure function of these and the step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleState {
    /// `constant`, `linear` or `cosine`.
    pub kind: ScheduleKind,
    /// Peak learning rate.
    pub peak_lr: f64,
    /// Warmup steps.
    pub warmup_steps: u64,
    /// The floor.
    pub min_lr: f64,
    /// The step the decay ends at.
    pub total_steps: u64,
    /// The learning rate of the last step taken, if any.
    pub last_lr: Option<f64>,
}

/// Read the `trainer_state.json` of the checkpoint at `dir` (already verified), refusing
/// another format version with a message that says which codex-ml can read it.
pub fn read_state(dir: &Path) -> Result<HostState, StateError> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|source| StateError::Read {
        path: path.clone(),
        source,
    })?;
    parse_state(&path, &text)
}

/// Parse `text`, the contents of the state file `path` (named in errors), as
/// [`read_state`] does.
pub fn parse_state(path: &Path, text: &str) -> Result<HostState, StateError> {
    let state: HostState = serde_json::from_str(text).map_err(|e| StateError::Format {
        path: path.to_owned(),
        found: None,
        detail: e.to_string(),
    })?;
    if state.version != HOST_STATE_VERSION {
        return Err(StateError::Format {
            path: path.to_owned(),
            found: Some(state.version),
            detail: String::new(),
        });
    }
    Ok(state)
}

/// The name of the host's state file in a checkpoint.
pub const STATE_FILE: &str = "trainer_state.json";

/// Why a checkpoint's state cannot be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// The file cannot be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Another format, or not this format at all.
    #[error("{}", format_message(path, *found, detail))]
    Format {
        /// The file.
        path: PathBuf,
        /// The version it declares, when it declares one this build does not read.
        found: Option<u32>,
        /// What the parser said, when it could not read the file.
        detail: String,
    },
}

fn format_message(path: &Path, found: Option<u32>, detail: &str) -> String {
    match found {
        Some(v) => format!(
            "{}: trainer state format {v} but this build reads format {HOST_STATE_VERSION}; resume with the codex-ml version that wrote it",
            path.display()
        ),
        None => format!(
            "{}: not a trainer state this build reads (format version {HOST_STATE_VERSION}); resume with the codex-ml version that wrote it: {detail}",
            path.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state written as a checkpoint writes it reads back to the same bits. serde_json without
    /// its `float_roundtrip` feature read `3.9181357628456115`, which it had written for the
    /// float parsed from `3.91813576284561138`, one unit in the last place off (found by the
    /// `checkpoint_state` fuzz target).
    #[test]
    fn a_state_reads_back_exactly_as_written() {
        let text = r#"{"version": 2, "step": 200, "micro_step": 0,
            "data": {"epoch": 1, "position": 592}, "seed": 1337,
            "rng": {"init_seed": 1, "data_order_seed": 2, "data_order_epoch": 1,
                    "dropout_seed": 3, "dropout_next_step": 201},
            "schedule": {"kind": "cosine", "peak_lr": 0.002, "warmup_steps": 40,
                         "min_lr": 0.0002, "total_steps": 400, "last_lr": 0.0012562833599002376},
            "val_loss": 3.91813576284561138, "config_dir": "/configs",
            "trainer": {"best_val_loss": 3.91813576284561138}}"#;
        let path = Path::new("trainer_state.json");
        let state = parse_state(path, text).expect("valid");
        let written = serde_json::to_string_pretty(&state).expect("serialisable");
        let back = parse_state(path, &written).expect("reads back");
        assert_eq!(
            state.val_loss.map(f64::to_bits),
            back.val_loss.map(f64::to_bits)
        );
        assert_eq!(state.trainer, back.trainer, "{written}");
    }
}
