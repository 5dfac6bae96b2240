//! Neural-network ops on candle tensors, built only from primitives whose backward candle
//! implements correctly.
//!
//! candle-nn's fast softmax, layer norm and RMS norm have no backward and silently drop
//! gradients, so nothing here uses candle-nn. Each op a fused kernel can replace —
//! [`softmax`], [`log_softmax`], [`layer_norm`], [`rms_norm`], [`gelu`] and [`cross_entropy`] —
//! is one function taking and returning candle tensors: that function is the dispatch point a
//! kernel layer intercepts by op name and device, and the composition below is the reference
//! every kernel is tested against.
//!
//! Numerics: softmax and log-softmax subtract the row maximum (detached: the shift cancels
//! exactly, so its gradient is zero and need not be computed); norms, softmaxes and
//! cross-entropy compute in f32 when the input is bf16 or f16, as PyTorch does.

use candle_core::{DType, Device, Tensor, D};
use codex_plugin_api::GeluForm;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::ops::{check_dim, full, last_dim};
use super::{dispatch, packed, Result, TensorError};

fn invalid(message: impl Into<String>) -> TensorError {
    TensorError::Invalid(message.into())
}

/// The dtype to compute in: f32 for the 16-bit floats, the input's own otherwise.
fn compute_dtype(x: &Tensor) -> DType {
    match x.dtype() {
        DType::BF16 | DType::F16 => DType::F32,
        d => d,
    }
}

/// Dispatch point `softmax`.
pub(crate) fn softmax(x: &Tensor, dim: usize) -> Result<Tensor> {
    check_dim(x, dim)?;
    if let Some(y) = dispatch::softmax(x, dim)? {
        return Ok(y);
    }
    let xc = x.to_dtype(compute_dtype(x))?;
    let max = xc.max_keepdim(dim)?.detach();
    let e = xc.broadcast_sub(&max)?.exp()?;
    let y = e.broadcast_div(&e.sum_keepdim(dim)?)?;
    Ok(y.to_dtype(x.dtype())?)
}

/// Dispatch point `log_softmax`. No kernel takes it: the `cpu` kernel has no log-softmax op,
/// and its one hot use, cross-entropy, is fused whole.
pub(crate) fn log_softmax(x: &Tensor, dim: usize) -> Result<Tensor> {
    check_dim(x, dim)?;
    let xc = x.to_dtype(compute_dtype(x))?;
    let max = xc.max_keepdim(dim)?.detach();
    let shifted = xc.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(dim)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?.to_dtype(x.dtype())?)
}

fn check_vector(what: &str, t: &Tensor, len: usize, x: &Tensor) -> Result<()> {
    if t.dims() != [len] {
        return Err(invalid(format!(
            "{what} has shape {:?}, expected [{len}] to match the last dimension of input {:?}",
            t.dims(),
            x.dims()
        )));
    }
    Ok(())
}

/// Dispatch point `layer_norm`: `(x - mean) / sqrt(var + eps) * weight + bias` over the last
/// dimension, with the biased variance (as PyTorch).
pub(crate) fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let d = last_dim(x)?;
    check_vector("weight", weight, d, x)?;
    check_vector("bias", bias, d, x)?;
    if let Some(y) = dispatch::layer_norm(x, weight, bias, eps)? {
        return Ok(y);
    }
    let dt = compute_dtype(x);
    let xc = x.to_dtype(dt)?;
    let centered = xc.broadcast_sub(&xc.mean_keepdim(D::Minus1)?)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&var.affine(1.0, eps)?.sqrt()?)?;
    let y = normed
        .broadcast_mul(&weight.to_dtype(dt)?)?
        .broadcast_add(&bias.to_dtype(dt)?)?;
    Ok(y.to_dtype(x.dtype())?)
}

/// Dispatch point `rms_norm`: `x / sqrt(mean(x²) + eps) * weight` over the last dimension.
pub(crate) fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let d = last_dim(x)?;
    check_vector("weight", weight, d, x)?;
    if let Some(y) = dispatch::rms_norm(x, weight, eps)? {
        return Ok(y);
    }
    let dt = compute_dtype(x);
    let xc = x.to_dtype(dt)?;
    let ms = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xc
        .broadcast_div(&ms.affine(1.0, eps)?.sqrt()?)?
        .broadcast_mul(&weight.to_dtype(dt)?)?;
    Ok(y.to_dtype(x.dtype())?)
}

const SQRT_TWO_OVER_PI: f64 = 0.797_884_560_802_865_4;

/// Dispatch point `gelu`.
///
/// candle's own GELU ops write their derivatives with six-digit constants (`0.398942`,
/// `0.797885`): exact to f32 precision, checked against finite differences in the tests, but
/// visibly off in f64. So f64 inputs take the composition from `tanh`/`erf`, whose backward is
/// exact, and every other dtype the single candle op.
pub(crate) fn gelu(x: &Tensor, form: GeluForm) -> Result<Tensor> {
    if let Some(y) = dispatch::gelu(x, form)? {
        return Ok(y);
    }
    if x.dtype() != DType::F64 {
        return Ok(match form {
            GeluForm::Erf => x.gelu_erf()?,
            GeluForm::Tanh => x.gelu()?,
        });
    }
    let inner = match form {
        GeluForm::Erf => x.affine(std::f64::consts::FRAC_1_SQRT_2, 0.0)?.erf()?,
        GeluForm::Tanh => {
            let cube = x.sqr()?.mul(x)?;
            (x + cube.affine(0.044715, 0.0)?)?
                .affine(SQRT_TWO_OVER_PI, 0.0)?
                .tanh()?
        }
    };
    Ok(x.mul(&inner.affine(0.5, 0.5)?)?)
}

pub(crate) fn silu(x: &Tensor) -> Result<Tensor> {
    Ok(x.silu()?)
}

pub(crate) fn relu(x: &Tensor) -> Result<Tensor> {
    Ok(x.relu()?)
}

/// Rows of `table` (`[vocab, dim]`) picked by `ids` (integers of any shape); the result has
/// shape `ids.shape + [dim]`.
pub(crate) fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    if table.rank() != 2 {
        return Err(invalid(format!(
            "the table must be [vocab, dim], found shape {:?}",
            table.dims()
        )));
    }
    if ids.dtype().is_float() {
        return Err(invalid(format!(
            "ids must be integers (u32), found {:?}",
            ids.dtype()
        )));
    }
    let vocab = table.dim(0)?;
    let flat = ids.flatten_all()?;
    if flat.elem_count() > 0 {
        let top = flat.to_dtype(DType::I64)?.max(0)?.to_scalar::<i64>()?;
        let bottom = flat.to_dtype(DType::I64)?.min(0)?.to_scalar::<i64>()?;
        if bottom < 0 || top >= vocab as i64 {
            let bad = if bottom < 0 { bottom } else { top };
            return Err(invalid(format!(
                "id {bad} is out of range for a table of {vocab} rows"
            )));
        }
    }
    let rows = table.index_select(&flat, 0)?;
    let mut shape = ids.dims().to_vec();
    shape.push(table.dim(1)?);
    Ok(rows.reshape(shape)?)
}

/// Where `mask` (integers, broadcast to `x`) is non-zero, `value`; elsewhere `x`.
pub(crate) fn masked_fill(x: &Tensor, mask: &Tensor, value: f64) -> Result<Tensor> {
    if mask.dtype().is_float() {
        return Err(invalid(format!(
            "the mask must be u8 (or another integer type), found {:?}",
            mask.dtype()
        )));
    }
    let mask = mask.broadcast_as(x.shape())?;
    let fill = full(&[], value, x.dtype(), x.device())?.broadcast_as(x.shape())?;
    Ok(mask.where_cond(&fill, x)?)
}

/// u8 `[t, t]`, 1 where the column is after the row (the positions a token must not see).
pub(crate) fn causal_mask(t: usize, device: &Device) -> Result<Tensor> {
    causal_mask_over(t, t, device)
}

/// u8 `[t, s]` for `t ≤ s` queries that are the last `t` of `s` positions: 1 where key `j` is
/// after query `i`'s position `s − t + i`.
fn causal_mask_over(t: usize, s: usize, device: &Device) -> Result<Tensor> {
    let fit = |n: usize| {
        u32::try_from(n).map_err(|_| invalid(format!("{n} positions do not fit in u32")))
    };
    let rows = Tensor::arange(fit(s - t)?, fit(s)?, device)?;
    let cols = Tensor::arange(0u32, fit(s)?, device)?;
    Ok(cols.unsqueeze(0)?.broadcast_gt(&rows.unsqueeze(1)?)?)
}

/// Rotary position embedding, Hugging Face LLaMA's rotate-half convention:
/// `x * cat(cos, cos) + rotate_half(x) * cat(sin, sin)` with `rotate_half(x) = cat(-x₂, x₁)`.
pub(crate) fn rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_, _, t, d) = x.dims4().map_err(|_| {
        invalid(format!(
            "the input must be [batch, heads, positions, head_dim], found shape {:?}",
            x.dims()
        ))
    })?;
    if d % 2 != 0 {
        return Err(invalid(format!("head_dim {d} must be even")));
    }
    let half = d / 2;
    let b = x.dim(0)?;
    // One table for every row, or one per row (packed rows, whose positions differ).
    let per_row = cos.dims() == [b, t, half];
    for (what, c) in [("cos", cos), ("sin", sin)] {
        if c.dims() != [t, half] && (c.dims() != [b, t, half] || !per_row) {
            return Err(invalid(format!(
                "{what} has shape {:?}, expected [{t}, {half}] or [{b}, {t}, {half}] for input \
                 {:?} (narrow a longer table to the positions used, or look up each row's)",
                c.dims(),
                x.dims()
            )));
        }
    }
    let table = |c: &Tensor| -> Result<Tensor> {
        let c = c.to_dtype(x.dtype())?;
        let last = c.rank() - 1;
        let c = Tensor::cat(&[&c, &c], last)?;
        Ok(match per_row {
            true => c.unsqueeze(1)?,
            false => c,
        })
    };
    let (cos, sin) = (table(cos)?, table(sin)?);
    let x1 = x.narrow(3, 0, half)?;
    let x2 = x.narrow(3, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], 3)?;
    Ok(x.broadcast_mul(&cos)?.add(&rotated.broadcast_mul(&sin)?)?)
}

/// The keep-mask of [`dropout`]: element `i` is kept when the `i`-th `f64` drawn from
/// `ChaCha8Rng::seed_from_u64(seed)` is at least `p`. ChaCha's stream is the same on every
/// machine, so a seed names one mask everywhere.
pub(crate) fn dropout_keep_mask(len: usize, p: f64, seed: u64) -> Vec<u8> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..len)
        .map(|_| u8::from(rng.random::<f64>() >= p))
        .collect()
}

/// Inverted dropout: kept elements are scaled by `1 / (1 - p)`.
pub(crate) fn dropout(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    if !(0.0..=1.0).contains(&p) {
        return Err(invalid(format!("probability {p} is not in [0, 1]")));
    }
    if p == 0.0 {
        return Ok(x.clone());
    }
    if p == 1.0 {
        return Ok(x.affine(0.0, 0.0)?);
    }
    let keep = dropout_keep_mask(x.elem_count(), p, seed);
    let mask = Tensor::from_vec(keep, x.shape(), x.device())?
        .to_dtype(x.dtype())?
        .affine(1.0 / (1.0 - p), 0.0)?;
    Ok(x.mul(&mask)?)
}

/// Cross-entropy sums and counts, all f32 scalars (computed in f32, or f64 for f64 logits).
pub(crate) struct CrossEntropyOut {
    /// Σ −log softmax(logits)[target] over rows whose target is not ignored; differentiable.
    pub(crate) loss_sum: Tensor,
    /// Number of rows whose target is not ignored.
    pub(crate) tokens: Tensor,
    /// Number of those rows whose arg-max equals the target.
    pub(crate) correct: Tensor,
}

/// Dispatch point `cross_entropy`. Ignored rows contribute nothing to the loss or its gradient,
/// whatever their logits (a `where`, not a multiplication by zero, so `-inf` logits cannot turn
/// into NaN).
/// `product`: the operands of the matmul that made `logits`, if one did, which the kernel may
/// fuse with.
pub(crate) fn cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    ignore_index: u32,
    product: Option<&dispatch::Product>,
) -> Result<CrossEntropyOut> {
    let (n, vocab) = logits.dims2().map_err(|_| {
        invalid(format!(
            "logits must be [rows, vocab], found shape {:?}",
            logits.dims()
        ))
    })?;
    if targets.dims() != [n] || targets.dtype() != DType::U32 {
        return Err(invalid(format!(
            "targets must be u32 [{n}] to match logits {:?}, found {:?} {:?}",
            logits.dims(),
            targets.dtype(),
            targets.dims()
        )));
    }
    if let Some((loss_sum, tokens, correct)) =
        dispatch::cross_entropy(logits, targets, ignore_index, product)?
    {
        return Ok(CrossEntropyOut {
            loss_sum,
            tokens,
            correct,
        });
    }
    let device = logits.device();
    let ignore = Tensor::full(ignore_index, n, device)?;
    let valid = targets.ne(&ignore)?;
    let safe_targets = valid.where_cond(targets, &ignore.zeros_like()?)?;
    if n > 0 {
        let top = safe_targets.max(0)?.to_scalar::<u32>()?;
        if top as usize >= vocab {
            return Err(invalid(format!(
                "target {top} is out of range for {vocab} classes (and is not the ignore index {ignore_index})"
            )));
        }
    }
    let logits = logits.to_dtype(compute_dtype(logits))?;
    let logp = log_softmax(&logits, 1)?;
    let picked = logp.gather(&safe_targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    let nll = valid.where_cond(&picked.neg()?, &picked.zeros_like()?)?;
    let valid32 = valid.to_dtype(DType::F32)?;
    let hits = logits.argmax(1)?.eq(targets)?.to_dtype(DType::F32)?;
    Ok(CrossEntropyOut {
        loss_sum: nll.sum_all()?.to_dtype(DType::F32)?,
        tokens: valid32.sum_all()?,
        correct: hits.mul(&valid32)?.sum_all()?,
    })
}

/// Dispatch point `attention`: `softmax(scale·q·kᵀ [masked]) · v` over the last two dims.
/// The causal mask is aligned to the last key: with `t ≤ s`, query `i` is position `s − t + i`
/// and sees keys `0..=s − t + i` (new positions over a key/value cache and themselves).
/// The kernel takes causal attention with k and v of one shape and q's leading dimensions and
/// width; everything else (and every call without a kernel) is this composition, whose softmax
/// may itself be fused.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal: bool,
    scale: f64,
) -> Result<Tensor> {
    let r = q.rank();
    let shapes_ok = r >= 2
        && k.rank() == r
        && v.rank() == r
        && q.dim(r - 1)? == k.dim(r - 1)?
        && k.dim(r - 2)? == v.dim(r - 2)?;
    if !shapes_ok {
        return Err(invalid(format!(
            "q, k and v must be [.., t, d], [.., s, d] and [.., s, e], found {:?}, {:?} and {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    let (t, s) = (q.dim(r - 2)?, k.dim(r - 2)?);
    if causal && t > s {
        return Err(invalid(format!(
            "causal attention needs at least as many keys as queries, found {t} queries and \
             {s} keys"
        )));
    }
    if !scale.is_finite() {
        return Err(invalid(format!("scale must be finite, found {scale}")));
    }
    let packing = match causal {
        true => packed::active_starts(q.dims(), s)?,
        false => None,
    };
    if let Some(y) = dispatch::attention(q, k, v, causal, scale, packing.as_deref())? {
        return Ok(y);
    }
    // Scaling q rather than the scores touches t·d instead of t·s values.
    let scores = super::ops::matmul(&q.affine(scale, 0.0)?, &k.transpose(r - 2, r - 1)?)?;
    let scores = match (causal, packing) {
        (false, _) => scores,
        (true, None) => masked_fill(
            &scores,
            &causal_mask_over(t, s, q.device())?,
            f64::NEG_INFINITY,
        )?,
        (true, Some(packing)) => {
            // [b, .., t, t] as [b, heads, t, t] against the [b, 1, t, t] mask of the rows.
            let dims = scores.dims().to_vec();
            let b = packing.dims()[0];
            let heads = dims[..r - 2].iter().product::<usize>() / b.max(1);
            let scores = scores.reshape((b, heads, t, s))?;
            masked_fill(&scores, &packing.mask(q.device())?, f64::NEG_INFINITY)?.reshape(dims)?
        }
    };
    super::ops::matmul(&softmax(&scores, r - 1)?, v)
}
