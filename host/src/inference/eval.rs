//! Evaluation: loss, perplexity and token accuracy as Σ over counted targets / Σ targets. The
//! one implementation: `codex-ml eval` calls it, and so does the trainer through its session
//! (`TrainSession::evaluate`), so the validation records of a run and `eval` on its checkpoint
//! count the same way.

use anyhow::{anyhow, bail, Result};
use codex_engine::{self as engine, Device};
use codex_plugin_api::model::ModelBox;
use codex_plugin_api::{EvalTotals, ForwardCtx, Tensor};

use super::generate::model_err;
use crate::data::{ValBatches, IGNORE_INDEX};
use crate::plugins::build::ApiResultExt;

/// Evaluate `model` on up to `max_batches` batches of `val` (all when `None`); an error when
/// the data has no counted target.
pub fn evaluate(
    model: &ModelBox,
    val: &ValBatches,
    device: &Device,
    max_batches: Option<usize>,
) -> Result<EvalTotals> {
    let totals = sums(model, val, device, max_batches)?;
    if totals.tokens == 0.0 {
        bail!("nothing to evaluate: the evaluation data has no tokens");
    }
    Ok(totals)
}

/// The sums of [`evaluate`], whatever they are: the trainer's in-run evaluation
/// (`TrainSession::evaluate`) reports nothing rather than failing when they are zero.
pub(crate) fn sums(
    model: &ModelBox,
    val: &ValBatches,
    device: &Device,
    max_batches: Option<usize>,
) -> Result<EvalTotals> {
    let mut totals = EvalTotals::default();
    let limit = max_batches.unwrap_or(usize::MAX);
    let mut index = 0;
    while index < limit {
        let Some(batch) = val.batch(index) else { break };
        index += 1;
        let (rows, t) = (batch.rows, batch.seq_len);
        let inputs = Tensor::from_id(engine::upload_ids(batch.inputs, &[rows, t], device)?);
        let targets = Tensor::from_id(engine::upload_ids(batch.targets, &[rows * t], device)?);
        let ctx = ForwardCtx {
            train: false,
            seed: 0,
        };
        let logits = Tensor::from_id(
            model
                .forward(inputs.id(), ctx)
                .into_result()
                .map_err(model_err)?,
        );
        let shape = logits.shape().anyhow()?;
        let vocab = *shape
            .last()
            .ok_or_else(|| anyhow!("model returned a scalar"))?;
        let ce = logits
            .reshape(&[rows * t, vocab])
            .anyhow()?
            .cross_entropy(&targets, IGNORE_INDEX)
            .anyhow()?;
        totals.nll += ce.loss_sum.to_scalar().anyhow()?;
        totals.tokens += ce.tokens.to_scalar().anyhow()?;
        totals.correct += ce.correct.to_scalar().anyhow()?;
        totals.batches += 1;
    }
    Ok(totals)
}
