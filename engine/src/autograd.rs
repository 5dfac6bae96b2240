//! Gradient slots and in-place updates of declared tensors.
//!
//! candle's `backward` returns a fresh map of gradients per call; PyTorch users expect `.grad`
//! to accumulate across calls (gradient accumulation over micro-batches relies on it). So each
//! parameter has one slot, and [`backward`] adds candle's gradient into the slot of every
//! trainable parameter it reaches. Only parameters have slots: gradients of intermediate tensors
//! are dropped with candle's map.
//!
//! The optimizer update is here too because it is an in-place write to declared tensors:
//! [`adamw_update`] runs the active kernel's fused step directly on their storage, or else the
//! primitive composition followed by three assignments.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use codex_plugin_api::tensor::AdamWHyper;
use codex_plugin_api::TensorId;

use super::handles::{self, Leaf};
use super::{dispatch, Result, TensorError};

/// Nanoseconds spent in [`backward`] since the process started, for the run's system metrics.
static BACKWARD_NANOS: AtomicU64 = AtomicU64::new(0);

/// Time spent in backward passes since the process started (every thread together).
pub fn backward_time() -> Duration {
    Duration::from_nanos(BACKWARD_NANOS.load(Ordering::Relaxed))
}

pub(crate) fn backward(loss: &Tensor) -> Result<()> {
    let started = Instant::now();
    let result = backward_into_slots(loss);
    let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
    BACKWARD_NANOS.fetch_add(nanos, Ordering::Relaxed);
    result
}

fn backward_into_slots(loss: &Tensor) -> Result<()> {
    if loss.elem_count() != 1 {
        return Err(TensorError::Invalid(format!(
            "the loss must have one element, found shape {:?}; reduce it with sum or mean first",
            loss.dims()
        )));
    }
    DIRECT.with(|d| d.borrow_mut().clear());
    let grads = loss.backward();
    let direct = DIRECT.with(|d| std::mem::take(&mut *d.borrow_mut()));
    let grads = grads?;
    for (leaf, g) in Direct::gather(direct)? {
        if leaf.trainable() {
            leaf.accumulate_grad(&g)?;
        }
    }
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

/// A gradient sent for a weight: of the whole weight, or of the slice `(dim, start, len)`.
type Part = (Option<(usize, usize, usize)>, Tensor);

thread_local! {
    /// Weight gradients fused products sent during the backward pass running on this thread.
    static DIRECT: RefCell<Vec<(Direct, Tensor)>> = const { RefCell::new(Vec::new()) };
}

/// Where a fused product (`dispatch`, `mixed`) sends its weight's gradient itself, rather than
/// through candle: a trainable weight, or a slice `(dim, start, len)` of one (GPT-2's
/// `c_attn` splits into q, k and v by slicing the weight).
///
/// Through candle, each such gradient costs a zero-filled tensor of the weight's size and an
/// add into it, and a slice's is first padded back to the whole weight with zeros. Sent here,
/// it waits until candle's backward returns; then the slices of one weight are joined (one
/// `cat` when they tile it, as q, k and v do) and the weight's slot gains the sum once. The
/// product takes the weight detached, so candle gives it nothing of its own; a product only
/// sends where its input is part of the graph, so that candle does call its backward.
#[derive(Clone)]
pub(crate) struct Direct {
    leaf: Arc<Leaf>,
    slice: Option<(usize, usize, usize)>,
}

impl Direct {
    pub(crate) fn new(leaf: Arc<Leaf>, slice: Option<(usize, usize, usize)>) -> Direct {
        Direct { leaf, slice }
    }

    /// Called from a product's backward with the gradient of the weight (or of its slice).
    pub(crate) fn send(&self, g: Tensor) {
        DIRECT.with(|d| d.borrow_mut().push((self.clone(), g)));
    }

    /// The gradients sent, summed per weight, in the order the weights first sent.
    fn gather(sent: Vec<(Direct, Tensor)>) -> Result<Vec<(Arc<Leaf>, Tensor)>> {
        let mut by_leaf: Vec<(Arc<Leaf>, Vec<Part>)> = Vec::new();
        for (d, g) in sent {
            match by_leaf.iter_mut().find(|(l, _)| Arc::ptr_eq(l, &d.leaf)) {
                Some((_, parts)) => parts.push((d.slice, g)),
                None => by_leaf.push((d.leaf, vec![(d.slice, g)])),
            }
        }
        by_leaf
            .into_iter()
            .map(|(leaf, parts)| {
                let g = Self::join(leaf.var.dims(), parts)?;
                Ok((leaf, g))
            })
            .collect()
    }

    /// One gradient of a weight of shape `dims` from the parts sent for it.
    fn join(dims: &[usize], parts: Vec<Part>) -> Result<Tensor> {
        let mut whole: Option<Tensor> = None;
        let mut add = |g: Tensor| -> Result<()> {
            whole = Some(match whole.take() {
                Some(w) => w.add(&g)?,
                None => g,
            });
            Ok(())
        };
        let mut slices: Vec<((usize, usize, usize), Tensor)> = Vec::new();
        for (slice, g) in parts {
            match slice {
                None => add(g)?,
                Some(s) => slices.push((s, g)),
            }
        }
        slices.sort_by_key(|((dim, start, _), _)| (*dim, *start));
        let tiles = slices.first().is_some_and(|((dim, _, _), _)| {
            let mut next = 0;
            for ((d, start, len), _) in &slices {
                if d != dim || *start != next {
                    return false;
                }
                next += len;
            }
            next == dims[*dim]
        });
        if tiles {
            let dim = slices[0].0 .0;
            let gs: Vec<Tensor> = slices.into_iter().map(|(_, g)| g).collect();
            add(Tensor::cat(&gs, dim)?)?;
        } else {
            for ((dim, start, len), g) in slices {
                // Padded with zeros to the whole weight, as candle's own `narrow` backward does.
                let mut pieces = Vec::with_capacity(3);
                let pad = |n: usize| -> Result<Tensor> {
                    let mut shape = dims.to_vec();
                    shape[dim] = n;
                    Ok(Tensor::zeros(shape, g.dtype(), g.device())?)
                };
                if start > 0 {
                    pieces.push(pad(start)?);
                }
                let after = dims[dim] - start - len;
                pieces.push(g.contiguous()?);
                if after > 0 {
                    pieces.push(pad(after)?);
                }
                add(Tensor::cat(&pieces, dim)?)?;
            }
        }
        whole.ok_or_else(|| TensorError::Invalid("a weight's gradient was sent empty".into()))
    }
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
    super::mixed::weights_changed(var.as_tensor());
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

/// One `torch.optim.AdamW` step on a declared parameter and its two declared moment tensors.
pub(crate) fn adamw_update(
    param: TensorId,
    grad: &Tensor,
    exp_avg: TensorId,
    exp_avg_sq: TensorId,
    h: AdamWHyper,
) -> Result<()> {
    let declared = |id: TensorId| handles::leaf(id)?.ok_or(TensorError::NotAssignable(id.0));
    let (p, m, v) = (declared(param)?, declared(exp_avg)?, declared(exp_avg_sq)?);
    for (what, leaf) in [("exp_avg", &m), ("exp_avg_sq", &v)] {
        if leaf.var.dims() != p.var.dims() || grad.dims() != p.var.dims() {
            return Err(TensorError::Invalid(format!(
                "parameter {:?}, gradient {:?} and {what} {:?} must have one shape",
                p.var.dims(),
                grad.dims(),
                leaf.var.dims()
            )));
        }
    }
    if h.step == 0 {
        return Err(TensorError::Invalid(
            "optimizer steps are counted from 1, found step 0".into(),
        ));
    }
    for (name, x) in [
        ("lr", h.lr),
        ("eps", h.eps),
        ("weight_decay", h.weight_decay),
    ] {
        if !(x.is_finite() && x >= 0.0) {
            return Err(TensorError::Invalid(format!(
                "{name} must be zero or positive, found {x}"
            )));
        }
    }
    for (name, b) in [("beta1", h.beta1), ("beta2", h.beta2)] {
        if !(0.0..1.0).contains(&b) {
            return Err(TensorError::Invalid(format!(
                "{name} must be in [0, 1), found {b}"
            )));
        }
    }
    let fused = dispatch::adamw_update(
        p.var.as_tensor(),
        grad,
        m.var.as_tensor(),
        v.var.as_tensor(),
        h,
    )?;
    if fused.is_some() {
        return Ok(());
    }
    // torch's evaluation order; the step size is not folded into the denominator, which would
    // divide by zero when a warm-up starts at lr = 0.
    let exponent = i32::try_from(h.step).unwrap_or(i32::MAX);
    let step_size = h.lr / (1.0 - h.beta1.powi(exponent));
    let inv_sqrt_bc2 = 1.0 / (1.0 - h.beta2.powi(exponent)).sqrt();
    let g = grad.to_dtype(candle_core::DType::F32)?;
    let (pt, mt, vt) = (
        p.var.as_tensor().detach(),
        m.var.as_tensor().detach(),
        v.var.as_tensor().detach(),
    );
    let m_new = (mt.affine(h.beta1, 0.0)? + g.affine(1.0 - h.beta1, 0.0)?)?;
    let v_new = (vt.affine(h.beta2, 0.0)? + g.sqr()?.affine(1.0 - h.beta2, 0.0)?)?;
    let denom = v_new.sqrt()?.affine(inv_sqrt_bc2, h.eps)?;
    let update = m_new.div(&denom)?.affine(step_size, 0.0)?;
    let decayed = if h.weight_decay == 0.0 {
        pt
    } else {
        pt.affine(1.0 - h.lr * h.weight_decay, 0.0)?
    };
    let updated = decayed.to_dtype(candle_core::DType::F32)?.sub(&update)?;
    assign_leaf(&p, &updated)?;
    assign_leaf(&m, &m_new)?;
    assign_leaf(&v, &v_new)?;
    Ok(())
}
