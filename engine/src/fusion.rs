//! Fusion across op-table calls: the consumer of a matmul takes over the matmul's backward.
//!
//! candle's backward gives every graph node a gradient by zero-filling a tensor of the node's
//! size and adding into it. For the `[rows, vocab]` logits of a language model that is the
//! largest memory traffic of a training step, and for every linear layer it is one more pass
//! over its output. Model code is a sequence of op-table calls (`matmul`, `add`, `reshape`,
//! `cross_entropy`) that cannot be changed, so while a kernel is active the handle of a 2-D
//! matmul's result remembers its operands ([`Origin`]), a reshape remembers its source, and:
//!
//! - a bias add on a matmul's result becomes one custom op over `x`, `w` and the bias;
//! - a cross-entropy on a matmul's result (through reshapes that end at the product's own
//!   shape) becomes one custom op over `x` and `w`;
//! - a reshape back to its source's shape is the source itself, not one more node;
//! - causal attention on heads split off `[b·t, h·d]` projections by a reshape to
//!   `[b, t, h, d]` and a transpose becomes one custom op over the projections, so the reshape
//!   and transpose nodes of q, k and v get no gradients either.
//!
//! The fused ops' backward computes `x`'s and `w`'s gradients directly (`dispatch`). Where
//! `w` is the transpose of a 2-D tensor, the op takes that tensor and gives it its gradient in
//! its own layout; where `w` is a trainable weight or a view of one (followed by `adapter`),
//! the op takes it detached and sends its gradient to the weight's slot (`autograd::Direct`).
//! The matmul output keeps its own graph node, so another consumer of it still
//! back-propagates through candle's matmul: the gradients add up the same either way.

use std::sync::Arc;

use candle_core::Tensor;
use codex_plugin_api::TensorId;

use super::autograd::Direct;
use super::{adapter, dispatch, handles, mixed, ops, packed, Result};

/// How a tensor behind a handle was made, for fusions with later ops.
pub(crate) enum Origin {
    /// `a · b`, both 2-D, with what a fused consumer needs to know of `b`.
    Matmul(dispatch::Product),
    /// A reshape of `src`, whose own origin follows.
    Reshape {
        src: Tensor,
        origin: Option<Arc<Origin>>,
    },
    /// `src` with two dimensions swapped, whose own origin follows.
    Transpose {
        src: Tensor,
        dims: (usize, usize),
        origin: Option<Arc<Origin>>,
    },
    /// A view of a declared weight that an adapter follows (`adapter`).
    Weight(adapter::View),
    /// The input ids of rows packed with several examples (`packed`).
    Packed(Arc<packed::Packing>),
}

/// Op-table `matmul`: the product, remembering its operands while a kernel is active.
pub(crate) fn matmul(a: TensorId, b: TensorId) -> Result<TensorId> {
    if let Some(y) = adapter::matmul(a, b)? {
        return Ok(y);
    }
    let (ta, tb) = (handles::tensor(a)?, handles::tensor(b)?);
    let entry_b = handles::entry(b)?;
    let origin_b = entry_b.origin();
    // A trainable weight (or a slice of one) gets its gradient from the fused product that
    // takes it, sent to its slot (`autograd::Direct`), when the product is part of the graph.
    let view = adapter::view_of(&entry_b).filter(|v| v.leaf().trainable());
    let direct = view
        .as_ref()
        .filter(|_| ta.track_op())
        .map(|v| Direct::new(v.leaf().clone(), v.slice()));
    // `b` as the transpose of a 2-D tensor (a weight stored `[out, in]`, a tied embedding as
    // the LM head), which the product's gradient then goes to in its own layout.
    let b_of = match (&view, origin_b.as_deref()) {
        (Some(v), _) if v.transposed() && direct.is_some() => Some(tb.t()?),
        (
            _,
            Some(Origin::Transpose {
                src, dims: (0, 1), ..
            }),
        ) if src.rank() == 2 && src.is_contiguous() && tb.rank() == 2 => Some(src.clone()),
        _ => None,
    };
    let y = match mixed::kernel_for(&ta, &tb) {
        Some(k) => {
            // The packed copy is kept for a whole weight (or its transpose).
            let key = match &view {
                Some(v) if v.slice().is_none() => Some((v.leaf().var.as_tensor(), v.transposed())),
                _ if tb.is_variable() => Some((&tb, false)),
                _ => match origin_b.as_deref() {
                    Some(Origin::Transpose {
                        src, dims: (0, 1), ..
                    }) if src.is_variable() && src.rank() == 2 => Some((src, true)),
                    _ => None,
                },
            };
            mixed::matmul(k, &ta, &tb, key, b_of.as_ref(), direct.clone())?
        }
        None => ops::matmul(&ta, &tb)?,
    };
    let origin =
        (ta.rank() == 2 && tb.rank() == 2 && dispatch::kernel_active(y.device())).then(|| {
            Arc::new(Origin::Matmul(dispatch::Product {
                x: ta,
                w: tb,
                w_of: b_of,
                direct,
            }))
        });
    Ok(handles::insert_derived(y, origin))
}

/// Op-table `reshape`: a reshape back to the source's shape returns the source.
pub(crate) fn reshape(x: TensorId, shape: &[usize]) -> Result<TensorId> {
    let entry = handles::entry(x)?;
    let (tx, origin) = (entry.tensor(), entry.origin());
    if let Some(Origin::Reshape { src, origin }) = origin.as_deref() {
        if src.dims() == shape {
            return Ok(handles::insert_derived(src.clone(), origin.clone()));
        }
    }
    if tx.dims() == shape {
        // A plain handle even to a declared tensor: a reshape's result is never assignable.
        return Ok(handles::insert_derived(tx, origin));
    }
    let y = ops::reshape(&tx, shape)?;
    let origin =
        dispatch::kernel_active(y.device()).then(|| Arc::new(Origin::Reshape { src: tx, origin }));
    Ok(handles::insert_derived(y, origin))
}

/// The operands of the 2-D matmul that made `id`, if it was one.
pub(crate) fn product(id: TensorId) -> Result<Option<dispatch::Product>> {
    Ok(match handles::entry(id)?.origin().as_deref() {
        Some(Origin::Matmul(p)) => Some(p.clone()),
        _ => None,
    })
}

/// Op-table `add`: a bias add on a matmul's result fuses with the matmul.
pub(crate) fn add(a: TensorId, b: TensorId) -> Result<TensorId> {
    let (ta, tb) = (handles::tensor(a)?, handles::tensor(b)?);
    for (m, bias, mid) in [(&ta, &tb, a), (&tb, &ta, b)] {
        if let Some(p) = product(mid)? {
            if let Some(y) = dispatch::linear_bias(&p, m, bias)? {
                return Ok(handles::insert(y));
            }
        }
    }
    Ok(handles::insert(ops::binary(ops::Binary::Add, &ta, &tb)?))
}

/// Op-table `transpose`, remembering its source while a kernel is active.
pub(crate) fn transpose(x: TensorId, d1: usize, d2: usize) -> Result<TensorId> {
    if let Some(y) = adapter::transpose(x, d1, d2)? {
        return Ok(y);
    }
    let entry = handles::entry(x)?;
    let tx = entry.tensor();
    let y = ops::transpose(&tx, d1, d2)?;
    let origin = dispatch::kernel_active(y.device()).then(|| {
        Arc::new(Origin::Transpose {
            src: tx,
            dims: (d1.min(d2), d1.max(d2)),
            origin: entry.origin(),
        })
    });
    Ok(handles::insert_derived(y, origin))
}

/// The `[b·t, h·d]` projection that `id`'s `[b, h, t, d]` heads were split off by a reshape to
/// `[b, t, h, d]` and a transpose of dimensions 1 and 2, with `[b, t, h, d]`.
fn heads(id: TensorId) -> Result<Option<(Tensor, [usize; 4])>> {
    let origin = handles::entry(id)?.origin();
    let Some(Origin::Transpose {
        src: split,
        dims: (1, 2),
        origin: Some(inner),
    }) = origin.as_deref()
    else {
        return Ok(None);
    };
    let Origin::Reshape { src: rows, .. } = &**inner else {
        return Ok(None);
    };
    let &[b, t, h, d] = split.dims() else {
        return Ok(None);
    };
    let fits = rows.dims() == [b * t, h * d] && rows.is_contiguous();
    Ok(fits.then(|| (rows.clone(), [b, t, h, d])))
}

/// Op-table `attention` for causal attention on heads split off projections (see the module
/// documentation); `None` where the general path must take it.
pub(crate) fn attention_on_rows(
    q: TensorId,
    k: TensorId,
    v: TensorId,
    causal: bool,
    scale: f64,
) -> Result<Option<TensorId>> {
    if !causal || !scale.is_finite() {
        return Ok(None);
    }
    let (Some((rq, dims)), Some((rk, dk)), Some((rv, dv))) = (heads(q)?, heads(k)?, heads(v)?)
    else {
        return Ok(None);
    };
    if dk != dims || dv != dims {
        return Ok(None);
    }
    let [b, t, h, d] = dims;
    let packing = packed::active_starts(&[b, h, t, d], t)?;
    Ok(
        dispatch::attention_rows(&rq, &rk, &rv, dims, scale, packing.as_deref())?
            .map(handles::insert),
    )
}
