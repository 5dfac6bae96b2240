//! The `extern "C"` op table handed to components.
//!
//! Every entry is a shell of a few lines: resolve the borrowed handles, call the function in
//! `ops`, `nn` or `autograd` that does the work, register the result as a new owned handle. The
//! shell runs inside [`guarded`], which turns both errors and panics into a [`PluginError`]
//! whose message starts with the op's name — a panic must never unwind through `extern "C"`,
//! where it would abort the process.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

use abi_stable::prefix_type::PrefixTypeTrait;
use abi_stable::std_types::{ROption, RResult, RSlice, RString, RVec};
use candle_core::{Device, Tensor};
use codex_plugin_api::elementwise::ElemInstr;
use codex_plugin_api::tensor::{AdamWHyper, CmpOp, CrossEntropyIds, ReduceOp, ScalarOp};
use codex_plugin_api::{
    DType, GeluForm, OpTable, OpTableExt, OpTableExtRef, OpTableRef, PluginError, TensorId,
};

use super::ops::{self, Binary, Reduce, Unary};
use super::profile::{self, Kind};
use super::{
    adapter, autograd, elementwise, from_candle_dtype, fusion, handles, nn, packed,
    to_candle_dtype, Result,
};

type R<T> = RResult<T, PluginError>;

/// Run `f`, naming `op` in its error or panic.
pub(crate) fn guarded<T>(op: &'static str, f: impl FnOnce() -> Result<T>) -> R<T> {
    match profile::timed(Kind::Op, op, || catch_unwind(AssertUnwindSafe(f))) {
        Ok(Ok(v)) => RResult::ROk(v),
        Ok(Err(e)) => RResult::RErr(PluginError::new(format!("{op}: {e}"))),
        Err(payload) => {
            let what = if let Some(s) = payload.downcast_ref::<&str>() {
                (*s).to_string()
            } else if let Some(s) = payload.downcast_ref::<String>() {
                s.clone()
            } else {
                "unknown panic payload".to_string()
            };
            RResult::RErr(PluginError {
                message: RString::from(format!("{op}: panic in the tensor engine: {what}")),
                panicked: true,
            })
        }
    }
}

/// Like [`guarded`] for ops that produce a tensor: registers it and returns the owned handle.
fn produce(op: &'static str, f: impl FnOnce() -> Result<Tensor>) -> R<TensorId> {
    guarded(op, || f().map(handles::insert))
}

fn t(id: TensorId) -> Result<Tensor> {
    handles::tensor(id)
}

fn device_of(like: TensorId) -> Result<Device> {
    Ok(t(like)?.device().clone())
}

// -- handles ---------------------------------------------------------------------------------

extern "C" fn release(id: TensorId) {
    let _ = catch_unwind(|| handles::release(id));
}

extern "C" fn retain(id: TensorId) -> TensorId {
    catch_unwind(|| handles::retain(id)).unwrap_or(TensorId(0))
}

extern "C" fn shape(x: TensorId) -> R<RVec<usize>> {
    guarded("shape", || Ok(t(x)?.dims().to_vec().into()))
}

extern "C" fn dtype(x: TensorId) -> R<DType> {
    guarded("dtype", || from_candle_dtype(t(x)?.dtype()))
}

// -- creation and read-back -------------------------------------------------------------------

extern "C" fn from_f32(
    data: RSlice<'_, f32>,
    shape: RSlice<'_, usize>,
    dtype: DType,
    like: TensorId,
) -> R<TensorId> {
    produce("from_f32", || {
        ops::from_f32(&data, &shape, to_candle_dtype(dtype), &device_of(like)?)
    })
}

extern "C" fn from_u32(
    data: RSlice<'_, u32>,
    shape: RSlice<'_, usize>,
    like: TensorId,
) -> R<TensorId> {
    produce("from_u32", || {
        ops::from_u32(&data, &shape, &device_of(like)?)
    })
}

extern "C" fn full(
    shape: RSlice<'_, usize>,
    value: f64,
    dtype: DType,
    like: TensorId,
) -> R<TensorId> {
    produce("full", || {
        ops::full(&shape, value, to_candle_dtype(dtype), &device_of(like)?)
    })
}

extern "C" fn arange(start: u32, end: u32, like: TensorId) -> R<TensorId> {
    produce("arange", || ops::arange(start, end, &device_of(like)?))
}

extern "C" fn to_vec_f32(x: TensorId) -> R<RVec<f32>> {
    guarded("to_vec_f32", || Ok(ops::to_vec_f32(&t(x)?)?.into()))
}

extern "C" fn to_vec_u32(x: TensorId) -> R<RVec<u32>> {
    guarded("to_vec_u32", || Ok(ops::to_vec_u32(&t(x)?)?.into()))
}

extern "C" fn to_scalar(x: TensorId) -> R<f64> {
    guarded("to_scalar", || ops::to_scalar(&t(x)?))
}

// -- arithmetic -------------------------------------------------------------------------------

extern "C" fn matmul(a: TensorId, b: TensorId) -> R<TensorId> {
    guarded("matmul", || fusion::matmul(a, b))
}

macro_rules! binary_entries {
    ($($name:ident => $op:ident),* $(,)?) => {$(
        extern "C" fn $name(a: TensorId, b: TensorId) -> R<TensorId> {
            produce(stringify!($name), || ops::binary(Binary::$op, &t(a)?, &t(b)?))
        }
    )*};
}

extern "C" fn add(a: TensorId, b: TensorId) -> R<TensorId> {
    guarded("add", || fusion::add(a, b))
}

binary_entries!(
    sub => Sub,
    mul => Mul,
    div => Div,
    maximum => Maximum,
    minimum => Minimum,
    eq => Eq,
);

macro_rules! unary_entries {
    ($($name:ident => $op:ident),* $(,)?) => {$(
        extern "C" fn $name(x: TensorId) -> R<TensorId> {
            produce(stringify!($name), || ops::unary(Unary::$op, &t(x)?))
        }
    )*};
}

unary_entries!(
    neg => Neg,
    exp => Exp,
    log => Log,
    sqrt => Sqrt,
    sqr => Sqr,
    recip => Recip,
    abs => Abs,
    tanh => Tanh,
);

extern "C" fn affine(x: TensorId, mul: f64, add: f64) -> R<TensorId> {
    produce("affine", || ops::affine(&t(x)?, mul, add))
}

extern "C" fn powf(x: TensorId, e: f64) -> R<TensorId> {
    produce("powf", || ops::powf(&t(x)?, e))
}

extern "C" fn gelu(x: TensorId, form: GeluForm) -> R<TensorId> {
    produce("gelu", || nn::gelu(&t(x)?, form))
}

extern "C" fn silu(x: TensorId) -> R<TensorId> {
    produce("silu", || nn::silu(&t(x)?))
}

extern "C" fn relu(x: TensorId) -> R<TensorId> {
    produce("relu", || nn::relu(&t(x)?))
}

// -- reductions -------------------------------------------------------------------------------

extern "C" fn sum(x: TensorId, dims: RSlice<'_, usize>, keepdim: bool) -> R<TensorId> {
    produce("sum", || ops::reduce(Reduce::Sum, &t(x)?, &dims, keepdim))
}

extern "C" fn mean(x: TensorId, dims: RSlice<'_, usize>, keepdim: bool) -> R<TensorId> {
    produce("mean", || ops::reduce(Reduce::Mean, &t(x)?, &dims, keepdim))
}

extern "C" fn max(x: TensorId, dims: RSlice<'_, usize>, keepdim: bool) -> R<TensorId> {
    produce("max", || ops::reduce(Reduce::Max, &t(x)?, &dims, keepdim))
}

extern "C" fn argmax(x: TensorId, dim: usize) -> R<TensorId> {
    produce("argmax", || ops::argmax(&t(x)?, dim))
}

// -- layout -----------------------------------------------------------------------------------

extern "C" fn reshape(x: TensorId, shape: RSlice<'_, usize>) -> R<TensorId> {
    guarded("reshape", || fusion::reshape(x, &shape))
}

extern "C" fn transpose(x: TensorId, d1: usize, d2: usize) -> R<TensorId> {
    guarded("transpose", || fusion::transpose(x, d1, d2))
}

extern "C" fn permute(x: TensorId, dims: RSlice<'_, usize>) -> R<TensorId> {
    produce("permute", || ops::permute(&t(x)?, &dims))
}

extern "C" fn narrow(x: TensorId, dim: usize, start: usize, len: usize) -> R<TensorId> {
    guarded("narrow", || adapter::narrow(x, dim, start, len))
}

extern "C" fn cat(xs: RSlice<'_, TensorId>, dim: usize) -> R<TensorId> {
    produce("cat", || {
        let xs = xs.iter().map(|&id| t(id)).collect::<Result<Vec<_>>>()?;
        ops::cat(&xs, dim)
    })
}

extern "C" fn contiguous(x: TensorId) -> R<TensorId> {
    produce("contiguous", || {
        // A declared tensor changes under `assign`; the copy must not.
        let declared = handles::leaf(x)?.is_some();
        ops::contiguous(&t(x)?, declared)
    })
}

extern "C" fn detach(x: TensorId) -> R<TensorId> {
    produce("detach", || Ok(ops::detach(&t(x)?)))
}

extern "C" fn to_dtype(x: TensorId, dtype: DType) -> R<TensorId> {
    produce("to_dtype", || ops::to_dtype(&t(x)?, to_candle_dtype(dtype)))
}

// -- neural-network ops -----------------------------------------------------------------------

extern "C" fn embedding(table: TensorId, ids: TensorId) -> R<TensorId> {
    produce("embedding", || nn::embedding(&t(table)?, &t(ids)?))
}

extern "C" fn masked_fill(x: TensorId, mask: TensorId, value: f64) -> R<TensorId> {
    produce("masked_fill", || nn::masked_fill(&t(x)?, &t(mask)?, value))
}

extern "C" fn causal_mask(size: usize, like: TensorId) -> R<TensorId> {
    produce("causal_mask", || nn::causal_mask(size, &device_of(like)?))
}

extern "C" fn softmax(x: TensorId, dim: usize) -> R<TensorId> {
    produce("softmax", || nn::softmax(&t(x)?, dim))
}

extern "C" fn log_softmax(x: TensorId, dim: usize) -> R<TensorId> {
    produce("log_softmax", || nn::log_softmax(&t(x)?, dim))
}

extern "C" fn layer_norm(x: TensorId, weight: TensorId, bias: TensorId, eps: f64) -> R<TensorId> {
    produce("layer_norm", || {
        nn::layer_norm(&t(x)?, &t(weight)?, &t(bias)?, eps)
    })
}

extern "C" fn rms_norm(x: TensorId, weight: TensorId, eps: f64) -> R<TensorId> {
    produce("rms_norm", || nn::rms_norm(&t(x)?, &t(weight)?, eps))
}

extern "C" fn rotary(x: TensorId, cos: TensorId, sin: TensorId) -> R<TensorId> {
    produce("rotary", || nn::rotary(&t(x)?, &t(cos)?, &t(sin)?))
}

extern "C" fn dropout(x: TensorId, p: f64, seed: u64) -> R<TensorId> {
    produce("dropout", || nn::dropout(&t(x)?, p, seed))
}

extern "C" fn cross_entropy(
    logits: TensorId,
    targets: TensorId,
    ignore_index: u32,
) -> R<CrossEntropyIds> {
    guarded("cross_entropy", || {
        let product = fusion::product(logits)?;
        let out = nn::cross_entropy(&t(logits)?, &t(targets)?, ignore_index, product.as_ref())?;
        Ok(CrossEntropyIds {
            loss_sum: handles::insert(out.loss_sum),
            tokens: handles::insert(out.tokens),
            correct: handles::insert(out.correct),
        })
    })
}

extern "C" fn attention(
    q: TensorId,
    k: TensorId,
    v: TensorId,
    causal: bool,
    scale: f64,
) -> R<TensorId> {
    guarded("attention", || {
        if let Some(y) = fusion::attention_on_rows(q, k, v, causal, scale)? {
            return Ok(y);
        }
        nn::attention(&t(q)?, &t(k)?, &t(v)?, causal, scale).map(handles::insert)
    })
}

// -- autograd and in-place updates ------------------------------------------------------------

extern "C" fn backward(loss: TensorId) -> R<()> {
    guarded("backward", || autograd::backward(&t(loss)?))
}

extern "C" fn grad(param: TensorId) -> R<ROption<TensorId>> {
    guarded("grad", || {
        Ok(autograd::grad(param)?.map(handles::insert).into())
    })
}

extern "C" fn zero_grad(param: TensorId) -> R<()> {
    guarded("zero_grad", || autograd::zero_grad(param))
}

extern "C" fn adamw_update(
    param: TensorId,
    grad: TensorId,
    exp_avg: TensorId,
    exp_avg_sq: TensorId,
    hyper: AdamWHyper,
) -> R<()> {
    guarded("adamw_update", || {
        autograd::adamw_update(param, &t(grad)?, exp_avg, exp_avg_sq, hyper)
    })
}

extern "C" fn assign(target: TensorId, value: TensorId) -> R<()> {
    guarded("assign", || autograd::assign(target, &t(value)?))
}

// -- the table's continuation: element-wise and whole-tensor ops, the fused update -------------

extern "C" fn sign(x: TensorId) -> R<TensorId> {
    produce("sign", || ops::unary(Unary::Sign, &t(x)?))
}

extern "C" fn rsqrt(x: TensorId) -> R<TensorId> {
    produce("rsqrt", || ops::unary(Unary::Rsqrt, &t(x)?))
}

extern "C" fn clamp(x: TensorId, min: f64, max: f64) -> R<TensorId> {
    produce("clamp", || ops::clamp(&t(x)?, min, max))
}

extern "C" fn select(mask: TensorId, a: TensorId, b: TensorId) -> R<TensorId> {
    produce("select", || ops::select(&t(mask)?, &t(a)?, &t(b)?))
}

extern "C" fn compare(a: TensorId, b: TensorId, op: CmpOp) -> R<TensorId> {
    produce("compare", || ops::compare(&t(a)?, &t(b)?, op))
}

extern "C" fn reduce_all(x: TensorId, op: ReduceOp) -> R<TensorId> {
    produce("reduce_all", || ops::reduce_all(&t(x)?, op))
}

extern "C" fn scalar(x: TensorId, op: ScalarOp, s: f64) -> R<TensorId> {
    produce("scalar", || ops::scalar(&t(x)?, op, s))
}

extern "C" fn elementwise_update(
    program: RSlice<'_, ElemInstr>,
    inputs: RSlice<'_, TensorId>,
    scalars: RSlice<'_, f64>,
    targets: RSlice<'_, TensorId>,
) -> R<()> {
    guarded("elementwise_update", || {
        elementwise::update(&program, &inputs, &scalars, &targets)
    })
}

extern "C" fn packed_positions(input: TensorId) -> R<ROption<TensorId>> {
    guarded("packed_positions", || Ok(packed::positions(input)?.into()))
}

fn build_ext() -> OpTableExtRef {
    OpTableExt {
        sign,
        rsqrt,
        clamp,
        select,
        compare,
        reduce_all,
        scalar,
        elementwise_update,
        packed_positions,
    }
    .leak_into_prefix()
}

fn build() -> OpTableRef {
    OpTable {
        release,
        retain,
        shape,
        dtype,
        from_f32,
        from_u32,
        full,
        arange,
        to_vec_f32,
        to_vec_u32,
        to_scalar,
        matmul,
        add,
        sub,
        mul,
        div,
        maximum,
        minimum,
        eq,
        affine,
        powf,
        neg,
        exp,
        log,
        sqrt,
        sqr,
        recip,
        abs,
        tanh,
        gelu,
        silu,
        relu,
        sum,
        mean,
        max,
        argmax,
        reshape,
        transpose,
        permute,
        narrow,
        cat,
        contiguous,
        detach,
        to_dtype,
        embedding,
        masked_fill,
        causal_mask,
        softmax,
        log_softmax,
        layer_norm,
        rms_norm,
        rotary,
        dropout,
        cross_entropy,
        attention,
        backward,
        grad,
        zero_grad,
        adamw_update,
        assign,
        ext: build_ext(),
    }
    .leak_into_prefix()
}

static TABLE: OnceLock<OpTableRef> = OnceLock::new();

pub(crate) fn install() {
    codex_plugin_api::ops::install_ops(table());
}

/// The host's op table (built on first use), for handing to native plugins.
pub(crate) fn table() -> OpTableRef {
    *TABLE.get_or_init(build)
}
