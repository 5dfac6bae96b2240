//! Gradient slots and in-place updates of declared tensors.
//!
//! candle's `backward` returns a fresh map of gradients per call; PyTorch users expect `.grad`
//! to accumulate across calls (gradient accumulation over micro-batches relies on it). So each
//! parameter has one slot, and [`backward`] adds candle's gradient into the slot of every
//! trainable parameter it reaches. Only parameters have slots: gradients of intermediate tensors
//! are dropped with candle's map.

use candle_core::Tensor;
use codex_plugin_api::TensorId;

use super::handles::{self, Leaf};
use super::{Result, TensorError};

pub(crate) fn backward(loss: &Tensor) -> Result<()> {
    if loss.elem_count() != 1 {
        return Err(TensorError::Invalid(format!(
            "the loss must have one element, found shape {:?}; reduce it with sum or mean first",
            loss.dims()
        )));
    }
    let grads = loss.backward()?;
    for id in grads.get_ids() {
        let Some(leaf) = handles::param_by_tensor(*id) else {
            continue;
        };
        if !leaf.trainable() {
            continue;
        }
        if let Some(g) = grads.get_id(*id) {
            leaf.accumulate_grad(g)?;
        }
    }
    Ok(())
}

fn param(id: TensorId) -> Result<std::sync::Arc<Leaf>> {
    match handles::leaf(id)? {
        Some(leaf) if leaf.is_param() => Ok(leaf),
        _ => Err(TensorError::NotAParameter(id.0)),
    }
}

/// The gradient slot of a parameter, if filled.
pub(crate) fn grad(id: TensorId) -> Result<Option<Tensor>> {
    Ok(param(id)?.grad())
}

pub(crate) fn zero_grad(id: TensorId) -> Result<()> {
    param(id)?.clear_grad();
    Ok(())
}

/// Overwrite a declared tensor with `value`, cast to its dtype and moved to its device.
pub(crate) fn assign(target: TensorId, value: &Tensor) -> Result<()> {
    let leaf = handles::leaf(target)?.ok_or(TensorError::NotAssignable(target.0))?;
    assign_leaf(&leaf, value)
}

pub(crate) fn assign_leaf(leaf: &Leaf, value: &Tensor) -> Result<()> {
    let var = &leaf.var;
    if value.dims() != var.dims() {
        return Err(TensorError::AssignShape {
            target: var.dims().to_vec(),
            value: value.dims().to_vec(),
        });
    }
    let value = value.to_dtype(var.dtype())?.to_device(var.device())?;
    // `Var::set` refuses a value that shares the variable's storage (a view of it); copying
    // first is the only way to know, because candle keeps `same_storage` private.
    match var.set(&value) {
        Err(e) if is_aliasing(&e) => Ok(var.set(&value.copy()?)?),
        r => Ok(r?),
    }
}

fn is_aliasing(e: &candle_core::Error) -> bool {
    match e {
        candle_core::Error::CannotSetVar { .. } => true,
        candle_core::Error::WithBacktrace { inner, .. } => is_aliasing(inner),
        _ => false,
    }
}
