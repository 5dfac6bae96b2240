//! A fake host for unit tests: a parameter store and an op table that compute nothing and
//! record every declaration and op call as one line of a trace.
//!
//! What a block guarantees is exactly this trace — which parameters it declares, by which name,
//! shape, role and initialiser, in which order, and which ops its `forward` calls on which
//! tensors — so the tests compare traces with [`check`]. Tensors are named: a declared
//! parameter by its full name, a test input by the name given to [`input`], an op's result
//! `%1`, `%2`, ... in call order. The state is per thread (the test harness runs each test on
//! a thread of its own); [`trace`] starts the numbering of results and the trace afresh.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Once;

use codex_plugin_api::abi_stable::prefix_type::PrefixTypeTrait;
use codex_plugin_api::abi_stable::sabi_trait::TD_Opaque;
use codex_plugin_api::abi_stable::std_types::{ROption, RResult, RSlice, RStr, RVec};
use codex_plugin_api::elementwise::ElemInstr;
use codex_plugin_api::params::{TensorStore, TensorStoreRef, TensorStore_TO};
use codex_plugin_api::tensor::{AdamWHyper, CmpOp, CrossEntropyIds, ReduceOp, ScalarOp};
use codex_plugin_api::{
    DType, GeluForm, Init, OpTable, OpTableExt, ParamRole, PluginError, Result, Store, Tensor,
    TensorId,
};

type R<T> = RResult<T, PluginError>;
type T = TensorId;

#[derive(Default)]
struct State {
    next_id: u64,
    results: u64,
    names: HashMap<u64, String>,
    lines: Vec<String>,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

fn with<V>(f: impl FnOnce(&mut State) -> V) -> V {
    STATE.with(|s| f(&mut s.borrow_mut()))
}

/// A new id called `name`.
fn named(name: String) -> TensorId {
    with(|s| {
        s.next_id += 1;
        s.names.insert(s.next_id, name);
        TensorId(s.next_id)
    })
}

fn name(id: T) -> String {
    with(|s| s.names.get(&id.0).cloned()).unwrap_or_else(|| format!("#{}", id.0))
}

fn record(line: String) {
    with(|s| s.lines.push(line));
}

/// Record `op(args)` and return a fresh result, named `%n`.
fn op(op: &str, args: String) -> R<T> {
    let result = with(|s| {
        s.results += 1;
        format!("%{}", s.results)
    });
    record(format!("{op}({args}) -> {result}"));
    RResult::ROk(named(result))
}

fn refused<V>(op: &str) -> R<V> {
    RResult::RErr(PluginError::new(format!(
        "{op}: not offered by the test host"
    )))
}

fn list<V: std::fmt::Debug>(values: RSlice<'_, V>) -> String {
    format!("{:?}", values.as_slice())
}

extern "C" fn release(_: T) {}
extern "C" fn retain(x: T) -> T {
    named(name(x))
}
extern "C" fn shape(_: T) -> R<RVec<usize>> {
    refused("shape")
}
extern "C" fn dtype(_: T) -> R<DType> {
    refused("dtype")
}
extern "C" fn from_f32(
    data: RSlice<'_, f32>,
    shape: RSlice<'_, usize>,
    dtype: DType,
    like: T,
) -> R<T> {
    op(
        "from_f32",
        format!(
            "{} values, {}, {dtype:?}, like {}",
            data.len(),
            list(shape),
            name(like)
        ),
    )
}
extern "C" fn from_u32(_: RSlice<'_, u32>, _: RSlice<'_, usize>, _: T) -> R<T> {
    refused("from_u32")
}
extern "C" fn full(_: RSlice<'_, usize>, _: f64, _: DType, _: T) -> R<T> {
    refused("full")
}
extern "C" fn arange(_: u32, _: u32, _: T) -> R<T> {
    refused("arange")
}
extern "C" fn to_vec_f32(_: T) -> R<RVec<f32>> {
    refused("to_vec_f32")
}
extern "C" fn to_vec_u32(_: T) -> R<RVec<u32>> {
    refused("to_vec_u32")
}
extern "C" fn to_scalar(_: T) -> R<f64> {
    refused("to_scalar")
}

macro_rules! unary {
    ($($name:ident),*) => {$(
        extern "C" fn $name(x: T) -> R<T> {
            op(stringify!($name), name(x))
        }
    )*};
}
macro_rules! binary {
    ($($name:ident),*) => {$(
        extern "C" fn $name(a: T, b: T) -> R<T> {
            op(stringify!($name), format!("{}, {}", name(a), name(b)))
        }
    )*};
}
unary!(neg, exp, log, sqrt, sqr, recip, abs, tanh, silu, relu, contiguous, detach, sign, rsqrt);
binary!(matmul, add, sub, mul, div, maximum, minimum, eq, embedding);

extern "C" fn affine(x: T, mul: f64, add: f64) -> R<T> {
    op("affine", format!("{}, {mul}, {add}", name(x)))
}
extern "C" fn powf(x: T, e: f64) -> R<T> {
    op("powf", format!("{}, {e}", name(x)))
}
extern "C" fn gelu(x: T, form: GeluForm) -> R<T> {
    op("gelu", format!("{}, {form:?}", name(x)))
}
extern "C" fn sum(_: T, _: RSlice<'_, usize>, _: bool) -> R<T> {
    refused("sum")
}
extern "C" fn mean(_: T, _: RSlice<'_, usize>, _: bool) -> R<T> {
    refused("mean")
}
extern "C" fn max(_: T, _: RSlice<'_, usize>, _: bool) -> R<T> {
    refused("max")
}
extern "C" fn argmax(_: T, _: usize) -> R<T> {
    refused("argmax")
}
extern "C" fn reshape(x: T, shape: RSlice<'_, usize>) -> R<T> {
    op("reshape", format!("{}, {}", name(x), list(shape)))
}
extern "C" fn transpose(x: T, d1: usize, d2: usize) -> R<T> {
    op("transpose", format!("{}, {d1}, {d2}", name(x)))
}
extern "C" fn permute(x: T, dims: RSlice<'_, usize>) -> R<T> {
    op("permute", format!("{}, {}", name(x), list(dims)))
}
extern "C" fn narrow(x: T, dim: usize, start: usize, len: usize) -> R<T> {
    op("narrow", format!("{}, {dim}, {start}, {len}", name(x)))
}
extern "C" fn cat(xs: RSlice<'_, T>, dim: usize) -> R<T> {
    let names: Vec<String> = xs.iter().map(|&x| name(x)).collect();
    op("cat", format!("[{}], {dim}", names.join(", ")))
}
extern "C" fn to_dtype(_: T, _: DType) -> R<T> {
    refused("to_dtype")
}
extern "C" fn masked_fill(x: T, mask: T, value: f64) -> R<T> {
    op(
        "masked_fill",
        format!("{}, {}, {value}", name(x), name(mask)),
    )
}
extern "C" fn causal_mask(_: usize, _: T) -> R<T> {
    refused("causal_mask")
}
extern "C" fn softmax(x: T, dim: usize) -> R<T> {
    op("softmax", format!("{}, {dim}", name(x)))
}
extern "C" fn log_softmax(_: T, _: usize) -> R<T> {
    refused("log_softmax")
}
extern "C" fn layer_norm(x: T, w: T, b: T, eps: f64) -> R<T> {
    op(
        "layer_norm",
        format!("{}, {}, {}, {eps}", name(x), name(w), name(b)),
    )
}
extern "C" fn rms_norm(x: T, w: T, eps: f64) -> R<T> {
    op("rms_norm", format!("{}, {}, {eps}", name(x), name(w)))
}
extern "C" fn rotary(x: T, cos: T, sin: T) -> R<T> {
    op(
        "rotary",
        format!("{}, {}, {}", name(x), name(cos), name(sin)),
    )
}
extern "C" fn dropout(x: T, p: f64, seed: u64) -> R<T> {
    op("dropout", format!("{}, {p}, {seed:#x}", name(x)))
}
extern "C" fn cross_entropy(_: T, _: T, _: u32) -> R<CrossEntropyIds> {
    refused("cross_entropy")
}
extern "C" fn attention(q: T, k: T, v: T, causal: bool, scale: f64) -> R<T> {
    op(
        "attention",
        format!("{}, {}, {}, {causal}, {scale}", name(q), name(k), name(v)),
    )
}
extern "C" fn backward(_: T) -> R<()> {
    refused("backward")
}
extern "C" fn grad(_: T) -> R<ROption<T>> {
    refused("grad")
}
extern "C" fn zero_grad(_: T) -> R<()> {
    refused("zero_grad")
}
extern "C" fn adamw_update(_: T, _: T, _: T, _: T, _: AdamWHyper) -> R<()> {
    refused("adamw_update")
}
extern "C" fn assign(_: T, _: T) -> R<()> {
    refused("assign")
}

extern "C" fn clamp(x: T, min: f64, max: f64) -> R<T> {
    op("clamp", format!("{}, {min}, {max}", name(x)))
}
extern "C" fn select(mask: T, a: T, b: T) -> R<T> {
    op(
        "select",
        format!("{}, {}, {}", name(mask), name(a), name(b)),
    )
}
extern "C" fn compare(a: T, b: T, cmp: CmpOp) -> R<T> {
    op("compare", format!("{}, {}, {cmp:?}", name(a), name(b)))
}
extern "C" fn reduce_all(x: T, reduce: ReduceOp) -> R<T> {
    op("reduce_all", format!("{}, {reduce:?}", name(x)))
}
extern "C" fn scalar(x: T, s_op: ScalarOp, s: f64) -> R<T> {
    op("scalar", format!("{}, {s_op:?}, {s}", name(x)))
}
extern "C" fn elementwise_update(
    _: RSlice<'_, ElemInstr>,
    _: RSlice<'_, T>,
    _: RSlice<'_, f64>,
    _: RSlice<'_, T>,
) -> R<()> {
    refused("elementwise_update")
}

/// The input of packed rows, for tests: an input whose name starts with `packed`.
extern "C" fn packed_positions(input: T) -> R<ROption<T>> {
    let input = name(input);
    if !input.starts_with("packed") {
        record(format!("packed_positions({input}) -> none"));
        return RResult::ROk(ROption::RNone);
    }
    match op("packed_positions", input) {
        RResult::ROk(positions) => RResult::ROk(ROption::RSome(positions)),
        RResult::RErr(e) => RResult::RErr(e),
    }
}

fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let table = OpTable {
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
            ext: OpTableExt {
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
            .leak_into_prefix(),
        }
        .leak_into_prefix();
        codex_plugin_api::ops::install_ops(table);
    });
}

/// The store side: declarations become trace lines and named tensors.
struct FakeStore;

impl TensorStore for FakeStore {
    fn declare_param(
        &mut self,
        name: RStr<'_>,
        shape: RSlice<'_, usize>,
        role: ParamRole,
        init: Init,
    ) -> R<TensorId> {
        record(format!(
            "param {name} {} {} {init:?}",
            list(shape),
            role.as_str()
        ));
        RResult::ROk(named(name.to_string()))
    }

    fn declare_state(
        &mut self,
        _: RStr<'_>,
        _: RSlice<'_, usize>,
        _: DType,
        _: Init,
    ) -> R<TensorId> {
        refused("declare_state")
    }

    fn params(&self) -> RVec<codex_plugin_api::params::ParamInfoAbi> {
        RVec::new()
    }
}

/// A test input named `name` (no data: the fake host computes nothing).
pub(crate) fn input(name: &str) -> Tensor {
    install();
    Tensor::from_id(named(name.to_string()))
}

/// Run `f` against a fresh fake host and return its trace, one line per declaration or op.
pub(crate) fn trace(f: impl FnOnce(&mut Store<'_, '_>) -> Result<()>) -> String {
    install();
    with(|s| {
        s.results = 0;
        s.lines.clear();
    });
    let mut fake = FakeStore;
    let mut abi: TensorStoreRef<'_> = TensorStore_TO::from_ptr(&mut fake, TD_Opaque);
    let mut store = Store::new(&mut abi);
    if let Err(e) = f(&mut store) {
        record(format!("error: {e}"));
    }
    let lines = with(|s| std::mem::take(&mut s.lines));
    lines.iter().fold(String::new(), |mut out, line| {
        let _ = writeln!(out, "{line}");
        out
    })
}

/// Compare a trace with the expected one; leading indentation of `expected` is ignored.
pub(crate) fn check(actual: &str, expected: &str) {
    let expected: String = expected
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .fold(String::new(), |mut out, line| {
            let _ = writeln!(out, "{line}");
            out
        });
    assert!(
        actual == expected,
        "trace differs\n--- expected\n{expected}--- actual\n{actual}"
    );
}
