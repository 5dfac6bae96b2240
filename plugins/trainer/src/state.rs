//! The trainer's own part of a checkpoint.
//!
//! Everything else that an exact resume needs — parameters, optimizer state, the data cursor
//! and its RNG — is the host's, saved next to this. The loop's remaining state is small
//! because the schedule and the dropout seeds are pure functions of the step.

use codex_plugin_api::{Error, Result};
use serde::{Deserialize, Serialize};

/// Bumped when the fields change incompatibly.
const FORMAT: u32 = 1;

/// Saved as `trainer_state.json` by the host.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub(crate) struct TrainerState {
    /// Format version of this record.
    pub(crate) format: u32,
    /// Optimizer steps completed.
    pub(crate) step: u64,
    /// Training target tokens consumed.
    pub(crate) tokens_seen: u64,
    /// Lowest validation loss so far.
    pub(crate) best_val_loss: Option<f64>,
    /// The step of the last evaluation.
    pub(crate) last_eval_step: Option<u64>,
    /// Summed loss and target tokens of the steps since the last `loss` record, whose mean
    /// the next one records. Checkpoints of earlier versions lack them: their window starts
    /// empty.
    #[serde(default)]
    pub(crate) window_nll: f64,
    #[serde(default)]
    pub(crate) window_tokens: u64,
    /// The loss scaler's state, with dynamic loss scaling (f16): the scale the next step
    /// multiplies the loss by, finite steps since the scale last changed, and the steps
    /// skipped so far for a gradient that was not finite. Absent without loss scaling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) loss_scale: Option<f64>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(crate) growth_tracker: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(crate) skipped_steps: u64,
}

fn is_zero(x: &u64) -> bool {
    *x == 0
}

impl Default for TrainerState {
    fn default() -> Self {
        TrainerState {
            format: FORMAT,
            step: 0,
            tokens_seen: 0,
            best_val_loss: None,
            last_eval_step: None,
            window_nll: 0.0,
            window_tokens: 0,
            loss_scale: None,
            growth_tracker: 0,
            skipped_steps: 0,
        }
    }
}

impl TrainerState {
    pub(crate) fn to_json(&self) -> Result<String> {
        Ok(serde_json::to_string(self)?)
    }

    pub(crate) fn from_json(text: &str) -> Result<TrainerState> {
        let state: TrainerState = serde_json::from_str(text).map_err(|e| {
            Error::msg(format!(
                "the checkpoint's trainer state is not one the `default` trainer wrote: {e}; resume with the trainer that wrote it"
            ))
        })?;
        if state.format != FORMAT {
            return Err(Error::msg(format!(
                "the checkpoint's trainer state has format {}, this build reads format {FORMAT}; resume with the codex-ml version that wrote it",
                state.format
            )));
        }
        Ok(state)
    }

    /// Remember a validation loss; JSON cannot hold a non-finite one, and it is never the best.
    pub(crate) fn observe_val_loss(&mut self, step: u64, loss: f64) {
        self.last_eval_step = Some(step);
        if loss.is_finite() && self.best_val_loss.is_none_or(|best| loss < best) {
            self.best_val_loss = Some(loss);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let mut s = TrainerState {
            step: 200,
            tokens_seen: 123_456,
            window_nll: 0.1 + 0.2,
            window_tokens: 96,
            ..TrainerState::default()
        };
        s.observe_val_loss(200, 2.5);
        let back = TrainerState::from_json(&s.to_json().map_err(|e| e.to_string()).unwrap());
        assert_eq!(back.map_err(|e| e.to_string()), Ok(s.clone()));
        s.loss_scale = Some(32768.0);
        s.growth_tracker = 17;
        s.skipped_steps = 3;
        let back = TrainerState::from_json(&s.to_json().map_err(|e| e.to_string()).unwrap());
        assert_eq!(back.map_err(|e| e.to_string()), Ok(s));
    }

    #[test]
    fn reads_states_without_a_logging_window_as_an_empty_one() {
        let old =
            r#"{"format":1,"step":9,"tokens_seen":90,"best_val_loss":null,"last_eval_step":null}"#;
        let s = TrainerState::from_json(old)
            .map_err(|e| e.to_string())
            .unwrap();
        assert_eq!((s.step, s.window_nll, s.window_tokens), (9, 0.0, 0));
    }

    #[test]
    fn keeps_the_best_finite_loss() {
        let mut s = TrainerState::default();
        s.observe_val_loss(10, 3.0);
        s.observe_val_loss(20, f64::NAN);
        s.observe_val_loss(30, 3.5);
        s.observe_val_loss(40, 2.0);
        assert_eq!((s.best_val_loss, s.last_eval_step), (Some(2.0), Some(40)));
    }

    #[test]
    fn refuses_foreign_or_future_states() {
        for bad in [
            "{}",
            r#"{"format":1,"step":1,"tokens_seen":0,"best_val_loss":null,"last_eval_step":null,"extra":1}"#,
            r#"{"format":2,"step":1,"tokens_seen":0,"best_val_loss":null,"last_eval_step":null}"#,
        ] {
            assert!(TrainerState::from_json(bad).is_err(), "{bad}");
        }
    }
}
