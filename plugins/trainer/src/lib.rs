//! The built-in training loop, registered as trainer `default`.
//!
//! The host owns the model, optimizer, data and run directory and hands the loop a
//! [`Session`]; this crate owns the policy. Per optimizer step:
//!
//! 1. pull `grad_accum` micro-batches first, so the step's target-token count `N` is known;
//! 2. per micro-batch: forward (training mode, dropout seed derived from (seed, step,
//!    micro-step)), summed cross-entropy, backward of `loss_sum / N` — gradients add up in the
//!    parameters' slots, so the step's gradient is the mean over all its tokens and
//!    `batch 8 × accum 1` equals `batch 2 × accum 4` by construction;
//! 3. global L2 norm of the gradients (logged before clipping), clip to `clip_norm`;
//! 4. learning rate from the schedule (a pure function of the step), optimizer step, zero
//!    every gradient.
//!
//! With dynamic loss scaling (the session asks for it when the matrix products are in f16),
//! as PyTorch's `GradScaler` under Hugging Face's Trainer: the loss is multiplied by the scale
//! before backward and the gradients divided by it before the norm; a step whose gradient is
//! not finite zeroes the gradients instead of stepping the optimizer, backs the scale off and
//! says so in the log. The step still counts (the data is consumed, and `max_steps` counts
//! it, as the Trainer's `global_step` does), but the schedule and the optimizer's own step
//! count do not advance: the learning rate of a step is that of the optimizer steps applied
//! so far plus one, as the Trainer steps its scheduler only after an applied step. Every
//! `log_every` steps it records `loss_scale` (the scale after the step) and `skipped_steps`
//! (so far). The scaler's state is part of the checkpoint.
//!
//! Evaluation, checkpointing and metric records follow the cadences of the `train`
//! settings. Every `log_every` steps the loop records, under split `train`: `loss`, the
//! token-weighted mean loss over the steps since the last record (as Hugging Face's Trainer
//! logs it, so a curve does not hang on one step's luck), `lr` and `grad_norm` of the step,
//! `tokens_per_s` over the window, and `tokens_seen` (target tokens trained on so far). The
//! window's sums are part of the checkpoint, so a resumed run records what the uninterrupted
//! one does. Losses, perplexity and accuracy are Σ over tokens / Σ tokens; padding is never
//! counted because the cross-entropy op skips `ignore_index`. The step itself does no IO and
//! no logging: records go to the host's queue, and scalars are read back once per step.

#![warn(missing_docs, unreachable_pub)]

mod scaler;
mod schedule;
mod seed;
mod state;

use std::time::Instant;

use codex_plugin_api::trainer::{LossScaling, Session, TrainOutcome, Trainer};
use codex_plugin_api::{
    bail, Batch, DType, Describe, Error, ForwardCtx, OptimStep, Result, Tensor, TrainSettings,
};
use serde::Deserialize;

use crate::schedule::learning_rate;
use crate::seed::forward_seed;
use crate::state::TrainerState;

codex_plugin_api::builtin!(codex_plugin_api::trainer::declare::<DefaultTrainer>);

/// Parameters of trainer `default`: it has none (its settings are the `train` section), and
/// anything given is refused rather than silently ignored.
#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct DefaultParams {}

/// The built-in training loop.
pub struct DefaultTrainer;

impl Describe for DefaultTrainer {
    const NAME: &'static str = "default";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "token-weighted accumulation, global-norm clipping, warmup + decay schedules, periodic evaluation";

    fn check_params(params: &str) -> codex_plugin_api::Result<()> {
        codex_plugin_api::strict::parse_params::<DefaultParams>(params).map(drop)
    }
}

impl Trainer for DefaultTrainer {
    fn create(params: &str) -> Result<Self> {
        codex_plugin_api::strict::parse_params::<DefaultParams>(params).map_err(|e| {
            Error::msg(format!(
                "invalid parameters for trainer `default`: {}; it takes none, set the `train` section instead",
                e.message()
            ))
        })?;
        Ok(DefaultTrainer)
    }

    fn train(&mut self, session: &mut Session<'_, '_>) -> Result<TrainOutcome> {
        Loop::new(session)?.run()
    }
}

/// True when something scheduled every `every` steps falls on `step` (0: never by cadence).
fn due(step: u64, every: u64) -> bool {
    every > 0 && step.is_multiple_of(every)
}

/// A parameter as the loop uses it.
struct Param {
    /// Its index in the session's parameter list (what the optimizer was created with).
    index: usize,
    tensor: Tensor,
    trainable: bool,
    /// Every dimension, to sum its squared gradient to a scalar.
    dims: Vec<usize>,
    /// Squares are summed in f32 even for half-precision gradients.
    cast: bool,
}

struct Loop<'s, 'a, 'b> {
    session: &'s mut Session<'a, 'b>,
    settings: TrainSettings,
    params: Vec<Param>,
    state: TrainerState,
    /// Dynamic loss scaling, when the session asks for it.
    scaling: Option<LossScaling>,
    last_checkpoint: Option<u64>,
    /// Tokens and seconds of training since the last `tokens_per_s` record.
    log_tokens: u64,
    log_seconds: f64,
}

impl<'s, 'a, 'b> Loop<'s, 'a, 'b> {
    fn new(session: &'s mut Session<'a, 'b>) -> Result<Self> {
        let settings = session.settings();
        if settings.grad_accum == 0 {
            bail!("train.grad_accum is 0; it must be at least 1");
        }
        if !(settings.clip_norm >= 0.0 && settings.clip_norm.is_finite()) {
            bail!(
                "train.clip_norm is {}; it must be 0 (no clipping) or a positive number",
                settings.clip_norm
            );
        }
        let mut params = Vec::new();
        for (index, info) in session.params().into_iter().enumerate() {
            let tensor = Tensor::retain(info.id);
            let cast = tensor.dtype()? != DType::F32;
            params.push(Param {
                index,
                tensor,
                trainable: info.trainable,
                dims: (0..info.shape.len()).collect(),
                cast,
            });
        }
        if !params.iter().any(|p| p.trainable) {
            bail!("the model has no trainable parameter; unfreeze some before training");
        }
        let (mut state, last_checkpoint) = match session.resume_state() {
            Some(text) => {
                let s = TrainerState::from_json(&text)?;
                let step = s.step;
                (s, Some(step))
            }
            None => (TrainerState::default(), None),
        };
        let scaling = session.loss_scaling();
        if let Some(scaling) = &scaling {
            let ok = scaling.init_scale.is_finite()
                && scaling.init_scale > 0.0
                && scaling.growth_factor > 1.0
                && scaling.backoff_factor > 0.0
                && scaling.backoff_factor < 1.0
                && scaling.growth_interval > 0;
            if !ok {
                bail!("the session's loss scaling is not one a scaler can run: {scaling:?}");
            }
            // A checkpoint keeps the scale it reached; a new run starts from the initial one.
            state.loss_scale.get_or_insert(scaling.init_scale);
        }
        Ok(Loop {
            session,
            settings,
            params,
            state,
            scaling,
            last_checkpoint,
            log_tokens: 0,
            log_seconds: 0.0,
        })
    }

    fn run(mut self) -> Result<TrainOutcome> {
        // Gradients left over from before the loop must not leak into its first step.
        self.zero_grads()?;
        while self.state.step < self.settings.total_steps {
            if self.session.should_stop() {
                self.checkpoint_if_new()?;
                return Ok(TrainOutcome {
                    steps: self.state.step,
                    interrupted: true,
                });
            }
            let Some(batches) = self.pull_micro_batches()? else {
                break; // the data is exhausted
            };
            self.step(batches)?;
            let step = self.state.step;
            if due(step, self.settings.eval_every) {
                self.evaluate()?;
            }
            if due(step, self.settings.checkpoint_every) {
                self.checkpoint_if_new()?;
            }
        }
        if self.state.last_eval_step != Some(self.state.step) {
            self.evaluate()?;
        }
        if self.state.step > 0 {
            self.checkpoint_if_new()?;
        }
        Ok(TrainOutcome {
            steps: self.state.step,
            interrupted: false,
        })
    }

    /// Up to `grad_accum` micro-batches; `None` when the data had none left. A step cut
    /// short by the end of the data still averages over exactly the tokens it saw.
    fn pull_micro_batches(&mut self) -> Result<Option<Vec<Batch>>> {
        let mut batches = Vec::with_capacity(self.settings.grad_accum as usize);
        while (batches.len() as u64) < self.settings.grad_accum {
            match self.session.next_batch()? {
                Some(b) => batches.push(b),
                None => break,
            }
        }
        Ok((!batches.is_empty()).then_some(batches))
    }

    fn step(&mut self, batches: Vec<Batch>) -> Result<()> {
        let started = Instant::now();
        let step = self.state.step + 1;
        let n: u64 = batches.iter().map(|b| b.tokens).sum();
        if n == 0 {
            // All padding: no gradient to take. The data is consumed and the step not counted.
            return Ok(());
        }
        let scale = 1.0 / n as f64;
        // The loss scale multiplies the loss before backward (1 without loss scaling).
        let loss_scale = self.state.loss_scale.filter(|_| self.scaling.is_some());
        let backward_scale = scale * loss_scale.unwrap_or(1.0);
        let mut nll: Option<Tensor> = None;
        let mut counted: Option<Tensor> = None;
        for (micro, batch) in batches.iter().enumerate() {
            let ctx = ForwardCtx {
                train: true,
                seed: forward_seed(self.settings.seed, step, micro as u64),
            };
            let (loss_sum, tokens) = {
                let ce = self.cross_entropy(batch, ctx)?;
                (ce.loss_sum, ce.tokens)
            };
            loss_sum.affine(backward_scale, 0.0)?.backward()?;
            let detached = loss_sum.detach()?;
            nll = Some(match nll {
                None => detached,
                Some(acc) => acc.add(&detached)?,
            });
            counted = Some(match counted {
                None => tokens,
                Some(acc) => acc.add(&tokens)?,
            });
        }
        drop(batches);
        let nll = nll.map(|t| t.to_scalar()).transpose()?.unwrap_or(0.0);
        let counted = counted.map(|t| t.to_scalar()).transpose()?.unwrap_or(0.0);
        if (counted - n as f64).abs() > 0.5 {
            bail!(
                "step {step}: the data reported {n} target tokens but cross-entropy counted {counted}; padding targets must equal train.ignore_index ({})",
                self.settings.ignore_index
            );
        }
        let loss = nll / n as f64;

        let mut grads: Vec<(usize, Tensor)> = Vec::with_capacity(self.params.len());
        for (i, p) in self.params.iter().enumerate() {
            if p.trainable {
                // A parameter the forward pass did not reach has no gradient and no update.
                if let Some(g) = p.tensor.grad()? {
                    grads.push((i, g));
                }
            }
        }
        if let Some(loss_scale) = loss_scale {
            // Unscaled before anything reads them, as `GradScaler.unscale_` does.
            let inv = 1.0 / loss_scale;
            for (_, g) in grads.iter_mut() {
                *g = g.affine(inv, 0.0)?;
            }
        }
        let grad_norm = self.global_norm(&grads)?;
        // Steps whose optimizer update was skipped for a non-finite gradient, before this one.
        let skipped_before = self.state.skipped_steps;
        let applied = step - skipped_before;
        if let (Some(scaling), Some(loss_scale)) = (self.scaling, loss_scale) {
            if !loss.is_finite() {
                // The forward pass overflowed: the loss scale only acts on backward, so
                // backing it off cannot help.
                bail!(
                    "step {step}: the loss is {loss}; training diverged (the loss is computed before any loss scaling): resume from a checkpoint with a lower learning rate for the steps to come (codex-ml resume RUN_DIR --retune --set optimizer.lr=LOWER), and --skip-batches N to step over the data that set it off"
                );
            }
            let finite = grad_norm.is_finite();
            let (next, tracker) =
                scaler::update(&scaling, loss_scale, self.state.growth_tracker, finite);
            self.state.loss_scale = Some(next);
            self.state.growth_tracker = tracker;
            if !finite {
                drop(grads);
                self.zero_grads()?;
                self.state.skipped_steps += 1;
                self.session.warn(&format!(
                    "step {step}: a gradient is not finite at loss scale {loss_scale}; the optimizer step is skipped and the scale backs off to {next} (steps skipped so far: {})",
                    self.state.skipped_steps
                ));
                let lr = learning_rate(
                    &self.settings.schedule,
                    self.settings.lr,
                    self.settings.total_steps,
                    applied,
                );
                return self.finish_step(started, step, n, nll, loss, lr, grad_norm);
            }
        }
        if !grad_norm.is_finite() {
            bail!(
                "step {step}: the gradient norm is {grad_norm} (loss {loss}); training diverged: resume from a checkpoint with a lower learning rate for the steps to come (codex-ml resume RUN_DIR --retune --set optimizer.lr=LOWER), and --skip-batches N to step over the data that set it off"
            );
        }
        let clip = self.settings.clip_norm;
        if clip > 0.0 && grad_norm > clip {
            // As torch.nn.utils.clip_grad_norm_: the epsilon keeps a zero norm harmless.
            let factor = clip / (grad_norm + 1e-6);
            for (_, g) in grads.iter_mut() {
                *g = g.affine(factor, 0.0)?;
            }
        }
        let lr = learning_rate(
            &self.settings.schedule,
            self.settings.lr,
            self.settings.total_steps,
            applied,
        );
        {
            let update: Vec<(usize, &Tensor, &Tensor)> = grads
                .iter()
                .map(|(i, g)| (self.params[*i].index, &self.params[*i].tensor, g))
                .collect();
            self.session
                .optimizer_step(&update, OptimStep { lr, step: applied })?;
        }
        drop(grads);
        self.zero_grads()?;
        self.finish_step(started, step, n, nll, loss, lr, grad_norm)
    }

    /// The bookkeeping of step `step`, applied or skipped: counters, progress and records.
    #[allow(clippy::too_many_arguments)]
    fn finish_step(
        &mut self,
        started: Instant,
        step: u64,
        n: u64,
        nll: f64,
        loss: f64,
        lr: f64,
        grad_norm: f64,
    ) -> Result<()> {
        self.state.step = step;
        self.state.tokens_seen += n;
        self.state.window_nll += nll;
        self.state.window_tokens += n;
        let seconds = started.elapsed().as_secs_f64();
        self.log_tokens += n;
        self.log_seconds += seconds;
        let step_rate = rate(n, seconds);
        self.session.progress(step, loss, lr, step_rate);
        if due(step, self.settings.log_every) || step == self.settings.total_steps {
            let tokens_per_s = rate(self.log_tokens, self.log_seconds);
            let mean_loss = self.state.window_nll / self.state.window_tokens.max(1) as f64;
            self.session.record(step, "train", "loss", mean_loss);
            self.session.record(step, "train", "lr", lr);
            self.session.record(step, "train", "grad_norm", grad_norm);
            self.session
                .record(step, "train", "tokens_per_s", tokens_per_s);
            self.session
                .record(step, "train", "tokens_seen", self.state.tokens_seen as f64);
            if let Some(scale) = self.state.loss_scale.filter(|_| self.scaling.is_some()) {
                self.session.record(step, "train", "loss_scale", scale);
                self.session.record(
                    step,
                    "train",
                    "skipped_steps",
                    self.state.skipped_steps as f64,
                );
            }
            self.log_tokens = 0;
            self.log_seconds = 0.0;
            self.state.window_nll = 0.0;
            self.state.window_tokens = 0;
        }
        Ok(())
    }

    /// Forward `batch` and its summed cross-entropy over `[batch·time, vocab]`.
    fn cross_entropy(
        &mut self,
        batch: &Batch,
        ctx: ForwardCtx,
    ) -> Result<codex_plugin_api::CrossEntropy> {
        let logits = self.session.forward(&batch.inputs, ctx)?;
        let shape = logits.shape()?;
        let Some((&vocab, lead)) = shape.split_last() else {
            bail!("the model returned a scalar instead of logits [batch, time, vocab]");
        };
        let rows: usize = lead.iter().product();
        let target_shape = batch.targets.shape()?;
        if target_shape.iter().product::<usize>() != rows {
            bail!(
                "the model returned logits of shape {shape:?} for targets of shape {target_shape:?}; expected [batch, time, vocab]"
            );
        }
        let logits = logits.reshape(&[rows, vocab])?;
        let targets = batch.targets.reshape(&[rows])?;
        logits.cross_entropy(&targets, self.settings.ignore_index)
    }

    /// L2 norm over every gradient together, summed on the device and read back once.
    fn global_norm(&self, grads: &[(usize, Tensor)]) -> Result<f64> {
        let mut total: Option<Tensor> = None;
        for (i, g) in grads {
            let p = &self.params[*i];
            let squares = if p.cast {
                g.to_dtype(DType::F32)?.sqr()?
            } else {
                g.sqr()?
            };
            let sum = squares.sum(&p.dims, false)?;
            total = Some(match total {
                None => sum,
                Some(t) => t.add(&sum)?,
            });
        }
        Ok(total
            .map(|t| t.to_scalar())
            .transpose()?
            .unwrap_or(0.0)
            .sqrt())
    }

    fn zero_grads(&self) -> Result<()> {
        for p in &self.params {
            p.tensor.zero_grad()?;
        }
        Ok(())
    }

    /// Loss, perplexity and accuracy over the validation batches, recorded at the current step.
    fn evaluate(&mut self) -> Result<()> {
        let step = self.state.step;
        let totals = self.session.evaluate(self.settings.eval_batches)?;
        if totals.tokens == 0.0 {
            // No validation data (or only padding): nothing to report, and nothing is "best".
            self.state.last_eval_step = Some(step);
            return Ok(());
        }
        let loss = totals.loss();
        self.session.record(step, "val", "loss", loss);
        self.session
            .record(step, "val", "perplexity", totals.perplexity());
        self.session
            .record(step, "val", "accuracy", totals.accuracy());
        self.state.observe_val_loss(step, loss);
        Ok(())
    }

    fn checkpoint_if_new(&mut self) -> Result<()> {
        let step = self.state.step;
        if self.last_checkpoint == Some(step) {
            return Ok(());
        }
        let json = self.state.to_json()?;
        self.session.checkpoint(step, &json)?;
        self.last_checkpoint = Some(step);
        Ok(())
    }
}

fn rate(tokens: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        tokens as f64 / seconds
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cadences() {
        assert!(due(10, 5) && due(5, 5) && !due(7, 5));
        assert!(!due(10, 0), "0 means only at the end");
    }

    #[test]
    fn params_are_strict() {
        for ok in ["", "null", "{}", " {} "] {
            assert!(DefaultTrainer::create(ok).is_ok(), "{ok:?}");
        }
        let e = DefaultTrainer::create(r#"{"lr": 1}"#)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("trainer `default`") && e.contains("lr"), "{e}");
    }

    #[test]
    fn rates_survive_zero_time() {
        assert_eq!(rate(100, 0.0), 0.0);
        assert!((rate(100, 0.5) - 200.0).abs() < 1e-9);
    }
}
