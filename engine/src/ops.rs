//! Creation, read-back, arithmetic, reductions and layout on candle tensors.
//!
//! One function per op-table entry, taking and returning candle tensors, so the `extern "C"`
//! shells in `table` stay one line each and a dispatch layer can wrap any of these by name.
//! Arguments are checked here when candle would otherwise panic or give a message that does not
//! say what to fix (reduction dimensions, data lengths, a non-scalar `to_scalar`). Bias adds
//! and sums over leading dimensions go to the active kernel when there is one (`dispatch`).

use candle_core::{DType, Device, Tensor, D};
use codex_plugin_api::tensor::{CmpOp, ReduceOp, ScalarOp};
use half::{bf16, f16};

use super::{Result, TensorError};

fn invalid(message: impl Into<String>) -> TensorError {
    TensorError::Invalid(message.into())
}

fn check_len(len: usize, shape: &[usize]) -> Result<()> {
    let n: usize = shape.iter().product();
    if len != n {
        return Err(invalid(format!(
            "{len} values do not fill shape {shape:?} ({n} elements)"
        )));
    }
    Ok(())
}

pub(crate) fn from_f32(
    data: &[f32],
    shape: &[usize],
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    check_len(data.len(), shape)?;
    Ok(Tensor::from_slice(data, shape, device)?.to_dtype(dtype)?)
}

pub(crate) fn from_u32(data: &[u32], shape: &[usize], device: &Device) -> Result<Tensor> {
    check_len(data.len(), shape)?;
    Ok(Tensor::from_slice(data, shape, device)?)
}

/// A tensor filled with `value`, converted to `dtype` the way `as` converts (integers truncate
/// and saturate).
pub(crate) fn full(shape: &[usize], value: f64, dtype: DType, device: &Device) -> Result<Tensor> {
    let shape = shape.to_vec();
    Ok(match dtype {
        DType::F32 => Tensor::full(value as f32, shape, device)?,
        DType::F64 => Tensor::full(value, shape, device)?,
        DType::BF16 => Tensor::full(bf16::from_f64(value), shape, device)?,
        DType::F16 => Tensor::full(f16::from_f64(value), shape, device)?,
        DType::U32 => Tensor::full(value as u32, shape, device)?,
        DType::U8 => Tensor::full(value as u8, shape, device)?,
        DType::I64 => Tensor::full(value as i64, shape, device)?,
        other => return Err(TensorError::UnsupportedDType(other)),
    })
}

pub(crate) fn arange(start: u32, end: u32, device: &Device) -> Result<Tensor> {
    if start > end {
        return Err(invalid(format!(
            "start {start} is after end {end}; give start <= end"
        )));
    }
    Ok(Tensor::arange(start, end, device)?)
}

pub(crate) fn to_vec_f32(x: &Tensor) -> Result<Vec<f32>> {
    Ok(x.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

pub(crate) fn to_vec_u32(x: &Tensor) -> Result<Vec<u32>> {
    Ok(x.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?)
}

pub(crate) fn to_scalar(x: &Tensor) -> Result<f64> {
    if x.elem_count() != 1 {
        return Err(invalid(format!(
            "a tensor of shape {:?} has {} elements, not one; reduce it first",
            x.dims(),
            x.elem_count()
        )));
    }
    Ok(x.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?[0])
}

/// Batched matmul over the last two dims with NumPy broadcasting of the batch dims. candle's
/// CPU and CUDA kernels accept many strided layouts but not all (e.g. permuted batch dims), so
/// a failure with a non-contiguous input is retried on contiguous copies.
pub(crate) fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.rank() < 2 || b.rank() < 2 {
        return Err(invalid(format!(
            "both operands need at least two dimensions, found {:?} and {:?}",
            a.dims(),
            b.dims()
        )));
    }
    if a.rank() == 2
        && b.rank() == 2
        && a.track_op()
        && !b.track_op()
        && a.device().is_cpu()
        && a.dtype() == b.dtype()
        && a.dims()[1] == b.dims()[0]
        && a.is_contiguous()
        && (b.is_contiguous() || b.t()?.is_contiguous())
    {
        return Ok(a.apply_op2(b, ConstRhsMatmul)?);
    }
    match a.broadcast_matmul(b) {
        Ok(c) => Ok(c),
        Err(_) if !a.is_contiguous() || !b.is_contiguous() => {
            Ok(a.contiguous()?.broadcast_matmul(&b.contiguous()?)?)
        }
        Err(e) => Err(e.into()),
    }
}

/// `a · b` for a right operand that takes no part in the graph (a frozen weight, or its
/// transpose), as a node whose backward gives `a` alone its gradient. candle's own product
/// would also compute `aᵀ · dy` for `b` and keep it to the end of the backward pass: a full
/// weight gradient, for every frozen weight, that nothing reads.
struct ConstRhsMatmul;

impl candle_core::CustomOp2 for ConstRhsMatmul {
    fn name(&self) -> &'static str {
        "matmul_const_rhs"
    }

    fn cpu_fwd(
        &self,
        a: &candle_core::CpuStorage,
        al: &candle_core::Layout,
        b: &candle_core::CpuStorage,
        bl: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::backend::BackendStorage as _;
        let (m, k) = (al.dims()[0], al.dims()[1]);
        let n = bl.dims()[1];
        Ok((a.matmul(b, (1, m, n, k), al, bl)?, (m, n).into()))
    }

    fn bwd(
        &self,
        _a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(dy.matmul(&b.t()?)?), None))
    }
}

/// The binary element-wise ops, all broadcasting like NumPy.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Binary {
    Add,
    Sub,
    Mul,
    Div,
    Maximum,
    Minimum,
    Eq,
}

pub(crate) fn binary(op: Binary, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if let Binary::Add = op {
        if let Some(y) = super::dispatch::bias_add(a, b)? {
            return Ok(y);
        }
    }
    Ok(match op {
        Binary::Add => a.broadcast_add(b)?,
        Binary::Sub => a.broadcast_sub(b)?,
        Binary::Mul => a.broadcast_mul(b)?,
        Binary::Div => a.broadcast_div(b)?,
        Binary::Maximum => a.broadcast_maximum(b)?,
        Binary::Minimum => a.broadcast_minimum(b)?,
        Binary::Eq => a.broadcast_eq(b)?,
    })
}

/// The unary element-wise ops candle differentiates correctly as they are.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Unary {
    Neg,
    Exp,
    Log,
    Sqrt,
    Sqr,
    Recip,
    Abs,
    Tanh,
    Sign,
    /// `1/√x`, as the reciprocal of the square root (candle has no single op for it).
    Rsqrt,
}

pub(crate) fn unary(op: Unary, x: &Tensor) -> Result<Tensor> {
    Ok(match op {
        Unary::Neg => x.neg()?,
        Unary::Exp => x.exp()?,
        Unary::Log => x.log()?,
        Unary::Sqrt => x.sqrt()?,
        Unary::Sqr => x.sqr()?,
        Unary::Recip => x.recip()?,
        Unary::Abs => x.abs()?,
        Unary::Tanh => x.tanh()?,
        Unary::Sign => x.sign()?,
        Unary::Rsqrt => x.sqrt()?.recip()?,
    })
}

/// `min(max(x, lo), hi)`, candle's clamp.
pub(crate) fn clamp(x: &Tensor, lo: f64, hi: f64) -> Result<Tensor> {
    Ok(x.clamp(lo, hi)?)
}

/// Whether `dtype` can be a mask: candle selects on integers only.
fn is_mask_dtype(dtype: DType) -> bool {
    matches!(dtype, DType::U8 | DType::U32 | DType::I64)
}

/// `a` where `mask` is non-zero, `b` elsewhere, the three broadcast to one shape.
pub(crate) fn select(mask: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !is_mask_dtype(mask.dtype()) {
        return Err(invalid(format!(
            "the mask is {:?}; a mask is u8, u32 or i64, such as a comparison gives",
            mask.dtype()
        )));
    }
    if a.dtype() != b.dtype() {
        return Err(invalid(format!(
            "the two branches are {:?} and {:?}; cast one so they share a dtype",
            a.dtype(),
            b.dtype()
        )));
    }
    let shape = mask
        .shape()
        .broadcast_shape_binary_op(a.shape(), "select")?
        .broadcast_shape_binary_op(b.shape(), "select")?;
    let expand = |t: &Tensor| -> Result<Tensor> {
        if t.shape() == &shape {
            Ok(t.clone())
        } else {
            Ok(t.broadcast_as(&shape)?)
        }
    };
    Ok(expand(mask)?.where_cond(&expand(a)?, &expand(b)?)?)
}

/// Broadcasting comparison, u8.
pub(crate) fn compare(a: &Tensor, b: &Tensor, op: CmpOp) -> Result<Tensor> {
    Ok(match op {
        CmpOp::Eq => a.broadcast_eq(b)?,
        CmpOp::Ne => a.broadcast_ne(b)?,
        CmpOp::Lt => a.broadcast_lt(b)?,
        CmpOp::Le => a.broadcast_le(b)?,
        CmpOp::Gt => a.broadcast_gt(b)?,
        CmpOp::Ge => a.broadcast_ge(b)?,
    })
}

/// A reduction over every element, as a tensor of shape `[]`.
pub(crate) fn reduce_all(x: &Tensor, op: ReduceOp) -> Result<Tensor> {
    let empty = x.elem_count() == 0;
    let y = match op {
        ReduceOp::Sum => x.sum_all()?,
        ReduceOp::Mean => {
            if !x.dtype().is_float() {
                return Err(invalid(format!(
                    "the mean of a {:?} tensor; cast it to a float dtype first",
                    x.dtype()
                )));
            }
            if empty {
                full(&[], f64::NAN, x.dtype(), x.device())?
            } else {
                x.mean_all()?
            }
        }
        ReduceOp::Max | ReduceOp::Min if empty => {
            return Err(invalid(format!(
                "an empty tensor (shape {:?}) has no {}",
                x.dims(),
                if matches!(op, ReduceOp::Max) {
                    "largest element"
                } else {
                    "smallest element"
                }
            )))
        }
        ReduceOp::Max => x.max_all()?,
        ReduceOp::Min => x.min_all()?,
    };
    // candle keeps a rank-0 input as it is; every result has shape `[]`.
    Ok(y.reshape(())?)
}

/// `x` op `s`, the scalar converted to `x`'s dtype like a tensor operand of that dtype. Sums
/// and products go through a one-element tensor rather than candle's `affine`, which computes
/// `x · 1 + s` and `x · (1/s)`: those differ from `x + s` and `x / s` in rounding and in the sign
/// of zeros.
pub(crate) fn scalar(x: &Tensor, op: ScalarOp, s: f64) -> Result<Tensor> {
    let s = Tensor::new(s, x.device())?.to_dtype(x.dtype())?;
    Ok(match op {
        ScalarOp::Add => x.broadcast_add(&s)?,
        ScalarOp::Sub => x.broadcast_sub(&s)?,
        ScalarOp::RSub => s.broadcast_sub(x)?,
        ScalarOp::Mul => x.broadcast_mul(&s)?,
        ScalarOp::Div => x.broadcast_div(&s)?,
        ScalarOp::RDiv => s.broadcast_div(x)?,
        ScalarOp::Maximum => x.broadcast_maximum(&s)?,
        ScalarOp::Minimum => x.broadcast_minimum(&s)?,
    })
}

pub(crate) fn affine(x: &Tensor, mul: f64, add: f64) -> Result<Tensor> {
    Ok(x.affine(mul, add)?)
}

pub(crate) fn powf(x: &Tensor, e: f64) -> Result<Tensor> {
    Ok(x.powf(e)?)
}

/// The reductions over a set of dimensions.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Reduce {
    Sum,
    Mean,
    Max,
}

/// The dimensions to reduce, sorted and checked. An empty list is refused on tensors with
/// dimensions: NumPy reads it as "reduce nothing" and PyTorch as "reduce everything", and
/// guessing either would silently give wrong losses.
fn reduce_dims(x: &Tensor, dims: &[usize]) -> Result<Vec<usize>> {
    let rank = x.rank();
    if dims.is_empty() && rank > 0 {
        return Err(invalid(format!(
            "no dimensions given for a tensor of shape {:?}; list every dimension to reduce, \
             e.g. {:?} for all",
            x.dims(),
            (0..rank).collect::<Vec<_>>()
        )));
    }
    let mut sorted = dims.to_vec();
    sorted.sort_unstable();
    for w in sorted.windows(2) {
        if w[0] == w[1] {
            return Err(invalid(format!(
                "dimension {} is listed twice in {dims:?}",
                w[0]
            )));
        }
    }
    if let Some(&d) = sorted.iter().find(|&&d| d >= rank) {
        return Err(invalid(format!(
            "dimension {d} is out of range for a tensor of shape {:?}",
            x.dims()
        )));
    }
    Ok(sorted)
}

pub(crate) fn reduce(op: Reduce, x: &Tensor, dims: &[usize], keepdim: bool) -> Result<Tensor> {
    let dims = reduce_dims(x, dims)?;
    if dims.is_empty() {
        return Ok(x.clone());
    }
    let leading = dims.iter().enumerate().all(|(i, &d)| i == d);
    let fused = match op {
        Reduce::Sum if leading => super::dispatch::sum_leading(x, dims.len())?,
        _ => None,
    };
    if let Some(y) = fused {
        let shape: Vec<usize> = if keepdim {
            x.dims()
                .iter()
                .enumerate()
                .map(|(i, &n)| if dims.contains(&i) { 1 } else { n })
                .collect()
        } else {
            y.dims().to_vec()
        };
        return Ok(y.reshape(shape)?);
    }
    let kept = match op {
        Reduce::Sum => x.sum_keepdim(dims.as_slice())?,
        Reduce::Mean => x.mean_keepdim(dims.as_slice())?,
        // candle's max reduces one dimension at a time.
        Reduce::Max => {
            let mut acc = x.clone();
            for &d in &dims {
                acc = acc.max_keepdim(d)?;
            }
            acc
        }
    };
    if keepdim {
        return Ok(kept);
    }
    let shape: Vec<usize> = x
        .dims()
        .iter()
        .enumerate()
        .filter(|(i, _)| !dims.contains(i))
        .map(|(_, &n)| n)
        .collect();
    Ok(kept.reshape(shape)?)
}

pub(crate) fn argmax(x: &Tensor, dim: usize) -> Result<Tensor> {
    check_dim(x, dim)?;
    Ok(x.argmax(dim)?)
}

pub(crate) fn check_dim(x: &Tensor, dim: usize) -> Result<()> {
    if dim >= x.rank() {
        return Err(invalid(format!(
            "dimension {dim} is out of range for a tensor of shape {:?}",
            x.dims()
        )));
    }
    Ok(())
}

pub(crate) fn reshape(x: &Tensor, shape: &[usize]) -> Result<Tensor> {
    Ok(x.reshape(shape)?)
}

pub(crate) fn transpose(x: &Tensor, d1: usize, d2: usize) -> Result<Tensor> {
    check_dim(x, d1)?;
    check_dim(x, d2)?;
    Ok(x.transpose(d1, d2)?)
}

pub(crate) fn permute(x: &Tensor, dims: &[usize]) -> Result<Tensor> {
    let mut sorted = dims.to_vec();
    sorted.sort_unstable();
    if sorted != (0..x.rank()).collect::<Vec<_>>() {
        return Err(invalid(format!(
            "{dims:?} is not a permutation of the dimensions of a tensor of shape {:?}",
            x.dims()
        )));
    }
    Ok(x.permute(dims)?)
}

pub(crate) fn narrow(x: &Tensor, dim: usize, start: usize, len: usize) -> Result<Tensor> {
    check_dim(x, dim)?;
    Ok(x.narrow(dim, start, len)?)
}

pub(crate) fn cat(xs: &[Tensor], dim: usize) -> Result<Tensor> {
    if xs.is_empty() {
        return Err(invalid("no tensors to concatenate"));
    }
    Ok(Tensor::cat(xs, dim)?)
}

/// A contiguous tensor. `copy` forces a fresh buffer even when `x` already is contiguous; the
/// table asks for it when `x` is a declared tensor, whose storage `assign` overwrites.
pub(crate) fn contiguous(x: &Tensor, copy: bool) -> Result<Tensor> {
    if copy && x.is_contiguous() {
        Ok(x.copy()?)
    } else {
        Ok(x.contiguous()?)
    }
}

pub(crate) fn detach(x: &Tensor) -> Tensor {
    x.detach()
}

pub(crate) fn to_dtype(x: &Tensor, dtype: DType) -> Result<Tensor> {
    Ok(x.to_dtype(dtype)?)
}

/// The last dimension's index, for ops documented to work "over the last dim".
pub(crate) fn last_dim(x: &Tensor) -> Result<usize> {
    if x.rank() == 0 {
        return Err(invalid("a scalar has no last dimension"));
    }
    Ok(x.dim(D::Minus1)?)
}
