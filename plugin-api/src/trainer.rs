//! Trainers: the training loop itself.
//!
//! The host owns the model, the optimizer, the data and the run directory; it hands a
//! trainer a [`TrainSession`] through which the loop pulls batches, runs the model, applies
//! optimizer steps, emits metric records and asks for checkpoints. The trainer owns the
//! *policy*: accumulation, loss accounting, clipping, the learning-rate schedule, when to
//! evaluate. Keeping data and gradients behind this interface is what lets a data-parallel
//! trainer replace the default one later without touching models.

use abi_stable::sabi_trait;
use abi_stable::std_types::{RBox, ROption, RResult, RSlice, RStr, RString, RVec};
use abi_stable::StableAbi;

use crate::component::{decl, ComponentDecl, Describe, Factory};
use crate::error::{from_abi, guard, PluginError, Result};
use crate::model::ForwardCtx;
use crate::optimizer::{OptimStep, ParamGrad};
use crate::params::{params_from_abi, ParamInfo, ParamInfoAbi};
use crate::tensor::{Tensor, TensorId};

/// Learning-rate schedule shapes.
#[repr(u8)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq)]
pub enum ScheduleKind {
    /// Constant after warmup.
    Constant,
    /// Linear decay from the peak to the minimum at the last step.
    Linear,
    /// Cosine decay from the peak to the minimum at the last step.
    Cosine,
}

/// The learning-rate schedule, stepped once per optimizer step.
#[repr(C)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq)]
pub struct Schedule {
    /// Shape after warmup.
    pub kind: ScheduleKind,
    /// Steps of linear warmup from 0 to the peak.
    pub warmup_steps: u64,
    /// The floor.
    pub min_lr: f64,
}

/// The resolved `train` section of the experiment config.
#[repr(C)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq)]
pub struct TrainSettings {
    /// Run seed.
    pub seed: u64,
    /// Optimizer steps to run in total (resolved from `max_steps` and/or `epochs`).
    pub total_steps: u64,
    /// Sequences per micro-batch.
    pub batch_size: u64,
    /// Tokens per sequence.
    pub seq_len: u64,
    /// Micro-batches per optimizer step.
    pub grad_accum: u64,
    /// Evaluate every N optimizer steps (0: only at the end).
    pub eval_every: u64,
    /// Validation batches per evaluation (0: the whole validation split).
    pub eval_batches: u64,
    /// Checkpoint every N optimizer steps (0: only at the end).
    pub checkpoint_every: u64,
    /// Emit training metrics every N optimizer steps.
    pub log_every: u64,
    /// Peak learning rate (`optimizer.lr`).
    pub lr: f64,
    /// The schedule.
    pub schedule: Schedule,
    /// Clip gradients to this global L2 norm (0: no clipping; the norm is logged anyway).
    pub clip_norm: f64,
    /// Target value that marks padding, never counted in losses or accuracy.
    pub ignore_index: u32,
}

/// One batch of token windows (owned handles).
#[repr(C)]
#[derive(StableAbi, Debug)]
pub struct BatchIds {
    /// u32 `[batch, seq_len]`.
    pub inputs: TensorId,
    /// u32 `[batch, seq_len]`, the inputs shifted by one; padding is `ignore_index`.
    pub targets: TensorId,
    /// Targets that are not padding.
    pub tokens: u64,
    /// The epoch this batch belongs to.
    pub epoch: u64,
}

/// The host's side of a training run (implemented by the host).
#[sabi_trait]
pub trait TrainSession {
    /// The `train` settings.
    fn settings(&self) -> TrainSettings;
    /// Every parameter of the model.
    fn params(&self) -> RVec<ParamInfoAbi>;
    /// The next training micro-batch; `None` when the data is exhausted.
    fn next_batch(&mut self) -> RResult<ROption<BatchIds>, PluginError>;
    /// Validation batch `index` in a fixed order; `None` past the end.
    fn val_batch(&mut self, index: u64) -> RResult<ROption<BatchIds>, PluginError>;
    /// Run the model: inputs → logits (owned).
    fn forward(&mut self, inputs: TensorId, ctx: ForwardCtx) -> RResult<TensorId, PluginError>;
    /// Apply one optimizer step.
    fn optimizer_step(
        &mut self,
        grads: RSlice<'_, ParamGrad>,
        step: OptimStep,
    ) -> RResult<(), PluginError>;
    /// Emit a metric record.
    fn record(&mut self, step: u64, split: RStr<'_>, name: RStr<'_>, value: f64);
    /// Report progress for the progress bar (after each optimizer step).
    fn progress(&mut self, step: u64, loss: f64, lr: f64, tokens_per_s: f64);
    /// Save a checkpoint at `step` with the trainer's own state (JSON).
    fn checkpoint(&mut self, step: u64, trainer_state: RStr<'_>) -> RResult<(), PluginError>;
    /// The trainer state saved in the checkpoint being resumed from, if any.
    fn resume_state(&self) -> ROption<RString>;
    /// True once the user asked to stop (Ctrl-C): finish the current step, then return.
    fn should_stop(&self) -> bool;
    /// Evaluate the model on the first `max_batches` validation batches (0: all of them), as
    /// `codex-ml eval` does; all zero when there is no validation data.
    #[sabi(last_prefix_field)]
    fn evaluate(&mut self, max_batches: u64) -> RResult<EvalTotals, PluginError>;
    /// Dynamic loss scaling, when the run's matrix products are in f16 (API 2.2).
    fn loss_scaling(&self) -> ROption<LossScaling>;
    /// Write `message` to the run's log and terminal as a warning (API 2.2).
    fn warn(&mut self, message: RStr<'_>);
}

/// Dynamic loss scaling, as PyTorch's `torch.amp.GradScaler` does it: the loss is multiplied
/// by the scale before backward and the gradients divided by it before they are used; a step
/// whose gradients are not all finite is skipped and the scale multiplied by
/// `backoff_factor`; after `growth_interval` finite steps in a row it is multiplied by
/// `growth_factor`.
#[repr(C)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq)]
pub struct LossScaling {
    /// The scale of the first step (PyTorch: 2¹⁶).
    pub init_scale: f64,
    /// Factor after `growth_interval` finite steps in a row (PyTorch: 2).
    pub growth_factor: f64,
    /// Factor after a step with a non-finite gradient (PyTorch: 0.5).
    pub backoff_factor: f64,
    /// Finite steps in a row before the scale grows (PyTorch: 2000).
    pub growth_interval: u64,
}

impl Default for LossScaling {
    /// PyTorch's defaults.
    fn default() -> Self {
        LossScaling {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
        }
    }
}

/// Sums over the counted (non-padding) targets of an evaluation, and what follows from them:
/// loss, perplexity and accuracy are ratios of sums, never means of per-batch means.
#[repr(C)]
#[derive(StableAbi, Copy, Clone, Debug, Default, PartialEq)]
pub struct EvalTotals {
    /// Σ negative log-likelihood.
    pub nll: f64,
    /// Counted targets.
    pub tokens: f64,
    /// Targets predicted correctly (arg-max).
    pub correct: f64,
    /// Batches evaluated.
    pub batches: u64,
}

impl EvalTotals {
    /// Mean loss per counted target.
    pub fn loss(&self) -> f64 {
        self.nll / self.tokens
    }
    /// exp(loss).
    pub fn perplexity(&self) -> f64 {
        self.loss().exp()
    }
    /// Fraction of counted targets predicted correctly.
    pub fn accuracy(&self) -> f64 {
        self.correct / self.tokens
    }
}

/// The ffi-safe handle to the host's [`TrainSession`].
pub type TrainSessionRef<'a> = TrainSession_TO<'a, abi_stable::RMut<'a, ()>>;

/// How a training call ended.
#[repr(C)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq)]
pub struct TrainOutcome {
    /// Optimizer steps completed in total.
    pub steps: u64,
    /// True when stopped early at the user's request.
    pub interrupted: bool,
}

/// The ABI face of a trainer.
#[sabi_trait]
pub trait TrainerAbi: Send {
    /// Run the loop to the end (or until asked to stop).
    #[sabi(last_prefix_field)]
    fn train(&mut self, session: TrainSessionRef<'_>) -> RResult<TrainOutcome, PluginError>;
}

/// An owned trainer object.
pub type TrainerBox = TrainerAbi_TO<'static, RBox<()>>;

/// A trainer constructor: `(params as JSON)`.
pub type TrainerFactory = extern "C" fn(RStr<'_>) -> RResult<TrainerBox, PluginError>;

/// An owned batch.
#[derive(Debug)]
pub struct Batch {
    /// u32 `[batch, seq_len]`.
    pub inputs: Tensor,
    /// u32 `[batch, seq_len]`.
    pub targets: Tensor,
    /// Targets that are not padding.
    pub tokens: u64,
    /// Epoch.
    pub epoch: u64,
}

impl Batch {
    fn from_ids(b: BatchIds) -> Batch {
        Batch {
            inputs: Tensor::from_id(b.inputs),
            targets: Tensor::from_id(b.targets),
            tokens: b.tokens,
            epoch: b.epoch,
        }
    }
}

/// Friendly wrapper over the host's [`TrainSession`], handed to [`Trainer::train`].
pub struct Session<'a, 'b> {
    inner: &'a mut TrainSessionRef<'b>,
}

impl Session<'_, '_> {
    /// The `train` settings.
    pub fn settings(&self) -> TrainSettings {
        self.inner.settings()
    }
    /// Every parameter.
    pub fn params(&self) -> Vec<ParamInfo> {
        params_from_abi(self.inner.params())
    }
    /// The next training batch.
    pub fn next_batch(&mut self) -> Result<Option<Batch>> {
        from_abi(self.inner.next_batch()).map(|o| o.into_option().map(Batch::from_ids))
    }
    /// Validation batch `index`.
    pub fn val_batch(&mut self, index: u64) -> Result<Option<Batch>> {
        from_abi(self.inner.val_batch(index)).map(|o| o.into_option().map(Batch::from_ids))
    }
    /// Run the model.
    pub fn forward(&mut self, inputs: &Tensor, ctx: ForwardCtx) -> Result<Tensor> {
        from_abi(self.inner.forward(inputs.id(), ctx)).map(Tensor::from_id)
    }
    /// Apply one optimizer step; `grads` pairs a parameter index with its gradient.
    pub fn optimizer_step(
        &mut self,
        grads: &[(usize, &Tensor, &Tensor)],
        step: OptimStep,
    ) -> Result<()> {
        let grads: Vec<ParamGrad> = grads
            .iter()
            .map(|(index, param, grad)| ParamGrad {
                index: *index,
                param: param.id(),
                grad: grad.id(),
            })
            .collect();
        from_abi(self.inner.optimizer_step(RSlice::from_slice(&grads), step))
    }
    /// Emit a metric record.
    pub fn record(&mut self, step: u64, split: &str, name: &str, value: f64) {
        self.inner.record(step, split.into(), name.into(), value)
    }
    /// Report progress.
    pub fn progress(&mut self, step: u64, loss: f64, lr: f64, tokens_per_s: f64) {
        self.inner.progress(step, loss, lr, tokens_per_s)
    }
    /// Save a checkpoint.
    pub fn checkpoint(&mut self, step: u64, trainer_state: &str) -> Result<()> {
        from_abi(self.inner.checkpoint(step, trainer_state.into()))
    }
    /// The trainer state being resumed from.
    pub fn resume_state(&self) -> Option<String> {
        self.inner
            .resume_state()
            .into_option()
            .map(RString::into_string)
    }
    /// True once the user asked to stop.
    pub fn should_stop(&self) -> bool {
        self.inner.should_stop()
    }
    /// Evaluate the model on the first `max_batches` validation batches (0: all), the one
    /// evaluation `codex-ml eval` runs too.
    pub fn evaluate(&mut self, max_batches: u64) -> Result<EvalTotals> {
        from_abi(self.inner.evaluate(max_batches))
    }
    /// Dynamic loss scaling, when the run's matrix products are in f16.
    pub fn loss_scaling(&self) -> Option<LossScaling> {
        self.inner.loss_scaling().into_option()
    }
    /// Write `message` to the run's log as a warning.
    pub fn warn(&mut self, message: &str) {
        self.inner.warn(message.into())
    }
}

/// What trainer authors implement.
pub trait Trainer: Describe + Send + Sized + 'static {
    /// Parse `params` (JSON, strictly).
    fn create(params: &str) -> Result<Self>;
    /// Run the loop.
    fn train(&mut self, session: &mut Session<'_, '_>) -> Result<TrainOutcome>;
}

struct Adapter<T>(T);

impl<T: Trainer> TrainerAbi for Adapter<T> {
    fn train(&mut self, mut session: TrainSessionRef<'_>) -> RResult<TrainOutcome, PluginError> {
        guard(T::NAME, "train", || {
            let mut s = Session {
                inner: &mut session,
            };
            self.0.train(&mut s)
        })
    }
}

extern "C" fn factory<T: Trainer>(params: RStr<'_>) -> RResult<TrainerBox, PluginError> {
    guard(T::NAME, "create", || {
        let t = T::create(params.as_str())?;
        Ok(TrainerAbi_TO::from_value(
            Adapter(t),
            abi_stable::sabi_trait::TD_Opaque,
        ))
    })
}

/// The declaration of trainer type `T`.
pub fn declare<T: Trainer>() -> ComponentDecl {
    decl::<T>(Factory::Trainer(factory::<T>))
}
