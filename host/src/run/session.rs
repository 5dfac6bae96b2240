//! The host side of the trainer's [`TrainSession`]: batches uploaded to the device, the
//! model's forward pass, the optimizer step, metric records, the progress display, stop
//! requests, and checkpoints — written atomically with the host's state around the trainer's,
//! then pruned by the retention policy.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use abi_stable::std_types::{ROption, RResult, RSlice, RStr, RString, RVec};
use anyhow::{Context, Result};
use codex_engine::{self as engine, Device, ParamStore, TensorGroup};
use codex_plugin_api::model::ModelBox;
use codex_plugin_api::optimizer::{OptimizerBox, ParamGrad};
use codex_plugin_api::params::ParamInfoAbi;
use codex_plugin_api::trainer::{BatchIds, TrainSession};
use codex_plugin_api::{
    EvalTotals, ForwardCtx, LossScaling, OptimStep, PluginError, TensorId, TrainSettings,
};

use super::progress::Progress;
use crate::checkpoint;
use crate::data::{TokenBatch, TrainBatches, ValBatches};
use crate::metrics::{Recorder, SystemMetrics, SYS_SPLIT};

/// The host side of the trainer's session.
pub(crate) struct HostSession<'r> {
    pub(crate) settings: TrainSettings,
    /// Dynamic loss scaling for the trainer, with f16 products.
    pub(crate) loss_scaling: Option<LossScaling>,
    pub(crate) store: &'r mut ParamStore,
    pub(crate) model: &'r ModelBox,
    pub(crate) optimizer: OptimizerBox,
    pub(crate) train: TrainBatches,
    pub(crate) val: Option<ValBatches>,
    pub(crate) device: Device,
    pub(crate) recorder: Recorder,
    pub(crate) progress: Progress,
    pub(crate) stop: Option<Arc<AtomicBool>>,
    pub(crate) checkpoints: PathBuf,
    /// What retention knows of the checkpoints on disk, kept up to date as they are written.
    pub(crate) known_checkpoints: Vec<checkpoint::Summary>,
    pub(crate) keep_checkpoints: usize,
    pub(crate) config_text: String,
    pub(crate) config_dir: PathBuf,
    pub(crate) tokenizer_json: Option<String>,
    /// The chat template of supervised fine-tuning data (`data::chat::SAVED_FILE`).
    pub(crate) chat_template: Option<String>,
    /// A LoRA run's base hash (see `steps::adapter`); `None` when every parameter trains.
    pub(crate) base_sha256: Option<String>,
    pub(crate) resume_state: Option<String>,
    pub(crate) last_checkpoint: Option<PathBuf>,
    pub(crate) val_loss: Option<f64>,
    /// The step `val_loss` was recorded at.
    pub(crate) val_loss_at: Option<u64>,
    pub(crate) last_lr: Option<f64>,
    /// CPU, memory and step times, recorded every `log_every` steps.
    pub(crate) system: SystemMetrics,
}

fn err(e: impl std::fmt::Display) -> PluginError {
    PluginError::new(e.to_string())
}

fn batch_ids(batch: TokenBatch, device: &Device) -> Result<BatchIds> {
    let (rows, t) = (batch.rows, batch.seq_len);
    Ok(BatchIds {
        targets: engine::upload_ids(batch.targets, &[rows, t], device)?,
        inputs: crate::inference::upload_inputs(batch.inputs, batch.positions, rows, t, device)?,
        tokens: batch.tokens,
        epoch: batch.epoch,
    })
}

impl HostSession<'_> {
    fn write_checkpoint(&mut self, step: u64, trainer_state: &str) -> Result<PathBuf> {
        // Records up to this step reach the files before the checkpoint exists, so a resume
        // from it never loses metrics that a kill would otherwise have left in the queue.
        if !self.recorder.sync(Duration::from_secs(10)) {
            tracing::warn!("metric sinks are behind; checkpointing step {step} anyway");
        }
        let data = self.train.cursor();
        let seed = self.settings.seed;
        let schedule = self.settings.schedule;
        let state = checkpoint::HostState {
            version: checkpoint::HOST_STATE_VERSION,
            step,
            micro_step: 0,
            data,
            seed,
            rng: checkpoint::RngStreams {
                init_seed: seed,
                data_order_seed: seed,
                data_order_epoch: data.epoch,
                dropout_seed: seed,
                dropout_next_step: step + 1,
            },
            schedule: checkpoint::ScheduleState {
                kind: match schedule.kind {
                    codex_plugin_api::ScheduleKind::Constant => {
                        crate::config::ScheduleKind::Constant
                    }
                    codex_plugin_api::ScheduleKind::Linear => crate::config::ScheduleKind::Linear,
                    codex_plugin_api::ScheduleKind::Cosine => crate::config::ScheduleKind::Cosine,
                },
                peak_lr: self.settings.lr,
                warmup_steps: schedule.warmup_steps,
                min_lr: schedule.min_lr,
                total_steps: self.settings.total_steps,
                last_lr: self.last_lr,
            },
            base_sha256: self.base_sha256.clone(),
            val_loss: self.val_loss.filter(|_| self.val_loss_at == Some(step)),
            config_dir: self.config_dir.clone(),
            trainer: serde_json::from_str(trainer_state)
                .with_context(|| format!("the trainer's state at step {step} is not JSON"))?,
        };
        let mut w = checkpoint::Writer::begin(&self.checkpoints, step)?;
        // A LoRA run's base is frozen and comes from `model.from`: its checkpoints hold what
        // trains, and the hash of the base it trained on.
        let params = match self.base_sha256 {
            Some(_) => TensorGroup::Trainable,
            None => TensorGroup::Params,
        };
        self.store
            .save_safetensors(&w.path_for("model.safetensors"), params)?;
        w.add_written("model.safetensors")?;
        self.store
            .save_safetensors(&w.path_for("optimizer.safetensors"), TensorGroup::State)?;
        w.add_written("optimizer.safetensors")?;
        w.write(
            "trainer_state.json",
            serde_json::to_string_pretty(&state)?.as_bytes(),
        )?;
        w.write("config.ron", self.config_text.as_bytes())?;
        if let Some(json) = &self.chat_template {
            w.write(crate::data::chat::SAVED_FILE, json.as_bytes())?;
        }
        if let Some(json) = &self.tokenizer_json {
            w.write("tokenizer.json", json.as_bytes())?;
        }
        let path = w.commit()?;
        tracing::info!("checkpoint: {}", path.display());
        self.recorder.artifact(&path);
        self.known_checkpoints.retain(|c| c.step != step);
        self.known_checkpoints.push(checkpoint::Summary {
            step,
            valid: true,
            val_loss: state.val_loss,
        });
        self.apply_retention();
        Ok(path)
    }

    /// Delete what the retention policy says to. A failure to delete costs disk space, not
    /// the run, so it is a warning.
    fn apply_retention(&mut self) {
        for step in checkpoint::retention(&self.known_checkpoints, self.keep_checkpoints) {
            let dir = self.checkpoints.join(checkpoint::dir_name(step));
            match checkpoint::remove(&dir) {
                Ok(()) => {
                    tracing::debug!("retention: removed {}", dir.display());
                    self.known_checkpoints.retain(|c| c.step != step);
                }
                Err(e) => tracing::warn!("retention: cannot remove {}: {e}", dir.display()),
            }
        }
    }
}

impl TrainSession for HostSession<'_> {
    fn settings(&self) -> TrainSettings {
        self.settings
    }

    fn params(&self) -> RVec<ParamInfoAbi> {
        self.store
            .param_infos()
            .into_iter()
            .map(Into::into)
            .collect()
    }

    fn next_batch(&mut self) -> RResult<ROption<BatchIds>, PluginError> {
        self.system.step_begins();
        let batch = self.train.next_batch();
        batch_ids(batch, &self.device)
            .map(ROption::RSome)
            .map_err(err)
            .into()
    }

    fn val_batch(&mut self, index: u64) -> RResult<ROption<BatchIds>, PluginError> {
        let Some(val) = &self.val else {
            return RResult::ROk(ROption::RNone);
        };
        match val.batch(index as usize) {
            Some(b) => batch_ids(b, &self.device)
                .map(ROption::RSome)
                .map_err(err)
                .into(),
            None => RResult::ROk(ROption::RNone),
        }
    }

    fn forward(&mut self, inputs: TensorId, ctx: ForwardCtx) -> RResult<TensorId, PluginError> {
        let started = Instant::now();
        engine::set_forward(ctx.train, ctx.seed);
        let logits = crate::inference::forward(self.model, inputs, ctx);
        engine::set_forward(false, 0);
        self.system.forward(started.elapsed());
        logits
    }

    fn optimizer_step(
        &mut self,
        grads: RSlice<'_, ParamGrad>,
        step: OptimStep,
    ) -> RResult<(), PluginError> {
        let started = Instant::now();
        let done = self.optimizer.step(grads, step);
        self.system.optimizer(started.elapsed());
        done
    }

    fn record(&mut self, step: u64, split: RStr<'_>, name: RStr<'_>, value: f64) {
        if split.as_str() == "val" && name.as_str() == "loss" {
            self.val_loss = Some(value);
            self.val_loss_at = Some(step);
            self.progress.evaluated(step, value);
        }
        self.recorder
            .record(step, split.as_str(), name.as_str(), value);
    }

    fn progress(&mut self, step: u64, loss: f64, lr: f64, tokens_per_s: f64) {
        self.last_lr = Some(lr);
        self.progress.update(step, loss, lr, tokens_per_s);
        self.system.step_ends();
        let every = self.settings.log_every;
        if (every > 0 && step.is_multiple_of(every)) || step == self.settings.total_steps {
            for (name, value) in self.system.sample() {
                self.recorder.record(step, SYS_SPLIT, &name, value);
            }
        }
    }

    fn checkpoint(&mut self, step: u64, trainer_state: RStr<'_>) -> RResult<(), PluginError> {
        match self.write_checkpoint(step, trainer_state.as_str()) {
            Ok(path) => {
                self.last_checkpoint = Some(path);
                RResult::ROk(())
            }
            Err(e) => RResult::RErr(err(format!("writing the checkpoint at step {step}: {e:#}"))),
        }
    }

    fn resume_state(&self) -> ROption<RString> {
        self.resume_state.clone().map(RString::from).into()
    }

    fn should_stop(&self) -> bool {
        super::interrupt::stop_requested(self.stop.as_ref())
            || self.recorder.record_failed().is_some()
    }

    fn evaluate(&mut self, max_batches: u64) -> RResult<EvalTotals, PluginError> {
        let Some(val) = &self.val else {
            return RResult::ROk(EvalTotals::default());
        };
        let limit = (max_batches > 0).then(|| usize::try_from(max_batches).unwrap_or(usize::MAX));
        crate::inference::evaluation_sums(self.model, val, &self.device, limit)
            .map_err(|e| err(format!("{e:#}")))
            .into()
    }

    fn loss_scaling(&self) -> ROption<LossScaling> {
        self.loss_scaling.into()
    }

    fn warn(&mut self, message: RStr<'_>) {
        tracing::warn!(
            "{}",
            codex_plugin_api::untrusted::clean(message.as_str(), 1000)
        );
    }
}
