//! The fused element-wise update (`Tensor::elementwise_update`) against candle's own ops.
//!
//! A program runs over declared tensors of a `ParamStore`; the same computation is written
//! directly in candle on copies of the values from before the call. With f32 tensors both do
//! the same f32 arithmetic, so the results must agree bit for bit; with bf16 or f64 tensors the
//! program computes in f32 (f64) and rounds once, which the candle reference does too. The rest
//! checks what the update promises around the arithmetic: inputs that are targets give their old
//! values, autograd never sees the update, and a bad program or call is refused with an error
//! naming the problem before anything is written.

use codex_engine::candle::{DType as CD, Device, Tensor as CT};
use codex_engine::{self as engine, ParamStore};
use codex_plugin_api::abi_stable::std_types::RSlice;
use codex_plugin_api::elementwise::{ElemInstr, ElemOp};
use codex_plugin_api::{ops, DType, Expr, Init, ParamRole, Program, Tensor};

type CandleResult<T> = codex_engine::candle::Result<T>;

/// Irregular values in about [-2, 2], every fifth one zero, every seventh 0.5.
fn values(n: usize, salt: f32) -> Vec<f32> {
    (0..n)
        .map(|i| match (i % 5, i % 7) {
            (0, _) => 0.0,
            (_, 0) => 0.5,
            _ => (i as f32 * 0.731 + salt).sin() * 1.7 + (i as f32 * 0.113 + salt).cos() * 0.4,
        })
        .collect()
}

fn ct(shape: &[usize], salt: f32, dtype: CD) -> CT {
    let n = shape.iter().product();
    CT::from_vec(values(n, salt), shape, &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .unwrap()
}

/// A handle to a plain (not declared) candle tensor.
fn handle(t: &CT) -> Tensor {
    engine::install();
    Tensor::from_id(engine::insert(t.clone()))
}

/// The current value of a tensor, as a copy that later updates do not change.
fn value(t: &Tensor) -> CT {
    engine::get(t.id()).unwrap().copy().unwrap()
}

/// A parameter declared in `store` with the values of `v` (f32).
fn param(store: &mut ParamStore, name: &str, v: &CT) -> Tensor {
    let t = Tensor::from_id(
        store
            .declare_param(name, v.dims(), ParamRole::Weight, Init::Zeros)
            .unwrap(),
    );
    t.assign(&handle(v)).unwrap();
    t
}

/// A state tensor declared in `store` with the values and dtype of `v`.
fn state(store: &mut ParamStore, name: &str, v: &CT) -> Tensor {
    let dtype = match v.dtype() {
        CD::F32 => DType::F32,
        CD::F64 => DType::F64,
        CD::BF16 => DType::BF16,
        CD::F16 => DType::F16,
        CD::U32 => DType::U32,
        other => panic!("no state of dtype {other:?} in these tests"),
    };
    let t = Tensor::from_id(
        store
            .declare_state(name, v.dims(), dtype, Init::Zeros)
            .unwrap(),
    );
    t.assign(&handle(v)).unwrap();
    t
}

/// Bit-for-bit equality, NaN equal to NaN.
fn assert_bits(what: &str, got: &CT, want: &CT) {
    assert_eq!(
        (got.dims(), got.dtype()),
        (want.dims(), want.dtype()),
        "{what}: shape or dtype"
    );
    let bits = |t: &CT| -> Vec<u64> {
        t.flatten_all()
            .unwrap()
            .to_dtype(CD::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
            .into_iter()
            .map(|v| if v.is_nan() { u64::MAX } else { v.to_bits() })
            .collect()
    };
    let (g, w) = (bits(got), bits(want));
    if let Some(i) = (0..g.len()).find(|&i| g[i] != w[i]) {
        panic!(
            "{what}: element {i} is {}, candle gives {} ({} of {} elements differ)",
            f64::from_bits(g[i]),
            f64::from_bits(w[i]),
            (0..g.len()).filter(|&i| g[i] != w[i]).count(),
            g.len()
        );
    }
}

/// A 0-d f32 constant, as a program's constants and scalars are in an f32 computation.
fn k(v: f64) -> CT {
    CT::new(v as f32, &Device::Cpu).unwrap()
}

/// The program every instruction appears in, over inputs `[p, g, m, v, c, mask]` (`c` has
/// one element, `mask` is u8) and scalars `[s0, s1]`, writing targets `[p, m, v]`.
fn every_instruction() -> Program {
    let (p, g, m, v) = (
        Expr::input(0),
        Expr::input(1),
        Expr::input(2),
        Expr::input(3),
    );
    let (c, mask) = (Expr::input(4), Expr::input(5));
    let (s0, s1) = (Expr::scalar(0), Expr::scalar(1));
    let new_p = -((&m * 0.9 + &g * 0.1).sign() * &s0) + &p * &s1;
    let new_m = (g.clone().sqr() + &v).sqrt() / (v.clone().abs() + 1e-3) - g.clone().recip().tanh();
    let branch = (v.clone().abs() + 0.5).log().minimum(&p).clamp(-0.25, &s0);
    let tests = g.clone().lt(&m) - g.clone().ge(&p)
        + g.clone().le(0.0) * 2.0
        + g.clone().eq(&m)
        + g.clone().ne(&p) * 0.5
        + g.clone().gt(&v) / 4.0;
    let new_v = mask.select(c.exp() * g.maximum(&m), branch) + tests + (v + 1.0).rsqrt();
    Program::new()
        .store(0, new_p)
        .store(2, new_v)
        .store(1, new_m)
}

/// [`every_instruction`] written in candle, on the values from before the call.
fn every_instruction_in_candle(x: &[CT], s: [f64; 2]) -> CandleResult<[CT; 3]> {
    let (p, g, m, v, c, mask) = (&x[0], &x[1], &x[2], &x[3], &x[4], &x[5]);
    let f32_of = |t: &CT| t.to_dtype(CD::F32);
    let c = c.reshape(())?;
    let new_p = m
        .broadcast_mul(&k(0.9))?
        .add(&g.broadcast_mul(&k(0.1))?)?
        .sign()?
        .broadcast_mul(&k(s[0]))?
        .neg()?
        .add(&p.broadcast_mul(&k(s[1]))?)?;
    let new_m = g
        .sqr()?
        .add(v)?
        .sqrt()?
        .div(&v.abs()?.broadcast_add(&k(1e-3))?)?
        .sub(&g.recip()?.tanh()?)?;
    let branch = v
        .abs()?
        .broadcast_add(&k(0.5))?
        .log()?
        .minimum(p)?
        .broadcast_maximum(&k(-0.25))?
        .broadcast_minimum(&k(s[0]))?;
    let tests = f32_of(&g.lt(m)?)?
        .sub(&f32_of(&g.ge(p)?)?)?
        .add(&f32_of(&g.broadcast_le(&k(0.0))?)?.broadcast_mul(&k(2.0))?)?
        .add(&f32_of(&g.eq(m)?)?)?
        .add(&f32_of(&g.ne(p)?)?.broadcast_mul(&k(0.5))?)?
        .add(&f32_of(&g.gt(v)?)?.broadcast_div(&k(4.0))?)?;
    let chosen = f32_of(mask)?
        .broadcast_ne(&k(0.0))?
        .where_cond(&c.exp()?.broadcast_mul(&g.maximum(m)?)?, &branch)?;
    let new_v = chosen
        .add(&tests)?
        .add(&v.broadcast_add(&k(1.0))?.sqrt()?.recip()?)?;
    Ok([new_p, new_m, new_v])
}

#[test]
fn a_program_equals_the_same_ops_in_candle_bit_for_bit() {
    engine::install();
    // Less than one block of elements; then several parallel chunks, the last one partial.
    for shape in [&[7usize, 9][..], &[300, 257]] {
        let mut store = ParamStore::new(Device::Cpu, 1);
        let p = param(&mut store, "p", &ct(shape, 0.1, CD::F32));
        let m = state(&mut store, "m", &ct(shape, 0.7, CD::F32));
        let v = state(&mut store, "v", &ct(shape, 1.9, CD::F32));
        let g = handle(&ct(shape, 2.3, CD::F32));
        let c = handle(&CT::new(&[0.375f32], &Device::Cpu).unwrap());
        let mask = g
            .gt(&handle(&CT::new(0.25f32, &Device::Cpu).unwrap()))
            .unwrap();
        let inputs = [&p, &g, &m, &v, &c, &mask];
        let before: Vec<CT> = inputs.iter().map(|t| value(t)).collect();
        let scalars = [0.125, 0.998];
        Tensor::elementwise_update(&every_instruction(), &inputs, &scalars, &[&p, &m, &v])
            .expect("the update runs");
        let want = every_instruction_in_candle(&before, scalars).expect("candle");
        for (name, t, w) in [
            ("p", &p, &want[0]),
            ("m", &m, &want[1]),
            ("v", &v, &want[2]),
        ] {
            assert_bits(&format!("{name} of {shape:?}"), &value(t), w);
        }
    }
}

/// Lion's step as the native-lion example writes it.
fn lion(b1: f64, b2: f64) -> Program {
    let (p, g, m) = (Expr::input(0), Expr::input(1), Expr::input(2));
    let (lr, decay) = (Expr::scalar(0), Expr::scalar(1));
    let c = &m * b1 + &g * (1.0 - b1);
    Program::new()
        .store(0, p * decay - c.sign() * lr)
        .store(1, m * b2 + g * (1.0 - b2))
}

#[test]
fn half_and_double_precision_targets_round_once() {
    engine::install();
    let shape = [33usize, 40];
    let (b1, b2, lr, decay) = (0.9, 0.99, 0.01, 0.999);
    // m in bf16 (f16, f64); p f32; g f32. The program computes in f32 (f64 when m is f64) and
    // rounds m once; the candle reference casts its inputs, computes, and casts back.
    for dtype in [CD::BF16, CD::F16, CD::F64] {
        let mut store = ParamStore::new(Device::Cpu, 2);
        let p = param(&mut store, "p", &ct(&shape, 0.3, CD::F32));
        let m = state(&mut store, "m", &ct(&shape, 1.3, dtype));
        let g = handle(&ct(&shape, 2.9, CD::F32));
        let (p0, m0, g0) = (value(&p), value(&m), value(&g));
        Tensor::elementwise_update(&lion(b1, b2), &[&p, &g, &m], &[lr, decay], &[&p, &m])
            .expect("the update runs");
        let wide = if dtype == CD::F64 { CD::F64 } else { CD::F32 };
        let c = |v: f64| CT::new(v, &Device::Cpu).unwrap().to_dtype(wide).unwrap();
        let (pw, mw, gw) = (
            p0.to_dtype(wide).unwrap(),
            m0.to_dtype(wide).unwrap(),
            g0.to_dtype(wide).unwrap(),
        );
        let interp =
            (mw.broadcast_mul(&c(b1)).unwrap() + gw.broadcast_mul(&c(1.0 - b1)).unwrap()).unwrap();
        let want_p = (pw.broadcast_mul(&c(decay)).unwrap()
            - interp.sign().unwrap().broadcast_mul(&c(lr)).unwrap())
        .unwrap()
        .to_dtype(CD::F32)
        .unwrap();
        let want_m = (mw.broadcast_mul(&c(b2)).unwrap() + gw.broadcast_mul(&c(1.0 - b2)).unwrap())
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        assert_bits(&format!("p next to m in {dtype:?}"), &value(&p), &want_p);
        assert_bits(&format!("m in {dtype:?}"), &value(&m), &want_m);
        // Against the same ops composed in the state's own dtype, which round after every op:
        // equal within that dtype's precision.
        if dtype != CD::F64 {
            let bc = |v: f64| CT::new(v, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let gd = g0.to_dtype(dtype).unwrap();
            let composed = (m0.broadcast_mul(&bc(b2)).unwrap()
                + gd.broadcast_mul(&bc(1.0 - b2)).unwrap())
            .unwrap();
            let (got, want): (Vec<f32>, Vec<f32>) = (
                value(&m)
                    .flatten_all()
                    .unwrap()
                    .to_dtype(CD::F32)
                    .unwrap()
                    .to_vec1()
                    .unwrap(),
                composed
                    .flatten_all()
                    .unwrap()
                    .to_dtype(CD::F32)
                    .unwrap()
                    .to_vec1()
                    .unwrap(),
            );
            // Each composed op rounds to the dtype's precision ε: the two differ by at most
            // a few ε of the terms' magnitudes (not of the result, which may cancel).
            let eps = if dtype == CD::BF16 {
                2f32.powi(-8)
            } else {
                2f32.powi(-11)
            };
            let scale: Vec<f32> = {
                let m: Vec<f32> = m0
                    .flatten_all()
                    .unwrap()
                    .to_dtype(CD::F32)
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let g: Vec<f32> = g0.flatten_all().unwrap().to_vec1().unwrap();
                m.iter()
                    .zip(&g)
                    .map(|(m, g)| m.abs() * b2 as f32 + g.abs() * (1.0 - b2) as f32)
                    .collect()
            };
            for (i, ((a, b), s)) in got.iter().zip(&want).zip(&scale).enumerate() {
                assert!(
                    (a - b).abs() <= 4.0 * eps * s,
                    "m[{i}] in {dtype:?}: {a} fused, {b} composed"
                );
            }
        }
    }
}

#[test]
fn integer_inputs_are_read_as_numbers() {
    engine::install();
    let mut store = ParamStore::new(Device::Cpu, 3);
    let t = state(
        &mut store,
        "t",
        &CT::zeros(4, CD::F32, &Device::Cpu).unwrap(),
    );
    let ids = handle(&CT::new(&[3u32, 0, 7, 1_000_000], &Device::Cpu).unwrap());
    let mask = handle(&CT::new(&[1u8, 0, 255, 0], &Device::Cpu).unwrap());
    let big = handle(&CT::new(&[-5i64, 2, 9, 1 << 40], &Device::Cpu).unwrap());
    let (i, m, b) = (Expr::input(0), Expr::input(1), Expr::input(2));
    let program = Program::new().store(0, m.select(i, b));
    Tensor::elementwise_update(&program, &[&ids, &mask, &big], &[], &[&t]).expect("update");
    assert_eq!(
        t.to_vec_f32().unwrap(),
        [3.0, 2.0, 7.0, (1u64 << 40) as f32]
    );
}

#[test]
fn inputs_that_are_targets_give_their_value_from_before_the_call() {
    engine::install();
    let mut store = ParamStore::new(Device::Cpu, 4);
    let a0 = ct(&[3, 3], 0.2, CD::F32);
    let b0 = ct(&[3, 3], 1.2, CD::F32);
    let a = state(&mut store, "a", &a0);
    let b = state(&mut store, "b", &b0);
    // A swap reads both before it writes either.
    let swap = Program::new()
        .store(0, Expr::input(1))
        .store(1, Expr::input(0));
    Tensor::elementwise_update(&swap, &[&a, &b], &[], &[&a, &b]).expect("swap");
    assert_bits("a after the swap", &value(&a), &b0);
    assert_bits("b after the swap", &value(&b), &a0);
    // A view of a target in its own layout (read in place), and a transposed one (copied first).
    let same = a.reshape(&[3, 3]).unwrap();
    let transposed = a.transpose(0, 1).unwrap();
    let sum = Program::new().store(0, Expr::input(0) + Expr::input(1) * 2.0 + Expr::input(2));
    Tensor::elementwise_update(&sum, &[&a, &same, &transposed], &[], &[&a]).expect("views");
    let want = b0
        .add(&b0.broadcast_mul(&k(2.0)).unwrap())
        .and_then(|x| x.add(&b0.t()?))
        .unwrap();
    assert_bits("a + 2a + aᵀ", &value(&a), &want);
    // The same input twice, and a one-element input that is a view of a target.
    let corner = b.narrow(0, 0, 1).unwrap().narrow(1, 0, 1).unwrap();
    let corner0 = a0
        .get(0)
        .unwrap()
        .get(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let twice = Program::new().store(0, Expr::input(0) * Expr::input(0) - Expr::input(1));
    Tensor::elementwise_update(&twice, &[&b, &corner], &[], &[&b]).expect("twice");
    let want = a0
        .sqr()
        .and_then(|x| x.broadcast_sub(&k(f64::from(corner0))))
        .unwrap();
    assert_bits("b² − b[0, 0]", &value(&b), &want);
}

#[test]
fn the_update_is_not_recorded_by_autograd() {
    engine::install();
    let mut store = ParamStore::new(Device::Cpu, 5);
    let p = param(&mut store, "p", &ct(&[2, 3], 0.5, CD::F32));
    let q = Tensor::from_id(
        store
            .declare_param("q", &[2, 3], ParamRole::Weight, Init::Normal { std: 1.0 })
            .unwrap(),
    );
    let w = handle(&ct(&[2, 3], 3.3, CD::F32));
    let loss = |t: &Tensor| t.mul(&w).unwrap().sum_all().unwrap();
    loss(&p).backward().unwrap();
    let slot = value(&p.grad().unwrap().expect("p has a gradient"));
    // p ← 3q + p, with q a trainable parameter and p's gradient slot filled.
    let twice_q = q.mul_scalar(2.0).unwrap();
    let program = Program::new().store(0, Expr::input(0) + Expr::input(1) + Expr::input(2));
    Tensor::elementwise_update(&program, &[&twice_q, &q, &p], &[], &[&p]).expect("update");
    assert_bits(
        "p's gradient slot",
        &value(&p.grad().unwrap().expect("kept")),
        &slot,
    );
    assert!(q.grad().unwrap().is_none(), "q has no gradient yet");
    // A loss of the updated p reaches p only: the update left no edge from p to q.
    p.zero_grad().unwrap();
    loss(&p).backward().unwrap();
    assert_bits(
        "∂loss/∂p",
        &value(&p.grad().unwrap().expect("p")),
        &value(&w),
    );
    assert!(
        q.grad().unwrap().is_none(),
        "the update is not part of the graph"
    );
}

/// The error of a raw op-table call, which a builder cannot get wrong.
fn raw(program: &[ElemInstr], inputs: &[&Tensor], scalars: &[f64], targets: &[&Tensor]) -> String {
    let ids = |ts: &[&Tensor]| ts.iter().map(|t| t.id()).collect::<Vec<_>>();
    let (inputs, targets) = (ids(inputs), ids(targets));
    (ops().ext().elementwise_update())(
        RSlice::from_slice(program),
        RSlice::from_slice(&inputs),
        RSlice::from_slice(scalars),
        RSlice::from_slice(&targets),
    )
    .into_result()
    .expect_err("the call is refused")
    .message
    .into_string()
}

fn code(ops: &[ElemOp]) -> Vec<ElemInstr> {
    ops.iter().map(|op| op.encode()).collect()
}

#[test]
fn bad_programs_and_calls_are_refused_before_anything_is_written() {
    use ElemOp::*;
    engine::install();
    let mut store = ParamStore::new(Device::Cpu, 6);
    let p = param(&mut store, "p", &ct(&[4, 5], 0.5, CD::F32));
    let m = state(&mut store, "m", &ct(&[4, 5], 1.5, CD::F32));
    let other = state(&mut store, "other", &ct(&[5, 4], 2.5, CD::F32));
    let ids = state(
        &mut store,
        "ids",
        &CT::zeros((4, 5), CD::U32, &Device::Cpu).unwrap(),
    );
    let plain = handle(&ct(&[4, 5], 3.5, CD::F32));
    let row = handle(&ct(&[5], 4.5, CD::F32));
    let before = [value(&p), value(&m)];
    let deep: Vec<ElemOp> = std::iter::repeat_n(Input(0), 65)
        .chain(std::iter::repeat_n(Add, 64))
        .chain([Store(0)])
        .collect();
    let unknown = [
        Input(0).encode(),
        ElemInstr {
            code: 99,
            index: 0,
            value: 0.0,
        },
        Store(0).encode(),
    ];
    let cases: Vec<(String, &[&str])> = vec![
        (
            raw(&unknown, &[&p], &[], &[&p]),
            &["instruction 1 has the unknown code 99", "plugin API"],
        ),
        (
            raw(&code(&[Input(0), Add, Store(0)]), &[&p], &[], &[&p]),
            &["instruction 1 (add) takes 2 values from the stack, which holds 1"],
        ),
        (
            raw(&code(&[Store(0)]), &[&p], &[], &[&p]),
            &["instruction 0 (store 0) takes 1 values from the stack, which holds 0"],
        ),
        (
            raw(&code(&[Input(0), Input(0), Store(0)]), &[&p], &[], &[&p]),
            &["leaves 1 values on the stack"],
        ),
        (
            raw(&code(&[Input(2), Store(0)]), &[&p, &m], &[], &[&p]),
            &["instruction 0 (input 2) reads input 2, but the call has 2 inputs"],
        ),
        (
            raw(&code(&[Scalar(0), Store(0)]), &[&p], &[], &[&p]),
            &["instruction 0 (scalar 0) reads scalar 0, but the call has 0 scalars"],
        ),
        (
            raw(&code(&[Input(0), Store(1)]), &[&p], &[], &[&p]),
            &["instruction 1 (store 1) writes target 1, but the call has 1 targets"],
        ),
        (
            raw(
                &code(&[Input(0), Store(0), Input(0), Store(0)]),
                &[&p],
                &[],
                &[&p],
            ),
            &["instruction 3 (store 0) writes target 0 a second time"],
        ),
        (
            raw(&code(&[Input(0), Store(1)]), &[&p], &[], &[&p, &m]),
            &["never writes target 0"],
        ),
        (raw(&[], &[&p], &[], &[&p]), &["never writes target 0"]),
        (raw(&code(&[Input(0)]), &[&p], &[], &[]), &["no targets"]),
        (
            raw(&code(&deep), &[&p], &[], &[&p]),
            &["more than 64 values on the stack", "split it"],
        ),
        (
            raw(&code(&[Input(0), Store(0)]), &[&p], &[], &[&plain]),
            &["target 0", "is not a declared parameter or state tensor"],
        ),
        (
            raw(
                &code(&[Input(0), Store(0), Input(0), Store(1)]),
                &[&p],
                &[],
                &[&m, &m],
            ),
            &["targets 0 and 1 are both `m`"],
        ),
        (
            raw(
                &code(&[Input(0), Store(0), Input(0), Store(1)]),
                &[&p],
                &[],
                &[&p, &other],
            ),
            &["target 1 (`other`) has shape [5, 4] and target 0 (`p`) [4, 5]"],
        ),
        (
            raw(&code(&[Input(0), Store(0)]), &[&row], &[], &[&p]),
            &[
                "input 0 has shape [5] and the targets [4, 5]",
                "one element",
            ],
        ),
        (
            raw(&code(&[Input(0), Store(0)]), &[&p], &[], &[&ids]),
            &["target 0 (`ids`) is U32", "f32, f64, bf16 or f16"],
        ),
        (
            raw(
                &code(&[Input(0), Store(0), Input(0), Store(1)]),
                &[&p],
                &[],
                &[&p, &ids],
            ),
            &["target 1 (`ids`) is U32"],
        ),
    ];
    for (error, fragments) in &cases {
        assert!(
            error.starts_with("elementwise_update: "),
            "the error names the op: {error}"
        );
        for fragment in *fragments {
            assert!(error.contains(fragment), "{error:?} lacks {fragment:?}");
        }
    }
    // Through the authoring layer too.
    let e = Tensor::elementwise_update(
        &Program::new().store(0, Expr::input(0) * Expr::scalar(1)),
        &[&p],
        &[0.5],
        &[&p],
    )
    .expect_err("one scalar")
    .to_string();
    assert!(
        e.contains("reads scalar 1, but the call has 1 scalars"),
        "{e}"
    );
    assert_bits("p after the refusals", &value(&p), &before[0]);
    assert_bits("m after the refusals", &value(&m), &before[1]);
}
