//! Evaluation: loss, perplexity and token accuracy as Σ over counted targets / Σ targets. The
//! one implementation: `codex-ml eval` calls it, and so does the trainer through its session
//! (`TrainSession::evaluate`), so the validation records of a run and `eval` on its checkpoint
//! count the same way.

use abi_stable::std_types::RResult;
use anyhow::{anyhow, bail, Result};
use codex_engine::{self as engine, Device};
use codex_plugin_api::model::ModelBox;
use codex_plugin_api::{EvalTotals, ForwardCtx, PluginError, Tensor, TensorId};

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
        let targets = Tensor::from_id(engine::upload_ids(batch.targets, &[rows * t], device)?);
        let inputs = Tensor::from_id(upload_inputs(
            batch.inputs,
            batch.positions,
            rows,
            t,
            device,
        )?);
        let ctx = ForwardCtx {
            train: false,
            seed: 0,
        };
        let logits = Tensor::from_id(
            forward(model, inputs.id(), ctx)
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

/// Upload a batch's input ids, `[rows, t]`: with the position of each token within its
/// example when the rows are packed (`positions`), so that the model reads them and attention
/// stays within each example.
pub(crate) fn upload_inputs(
    ids: Vec<u32>,
    positions: Option<Vec<u32>>,
    rows: usize,
    t: usize,
    device: &Device,
) -> Result<TensorId> {
    Ok(match positions {
        Some(positions) => engine::upload_packed(ids, positions, &[rows, t], device)?,
        None => engine::upload_ids(ids, &[rows, t], device)?,
    })
}

/// The model's forward pass over `inputs`: with attention confined to each example when they
/// are packed rows, and refused when the model did not read their positions (every example
/// after the first in a row would continue the positions of the one before).
pub(crate) fn forward(
    model: &ModelBox,
    inputs: TensorId,
    ctx: ForwardCtx,
) -> RResult<TensorId, PluginError> {
    let (logits, pass) = match engine::forward_pass(inputs, || model.forward(inputs, ctx)) {
        Ok(done) => done,
        Err(e) => return RResult::RErr(PluginError::new(e.to_string())),
    };
    if pass.packed && !pass.positions_read {
        if let RResult::ROk(id) = logits {
            drop(Tensor::from_id(id));
        }
        return RResult::RErr(PluginError::new(
            "the model did not read the positions of packed rows (`Tensor::packed_positions`); \
             set data.sft.packing: false"
                .to_string(),
        ));
    }
    logits
}

/// Refuse `data.sft.packing` for a model that does not read the positions of packed rows:
/// one forward pass over a row packed with two one-token examples.
pub(crate) fn check_packing(model: &ModelBox, name: &str, device: &Device) -> Result<()> {
    let ids = Tensor::from_id(engine::upload_packed(
        vec![0, 0],
        vec![0, 0],
        &[1, 2],
        device,
    )?);
    let ctx = ForwardCtx {
        train: false,
        seed: 0,
    };
    let (logits, pass) = engine::forward_pass(ids.id(), || model.forward(ids.id(), ctx))?;
    drop(Tensor::from_id(logits.into_result().map_err(model_err)?));
    if !pass.positions_read {
        return Err(crate::run::RunError::PackingUnread(name.to_string()).into());
    }
    Ok(())
}
