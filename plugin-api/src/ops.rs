//! The op table: every tensor operation a plugin can ask of the host.
//!
//! It is an `abi_stable` prefix type, in two parts: [`OpTable`], whose last entry `ext` leads
//! to [`OpTableExt`] (a prefix type holds at most 64 entries, and the first part is full).
//! Plugin API 2.0 ends at the fields marked `last_prefix_field` (`OpTable::ext` and
//! `OpTableExt::elementwise_update`); a later minor version adds entries at the end of
//! `OpTableExt`, after its marked field, and a plugin built against an older minor simply does
//! not see them. Never reorder, remove or retype an entry within a major version.
//!
//! Conventions for every entry: tensor arguments are borrowed handles; a returned handle is
//! owned by the caller. Errors come back as [`PluginError`] with the op's name in the message.
//! Shapes are `usize` lists in row-major order. Binary element-wise ops broadcast like NumPy.
//! Which engine, device or fused kernel runs an op is the host's choice (dispatch by op name
//! and device); the results are the same within floating-point tolerance.

use std::sync::OnceLock;

use abi_stable::std_types::{ROption, RResult, RSlice, RVec};
use abi_stable::StableAbi;

use crate::elementwise::ElemInstr;
use crate::error::PluginError;
use crate::tensor::{
    AdamWHyper, CmpOp, CrossEntropyIds, DType, GeluForm, ReduceOp, ScalarOp, TensorId,
};

type R<T> = RResult<T, PluginError>;
type T = TensorId;

/// The host's tensor operations. Obtain it with [`ops`] once the host has installed it.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = OpTableRef)))]
#[sabi(missing_field(panic))]
pub struct OpTable {
    // -- handles ---------------------------------------------------------------------------
    /// Release a handle. Releasing an unknown handle is a no-op.
    pub release: extern "C" fn(T),
    /// A second handle to the same tensor.
    pub retain: extern "C" fn(T) -> T,
    /// Dimensions.
    pub shape: extern "C" fn(T) -> R<RVec<usize>>,
    /// Element type.
    pub dtype: extern "C" fn(T) -> R<DType>,

    // -- creation and read-back --------------------------------------------------------------
    /// `(data, shape, dtype, like)`: a tensor from f32 values on `like`'s device.
    pub from_f32: extern "C" fn(RSlice<'_, f32>, RSlice<'_, usize>, DType, T) -> R<T>,
    /// `(data, shape, like)`: a u32 tensor on `like`'s device.
    pub from_u32: extern "C" fn(RSlice<'_, u32>, RSlice<'_, usize>, T) -> R<T>,
    /// `(shape, value, dtype, like)`.
    pub full: extern "C" fn(RSlice<'_, usize>, f64, DType, T) -> R<T>,
    /// `(start, end, like)`: u32 range.
    pub arange: extern "C" fn(u32, u32, T) -> R<T>,
    /// Values as f32, row-major.
    pub to_vec_f32: extern "C" fn(T) -> R<RVec<f32>>,
    /// Values as u32, row-major.
    pub to_vec_u32: extern "C" fn(T) -> R<RVec<u32>>,
    /// The value of a one-element tensor.
    pub to_scalar: extern "C" fn(T) -> R<f64>,

    // -- arithmetic -------------------------------------------------------------------------
    /// Batched matmul over the last two dims.
    pub matmul: extern "C" fn(T, T) -> R<T>,
    /// Broadcasting `a + b`.
    pub add: extern "C" fn(T, T) -> R<T>,
    /// Broadcasting `a - b`.
    pub sub: extern "C" fn(T, T) -> R<T>,
    /// Broadcasting `a * b`.
    pub mul: extern "C" fn(T, T) -> R<T>,
    /// Broadcasting `a / b`.
    pub div: extern "C" fn(T, T) -> R<T>,
    /// Broadcasting element-wise maximum.
    pub maximum: extern "C" fn(T, T) -> R<T>,
    /// Broadcasting element-wise minimum.
    pub minimum: extern "C" fn(T, T) -> R<T>,
    /// Broadcasting equality, u8.
    pub eq: extern "C" fn(T, T) -> R<T>,
    /// `x * mul + add`.
    pub affine: extern "C" fn(T, f64, f64) -> R<T>,
    /// `x ^ e`.
    pub powf: extern "C" fn(T, f64) -> R<T>,
    /// `-x`.
    pub neg: extern "C" fn(T) -> R<T>,
    /// `e^x`.
    pub exp: extern "C" fn(T) -> R<T>,
    /// `ln x`.
    pub log: extern "C" fn(T) -> R<T>,
    /// `√x`.
    pub sqrt: extern "C" fn(T) -> R<T>,
    /// `x²`.
    pub sqr: extern "C" fn(T) -> R<T>,
    /// `1/x`.
    pub recip: extern "C" fn(T) -> R<T>,
    /// `|x|`.
    pub abs: extern "C" fn(T) -> R<T>,
    /// `tanh x`.
    pub tanh: extern "C" fn(T) -> R<T>,
    /// GELU, erf or tanh form.
    pub gelu: extern "C" fn(T, GeluForm) -> R<T>,
    /// `x·σ(x)`.
    pub silu: extern "C" fn(T) -> R<T>,
    /// `max(x, 0)`.
    pub relu: extern "C" fn(T) -> R<T>,

    // -- reductions -------------------------------------------------------------------------
    /// `(x, dims, keepdim)`.
    pub sum: extern "C" fn(T, RSlice<'_, usize>, bool) -> R<T>,
    /// `(x, dims, keepdim)`.
    pub mean: extern "C" fn(T, RSlice<'_, usize>, bool) -> R<T>,
    /// `(x, dims, keepdim)`.
    pub max: extern "C" fn(T, RSlice<'_, usize>, bool) -> R<T>,
    /// `(x, dim)`: u32 indices, dim removed.
    pub argmax: extern "C" fn(T, usize) -> R<T>,

    // -- layout -----------------------------------------------------------------------------
    /// `(x, shape)`.
    pub reshape: extern "C" fn(T, RSlice<'_, usize>) -> R<T>,
    /// `(x, d1, d2)`.
    pub transpose: extern "C" fn(T, usize, usize) -> R<T>,
    /// `(x, dims)`.
    pub permute: extern "C" fn(T, RSlice<'_, usize>) -> R<T>,
    /// `(x, dim, start, len)`.
    pub narrow: extern "C" fn(T, usize, usize, usize) -> R<T>,
    /// `(tensors, dim)`.
    pub cat: extern "C" fn(RSlice<'_, T>, usize) -> R<T>,
    /// A contiguous copy.
    pub contiguous: extern "C" fn(T) -> R<T>,
    /// Cut from the autograd graph.
    pub detach: extern "C" fn(T) -> R<T>,
    /// `(x, dtype)`.
    pub to_dtype: extern "C" fn(T, DType) -> R<T>,

    // -- neural-network ops -------------------------------------------------------------------
    /// `(table, ids)`: embedding lookup.
    pub embedding: extern "C" fn(T, T) -> R<T>,
    /// `(x, mask, value)`.
    pub masked_fill: extern "C" fn(T, T, f64) -> R<T>,
    /// `(t, like)`: u8 `[t, t]`, 1 strictly above the diagonal.
    pub causal_mask: extern "C" fn(usize, T) -> R<T>,
    /// `(x, dim)`.
    pub softmax: extern "C" fn(T, usize) -> R<T>,
    /// `(x, dim)`.
    pub log_softmax: extern "C" fn(T, usize) -> R<T>,
    /// `(x, weight, bias, eps)` over the last dim.
    pub layer_norm: extern "C" fn(T, T, T, f64) -> R<T>,
    /// `(x, weight, eps)` over the last dim.
    pub rms_norm: extern "C" fn(T, T, f64) -> R<T>,
    /// `(x [b,h,t,d], cos [t,d/2] or [b,t,d/2], sin like cos)`, rotate-half convention.
    pub rotary: extern "C" fn(T, T, T) -> R<T>,
    /// `(x, p, seed)`: inverted dropout with a seeded mask.
    pub dropout: extern "C" fn(T, f64, u64) -> R<T>,
    /// `(logits [n,v], targets u32 [n], ignore_index)`: sums and counts.
    pub cross_entropy: extern "C" fn(T, T, u32) -> R<CrossEntropyIds>,
    /// `(q, k, v, causal, scale)`: scaled dot-product attention over the last two dims,
    /// `softmax(scale·q·kᵀ [+ causal mask])·v`; q `[.., t, d]`, k `[.., s, d]`, v `[.., s, e]`
    /// (e.g. `[b, h, t, d]`); `causal` needs `t ≤ s` and aligns the mask to the last key
    /// (query `i` sees keys `0..=s−t+i`); over packed rows (see `packed_positions`), causal
    /// attention is confined to each example.
    pub attention: extern "C" fn(T, T, T, bool, f64) -> R<T>,

    // -- autograd and in-place updates -----------------------------------------------------------
    /// Back-propagate from a scalar, adding into parameters' gradient slots.
    pub backward: extern "C" fn(T) -> R<()>,
    /// The gradient slot of a parameter.
    pub grad: extern "C" fn(T) -> R<ROption<T>>,
    /// Clear a parameter's gradient slot.
    pub zero_grad: extern "C" fn(T) -> R<()>,
    /// `(param, grad, exp_avg, exp_avg_sq, hyper)`: one `torch.optim.AdamW` step, updating the
    /// parameter and both moment tensors (declared, f32) in place; not recorded by autograd.
    pub adamw_update: extern "C" fn(T, T, T, T, AdamWHyper) -> R<()>,
    /// `(target, value)`: overwrite a parameter or state tensor in place.
    pub assign: extern "C" fn(T, T) -> R<()>,

    // -- the rest -------------------------------------------------------------------------------
    /// Every entry added since plugin API 2.0: element-wise and whole-tensor ops, the fused
    /// element-wise update. A prefix type holds at most 64 fields (abi_stable keeps a 64-bit
    /// mask of them), and this one has 61, so it takes no more entries: new ones go at the end
    /// of [`OpTableExt`].
    #[sabi(last_prefix_field)]
    pub ext: OpTableExtRef,
}

/// The op table's continuation, reached through [`OpTable::ext`]: the same conventions, its
/// own 64 entries. Later minor versions add entries at its end, after the field marked
/// `last_prefix_field`.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = OpTableExtRef)))]
#[sabi(missing_field(panic))]
pub struct OpTableExt {
    /// −1, 0 or 1 per element (0 at ±0 and NaN); its gradient is zero.
    pub sign: extern "C" fn(T) -> R<T>,
    /// `1/√x`.
    pub rsqrt: extern "C" fn(T) -> R<T>,
    /// `(x, min, max)`: `min(max(x, min), max)` with scalar bounds.
    pub clamp: extern "C" fn(T, f64, f64) -> R<T>,
    /// `(mask, a, b)`: `a` where the integer `mask` is non-zero, `b` elsewhere; all three
    /// broadcast, `a` and `b` share a dtype.
    pub select: extern "C" fn(T, T, T) -> R<T>,
    /// `(a, b, op)`: broadcasting comparison, u8 (1 where it holds).
    pub compare: extern "C" fn(T, T, CmpOp) -> R<T>,
    /// `(x, op)`: a reduction over every element, as a tensor with no dimensions.
    pub reduce_all: extern "C" fn(T, ReduceOp) -> R<T>,
    /// `(x, op, s)`: `x` with the f64 scalar `s`, element-wise, without a tensor for `s`.
    pub scalar: extern "C" fn(T, ScalarOp, f64) -> R<T>,
    /// `(program, inputs, scalars, targets)`: evaluate an element-wise program
    /// ([`crate::elementwise`]) in one pass over the elements and write its results into the
    /// targets — declared parameters or state tensors, all of one shape — in place; not
    /// recorded by autograd. Inputs have the targets' shape or one element.
    pub elementwise_update: extern "C" fn(
        RSlice<'_, ElemInstr>,
        RSlice<'_, T>,
        RSlice<'_, f64>,
        RSlice<'_, T>,
    ) -> R<()>,
    /// `(input)`: when the forward pass's input ids `[b, t]` are rows packed with several
    /// examples each, the position of every token within its example (u32 `[b, t]`, 0 at each
    /// example's first token); none when every row is one sequence from position 0. Added in
    /// plugin API 2.2.
    #[sabi(last_prefix_field)]
    pub packed_positions: extern "C" fn(T) -> R<ROption<T>>,
}

static OPS: OnceLock<OpTableRef> = OnceLock::new();

/// Install the host's op table. The host calls this for built-ins; the native-plugin glue
/// calls it with the table the host passes at registration. Later calls are ignored.
#[doc(hidden)]
pub fn install_ops(table: OpTableRef) {
    let _ = OPS.set(table);
}

/// The host's op table.
///
/// # Panics
/// If called before the host installed it — which cannot happen inside a component method,
/// because the host installs the table before it creates any component.
pub fn ops() -> OpTableRef {
    *OPS.get()
        .expect("the host installs its op table before creating components")
}
