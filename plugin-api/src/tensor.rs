//! Opaque tensor handles, and the [`Tensor`] wrapper plugin code computes with.
//!
//! The host owns every tensor; a plugin only ever holds a [`TensorId`]. The [`Tensor`]
//! wrapper owns one handle (released on drop, duplicated on clone) and turns every method into
//! a call through the host's [`OpTable`](crate::OpTable), so model code reads like ordinary
//! tensor code while the engine behind it (candle today, on CPU, CUDA or Metal) stays the
//! host's business. Handles are cheap: an id, no data.

use std::fmt;

use abi_stable::std_types::{RResult, RSlice, RVec};
use abi_stable::StableAbi;

use crate::elementwise::Program;
use crate::error::{from_abi, Result};
use crate::ops::ops;

/// An opaque handle to a host tensor. The id means nothing to the plugin.
///
/// Ownership rule at the boundary: a `TensorId` passed *into* a call is borrowed; a
/// `TensorId` *returned* by a call is owned by the caller, who releases it (the [`Tensor`]
/// wrapper does this on drop).
#[repr(transparent)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorId(pub u64);

/// Element types the host supports.
#[repr(u8)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit float.
    F32,
    /// 16-bit brain float.
    BF16,
    /// 16-bit IEEE float.
    F16,
    /// 64-bit float.
    F64,
    /// 32-bit unsigned integer (token ids, indices).
    U32,
    /// 8-bit unsigned integer (masks).
    U8,
    /// 64-bit signed integer.
    I64,
}

impl DType {
    /// The name used in configs: `f32`, `bf16`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::F64 => "f64",
            DType::U32 => "u32",
            DType::U8 => "u8",
            DType::I64 => "i64",
        }
    }
}

/// The two forms of GELU.
#[repr(u8)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq)]
pub enum GeluForm {
    /// Exact: `x * Φ(x)` with the error function.
    Erf,
    /// The tanh approximation used by GPT-2.
    Tanh,
}

/// The comparisons of [`Tensor::ne`], [`Tensor::lt`], [`Tensor::le`], [`Tensor::gt`] and
/// [`Tensor::ge`] (the op table's `compare`); each gives a u8 mask, 1 where it holds.
#[repr(u8)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq)]
pub enum CmpOp {
    /// `a == b`.
    Eq,
    /// `a != b` (1 where either is NaN).
    Ne,
    /// `a < b`.
    Lt,
    /// `a <= b`.
    Le,
    /// `a > b`.
    Gt,
    /// `a >= b`.
    Ge,
}

/// The reductions over every element of [`Tensor::sum_all`], [`Tensor::mean_all`],
/// [`Tensor::max_all`] and [`Tensor::min_all`] (the op table's `reduce_all`).
#[repr(u8)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    /// Σ x, in the tensor's dtype.
    Sum,
    /// Σ x / n (float dtypes only).
    Mean,
    /// The largest element (not of an empty tensor).
    Max,
    /// The smallest element (not of an empty tensor).
    Min,
}

/// Element-wise ops between a tensor `x` and an f64 scalar `s` (the op table's `scalar`),
/// behind [`Tensor::add_scalar`] and its siblings. `s` is converted to `x`'s dtype first, as
/// a tensor operand of that dtype would be; no tensor is allocated for it.
#[repr(u8)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq)]
pub enum ScalarOp {
    /// `x + s`.
    Add,
    /// `x − s`.
    Sub,
    /// `s − x`.
    RSub,
    /// `x · s`.
    Mul,
    /// `x / s` (a true division, not a product with `1/s`).
    Div,
    /// `s / x`.
    RDiv,
    /// `max(x, s)`.
    Maximum,
    /// `min(x, s)`.
    Minimum,
}

/// Result of [`Tensor::cross_entropy`]: sums, never means, so that accumulation over
/// micro-batches and evaluation over many batches weight every token equally.
#[repr(C)]
#[derive(StableAbi, Debug)]
pub struct CrossEntropyIds {
    /// Σ negative log-likelihood over the counted tokens (scalar, f32, differentiable).
    pub loss_sum: TensorId,
    /// Number of tokens whose target is not the ignore index (scalar, f32).
    pub tokens: TensorId,
    /// Number of counted tokens whose arg-max prediction equals the target (scalar, f32).
    pub correct: TensorId,
}

/// The settings of one AdamW step ([`Tensor::adamw_update`]), as `torch.optim.AdamW` names
/// them.
#[repr(C)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq)]
pub struct AdamWHyper {
    /// Learning rate of this step (≥ 0).
    pub lr: f64,
    /// Decay of the first moment, in `[0, 1)`.
    pub beta1: f64,
    /// Decay of the second moment, in `[0, 1)`.
    pub beta2: f64,
    /// Added to the denominator after the square root (≥ 0).
    pub eps: f64,
    /// Decoupled weight decay λ (≥ 0); 0 for parameters that are not decayed.
    pub weight_decay: f64,
    /// The step being taken, counted from 1 (bias correction).
    pub step: u64,
}

/// Owned results of [`Tensor::cross_entropy`].
#[derive(Debug)]
pub struct CrossEntropy {
    /// Σ negative log-likelihood over counted tokens; differentiable.
    pub loss_sum: Tensor,
    /// Number of counted tokens.
    pub tokens: Tensor,
    /// Number of counted tokens predicted correctly (arg-max).
    pub correct: Tensor,
}

/// An owned tensor handle. Dropping it releases the handle; cloning asks the host for a
/// second handle to the same tensor (no data is copied).
pub struct Tensor {
    id: TensorId,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor({})", self.id.0)
    }
}

impl Drop for Tensor {
    fn drop(&mut self) {
        (ops().release())(self.id);
    }
}

impl Clone for Tensor {
    fn clone(&self) -> Self {
        Tensor {
            id: (ops().retain())(self.id),
        }
    }
}

fn wrap(r: RResult<TensorId, crate::PluginError>) -> Result<Tensor> {
    from_abi(r).map(Tensor::from_id)
}

macro_rules! unary {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {$(
        $(#[$doc])*
        pub fn $name(&self) -> Result<Tensor> {
            wrap((ops().$name())(self.id))
        }
    )*};
}

macro_rules! binary {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {$(
        $(#[$doc])*
        pub fn $name(&self, rhs: &Tensor) -> Result<Tensor> {
            wrap((ops().$name())(self.id, rhs.id))
        }
    )*};
}

impl Tensor {
    /// Take ownership of a handle returned by the host.
    pub fn from_id(id: TensorId) -> Tensor {
        Tensor { id }
    }

    /// A new owned handle to a tensor whose handle is only borrowed.
    pub fn retain(id: TensorId) -> Tensor {
        Tensor {
            id: (ops().retain())(id),
        }
    }

    /// The handle, still owned by `self`.
    pub fn id(&self) -> TensorId {
        self.id
    }

    /// Give up ownership of the handle without releasing it.
    pub fn into_id(self) -> TensorId {
        let id = self.id;
        std::mem::forget(self);
        id
    }

    /// A tensor from f32 values, with the given shape and dtype, on the device of `like`.
    pub fn from_f32(data: &[f32], shape: &[usize], dtype: DType, like: &Tensor) -> Result<Tensor> {
        wrap((ops().from_f32())(
            RSlice::from_slice(data),
            RSlice::from_slice(shape),
            dtype,
            like.id,
        ))
    }

    /// A tensor from u32 values (token ids, indices), on the device of `like`.
    pub fn from_u32(data: &[u32], shape: &[usize], like: &Tensor) -> Result<Tensor> {
        wrap((ops().from_u32())(
            RSlice::from_slice(data),
            RSlice::from_slice(shape),
            like.id,
        ))
    }

    /// A tensor filled with `value`, on the device of `like`.
    pub fn full(shape: &[usize], value: f64, dtype: DType, like: &Tensor) -> Result<Tensor> {
        wrap((ops().full())(
            RSlice::from_slice(shape),
            value,
            dtype,
            like.id,
        ))
    }

    /// `[start, start+1, ..., end-1]` as u32, on the device of `like`.
    pub fn arange(start: u32, end: u32, like: &Tensor) -> Result<Tensor> {
        wrap((ops().arange())(start, end, like.id))
    }

    /// The dimensions.
    pub fn shape(&self) -> Result<Vec<usize>> {
        from_abi((ops().shape())(self.id)).map(RVec::into_vec)
    }

    /// The element type.
    pub fn dtype(&self) -> Result<DType> {
        from_abi((ops().dtype())(self.id))
    }

    /// Values as f32, flattened in row-major order (copies to the host CPU).
    pub fn to_vec_f32(&self) -> Result<Vec<f32>> {
        from_abi((ops().to_vec_f32())(self.id)).map(RVec::into_vec)
    }

    /// Values as u32, flattened in row-major order.
    pub fn to_vec_u32(&self) -> Result<Vec<u32>> {
        from_abi((ops().to_vec_u32())(self.id)).map(RVec::into_vec)
    }

    /// The single value of a one-element tensor, as f64.
    pub fn to_scalar(&self) -> Result<f64> {
        from_abi((ops().to_scalar())(self.id))
    }

    binary!(
        /// Batched matrix product over the last two dimensions; leading dimensions broadcast.
        matmul,
        /// Element-wise sum with broadcasting.
        add,
        /// Element-wise difference with broadcasting.
        sub,
        /// Element-wise product with broadcasting.
        mul,
        /// Element-wise quotient with broadcasting.
        div,
        /// Element-wise maximum with broadcasting.
        maximum,
        /// Element-wise minimum with broadcasting.
        minimum,
        /// Element-wise equality with broadcasting, as u8 (1 where equal).
        eq,
    );

    unary!(
        /// `-x`.
        neg,
        /// `e^x`.
        exp,
        /// Natural logarithm.
        log,
        /// Square root.
        sqrt,
        /// `x²`.
        sqr,
        /// `1/x`.
        recip,
        /// `|x|`.
        abs,
        /// Hyperbolic tangent.
        tanh,
        /// `x·sigmoid(x)` (SwiGLU's activation).
        silu,
        /// `max(x, 0)`.
        relu,
        /// A copy in row-major contiguous layout.
        contiguous,
        /// The same values cut off from the autograd graph.
        detach,
    );

    /// `x * mul + add`.
    pub fn affine(&self, mul: f64, add: f64) -> Result<Tensor> {
        wrap((ops().affine())(self.id, mul, add))
    }

    /// `x^e`, element-wise.
    pub fn powf(&self, e: f64) -> Result<Tensor> {
        wrap((ops().powf())(self.id, e))
    }

    /// −1, 0 or 1 per element (0 at ±0 and NaN), like `torch.sign`; the gradient is zero.
    pub fn sign(&self) -> Result<Tensor> {
        wrap((ops().ext().sign())(self.id))
    }

    /// `1/√x`, like `torch.rsqrt`.
    pub fn rsqrt(&self) -> Result<Tensor> {
        wrap((ops().ext().rsqrt())(self.id))
    }

    /// `min(max(x, min), max)` element-wise, like `torch.clamp` (where `min > max` every element
    /// becomes `max`).
    pub fn clamp(&self, min: f64, max: f64) -> Result<Tensor> {
        wrap((ops().ext().clamp())(self.id, min, max))
    }

    /// `on_true` where `self` (an integer mask, such as a comparison's) is non-zero, `on_false`
    /// elsewhere, like `torch.where`. The three broadcast; `on_true` and `on_false` have one
    /// dtype, which the result has.
    pub fn select(&self, on_true: &Tensor, on_false: &Tensor) -> Result<Tensor> {
        wrap((ops().ext().select())(self.id, on_true.id, on_false.id))
    }

    fn compare(&self, rhs: &Tensor, op: CmpOp) -> Result<Tensor> {
        wrap((ops().ext().compare())(self.id, rhs.id, op))
    }

    /// Element-wise `self != rhs` with broadcasting, as u8 (1 where it holds).
    pub fn ne(&self, rhs: &Tensor) -> Result<Tensor> {
        self.compare(rhs, CmpOp::Ne)
    }

    /// Element-wise `self < rhs` with broadcasting, as u8 (1 where it holds).
    pub fn lt(&self, rhs: &Tensor) -> Result<Tensor> {
        self.compare(rhs, CmpOp::Lt)
    }

    /// Element-wise `self <= rhs` with broadcasting, as u8 (1 where it holds).
    pub fn le(&self, rhs: &Tensor) -> Result<Tensor> {
        self.compare(rhs, CmpOp::Le)
    }

    /// Element-wise `self > rhs` with broadcasting, as u8 (1 where it holds).
    pub fn gt(&self, rhs: &Tensor) -> Result<Tensor> {
        self.compare(rhs, CmpOp::Gt)
    }

    /// Element-wise `self >= rhs` with broadcasting, as u8 (1 where it holds).
    pub fn ge(&self, rhs: &Tensor) -> Result<Tensor> {
        self.compare(rhs, CmpOp::Ge)
    }

    fn reduce_all(&self, op: ReduceOp) -> Result<Tensor> {
        wrap((ops().ext().reduce_all())(self.id, op))
    }

    /// The sum of every element, as a tensor with no dimensions (shape `[]`).
    pub fn sum_all(&self) -> Result<Tensor> {
        self.reduce_all(ReduceOp::Sum)
    }

    /// The mean of every element, as a tensor with no dimensions (float dtypes; NaN for an
    /// empty tensor).
    pub fn mean_all(&self) -> Result<Tensor> {
        self.reduce_all(ReduceOp::Mean)
    }

    /// The largest element, as a tensor with no dimensions (an error for an empty tensor).
    pub fn max_all(&self) -> Result<Tensor> {
        self.reduce_all(ReduceOp::Max)
    }

    /// The smallest element, as a tensor with no dimensions (an error for an empty tensor).
    pub fn min_all(&self) -> Result<Tensor> {
        self.reduce_all(ReduceOp::Min)
    }

    /// `self` op `s` for a scalar `s`, element-wise; see [`ScalarOp`].
    pub fn scalar_op(&self, op: ScalarOp, s: f64) -> Result<Tensor> {
        wrap((ops().ext().scalar())(self.id, op, s))
    }

    /// `x + s`.
    pub fn add_scalar(&self, s: f64) -> Result<Tensor> {
        self.scalar_op(ScalarOp::Add, s)
    }

    /// `x − s`.
    pub fn sub_scalar(&self, s: f64) -> Result<Tensor> {
        self.scalar_op(ScalarOp::Sub, s)
    }

    /// `x · s`.
    pub fn mul_scalar(&self, s: f64) -> Result<Tensor> {
        self.scalar_op(ScalarOp::Mul, s)
    }

    /// `x / s`.
    pub fn div_scalar(&self, s: f64) -> Result<Tensor> {
        self.scalar_op(ScalarOp::Div, s)
    }

    /// `max(x, s)`.
    pub fn maximum_scalar(&self, s: f64) -> Result<Tensor> {
        self.scalar_op(ScalarOp::Maximum, s)
    }

    /// `min(x, s)`.
    pub fn minimum_scalar(&self, s: f64) -> Result<Tensor> {
        self.scalar_op(ScalarOp::Minimum, s)
    }

    /// GELU in the given form.
    pub fn gelu(&self, form: GeluForm) -> Result<Tensor> {
        wrap((ops().gelu())(self.id, form))
    }

    /// Sum over `dims`; `keepdim` keeps them with size 1.
    pub fn sum(&self, dims: &[usize], keepdim: bool) -> Result<Tensor> {
        wrap((ops().sum())(self.id, RSlice::from_slice(dims), keepdim))
    }

    /// Mean over `dims`.
    pub fn mean(&self, dims: &[usize], keepdim: bool) -> Result<Tensor> {
        wrap((ops().mean())(self.id, RSlice::from_slice(dims), keepdim))
    }

    /// Maximum over `dims`.
    pub fn max(&self, dims: &[usize], keepdim: bool) -> Result<Tensor> {
        wrap((ops().max())(self.id, RSlice::from_slice(dims), keepdim))
    }

    /// Index of the maximum along `dim` (u32), the dimension removed.
    pub fn argmax(&self, dim: usize) -> Result<Tensor> {
        wrap((ops().argmax())(self.id, dim))
    }

    /// The same elements with another shape.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        wrap((ops().reshape())(self.id, RSlice::from_slice(shape)))
    }

    /// Swap two dimensions (a view; call [`Tensor::contiguous`] to copy).
    pub fn transpose(&self, d1: usize, d2: usize) -> Result<Tensor> {
        wrap((ops().transpose())(self.id, d1, d2))
    }

    /// Reorder dimensions.
    pub fn permute(&self, dims: &[usize]) -> Result<Tensor> {
        wrap((ops().permute())(self.id, RSlice::from_slice(dims)))
    }

    /// `len` entries of `dim` starting at `start`.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        wrap((ops().narrow())(self.id, dim, start, len))
    }

    /// Concatenate along `dim`.
    pub fn cat(tensors: &[&Tensor], dim: usize) -> Result<Tensor> {
        let ids: Vec<TensorId> = tensors.iter().map(|t| t.id).collect();
        wrap((ops().cat())(RSlice::from_slice(&ids), dim))
    }

    /// Rows of `self` (a `[vocab, dim]` table) picked by `ids` (u32 of any shape):
    /// the result has shape `ids.shape + [dim]`.
    pub fn embedding(&self, ids: &Tensor) -> Result<Tensor> {
        wrap((ops().embedding())(self.id, ids.id))
    }

    /// Where `mask` (u8, broadcast to `self`) is non-zero, `value`; elsewhere `self`.
    pub fn masked_fill(&self, mask: &Tensor, value: f64) -> Result<Tensor> {
        wrap((ops().masked_fill())(self.id, mask.id, value))
    }

    /// The `[t, t]` u8 mask that is 1 above the diagonal (the future), on the device of `like`.
    pub fn causal_mask(t: usize, like: &Tensor) -> Result<Tensor> {
        wrap((ops().causal_mask())(t, like.id))
    }

    /// Softmax over `dim`.
    pub fn softmax(&self, dim: usize) -> Result<Tensor> {
        wrap((ops().softmax())(self.id, dim))
    }

    /// Log-softmax over `dim`.
    pub fn log_softmax(&self, dim: usize) -> Result<Tensor> {
        wrap((ops().log_softmax())(self.id, dim))
    }

    /// Layer norm over the last dimension, with weight and bias of that size.
    pub fn layer_norm(&self, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
        wrap((ops().layer_norm())(self.id, weight.id, bias.id, eps))
    }

    /// RMS norm over the last dimension, with a weight of that size.
    pub fn rms_norm(&self, weight: &Tensor, eps: f64) -> Result<Tensor> {
        wrap((ops().rms_norm())(self.id, weight.id, eps))
    }

    /// Rotary position embedding in the "rotate half" convention of Hugging Face LLaMA:
    /// `self` is `[b, h, t, d]`, `cos` and `sin` are `[t, d/2]` (one table for every row) or
    /// `[b, t, d/2]` (a table per row, for rows whose positions differ: packed rows, see
    /// [`Tensor::packed_positions`]; since plugin API 2.2).
    pub fn rotary(&self, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        wrap((ops().rotary())(self.id, cos.id, sin.id))
    }

    /// Inverted dropout with probability `p`, its mask drawn from a generator seeded with
    /// `seed` (the same seed gives the same mask on every machine).
    pub fn dropout(&self, p: f64, seed: u64) -> Result<Tensor> {
        wrap((ops().dropout())(self.id, p, seed))
    }

    /// Cast to another element type.
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        wrap((ops().to_dtype())(self.id, dtype))
    }

    /// Cross-entropy of `self` (logits `[n, vocab]`) against `targets` (u32 `[n]`), skipping
    /// targets equal to `ignore_index`. Returns sums and counts, not a mean: divide by the
    /// token count of the whole optimizer step for token-weighted accumulation.
    pub fn cross_entropy(&self, targets: &Tensor, ignore_index: u32) -> Result<CrossEntropy> {
        let r = from_abi((ops().cross_entropy())(self.id, targets.id, ignore_index))?;
        Ok(CrossEntropy {
            loss_sum: Tensor::from_id(r.loss_sum),
            tokens: Tensor::from_id(r.tokens),
            correct: Tensor::from_id(r.correct),
        })
    }

    /// Scaled dot-product attention: `softmax(scale · self · kᵀ) · v` over the last two
    /// dimensions, with the future masked out when `causal`. `self` (queries) is `[.., t, d]`,
    /// `k` is `[.., s, d]` and `v` is `[.., s, e]`, e.g. `[batch, heads, positions, head_dim]`.
    /// `causal` needs `t ≤ s` and aligns the mask to the last key, as flash-attention does:
    /// the queries are the last `t` of the `s` positions, and query `i` sees keys
    /// `0..=s − t + i` (with `t == s`, the usual `0..=i`; with `t < s`, new positions
    /// attending over a key/value cache and themselves). The host runs a fused kernel when
    /// one is active, else the composition from matmul, masked fill and softmax.
    ///
    /// In a forward pass over packed rows ([`Tensor::packed_positions`]), causal attention
    /// over the rows' `t` positions is confined to each example: query `i` sees the keys of
    /// its own example up to itself, never those of the example before it.
    pub fn attention(&self, k: &Tensor, v: &Tensor, causal: bool, scale: f64) -> Result<Tensor> {
        wrap((ops().attention())(self.id, k.id, v.id, causal, scale))
    }

    /// For the input ids of a forward pass (`[b, t]`, what [`crate::Model::forward`] gets):
    /// the position of each token within its own sequence, u32 `[b, t]`, when the host packed
    /// several examples into each row; `None` when every row is one sequence from position 0
    /// (positions `0..t`, the usual case, for which a model keeps its cheaper path).
    ///
    /// A model with positions of its own (learned position embeddings, rotary tables) reads
    /// them here, so that every example starts at position 0 as it would alone; causal
    /// [`Tensor::attention`] confines itself to each example. Supervised fine-tuning with
    /// `data.sft.packing: true` needs it: the host refuses to train a model on packed rows
    /// when its forward pass did not ask. Since plugin API 2.2.
    pub fn packed_positions(&self) -> Result<Option<Tensor>> {
        from_abi((ops().ext().packed_positions())(self.id))
            .map(|o| o.into_option().map(Tensor::from_id))
    }

    /// One `torch.optim.AdamW` step on this parameter, in place:
    /// `p ← p·(1 − lr·λ)`, `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`,
    /// `p ← p − lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε)`. `exp_avg` (m) and `exp_avg_sq` (v) are
    /// declared state tensors of the parameter's shape, updated in place too. Not recorded by
    /// autograd.
    pub fn adamw_update(
        &self,
        grad: &Tensor,
        exp_avg: &Tensor,
        exp_avg_sq: &Tensor,
        hyper: AdamWHyper,
    ) -> Result<()> {
        from_abi((ops().adamw_update())(
            self.id,
            grad.id,
            exp_avg.id,
            exp_avg_sq.id,
            hyper,
        ))
    }

    /// Run an element-wise [`Program`] over `inputs` and `scalars` and write its results into
    /// `targets` in place, in one pass over the elements (see [`crate::elementwise`]).
    ///
    /// Targets are declared parameters or state tensors of one shape, each listed once; inputs
    /// have that shape or one element (broadcast), and may be targets too (they give their
    /// value from before the call). Not recorded by autograd, like [`Tensor::assign`]. The
    /// host checks the program against the call before it writes anything: an unknown
    /// instruction, a stack that runs dry or is left with values, an input, scalar or target
    /// the call does not have, a target missed or written twice, a shape or a dtype that does
    /// not fit — each is an error naming the problem.
    pub fn elementwise_update(
        program: &Program,
        inputs: &[&Tensor],
        scalars: &[f64],
        targets: &[&Tensor],
    ) -> Result<()> {
        let inputs: Vec<TensorId> = inputs.iter().map(|t| t.id).collect();
        let targets: Vec<TensorId> = targets.iter().map(|t| t.id).collect();
        from_abi((ops().ext().elementwise_update())(
            RSlice::from_slice(program.instructions()),
            RSlice::from_slice(&inputs),
            RSlice::from_slice(scalars),
            RSlice::from_slice(&targets),
        ))
    }

    /// Back-propagate from this scalar. The gradients are added into every parameter's
    /// gradient slot (as PyTorch's `.grad`); read them with [`Tensor::grad`].
    pub fn backward(&self) -> Result<()> {
        from_abi((ops().backward())(self.id))
    }

    /// The accumulated gradient of a parameter, if it has one.
    pub fn grad(&self) -> Result<Option<Tensor>> {
        from_abi((ops().grad())(self.id)).map(|o| o.into_option().map(Tensor::from_id))
    }

    /// Clear the gradient slot of a parameter.
    pub fn zero_grad(&self) -> Result<()> {
        from_abi((ops().zero_grad())(self.id))
    }

    /// Overwrite a parameter or optimizer-state tensor in place with `value`
    /// (same shape; cast to its dtype). Not recorded by autograd.
    pub fn assign(&self, value: &Tensor) -> Result<()> {
        from_abi((ops().assign())(self.id, value.id))
    }
}
