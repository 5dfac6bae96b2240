//! The host's op table against candle itself, op by op, values and gradients.
//!
//! Each op runs twice: through plugin-API handles on parameters declared in a `ParamStore`
//! (gradients read back from the slots that `backward` fills), and written directly in candle
//! on `Var`s holding the same values (gradients from candle's `backward`). The fusable ops and
//! the activations are also checked against central finite differences in f64, which is what
//! catches a backward that is wrong in candle itself. The rest covers the contracts around the
//! ops: gradient slots, `assign`, errors instead of panics, dropout masks, initialisation,
//! checkpoints and handle leaks.

use codex_engine::candle::{DType as CD, Device, Tensor as CT, Var, D};
use codex_engine::{self as engine, ParamStore, TensorGroup};
use codex_plugin_api::{ops, DType, GeluForm, Init, ParamRole, Tensor};

type ApiResult<T> = codex_plugin_api::Result<T>;
type CandleResult<T> = codex_engine::candle::Result<T>;

/// Deterministic, irregular test values in about [-2, 2].
fn values(n: usize, salt: f32) -> Vec<f32> {
    (0..n)
        .map(|i| (i as f32 * 0.731 + salt).sin() * 1.7 + (i as f32 * 0.113 + salt).cos() * 0.4)
        .collect()
}

/// An input of a checked op: its shape, and whether its values must be positive (log, sqrt, ...).
#[derive(Clone, Copy)]
struct Spec<'a> {
    shape: &'a [usize],
    positive: bool,
}

fn inp(shape: &[usize]) -> Spec<'_> {
    Spec {
        shape,
        positive: false,
    }
}

fn pos(shape: &[usize]) -> Spec<'_> {
    Spec {
        shape,
        positive: true,
    }
}

fn spec_values(spec: Spec<'_>, salt: f32) -> Vec<f32> {
    let n = spec.shape.iter().product();
    let v = values(n, salt);
    if spec.positive {
        v.into_iter().map(|x| x.abs() + 0.5).collect()
    } else {
        v
    }
}

fn ct(spec: Spec<'_>, salt: f32, dtype: CD) -> CT {
    CT::from_vec(spec_values(spec, salt), spec.shape, &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .unwrap()
}

/// A handle to a plain candle tensor.
fn handle(t: &CT) -> Tensor {
    engine::install();
    Tensor::from_id(engine::insert(t.clone()))
}

fn candle(t: &Tensor) -> CT {
    engine::get(t.id()).unwrap()
}

fn all_dims(t: &Tensor) -> Vec<usize> {
    (0..t.shape().unwrap().len()).collect()
}

/// `|got - want| <= tol * (1 + |want|)` element-wise, same shape.
fn assert_close(what: &str, got: &CT, want: &CT, tol: f64) {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes differ");
    let g: Vec<f64> = got
        .flatten_all()
        .unwrap()
        .to_dtype(CD::F64)
        .unwrap()
        .to_vec1()
        .unwrap();
    let w: Vec<f64> = want
        .flatten_all()
        .unwrap()
        .to_dtype(CD::F64)
        .unwrap()
        .to_vec1()
        .unwrap();
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let same_special = (a.is_nan() && b.is_nan()) || a == b;
        assert!(
            same_special || (a - b).abs() <= tol * (1.0 + b.abs()),
            "{what}: element {i} is {a}, expected {b} (tolerance {tol})"
        );
    }
}

/// The weighting that turns an output into a scalar loss, so every output element gets its
/// own gradient.
fn weights(shape: &[usize], dtype: CD) -> CT {
    let n = shape.iter().product();
    CT::from_vec(values(n, 0.37), shape, &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .unwrap()
}

/// Compare `via_handles` (on store parameters) with `direct` (on candle `Var`s): the values,
/// and the gradients of Σ out·w into every input.
fn check(
    name: &str,
    specs: &[Spec<'_>],
    via_handles: impl Fn(&[Tensor]) -> ApiResult<Tensor>,
    direct: impl Fn(&[CT]) -> CandleResult<CT>,
) {
    check_impl(name, specs, true, via_handles, direct)
}

/// [`check`] for ops without a gradient (integer outputs, comparisons).
fn check_values(
    name: &str,
    specs: &[Spec<'_>],
    via_handles: impl Fn(&[Tensor]) -> ApiResult<Tensor>,
    direct: impl Fn(&[CT]) -> CandleResult<CT>,
) {
    check_impl(name, specs, false, via_handles, direct)
}

fn check_impl(
    name: &str,
    specs: &[Spec<'_>],
    grads: bool,
    via_handles: impl Fn(&[Tensor]) -> ApiResult<Tensor>,
    direct: impl Fn(&[CT]) -> CandleResult<CT>,
) {
    engine::install();
    let mut store = ParamStore::new(Device::Cpu, 11);
    let mut params = Vec::new();
    let mut vars = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let id = store
            .declare_param(
                &format!("{name}.in{i}"),
                spec.shape,
                ParamRole::Weight,
                Init::Zeros,
            )
            .unwrap();
        let p = Tensor::from_id(id);
        let v = ct(*spec, i as f32 * 1.3, CD::F32);
        p.assign(&handle(&v)).unwrap();
        vars.push(Var::from_tensor(&v).unwrap());
        params.push(p);
    }
    let out = via_handles(&params).unwrap_or_else(|e| panic!("{name}: {e}"));
    let inputs: Vec<CT> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let want = direct(&inputs).unwrap_or_else(|e| panic!("{name} in candle: {e}"));
    let got = candle(&out);
    assert_eq!(got.dtype(), want.dtype(), "{name}: dtypes differ");
    assert_close(&format!("{name} values"), &got, &want, 1e-6);
    if !grads {
        return;
    }
    let w = weights(want.dims(), want.dtype());
    let loss = out.mul(&handle(&w)).unwrap();
    let loss = loss.sum(&all_dims(&loss), false).unwrap();
    loss.backward().unwrap();
    let want_grads = (want * &w).unwrap().sum_all().unwrap().backward().unwrap();
    for (i, (p, v)) in params.iter().zip(&vars).enumerate() {
        let got = p.grad().unwrap().map(|g| candle(&g));
        let want = want_grads.get(v).cloned();
        match (got, want) {
            (Some(g), Some(w)) => {
                assert_close(&format!("{name} gradient of input {i}"), &g, &w, 1e-5)
            }
            (None, None) => {}
            (g, w) => panic!(
                "{name}: input {i} has a gradient through handles: {}, in candle: {}",
                g.is_some(),
                w.is_some()
            ),
        }
    }
}

/// Central finite differences in f64 against the analytic gradient of Σ f(inputs)·w.
fn fd_check(
    name: &str,
    specs: &[Spec<'_>],
    h: f64,
    tol: f64,
    f: impl Fn(&[Tensor]) -> ApiResult<Tensor>,
) {
    engine::install();
    let base: Vec<CT> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| ct(*s, i as f32 * 1.3, CD::F64))
        .collect();
    let loss_of = |inputs: &[CT]| -> (CT, f64) {
        let handles: Vec<Tensor> = inputs.iter().map(handle).collect();
        let out = candle(&f(&handles).unwrap_or_else(|e| panic!("{name}: {e}")));
        let out = out.to_dtype(CD::F64).unwrap();
        let loss = (&out * weights(out.dims(), CD::F64))
            .unwrap()
            .sum_all()
            .unwrap();
        let value = loss.to_scalar::<f64>().unwrap();
        (loss, value)
    };
    let vars: Vec<Var> = base.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let var_inputs: Vec<CT> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let (loss, _) = loss_of(&var_inputs);
    let grads = loss.backward().unwrap();
    for (i, var) in vars.iter().enumerate() {
        let analytic: Vec<f64> = grads
            .get(var)
            .unwrap_or_else(|| panic!("{name}: input {i} got no gradient"))
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let flat: Vec<f64> = base[i].flatten_all().unwrap().to_vec1().unwrap();
        for j in 0..flat.len() {
            let at = |delta: f64| {
                let mut v = flat.clone();
                v[j] += delta;
                let mut inputs = base.clone();
                inputs[i] = CT::from_vec(v, base[i].dims(), &Device::Cpu).unwrap();
                loss_of(&inputs).1
            };
            let numeric = (at(h) - at(-h)) / (2.0 * h);
            assert!(
                (analytic[j] - numeric).abs() <= tol * (1.0 + numeric.abs()),
                "{name}: d/d input {i}[{j}] is {} analytically, {numeric} numerically",
                analytic[j]
            );
        }
    }
}

fn u32_handle(data: &[u32], shape: &[usize]) -> Tensor {
    handle(&CT::from_vec(data.to_vec(), shape, &Device::Cpu).unwrap())
}

fn err_of<T: std::fmt::Debug>(r: ApiResult<T>) -> String {
    r.expect_err("expected an error").message().to_string()
}

// -- element-wise, matmul, reductions ------------------------------------------------------------

#[test]
fn binary_ops_broadcast_like_candle() {
    let (a, b) = (inp(&[2, 3, 4]), inp(&[3, 1]));
    check(
        "add",
        &[a, b],
        |x| x[0].add(&x[1]),
        |x| x[0].broadcast_add(&x[1]),
    );
    check(
        "sub",
        &[a, b],
        |x| x[0].sub(&x[1]),
        |x| x[0].broadcast_sub(&x[1]),
    );
    check(
        "mul",
        &[a, b],
        |x| x[0].mul(&x[1]),
        |x| x[0].broadcast_mul(&x[1]),
    );
    check(
        "div",
        &[a, pos(&[3, 1])],
        |x| x[0].div(&x[1]),
        |x| x[0].broadcast_div(&x[1]),
    );
    check(
        "maximum",
        &[a, b],
        |x| x[0].maximum(&x[1]),
        |x| x[0].broadcast_maximum(&x[1]),
    );
    check(
        "minimum",
        &[a, b],
        |x| x[0].minimum(&x[1]),
        |x| x[0].broadcast_minimum(&x[1]),
    );
    check_values(
        "eq",
        &[a, a],
        |x| x[0].eq(&x[1]),
        |x| x[0].broadcast_eq(&x[1]),
    );
    check_values("eq self", &[a], |x| x[0].eq(&x[0]), |x| x[0].eq(&x[0]));
}

#[test]
fn unary_ops_match_candle() {
    let x = inp(&[3, 5]);
    let p = pos(&[3, 5]);
    check("neg", &[x], |x| x[0].neg(), |x| x[0].neg());
    check("exp", &[x], |x| x[0].exp(), |x| x[0].exp());
    check("log", &[p], |x| x[0].log(), |x| x[0].log());
    check("sqrt", &[p], |x| x[0].sqrt(), |x| x[0].sqrt());
    check("sqr", &[x], |x| x[0].sqr(), |x| x[0].sqr());
    check("recip", &[p], |x| x[0].recip(), |x| x[0].recip());
    check("abs", &[x], |x| x[0].abs(), |x| x[0].abs());
    check("tanh", &[x], |x| x[0].tanh(), |x| x[0].tanh());
    check(
        "affine",
        &[x],
        |x| x[0].affine(-1.5, 0.25),
        |x| x[0].affine(-1.5, 0.25),
    );
    check("powf", &[p], |x| x[0].powf(1.7), |x| x[0].powf(1.7));
    check("silu", &[x], |x| x[0].silu(), |x| x[0].silu());
    check("relu", &[x], |x| x[0].relu(), |x| x[0].relu());
    check(
        "gelu erf",
        &[x],
        |x| x[0].gelu(GeluForm::Erf),
        |x| x[0].gelu_erf(),
    );
    check(
        "gelu tanh",
        &[x],
        |x| x[0].gelu(GeluForm::Tanh),
        |x| x[0].gelu(),
    );
}

#[test]
fn matmul_broadcasts_batch_dims_and_accepts_strided_inputs() {
    check(
        "matmul 2d",
        &[inp(&[3, 4]), inp(&[4, 2])],
        |x| x[0].matmul(&x[1]),
        |x| x[0].matmul(&x[1]),
    );
    check(
        "matmul batched",
        &[inp(&[2, 1, 3, 4]), inp(&[5, 4, 2])],
        |x| x[0].matmul(&x[1]),
        |x| x[0].broadcast_matmul(&x[1]),
    );
    check(
        "matmul 2d rhs",
        &[inp(&[2, 3, 4]), inp(&[4, 5])],
        |x| x[0].matmul(&x[1]),
        |x| x[0].broadcast_matmul(&x[1]),
    );
    check(
        "matmul transposed rhs",
        &[inp(&[2, 3, 4]), inp(&[2, 5, 4])],
        |x| x[0].matmul(&x[1].transpose(1, 2)?),
        |x| x[0].matmul(&x[1].transpose(1, 2)?),
    );
    check(
        "matmul permuted batch",
        &[inp(&[3, 2, 4, 5]), inp(&[2, 3, 5, 4])],
        |x| x[0].permute(&[1, 0, 2, 3])?.matmul(&x[1]),
        |x| x[0].permute((1, 0, 2, 3))?.contiguous()?.matmul(&x[1]),
    );
}

#[test]
fn reductions_over_several_dims() {
    let x = inp(&[2, 3, 4]);
    for keep in [false, true] {
        let sum = |x: &CT, d: &[usize]| if keep { x.sum_keepdim(d) } else { x.sum(d) };
        let mean = |x: &CT, d: &[usize]| if keep { x.mean_keepdim(d) } else { x.mean(d) };
        check(
            "sum 0,2",
            &[x],
            |x| x[0].sum(&[0, 2], keep),
            |x| sum(&x[0], &[0, 2]),
        );
        check(
            "sum 1",
            &[x],
            |x| x[0].sum(&[1], keep),
            |x| sum(&x[0], &[1]),
        );
        check(
            "mean 2,0",
            &[x],
            |x| x[0].mean(&[2, 0], keep),
            |x| mean(&x[0], &[0, 2]),
        );
        check(
            "mean all",
            &[x],
            |x| x[0].mean(&[0, 1, 2], keep),
            |x| mean(&x[0], &[0, 1, 2]),
        );
        check(
            "max 0,2",
            &[x],
            |x| x[0].max(&[0, 2], keep),
            |x| {
                let m = x[0].max_keepdim(0)?.max_keepdim(2)?;
                if keep {
                    Ok(m)
                } else {
                    m.squeeze(2)?.squeeze(0)
                }
            },
        );
    }
    check_values("argmax", &[x], |x| x[0].argmax(1), |x| x[0].argmax(1));
}

// -- layout and creation --------------------------------------------------------------------------

#[test]
fn layout_ops_match_candle() {
    let x = inp(&[2, 3, 4]);
    check(
        "reshape",
        &[x],
        |x| x[0].reshape(&[6, 4]),
        |x| x[0].reshape((6, 4)),
    );
    check(
        "transpose",
        &[x],
        |x| x[0].transpose(0, 2),
        |x| x[0].transpose(0, 2),
    );
    check(
        "permute",
        &[x],
        |x| x[0].permute(&[2, 0, 1]),
        |x| x[0].permute((2, 0, 1)),
    );
    check(
        "narrow",
        &[x],
        |x| x[0].narrow(2, 1, 2),
        |x| x[0].narrow(2, 1, 2),
    );
    check(
        "cat",
        &[x, inp(&[2, 1, 4])],
        |x| Tensor::cat(&[&x[0], &x[1], &x[0]], 1),
        |x| CT::cat(&[&x[0], &x[1], &x[0]], 1),
    );
    check(
        "contiguous",
        &[x],
        |x| x[0].transpose(0, 1)?.contiguous(),
        |x| x[0].transpose(0, 1)?.contiguous(),
    );
    check(
        "detach",
        &[x],
        |x| x[0].detach()?.add(&x[0]),
        |x| x[0].detach().add(&x[0]),
    );
    check(
        "to_dtype",
        &[x],
        |x| x[0].to_dtype(DType::F64),
        |x| x[0].to_dtype(CD::F64),
    );
    check_values(
        "to_dtype u32",
        &[pos(&[5])],
        |x| x[0].to_dtype(DType::U32),
        |x| x[0].to_dtype(CD::U32),
    );
}

#[test]
fn creation_and_read_back() {
    let like = handle(&CT::zeros(1, CD::F32, &Device::Cpu).unwrap());
    let t = Tensor::from_f32(&[1.0, 2.5, -3.0, 4.0], &[2, 2], DType::F32, &like).unwrap();
    assert_eq!(t.shape().unwrap(), vec![2, 2]);
    assert_eq!(t.dtype().unwrap(), DType::F32);
    assert_eq!(t.to_vec_f32().unwrap(), vec![1.0, 2.5, -3.0, 4.0]);
    let h = Tensor::from_f32(&[1.0, 2.5], &[2], DType::BF16, &like).unwrap();
    assert_eq!(h.dtype().unwrap(), DType::BF16);
    assert_eq!(h.to_vec_f32().unwrap(), vec![1.0, 2.5]);
    let ids = Tensor::from_u32(&[3, 1, 4], &[3], &like).unwrap();
    assert_eq!(
        (ids.dtype().unwrap(), ids.to_vec_u32().unwrap()),
        (DType::U32, vec![3, 1, 4])
    );
    let f = Tensor::full(&[2, 3], 1.5, DType::F64, &like).unwrap();
    assert_eq!(
        (f.dtype().unwrap(), f.to_vec_f32().unwrap()),
        (DType::F64, vec![1.5; 6])
    );
    let f = Tensor::full(&[2], 7.0, DType::U8, &like).unwrap();
    assert_eq!(
        (f.dtype().unwrap(), f.to_vec_u32().unwrap()),
        (DType::U8, vec![7, 7])
    );
    assert_eq!(
        Tensor::arange(2, 6, &like).unwrap().to_vec_u32().unwrap(),
        vec![2, 3, 4, 5]
    );
    let s = t.sum(&[0, 1], false).unwrap();
    assert!((s.to_scalar().unwrap() - 4.5).abs() < 1e-12);
    assert!(err_of(t.to_scalar()).starts_with("to_scalar: "));
    assert!(err_of(Tensor::from_f32(&[1.0], &[2, 2], DType::F32, &like)).starts_with("from_f32: "));
    let again = Tensor::retain(t.id());
    drop(t);
    assert_eq!(
        again.to_vec_f32().unwrap(),
        vec![1.0, 2.5, -3.0, 4.0],
        "retain keeps the tensor alive"
    );
}

// -- neural-network ops -------------------------------------------------------------------------

#[test]
fn embedding_picks_rows_with_the_ids_shape() {
    let ids = [2u32, 0, 4, 4, 1, 3];
    check(
        "embedding",
        &[inp(&[5, 3])],
        |x| x[0].embedding(&u32_handle(&ids, &[2, 3])),
        |x| {
            x[0].index_select(&CT::new(&ids, &Device::Cpu)?, 0)?
                .reshape((2, 3, 3))
        },
    );
    let table = handle(&ct(inp(&[5, 3]), 0.0, CD::F32));
    let e = err_of(table.embedding(&u32_handle(&[5], &[1])));
    assert!(
        e.starts_with("embedding: ") && e.contains("out of range"),
        "{e}"
    );
}

#[test]
fn masks_and_masked_fill() {
    let like = handle(&CT::zeros(1, CD::F32, &Device::Cpu).unwrap());
    let m = Tensor::causal_mask(3, &like).unwrap();
    assert_eq!(m.dtype().unwrap(), DType::U8);
    assert_eq!(m.shape().unwrap(), vec![3, 3]);
    assert_eq!(m.to_vec_u32().unwrap(), vec![0, 1, 1, 0, 0, 1, 0, 0, 0]);
    let mask = CT::from_vec(vec![0u8, 1, 1, 0, 0, 1, 0, 0, 0], (3, 3), &Device::Cpu).unwrap();
    check(
        "masked_fill",
        &[inp(&[2, 3, 3])],
        |x| x[0].masked_fill(&Tensor::causal_mask(3, &x[0])?, -1e4),
        |x| {
            let m = mask.broadcast_as(x[0].shape())?;
            m.where_cond(&CT::full(-1e4f32, x[0].shape(), &Device::Cpu)?, &x[0])
        },
    );
}

fn softmax_ref(x: &CT, dim: usize) -> CandleResult<CT> {
    let e = x.broadcast_sub(&x.max_keepdim(dim)?)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(dim)?)
}

fn log_softmax_ref(x: &CT, dim: usize) -> CandleResult<CT> {
    let s = x.broadcast_sub(&x.max_keepdim(dim)?)?;
    s.broadcast_sub(&s.exp()?.sum_keepdim(dim)?.log()?)
}

#[test]
fn softmaxes_and_norms_match_candle() {
    let x = inp(&[2, 3, 5]);
    for dim in [1, 2] {
        check(
            "softmax",
            &[x],
            |x| x[0].softmax(dim),
            |x| softmax_ref(&x[0], dim),
        );
        check(
            "log_softmax",
            &[x],
            |x| x[0].log_softmax(dim),
            |x| log_softmax_ref(&x[0], dim),
        );
    }
    let v = inp(&[5]);
    check(
        "layer_norm",
        &[x, v, v],
        |x| x[0].layer_norm(&x[1], &x[2], 1e-5),
        |x| {
            let c = x[0].broadcast_sub(&x[0].mean_keepdim(D::Minus1)?)?;
            let var = c.sqr()?.mean_keepdim(D::Minus1)?;
            c.broadcast_div(&(var + 1e-5)?.sqrt()?)?
                .broadcast_mul(&x[1])?
                .broadcast_add(&x[2])
        },
    );
    check(
        "rms_norm",
        &[x, v],
        |x| x[0].rms_norm(&x[1], 1e-6),
        |x| {
            let ms = x[0].sqr()?.mean_keepdim(D::Minus1)?;
            x[0].broadcast_div(&(ms + 1e-6)?.sqrt()?)?
                .broadcast_mul(&x[1])
        },
    );
    let big = handle(&CT::new(&[[1000f32, 1001.0, 999.0]], &Device::Cpu).unwrap());
    let s = big.softmax(1).unwrap().to_vec_f32().unwrap();
    assert!(
        s.iter().all(|v| v.is_finite()),
        "softmax of large logits overflowed: {s:?}"
    );
    let e = err_of(handle(&ct(x, 0.0, CD::F32)).layer_norm(
        &handle(&ct(inp(&[4]), 0.0, CD::F32)),
        &handle(&ct(v, 0.0, CD::F32)),
        1e-5,
    ));
    assert!(e.starts_with("layer_norm: ") && e.contains("weight"), "{e}");
}

fn rotary_ref(x: &CT, cos: &CT, sin: &CT) -> CandleResult<CT> {
    let half = x.dim(3)? / 2;
    let cos = CT::cat(&[cos, cos], 1)?;
    let sin = CT::cat(&[sin, sin], 1)?;
    let rot = CT::cat(
        &[&x.narrow(3, half, half)?.neg()?, &x.narrow(3, 0, half)?],
        3,
    )?;
    x.broadcast_mul(&cos)? + rot.broadcast_mul(&sin)?
}

#[test]
fn rotary_rotates_half() {
    let specs = [inp(&[2, 3, 4, 6]), inp(&[4, 3]), inp(&[4, 3])];
    check(
        "rotary",
        &specs,
        |x| x[0].rotary(&x[1], &x[2]),
        |x| rotary_ref(&x[0], &x[1], &x[2]),
    );
    // Pair (i, i + d/2) rotates by the angle whose cosine and sine are given.
    let angle = 0.3f32;
    let x = handle(
        &CT::new(&[1f32, 0.0, 0.0, 1.0], &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 1, 4))
            .unwrap(),
    );
    let cos = handle(&CT::new(&[[angle.cos(), 1.0]], &Device::Cpu).unwrap());
    let sin = handle(&CT::new(&[[angle.sin(), 0.0]], &Device::Cpu).unwrap());
    let out = x.rotary(&cos, &sin).unwrap();
    let want = CT::new(&[angle.cos(), 0.0, angle.sin(), 1.0], &Device::Cpu)
        .unwrap()
        .reshape((1, 1, 1, 4))
        .unwrap();
    assert_close("rotary by hand", &candle(&out), &want, 1e-6);
    let e = err_of(x.rotary(&cos.narrow(1, 0, 1).unwrap(), &sin));
    assert!(e.starts_with("rotary: ") && e.contains("cos"), "{e}");
}

/// The ignore index used by the cross-entropy checks.
const IGNORE: u32 = u32::MAX;

#[test]
fn cross_entropy_sums_counts_and_ignores() {
    let targets = [2u32, IGNORE, 0, 4];
    let t = || u32_handle(&targets, &[4]);
    let reference = |x: &CT| -> CandleResult<(CT, f32, f32)> {
        let logp = log_softmax_ref(x, 1)?;
        let mut rows = Vec::new();
        let (mut tokens, mut correct) = (0.0, 0.0);
        let arg: Vec<u32> = x.argmax(1)?.to_vec1()?;
        for (i, &tg) in targets.iter().enumerate() {
            if tg != IGNORE {
                rows.push(logp.get(i)?.get(tg as usize)?.neg()?);
                tokens += 1.0;
                correct += f32::from(u8::from(arg[i] == tg));
            }
        }
        Ok((CT::stack(&rows, 0)?.sum_all()?, tokens, correct))
    };
    check(
        "cross_entropy",
        &[inp(&[4, 5])],
        |x| Ok(x[0].cross_entropy(&t(), IGNORE)?.loss_sum),
        |x| Ok(reference(&x[0])?.0),
    );
    let x = ct(inp(&[4, 5]), 0.0, CD::F32);
    let out = handle(&x).cross_entropy(&t(), IGNORE).unwrap();
    let (_, tokens, correct) = reference(&x).unwrap();
    assert_eq!(out.tokens.to_scalar().unwrap(), f64::from(tokens));
    assert_eq!(out.correct.to_scalar().unwrap(), f64::from(correct));
    assert_eq!(out.tokens.dtype().unwrap(), DType::F32);
    assert_eq!(out.loss_sum.dtype().unwrap(), DType::F32);

    // d loss_sum / d logits = softmax - one_hot(target) on counted rows, 0 on ignored ones.
    let var = Var::from_tensor(&x).unwrap();
    let loss = handle(var.as_tensor())
        .cross_entropy(&t(), IGNORE)
        .unwrap()
        .loss_sum;
    let g = candle(&loss)
        .backward()
        .unwrap()
        .get(&var)
        .cloned()
        .unwrap();
    let p: Vec<Vec<f32>> = softmax_ref(&x, 1).unwrap().to_vec2().unwrap();
    let want: Vec<f32> = (0..4)
        .flat_map(|i| {
            let p = p[i].clone();
            (0..5).map(move |j| match targets[i] {
                IGNORE => 0.0,
                tg => p[j] - f32::from(u8::from(tg as usize == j)),
            })
        })
        .collect();
    assert_close(
        "cross_entropy gradient",
        &g,
        &CT::from_vec(want, (4, 5), &Device::Cpu).unwrap(),
        1e-6,
    );

    let e = err_of(handle(&x).cross_entropy(&u32_handle(&[0, 1, 9, 0], &[4]), IGNORE));
    assert!(
        e.starts_with("cross_entropy: ") && e.contains("out of range"),
        "{e}"
    );
}

#[test]
fn gradients_match_finite_differences() {
    let x = inp(&[3, 4]);
    let v = inp(&[4]);
    fd_check("softmax", &[x], 1e-5, 1e-6, |x| x[0].softmax(1));
    fd_check("softmax dim 0", &[x], 1e-5, 1e-6, |x| x[0].softmax(0));
    fd_check("log_softmax", &[x], 1e-5, 1e-6, |x| x[0].log_softmax(1));
    fd_check("layer_norm", &[x, v, v], 1e-5, 1e-6, |x| {
        x[0].layer_norm(&x[1], &x[2], 1e-5)
    });
    fd_check("rms_norm", &[x, v], 1e-5, 1e-6, |x| {
        x[0].rms_norm(&x[1], 1e-6)
    });
    fd_check("gelu erf", &[x], 1e-5, 1e-7, |x| x[0].gelu(GeluForm::Erf));
    fd_check("gelu tanh", &[x], 1e-5, 1e-7, |x| x[0].gelu(GeluForm::Tanh));
    fd_check("silu", &[x], 1e-5, 1e-7, |x| x[0].silu());
    fd_check(
        "rotary",
        &[inp(&[1, 2, 3, 4]), inp(&[3, 2]), inp(&[3, 2])],
        1e-5,
        1e-7,
        |x| x[0].rotary(&x[1], &x[2]),
    );
    // loss_sum is an f32 by contract, so the differences are taken with a wider step.
    let targets = [1u32, IGNORE, 3];
    fd_check("cross_entropy", &[inp(&[3, 4])], 1e-2, 2e-3, |x| {
        Ok(x[0]
            .cross_entropy(&u32_handle(&targets, &[3]), IGNORE)?
            .loss_sum)
    });
}

/// The f64 composition (checked against finite differences above) and candle's single GELU op
/// (used for every other dtype) agree: forward values, and candle's own backward.
#[test]
fn gelu_f32_agrees_with_the_f64_composition() {
    for form in [GeluForm::Erf, GeluForm::Tanh] {
        let xs: Vec<f64> = (0..81).map(|i| -4.0 + 0.1 * f64::from(i)).collect();
        let run = |dtype: CD| {
            let x = CT::new(xs.as_slice(), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let var = Var::from_tensor(&x).unwrap();
            let y = candle(&handle(var.as_tensor()).gelu(form).unwrap());
            let g = y.sum_all().unwrap().backward().unwrap();
            let g = g.get(&var).unwrap().to_dtype(CD::F64).unwrap();
            (y.to_dtype(CD::F64).unwrap(), g)
        };
        let ((y32, g32), (y64, g64)) = (run(CD::F32), run(CD::F64));
        assert_close(&format!("gelu {form:?} f32 values"), &y32, &y64, 1e-6);
        assert_close(&format!("gelu {form:?} f32 gradient"), &g32, &g64, 2e-6);
    }
}

#[test]
fn dropout_masks_are_seeded() {
    let x = handle(&CT::ones((100, 100), CD::F32, &Device::Cpu).unwrap());
    let a = x.dropout(0.25, 7).unwrap().to_vec_f32().unwrap();
    let b = x.dropout(0.25, 7).unwrap().to_vec_f32().unwrap();
    let c = x.dropout(0.25, 8).unwrap().to_vec_f32().unwrap();
    assert_eq!(a, b, "same seed, same mask");
    assert_ne!(a, c, "another seed, another mask");
    assert!(
        a.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6),
        "kept values are scaled by 1/(1-p)"
    );
    let dropped = a.iter().filter(|&&v| v == 0.0).count();
    // 10 000 draws at p = 0.25: the count is 2500 ± 43 (one standard deviation).
    assert!(
        (2300..=2700).contains(&dropped),
        "dropped {dropped} of 10000 at p = 0.25"
    );
    assert_eq!(
        x.dropout(0.0, 7).unwrap().to_vec_f32().unwrap(),
        vec![1.0; 10_000]
    );
    // The mask is a function of the seed alone, on every machine: pin the start of seed 7's.
    let first: Vec<u8> = a[..16].iter().map(|&v| u8::from(v != 0.0)).collect();
    assert_eq!(first, [0, 0, 1, 1, 1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 1, 1]);
    assert!(err_of(x.dropout(1.5, 7)).starts_with("dropout: "));
    // Gradient of Σ dropout(x)·w is mask·w / (1 - p).
    check(
        "dropout",
        &[inp(&[4, 6])],
        |x| x[0].dropout(0.5, 3),
        |x| {
            let kept = candle(
                &handle(&CT::ones((4, 6), CD::F32, &Device::Cpu)?)
                    .dropout(0.5, 3)
                    .map_err(codex_engine::candle::Error::msg)?,
            );
            x[0].mul(&kept)
        },
    );
}

// -- autograd and in-place updates ----------------------------------------------------------------

fn store_with(names: &[(&str, &[usize])], seed: u64) -> (ParamStore, Vec<Tensor>) {
    engine::install();
    let mut store = ParamStore::new(Device::Cpu, seed);
    let params = names
        .iter()
        .map(|(n, s)| {
            Tensor::from_id(
                store
                    .declare_param(n, s, ParamRole::Weight, Init::Normal { std: 1.0 })
                    .unwrap(),
            )
        })
        .collect();
    (store, params)
}

#[test]
fn gradients_accumulate_until_zeroed() {
    let (_store, p) = store_with(&[("w", &[3, 2])], 5);
    let w = &p[0];
    assert!(
        w.grad().unwrap().is_none(),
        "a fresh parameter has an empty slot"
    );
    let loss1 = w.sqr().unwrap().sum(&[0, 1], false).unwrap();
    let loss2 = w.affine(3.0, 0.0).unwrap().sum(&[0, 1], false).unwrap();
    loss1.backward().unwrap();
    let g1 = candle(&w.grad().unwrap().unwrap());
    loss2.backward().unwrap();
    let g12 = candle(&w.grad().unwrap().unwrap());
    let wv = candle(w);
    assert_close("first gradient", &g1, &(&wv * 2.0).unwrap(), 1e-6);
    assert_close(
        "accumulated gradient",
        &g12,
        &((&wv * 2.0).unwrap() + 3.0).unwrap(),
        1e-6,
    );
    w.zero_grad().unwrap();
    assert!(w.grad().unwrap().is_none(), "zero_grad empties the slot");
    loss2.backward().unwrap();
    assert_close(
        "after zero_grad",
        &candle(&w.grad().unwrap().unwrap()),
        &CT::full(3f32, (3, 2), &Device::Cpu).unwrap(),
        1e-6,
    );
}

#[test]
fn frozen_parameters_get_no_gradient() {
    let (mut store, p) = store_with(&[("a", &[2]), ("b", &[2])], 5);
    store.set_trainable("b", false).unwrap();
    let infos = store.param_infos();
    assert_eq!(
        infos.iter().map(|i| i.trainable).collect::<Vec<_>>(),
        [true, false]
    );
    let loss = p[0].mul(&p[1]).unwrap().sum(&[0], false).unwrap();
    loss.backward().unwrap();
    assert!(p[0].grad().unwrap().is_some());
    assert!(p[1].grad().unwrap().is_none());
    assert!(store.set_trainable("nope", false).is_err());
}

#[test]
fn grad_and_assign_need_declared_tensors() {
    let plain = handle(&CT::zeros(2, CD::F32, &Device::Cpu).unwrap());
    assert!(err_of(plain.grad()).starts_with("grad: "));
    assert!(err_of(plain.zero_grad()).starts_with("zero_grad: "));
    assert!(err_of(plain.assign(&plain)).starts_with("assign: "));
    let e = err_of(
        plain
            .sum(&[0], false)
            .unwrap()
            .backward()
            .and_then(|_| plain.backward()),
    );
    assert!(
        e.starts_with("backward: ") && e.contains("one element"),
        "{e}"
    );
}

#[test]
fn assign_overwrites_in_place_and_checks_shapes() {
    let (mut store, p) = store_with(&[("w", &[2, 2])], 5);
    let s = Tensor::from_id(
        store
            .declare_state("w.m", &[2, 2], DType::BF16, Init::Zeros)
            .unwrap(),
    );
    let view = p[0].reshape(&[4]).unwrap();
    let v = handle(&CT::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap());
    p[0].assign(&v).unwrap();
    assert_eq!(p[0].to_vec_f32().unwrap(), [1.0, 2.0, 3.0, 4.0]);
    assert_eq!(
        view.to_vec_f32().unwrap(),
        [1.0, 2.0, 3.0, 4.0],
        "views see the update"
    );
    s.assign(&v).unwrap();
    assert_eq!(
        (s.dtype().unwrap(), s.to_vec_f32().unwrap()),
        (DType::BF16, vec![1.0, 2.0, 3.0, 4.0])
    );
    // A value computed from the target itself, or one of its views.
    p[0].assign(&p[0].affine(2.0, 0.0).unwrap()).unwrap();
    p[0].assign(&p[0].transpose(0, 1).unwrap()).unwrap();
    assert_eq!(p[0].to_vec_f32().unwrap(), [2.0, 6.0, 4.0, 8.0]);
    let copy = p[0].contiguous().unwrap();
    p[0].assign(&v).unwrap();
    assert_eq!(
        copy.to_vec_f32().unwrap(),
        [2.0, 6.0, 4.0, 8.0],
        "contiguous copies a declared tensor"
    );
    let e = err_of(p[0].assign(&handle(&CT::zeros(3, CD::F32, &Device::Cpu).unwrap())));
    assert!(
        e.starts_with("assign: ") && e.contains("[3]") && e.contains("[2, 2]"),
        "{e}"
    );
    assert!(
        err_of(s.grad()).starts_with("grad: "),
        "state has no gradient slot"
    );
}

// -- errors instead of panics --------------------------------------------------------------------

#[test]
fn unknown_handles_and_bad_shapes_are_errors() {
    engine::install();
    let t = handle(&CT::zeros((2, 3), CD::F32, &Device::Cpu).unwrap());
    let raw = t.id();
    drop(t);
    let r = (ops().exp())(raw)
        .into_result()
        .expect_err("released handle");
    assert!(
        r.message.starts_with("exp: unknown tensor handle") && !r.panicked,
        "{}",
        r.message
    );
    (ops().release())(raw);
    assert_eq!(
        (ops().retain())(raw).0,
        0,
        "retaining an unknown handle gives the null handle"
    );

    let a = handle(&CT::zeros((2, 3), CD::F32, &Device::Cpu).unwrap());
    let b = handle(&CT::zeros((4, 5), CD::F32, &Device::Cpu).unwrap());
    for (e, op) in [
        (err_of(a.matmul(&b)), "matmul: "),
        (err_of(a.add(&b)), "add: "),
        (err_of(a.reshape(&[5])), "reshape: "),
        (err_of(a.narrow(1, 2, 5)), "narrow: "),
        (err_of(a.transpose(0, 4)), "transpose: "),
        (err_of(a.permute(&[0, 0])), "permute: "),
        (err_of(a.sum(&[], false)), "sum: "),
        (err_of(a.mean(&[2], false)), "mean: "),
        (err_of(a.max(&[1, 1], true)), "max: "),
        (err_of(a.softmax(2)), "softmax: "),
        (err_of(Tensor::cat(&[&a, &b], 0)), "cat: "),
        (err_of(a.cross_entropy(&a, 0)), "cross_entropy: "),
        (err_of(a.embedding(&a)), "embedding: "),
        (err_of(a.masked_fill(&a, 0.0)), "masked_fill: "),
        (err_of(a.rotary(&a, &a)), "rotary: "),
    ] {
        assert!(
            e.starts_with(op),
            "expected an error starting with {op:?}, got {e:?}"
        );
    }
}

// -- the store ------------------------------------------------------------------------------------

fn bytes_of(store: &ParamStore, group: TensorGroup) -> Vec<(String, Vec<u8>)> {
    store
        .export(group)
        .unwrap()
        .into_iter()
        .map(|e| (e.name, e.bytes))
        .collect()
}

#[test]
fn init_is_reproducible_and_order_independent() {
    let (a, _) = store_with(&[("x", &[50]), ("y", &[3, 4])], 42);
    let (b, _) = store_with(&[("y", &[3, 4]), ("z", &[7]), ("x", &[50])], 42);
    let (c, _) = store_with(&[("x", &[50])], 43);
    let get = |s: &ParamStore, n: &str| {
        bytes_of(s, TensorGroup::Params)
            .into_iter()
            .find(|(k, _)| k == n)
            .unwrap()
            .1
    };
    assert_eq!(get(&a, "x"), get(&b, "x"));
    assert_eq!(get(&a, "y"), get(&b, "y"));
    assert_ne!(
        get(&a, "x"),
        get(&c, "x"),
        "another seed draws other values"
    );
    assert_ne!(
        get(&a, "x")[..8],
        get(&a, "y")[..8],
        "another name draws other values"
    );
    assert_eq!(
        a.param_infos()
            .iter()
            .map(|i| i.name.to_string())
            .collect::<Vec<_>>(),
        ["x", "y"]
    );

    let mut s = ParamStore::new(Device::Cpu, 1);
    let n = Tensor::from_id(
        s.declare_param(
            "n",
            &[20_000],
            ParamRole::Weight,
            Init::Normal { std: 0.02 },
        )
        .unwrap(),
    );
    let u = Tensor::from_id(
        s.declare_param("u", &[1000], ParamRole::Bias, Init::Uniform { bound: 0.5 })
            .unwrap(),
    );
    let o = Tensor::from_id(s.declare_state("o", &[3], DType::U32, Init::Ones).unwrap());
    let nv = n.to_vec_f32().unwrap();
    let mean = nv.iter().map(|&v| f64::from(v)).sum::<f64>() / nv.len() as f64;
    let std = (nv
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / nv.len() as f64)
        .sqrt();
    assert!(
        mean.abs() < 1e-3 && (std - 0.02).abs() < 1e-3,
        "normal(0, 0.02) drew mean {mean}, std {std}"
    );
    assert!(u.to_vec_f32().unwrap().iter().all(|v| v.abs() <= 0.5));
    assert_eq!(
        (o.dtype().unwrap(), o.to_vec_u32().unwrap()),
        (DType::U32, vec![1, 1, 1])
    );
    let e = s
        .declare_param("n", &[1], ParamRole::Weight, Init::Zeros)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`n`") && e.contains("already declared"), "{e}");
    for (i, bad) in [
        Init::Normal { std: -1.0 },
        Init::Normal { std: f64::NAN },
        Init::Uniform { bound: -0.5 },
        Init::Uniform {
            bound: f64::INFINITY,
        },
    ]
    .into_iter()
    .enumerate()
    {
        let e = s.declare_param(&format!("bad{i}"), &[1], ParamRole::Weight, bad);
        assert!(e.unwrap_err().to_string().contains(&format!("`bad{i}`")));
    }
}

#[test]
fn the_store_works_through_the_plugin_api() {
    let mut store = ParamStore::new(Device::Cpu, 3);
    let mut store_ref = store.as_tensor_store();
    let mut api = codex_plugin_api::Store::new(&mut store_ref);
    let w = api
        .pp("block")
        .param("weight", &[2, 3], ParamRole::Weight, Init::Ones)
        .unwrap();
    let m = api
        .state("adam.m", &[2, 3], DType::F32, Init::Zeros)
        .unwrap();
    let e = api
        .pp("block")
        .param("weight", &[1], ParamRole::Weight, Init::Ones)
        .unwrap_err();
    assert!(
        e.message().starts_with("declare_param: ") && e.message().contains("block.weight"),
        "{e}"
    );
    let infos = api.params();
    assert_eq!(infos.len(), 1);
    assert_eq!(
        (
            infos[0].name.as_str(),
            infos[0].shape.to_vec(),
            infos[0].role
        ),
        ("block.weight", vec![2, 3], ParamRole::Weight)
    );
    assert_eq!(w.to_vec_f32().unwrap(), vec![1.0; 6]);
    assert_eq!(m.to_vec_f32().unwrap(), vec![0.0; 6]);
    drop(store_ref);
    assert_eq!(store.named_state()[0].0, "adam.m");
}

#[test]
fn safetensors_round_trip_bitwise_and_mismatches_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let declare = |seed: u64| {
        let mut s = ParamStore::new(Device::Cpu, seed);
        s.declare_param(
            "emb",
            &[4, 3],
            ParamRole::Embedding,
            Init::Normal { std: 1.0 },
        )
        .map(|id| (ops().release())(id))
        .unwrap();
        s.declare_param("bias", &[3], ParamRole::Bias, Init::Uniform { bound: 1.0 })
            .map(|id| (ops().release())(id))
            .unwrap();
        s.declare_state("emb.v", &[4, 3], DType::BF16, Init::Normal { std: 1.0 })
            .map(|id| (ops().release())(id))
            .unwrap();
        s.declare_state("step", &[1], DType::I64, Init::Ones)
            .map(|id| (ops().release())(id))
            .unwrap();
        s
    };
    engine::install();
    let a = declare(1);
    let mut b = declare(2);
    let params = dir.path().join("model.safetensors");
    let state = dir.path().join("optimizer.safetensors");
    a.save_safetensors(&params, TensorGroup::Params).unwrap();
    a.save_safetensors(&state, TensorGroup::State).unwrap();
    assert_ne!(
        bytes_of(&a, TensorGroup::Params),
        bytes_of(&b, TensorGroup::Params)
    );
    b.load_safetensors(&params, TensorGroup::Params).unwrap();
    b.load_safetensors(&state, TensorGroup::State).unwrap();
    assert_eq!(
        bytes_of(&a, TensorGroup::Params),
        bytes_of(&b, TensorGroup::Params)
    );
    assert_eq!(
        bytes_of(&a, TensorGroup::State),
        bytes_of(&b, TensorGroup::State)
    );

    let mut other = ParamStore::new(Device::Cpu, 1);
    other
        .declare_param("emb", &[4, 4], ParamRole::Embedding, Init::Zeros)
        .map(|id| (ops().release())(id))
        .unwrap();
    other
        .declare_param("head", &[3], ParamRole::Weight, Init::Zeros)
        .map(|id| (ops().release())(id))
        .unwrap();
    let before = bytes_of(&other, TensorGroup::Params);
    let e = other
        .load_safetensors(&params, TensorGroup::Params)
        .unwrap_err()
        .to_string();
    for part in [
        "model.safetensors",
        "`emb` has shape [4, 3] in the file, [4, 4]",
        "missing tensor `head`",
        "unexpected tensor `bias`",
    ] {
        assert!(e.contains(part), "{e:?} should mention {part:?}");
    }
    assert_eq!(
        bytes_of(&other, TensorGroup::Params),
        before,
        "a failed load changes nothing"
    );
    let mut wrong_dtype = ParamStore::new(Device::Cpu, 1);
    wrong_dtype
        .declare_state("emb.v", &[4, 3], DType::F32, Init::Zeros)
        .map(|id| (ops().release())(id))
        .unwrap();
    wrong_dtype
        .declare_state("step", &[1], DType::I64, Init::Zeros)
        .map(|id| (ops().release())(id))
        .unwrap();
    let e = wrong_dtype
        .load_safetensors(&state, TensorGroup::State)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`emb.v` is BF16 in the file, f32 in the model"),
        "{e}"
    );
    let e = b
        .load_safetensors(&dir.path().join("absent.safetensors"), TensorGroup::Params)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("absent.safetensors") && e.contains("cannot read"),
        "{e}"
    );
}

#[test]
fn devices_parse() {
    assert!(matches!(engine::parse_device("cpu"), Ok(Device::Cpu)));
    assert!(engine::parse_device("tpu")
        .unwrap_err()
        .to_string()
        .contains("unknown device"));
    assert!(engine::parse_device("cuda:x")
        .unwrap_err()
        .to_string()
        .contains("unknown device"));
    // Builds without the `cuda` feature say which feature is missing; builds with it may succeed.
    if let Err(e) = engine::parse_device("cuda:0") {
        assert!(e.to_string().contains("cuda"), "{e}");
    }
}

#[test]
fn handles_do_not_leak() {
    engine::install();
    let me = std::thread::current().id();
    let before = engine::live_handles_on_thread(me);
    {
        let (_store, p) = store_with(&[("w", &[4, 3]), ("b", &[3])], 9);
        let x = handle(&ct(inp(&[2, 4]), 0.0, CD::F32));
        let y = x
            .matmul(&p[0])
            .unwrap()
            .add(&p[1])
            .unwrap()
            .gelu(GeluForm::Tanh)
            .unwrap();
        let ce = y.cross_entropy(&u32_handle(&[1, 2], &[2]), IGNORE).unwrap();
        ce.loss_sum.backward().unwrap();
        let _g = p[0].grad().unwrap();
        let _clones: Vec<Tensor> = (0..5).map(|_| y.clone()).collect();
        assert!(engine::live_handles() >= engine::live_handles_on_thread(me));
        assert!(engine::live_handles_on_thread(me) > before);
    }
    assert_eq!(
        engine::live_handles_on_thread(me),
        before,
        "every handle created here was released"
    );
}

type UnaryOp<'a> = dyn Fn(&Tensor) -> ApiResult<Tensor> + 'a;

/// bf16 and f16 inputs are computed in f32 and cast back, so they agree with the f32 result
/// to the 16-bit type's precision; parameters stay f32 and mix in.
#[test]
fn half_precision_inputs_compute_in_f32() {
    let x32 = ct(inp(&[3, 8]), 0.5, CD::F32);
    let w = handle(&ct(inp(&[8]), 1.0, CD::F32));
    let b = handle(&ct(inp(&[8]), 2.0, CD::F32));
    for (dtype, cd) in [(DType::BF16, CD::BF16), (DType::F16, CD::F16)] {
        let full = handle(&x32);
        let half = full.to_dtype(dtype).unwrap();
        let pairs: [(&str, Box<UnaryOp<'_>>); 4] = [
            ("softmax", Box::new(|x| x.softmax(1))),
            ("log_softmax", Box::new(|x| x.log_softmax(1))),
            ("layer_norm", Box::new(|x| x.layer_norm(&w, &b, 1e-5))),
            ("rms_norm", Box::new(|x| x.rms_norm(&w, 1e-6))),
        ];
        for (name, f) in pairs {
            let got = candle(&f(&half).unwrap());
            assert_eq!(got.dtype(), cd, "{name} keeps the input's dtype");
            let want = candle(&f(&full).unwrap());
            assert_close(&format!("{name} in {dtype:?}"), &got, &want, 1e-2);
        }
        let targets = u32_handle(&[1, 7, 3], &[3]);
        let got = half.cross_entropy(&targets, IGNORE).unwrap().loss_sum;
        let want = full.cross_entropy(&targets, IGNORE).unwrap().loss_sum;
        assert_eq!(got.dtype().unwrap(), DType::F32);
        assert!((got.to_scalar().unwrap() - want.to_scalar().unwrap()).abs() < 2e-2);
    }
}

// -- element-wise and whole-tensor ops for optimizers ---------------------------------------------

/// Element by element, with NaN equal to NaN: the ops below are candle's own, so their results
/// agree bit for bit, not within a tolerance.
fn assert_same(what: &str, got: &CT, want: &CT) {
    assert_eq!(
        (got.dims(), got.dtype()),
        (want.dims(), want.dtype()),
        "{what}: shape or dtype"
    );
    let bits = |t: &CT| -> Vec<u64> {
        let t = t.flatten_all().unwrap();
        match t.dtype() {
            CD::U8 | CD::U32 | CD::I64 => t
                .to_dtype(CD::I64)
                .unwrap()
                .to_vec1::<i64>()
                .unwrap()
                .into_iter()
                .map(|v| v as u64)
                .collect(),
            _ => t
                .to_dtype(CD::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
                .into_iter()
                .map(|v| if v.is_nan() { u64::MAX } else { v.to_bits() })
                .collect(),
        }
    };
    assert_eq!(bits(got), bits(want), "{what}: values differ");
}

/// A float tensor of `shape` in `dtype`, with a few exact zeros and repeated values among
/// irregular ones, so that signs, ties and comparisons at equality all occur.
fn with_ties(shape: &[usize], salt: f32, dtype: CD) -> CT {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = values(n, salt)
        .into_iter()
        .enumerate()
        .map(|(i, x)| match i % 5 {
            0 => 0.0,
            1 => 0.5,
            _ => x,
        })
        .collect();
    CT::from_vec(v, shape, &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .unwrap()
}

#[test]
fn sign_and_rsqrt_match_candle() {
    let x = inp(&[3, 5]);
    check("sign", &[x], |x| x[0].sign(), |x| x[0].sign());
    check(
        "rsqrt",
        &[pos(&[3, 5])],
        |x| x[0].rsqrt(),
        |x| x[0].sqrt()?.recip(),
    );
    fd_check("rsqrt", &[pos(&[2, 3])], 1e-6, 1e-5, |x| x[0].rsqrt());
    let special = CT::new(
        &[-2.0f32, -0.0, 0.0, 3.0, f32::NAN, f32::INFINITY],
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        candle(&handle(&special).sign().unwrap())
            .to_vec1::<f32>()
            .unwrap(),
        [-1.0, 0.0, 0.0, 1.0, 0.0, 1.0],
        "torch.sign: zero at ±0, and NaN gives 0 as candle's sign does"
    );
    for dtype in [CD::F64, CD::BF16, CD::F16] {
        let t = with_ties(&[4, 5], 0.3, dtype);
        assert_same(
            &format!("sign {dtype:?}"),
            &candle(&handle(&t).sign().unwrap()),
            &t.sign().unwrap(),
        );
        let p = t.abs().unwrap().affine(1.0, 0.25).unwrap();
        assert_same(
            &format!("rsqrt {dtype:?}"),
            &candle(&handle(&p).rsqrt().unwrap()),
            &p.sqrt().unwrap().recip().unwrap(),
        );
    }
    assert!(err_of(u32_handle(&[1, 4], &[2]).rsqrt()).starts_with("rsqrt: "));
}

#[test]
fn clamp_matches_candle() {
    let x = inp(&[4, 6]);
    check(
        "clamp",
        &[x],
        |x| x[0].clamp(-0.5, 0.75),
        |x| x[0].clamp(-0.5f64, 0.75f64),
    );
    for dtype in [CD::F32, CD::F64, CD::BF16] {
        let t = with_ties(&[4, 5], 1.1, dtype);
        for (lo, hi) in [
            (-0.5, 0.5),
            (0.0, 0.0),
            (1.0, -1.0),
            (f64::NEG_INFINITY, 0.25),
        ] {
            assert_same(
                &format!("clamp({lo}, {hi}) {dtype:?}"),
                &candle(&handle(&t).clamp(lo, hi).unwrap()),
                &t.clamp(lo, hi).unwrap(),
            );
        }
    }
    // Like torch.clamp: min > max gives max everywhere.
    let t = handle(&with_ties(&[3], 0.0, CD::F32));
    assert_eq!(t.clamp(1.0, -1.0).unwrap().to_vec_f32().unwrap(), [-1.0; 3]);
}

#[test]
fn comparisons_broadcast_like_candle() {
    type Cmp = (
        &'static str,
        fn(&Tensor, &Tensor) -> ApiResult<Tensor>,
        fn(&CT, &CT) -> CandleResult<CT>,
    );
    let cases: [Cmp; 5] = [
        ("ne", Tensor::ne, CT::broadcast_ne),
        ("lt", Tensor::lt, CT::broadcast_lt),
        ("le", Tensor::le, CT::broadcast_le),
        ("gt", Tensor::gt, CT::broadcast_gt),
        ("ge", Tensor::ge, CT::broadcast_ge),
    ];
    for dtype in [CD::F32, CD::F64, CD::BF16, CD::U32, CD::U8] {
        // Integers from the float values would be mostly zeros: scale them first.
        let make = |shape: &[usize], salt: f32| {
            let t = with_ties(shape, salt, CD::F32);
            if dtype.is_float() {
                t.to_dtype(dtype).unwrap()
            } else {
                t.affine(2.0, 4.0).unwrap().to_dtype(dtype).unwrap()
            }
        };
        let (a, b) = (make(&[2, 3, 4], 0.2), make(&[3, 1], 0.9));
        for (name, via_api, in_candle) in cases {
            for (l, r) in [(&a, &b), (&b, &a), (&a, &a)] {
                let got = candle(&via_api(&handle(l), &handle(r)).unwrap());
                let want = in_candle(l, r).unwrap();
                assert_eq!(got.dtype(), CD::U8, "{name} gives a u8 mask");
                assert_same(
                    &format!("{name} {dtype:?} {:?} {:?}", l.dims(), r.dims()),
                    &got,
                    &want,
                );
            }
        }
    }
    let (a, b) = (
        handle(&with_ties(&[2, 3], 0.0, CD::F32)),
        handle(&with_ties(&[4], 0.0, CD::F32)),
    );
    let e = err_of(a.lt(&b));
    assert!(e.starts_with("compare: ") && e.contains("shape"), "{e}");
    let e = err_of(a.ge(&a.to_dtype(DType::F64).unwrap()));
    assert!(e.starts_with("compare: ") && e.contains("dtype"), "{e}");
}

#[test]
fn select_broadcasts_mask_and_branches() {
    // The mask is computed from the inputs, so gradients reach both branches through it.
    check(
        "select",
        &[inp(&[2, 3, 4]), inp(&[3, 1])],
        |x| x[0].gt(&x[1])?.select(&x[0], &x[1]),
        |x| {
            let shape = x[0].shape();
            let m = x[0].broadcast_gt(&x[1])?;
            m.where_cond(&x[0], &x[1].broadcast_as(shape)?)
        },
    );
    let a = with_ties(&[2, 3], 0.4, CD::F32);
    let b = with_ties(&[3], 1.7, CD::F32);
    for mask_dtype in [CD::U8, CD::U32, CD::I64] {
        let m = CT::new(&[[1u8, 0, 2], [0, 0, 7]], &Device::Cpu)
            .unwrap()
            .to_dtype(mask_dtype)
            .unwrap();
        let got = candle(&handle(&m).select(&handle(&a), &handle(&b)).unwrap());
        let want = m.where_cond(&a, &b.broadcast_as((2, 3)).unwrap()).unwrap();
        assert_same(&format!("select with a {mask_dtype:?} mask"), &got, &want);
        // A mask row broadcast over a column of branches.
        let row = m.narrow(0, 1, 1).unwrap();
        let got = candle(&handle(&row).select(&handle(&a), &handle(&b)).unwrap());
        let want = row
            .broadcast_as((2, 3))
            .unwrap()
            .where_cond(&a, &b.broadcast_as((2, 3)).unwrap())
            .unwrap();
        assert_same("select with a broadcast mask", &got, &want);
    }
    for dtype in [CD::F64, CD::BF16, CD::U32] {
        let (a, b) = (a.to_dtype(dtype).unwrap(), b.to_dtype(dtype).unwrap());
        let m = a.ge(&b.broadcast_as((2, 3)).unwrap()).unwrap();
        let got = candle(&handle(&m).select(&handle(&a), &handle(&b)).unwrap());
        assert_eq!(got.dtype(), dtype, "select keeps the branches' dtype");
        assert_same(
            &format!("select {dtype:?}"),
            &got,
            &m.where_cond(&a, &b.broadcast_as((2, 3)).unwrap()).unwrap(),
        );
    }
    let (ha, hb) = (handle(&a), handle(&b));
    let e = err_of(ha.select(&ha, &hb));
    assert!(
        e.starts_with("select: ") && e.contains("mask") && e.contains("F32"),
        "{e}"
    );
    let m = handle(&a.ge(&a).unwrap());
    let e = err_of(m.select(&ha, &hb.to_dtype(DType::F64).unwrap()));
    assert!(e.starts_with("select: ") && e.contains("F64"), "{e}");
    let e = err_of(m.select(&ha, &handle(&CT::zeros(4, CD::F32, &Device::Cpu).unwrap())));
    assert!(e.starts_with("select: ") && e.contains("shape"), "{e}");
}

#[test]
fn whole_tensor_reductions_give_a_tensor_without_dimensions() {
    let x = inp(&[3, 4, 2]);
    check("sum_all", &[x], |x| x[0].sum_all(), |x| x[0].sum_all());
    check("mean_all", &[x], |x| x[0].mean_all(), |x| x[0].mean_all());
    check("max_all", &[x], |x| x[0].max_all(), |x| x[0].max_all());
    check("min_all", &[x], |x| x[0].min_all(), |x| x[0].min_all());
    for dtype in [CD::F64, CD::BF16, CD::U32] {
        let t = with_ties(&[5, 3], 0.6, CD::F32)
            .affine(3.0, 6.0)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let h = handle(&t);
        let mut cases = vec![
            ("sum_all", h.sum_all().unwrap(), t.sum_all().unwrap()),
            ("max_all", h.max_all().unwrap(), t.max_all().unwrap()),
            ("min_all", h.min_all().unwrap(), t.min_all().unwrap()),
        ];
        if dtype.is_float() {
            cases.push(("mean_all", h.mean_all().unwrap(), t.mean_all().unwrap()));
        }
        for (name, got, want) in cases {
            assert_eq!(
                got.shape().unwrap(),
                Vec::<usize>::new(),
                "{name} has shape []"
            );
            assert_same(&format!("{name} {dtype:?}"), &candle(&got), &want);
        }
    }
    // A tensor without dimensions reduces to itself; one with a zero dimension has a sum and a
    // mean but no extremes.
    let scalar = handle(&CT::new(2.5f32, &Device::Cpu).unwrap());
    assert_eq!(scalar.max_all().unwrap().to_scalar().unwrap(), 2.5);
    assert_eq!(
        scalar.sum_all().unwrap().shape().unwrap(),
        Vec::<usize>::new()
    );
    let empty = handle(&CT::zeros((2, 0), CD::F32, &Device::Cpu).unwrap());
    assert_eq!(empty.sum_all().unwrap().to_scalar().unwrap(), 0.0);
    assert!(empty.mean_all().unwrap().to_scalar().unwrap().is_nan());
    for e in [err_of(empty.max_all()), err_of(empty.min_all())] {
        assert!(e.starts_with("reduce_all: ") && e.contains("empty"), "{e}");
    }
    let e = err_of(u32_handle(&[1, 2], &[2]).mean_all());
    assert!(e.starts_with("reduce_all: ") && e.contains("U32"), "{e}");
}

#[test]
fn scalar_operands_match_candle_with_a_scalar_tensor() {
    type Case = (
        &'static str,
        fn(&Tensor, f64) -> ApiResult<Tensor>,
        fn(&CT, &CT) -> CandleResult<CT>,
    );
    use codex_plugin_api::tensor::ScalarOp;
    let cases: [Case; 8] = [
        ("add", Tensor::add_scalar, |x, s| x.broadcast_add(s)),
        ("sub", Tensor::sub_scalar, |x, s| x.broadcast_sub(s)),
        (
            "rsub",
            |x, s| x.scalar_op(ScalarOp::RSub, s),
            |x, s| s.broadcast_sub(x),
        ),
        ("mul", Tensor::mul_scalar, |x, s| x.broadcast_mul(s)),
        ("div", Tensor::div_scalar, |x, s| x.broadcast_div(s)),
        (
            "rdiv",
            |x, s| x.scalar_op(ScalarOp::RDiv, s),
            |x, s| s.broadcast_div(x),
        ),
        ("maximum", Tensor::maximum_scalar, |x, s| {
            x.broadcast_maximum(s)
        }),
        ("minimum", Tensor::minimum_scalar, |x, s| {
            x.broadcast_minimum(s)
        }),
    ];
    for (name, via_api, in_candle) in cases {
        for s in [0.3, -1.75, 0.0] {
            check(
                &format!("{name} {s}"),
                &[pos(&[3, 4])],
                |x| via_api(&x[0], s),
                |x| in_candle(&x[0], &CT::new(s as f32, &Device::Cpu)?),
            );
        }
        for dtype in [CD::F64, CD::BF16, CD::F16, CD::U32] {
            // Unsigned differences would wrap (candle refuses them in debug builds).
            if dtype == CD::U32 && name.contains("sub") {
                continue;
            }
            let t = with_ties(&[2, 5], 0.8, CD::F32)
                .affine(4.0, 9.5)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let s = 3.0;
            let st = CT::new(s, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            assert_same(
                &format!("{name} {dtype:?}"),
                &candle(&via_api(&handle(&t), s).unwrap()),
                &in_candle(&t, &st).unwrap(),
            );
        }
    }
    // A true division: x / 3 is not x · (1/3).
    let x = handle(&CT::new(&[1.0f32, 5.0, 7.0, 10.0], &Device::Cpu).unwrap());
    let third: Vec<f32> = [1.0f32, 5.0, 7.0, 10.0].iter().map(|v| v / 3.0).collect();
    assert_eq!(x.div_scalar(3.0).unwrap().to_vec_f32().unwrap(), third);
}

/// An adapter's product on `x` (`[4, 5]`, or its `[5, 4]` transpose read as `[4, 5]`, a strided
/// input) in training, with dropout: the output and the gradients of the input and of `A`
/// and `B`.
fn adapter_product(strided: bool, train: bool) -> (Vec<f32>, Vec<Vec<f32>>) {
    engine::install();
    let mut store = ParamStore::new(Device::Cpu, 3);
    let param = |store: &mut ParamStore, name: &str, shape: &[usize]| {
        Tensor::from_id(
            store
                .declare_param(name, shape, ParamRole::Weight, Init::Normal { std: 0.5 })
                .unwrap(),
        )
    };
    let w = param(&mut store, "layer.weight", &[6, 5]);
    let x_shape: &[usize] = if strided { &[5, 4] } else { &[4, 5] };
    let x_param = param(&mut store, "x", x_shape);
    let (a_name, b_name) = store
        .attach_lora("layer.weight", 3, 2.0, 0.3, false)
        .unwrap();
    let (a, b) = (
        Tensor::from_id(store.handle(&a_name).unwrap()),
        Tensor::from_id(store.handle(&b_name).unwrap()),
    );
    // B starts at zero, which would leave A without a gradient.
    b.assign(&handle(&ct(inp(&[6, 3]), 0.7, CD::F32))).unwrap();
    let x_values = ct(inp(&[4, 5]), 0.3, CD::F32);
    let x_init = if strided {
        x_values.t().unwrap().contiguous().unwrap()
    } else {
        x_values
    };
    x_param.assign(&handle(&x_init)).unwrap();
    let x = if strided {
        x_param.transpose(0, 1).unwrap()
    } else {
        x_param.clone()
    };

    engine::set_forward(train, 41);
    let y = x.matmul(&w.transpose(0, 1).unwrap()).unwrap();
    engine::set_forward(false, 0);
    let weights = handle(&weights(&[4, 6], CD::F32));
    y.mul(&weights)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let grad = |t: &Tensor| t.grad().unwrap().expect("a gradient").to_vec_f32().unwrap();
    let gx = grad(&x_param);
    let gx = if strided {
        // Back to [4, 5] order.
        (0..20).map(|i| gx[(i % 5) * 4 + i / 5]).collect()
    } else {
        gx
    };
    (y.to_vec_f32().unwrap(), vec![gx, grad(&a), grad(&b)])
}

#[test]
fn adapter_dropout_in_one_node_equals_the_composed_path() {
    // A contiguous input takes the node that draws its mask again in backward; a strided one
    // the composition of dropout and a product, which keeps the mask and the dropped copy.
    let (fused_y, fused_grads) = adapter_product(false, true);
    let (plain_y, plain_grads) = adapter_product(true, true);
    let close = |what: &str, a: &[f32], b: &[f32]| {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                "{what}[{i}]: {x} vs {y}"
            );
        }
    };
    close("output", &fused_y, &plain_y);
    for (what, (a, b)) in ["x", "A", "B"]
        .iter()
        .zip(fused_grads.iter().zip(&plain_grads))
    {
        close(&format!("gradient of {what}"), a, b);
    }
    // Dropout acted: without it (evaluation), the output is another.
    let (eval_y, _) = adapter_product(false, false);
    assert!(
        fused_y
            .iter()
            .zip(&eval_y)
            .any(|(a, b)| (a - b).abs() > 1e-3),
        "dropout changed nothing"
    );
}
