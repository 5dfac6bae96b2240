//! Mixed precision: with `Precision::Bf16` the 2-D matrix products of the op table — plain,
//! fused with a bias add, fused with cross-entropy, on a weight or on its transpose — and
//! their gradients run in bf16 with f32 accumulation, within bf16's tolerance of f32; a weight
//! written in place is packed again; a CPU without the bf16 products (or a kernel told to stay
//! portable) multiplies in f32, bit for bit as an f32 run; a config asks for it with
//! `precision`, and refuses what it cannot do.
//!
//! The bf16 products need AVX512-BF16. On a CPU without it the comparisons with f32 cannot run
//! and say so; the fallback and config checks run everywhere.

use codex_engine::candle::{Device, Tensor as CT, Var};
use codex_engine::{self as engine, Precision};
use codex_plugin_api::abi_stable::std_types::{RResult, RStr};
use codex_plugin_api::kernel::KernelBox;
use codex_plugin_api::{ComponentKind, Factory, Tensor};

use crate::model::builtin;

fn cpu_kernel(params: &str) -> KernelBox {
    let Factory::Kernel(factory) = builtin("cpu", ComponentKind::Kernel).factory else {
        panic!("cpu is registered with a factory of another kind");
    };
    match factory(RStr::from(params)) {
        RResult::ROk(k) => k,
        RResult::RErr(e) => panic!("the cpu kernel does not build: {e}"),
    }
}

/// Whether the `cpu` kernel multiplies in bf16 on this machine.
pub(crate) fn bf16_here() -> bool {
    engine::install();
    let _scope = engine::scoped_kernel_at(&Device::Cpu, Some(cpu_kernel("{}")), Precision::Bf16)
        .expect("scope");
    engine::bf16_active(&Device::Cpu)
}

/// Deterministic, irregular values in about [-2, 2].
fn values(n: usize, salt: u32) -> Vec<f32> {
    (0..n as u32)
        .map(|i| {
            let h = (i.wrapping_mul(2_654_435_761) ^ salt.wrapping_mul(40_503)) % 10_007;
            (h as f32 / 10_007.0) * 4.0 - 2.0
        })
        .collect()
}

fn input(shape: &[usize], salt: u32) -> Var {
    let t = CT::from_vec(values(shape.iter().product(), salt), shape, &Device::Cpu).expect("input");
    Var::from_tensor(&t).expect("var")
}

fn flat(t: &CT) -> Vec<f32> {
    t.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("read back")
}

/// Output values and every input's gradient of `Σ y·w` for fixed irregular `w`.
struct Run {
    y: Vec<f32>,
    grads: Vec<Vec<f32>>,
}

/// Run `f` on handles to `inputs` with the kernel (`params`) at `precision`.
fn run(
    params: &str,
    precision: Precision,
    inputs: &[&Var],
    f: &dyn Fn(&[Tensor]) -> Tensor,
) -> Run {
    engine::install();
    let _scope = engine::scoped_kernel_at(&Device::Cpu, Some(cpu_kernel(params)), precision)
        .expect("kernel scope");
    let handles: Vec<Tensor> = inputs
        .iter()
        .map(|v| Tensor::from_id(engine::insert(v.as_tensor().clone())))
        .collect();
    let y = engine::get(f(&handles).id()).expect("result");
    let w = CT::from_vec(values(y.elem_count(), 99), y.shape(), &Device::Cpu).expect("weights");
    let loss = y.mul(&w).and_then(|p| p.sum_all()).expect("loss");
    let grads = loss.backward().expect("backward");
    Run {
        y: flat(&y),
        grads: inputs
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let g = grads.get(v.as_tensor());
                flat(g.unwrap_or_else(|| panic!("no gradient for input {i} ({precision:?})")))
            })
            .collect(),
    }
}

/// `|a − b| ≤ tol·(1 + max|b|)` element by element.
fn assert_close(what: &str, found: &[f32], expected: &[f32], tol: f32) {
    assert_eq!(found.len(), expected.len(), "{what}: lengths differ");
    let scale = 1.0 + expected.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    for (i, (f, e)) in found.iter().zip(expected).enumerate() {
        assert!(
            (f - e).abs() <= tol * scale,
            "{what}[{i}]: bf16 {f}, f32 {e} (tolerance {})",
            tol * scale
        );
    }
}

/// The cases: a product on its own, with a bias, under cross-entropy, on a weight's
/// transpose and on a strided slice of a weight; `(name, inputs, f)`.
fn cases(
    m: usize,
    k: usize,
    n: usize,
) -> Vec<(String, Vec<Var>, Box<dyn Fn(&[Tensor]) -> Tensor>)> {
    let targets: Vec<u32> = (0..m as u32)
        .map(|i| {
            if i % 4 == 3 {
                u32::MAX
            } else {
                (i * 5) % n as u32
            }
        })
        .collect();
    vec![
        (
            format!("x [{m}, {k}] · w [{k}, {n}]"),
            vec![input(&[m, k], 1), input(&[k, n], 2)],
            Box::new(|t: &[Tensor]| t[0].matmul(&t[1]).expect("matmul")),
        ),
        (
            format!("x [{m}, {k}] · w [{k}, {n}] + b"),
            vec![input(&[m, k], 3), input(&[k, n], 4), input(&[n], 5)],
            Box::new(|t: &[Tensor]| {
                t[0].matmul(&t[1])
                    .and_then(|a| a.add(&t[2]))
                    .expect("linear")
            }),
        ),
        (
            format!("x [{m}, {k}] · wᵀ, w [{n}, {k}]"),
            vec![input(&[m, k], 6), input(&[n, k], 7)],
            Box::new(|t: &[Tensor]| {
                t[0].matmul(&t[1].transpose(0, 1).expect("wT"))
                    .expect("matmul")
            }),
        ),
        (
            format!("x [{m}, {k}] · a column slice of w [{k}, {}]", 3 * n),
            vec![input(&[m, k], 8), input(&[k, 3 * n], 9)],
            Box::new(move |t: &[Tensor]| {
                let w = t[1].narrow(1, n, n).expect("narrow");
                t[0].matmul(&w).expect("matmul")
            }),
        ),
        (
            format!("cross_entropy of x [{m}, {k}] · wᵀ, w [{n}, {k}]"),
            vec![input(&[m, k], 10), input(&[n, k], 11)],
            Box::new(move |t: &[Tensor]| {
                let logits = t[0]
                    .matmul(&t[1].transpose(0, 1).expect("wT"))
                    .expect("logits");
                let ids = Tensor::from_u32(&targets, &[m], &t[0]).expect("targets");
                logits
                    .cross_entropy(&ids, u32::MAX)
                    .expect("cross_entropy")
                    .loss_sum
            }),
        ),
    ]
}

#[test]
fn bf16_products_and_gradients_are_within_bf16_tolerance_of_f32() {
    if !bf16_here() {
        eprintln!("this CPU has no AVX512-BF16: the bf16 products cannot run here");
        return;
    }
    for (m, k, n) in [(1, 1, 1), (7, 13, 5), (33, 70, 65), (64, 31, 97)] {
        for (what, vars, f) in cases(m, k, n) {
            let inputs: Vec<&Var> = vars.iter().collect();
            let half = run("{}", Precision::Bf16, &inputs, &*f);
            let full = run("{}", Precision::F32, &inputs, &*f);
            // Operands rounded to 8 significant bits, sums of up to 97 terms in f32.
            let tol = 2e-2;
            assert_close(&format!("{what} values"), &half.y, &full.y, tol);
            for (i, (a, b)) in half.grads.iter().zip(&full.grads).enumerate() {
                assert_close(&format!("{what} grad of input {i}"), a, b, tol);
            }
            // And it is bf16: some value differs from f32 wherever k > 1.
            if k > 1 {
                assert!(half.y != full.y, "{what}: the bf16 product is the f32 one");
            }
        }
    }
}

#[test]
fn bf16_products_are_deterministic() {
    if !bf16_here() {
        eprintln!("this CPU has no AVX512-BF16: the bf16 products cannot run here");
        return;
    }
    for (what, vars, f) in cases(67, 129, 45) {
        let inputs: Vec<&Var> = vars.iter().collect();
        let a = run("{}", Precision::Bf16, &inputs, &*f);
        let b = run(r#"{"threads": 1}"#, Precision::Bf16, &inputs, &*f);
        assert!(a.y == b.y, "{what}: values differ between runs");
        assert!(a.grads == b.grads, "{what}: gradients differ between runs");
    }
}

#[test]
fn a_weight_written_in_place_is_packed_again() {
    if !bf16_here() {
        eprintln!("this CPU has no AVX512-BF16: the bf16 products cannot run here");
        return;
    }
    engine::install();
    let mut store = engine::ParamStore::new(Device::Cpu, 3);
    let _scope = engine::scoped_kernel_at(&Device::Cpu, Some(cpu_kernel("{}")), Precision::Bf16)
        .expect("scope");
    let w = store
        .declare_param(
            "w",
            &[16, 8],
            codex_plugin_api::ParamRole::Weight,
            codex_plugin_api::Init::Normal { std: 1.0 },
        )
        .expect("declare w");
    let w = Tensor::from_id(w);
    let x = Tensor::from_id(engine::insert(
        CT::from_vec(values(5 * 16, 1), (5, 16), &Device::Cpu).expect("x"),
    ));
    let before = engine::get(x.matmul(&w).expect("product").id()).expect("y");
    // Again with the weight unchanged: the same packed copy, the same values.
    let again = engine::get(x.matmul(&w).expect("product").id()).expect("y");
    assert!(flat(&before) == flat(&again));
    // Doubled in place (as an optimizer writes it): the product doubles.
    let doubled = w.affine(2.0, 0.0).expect("2w");
    w.assign(&doubled).expect("assign");
    let after = engine::get(x.matmul(&w).expect("product").id()).expect("y");
    for (a, b) in flat(&after).iter().zip(flat(&before)) {
        // Doubling is exact in bf16 too.
        assert_eq!(*a, 2.0 * b);
    }
    // And through a transpose of it, as a tied LM head uses the embedding.
    let wt = w.transpose(0, 1).expect("wT");
    let y = engine::get(
        Tensor::from_id(engine::insert(
            CT::from_vec(values(3 * 8, 2), (3, 8), &Device::Cpu).expect("z"),
        ))
        .matmul(&wt)
        .expect("product")
        .id(),
    )
    .expect("y");
    assert_eq!(y.dims(), [3, 16]);
    drop(store);
}

#[test]
fn without_bf16_products_bf16_precision_is_the_f32_run_bit_for_bit() {
    // A kernel told to stay portable offers no bf16 products, as on a CPU without them.
    for (what, vars, f) in cases(9, 33, 31) {
        let inputs: Vec<&Var> = vars.iter().collect();
        let half = run(r#"{"simd": "portable"}"#, Precision::Bf16, &inputs, &*f);
        let full = run(r#"{"simd": "portable"}"#, Precision::F32, &inputs, &*f);
        assert!(half.y == full.y, "{what}: values differ");
        assert!(half.grads == full.grads, "{what}: gradients differ");
    }
    engine::install();
    let _scope = engine::scoped_kernel_at(
        &Device::Cpu,
        Some(cpu_kernel(r#"{"simd": "portable"}"#)),
        Precision::Bf16,
    )
    .expect("scope");
    assert!(!engine::bf16_active(&Device::Cpu));
    let _plain = engine::scoped_kernel_at(&Device::Cpu, None, Precision::Bf16).expect("scope");
    assert!(!engine::bf16_active(&Device::Cpu));
}

/// The `cpu` kernel's f16 products run on every CPU (on its best path, or the portable one):
/// within f16's tolerance of f32, the same bits on every path for a plain product and its
/// gradients, and the same bits on every run.
#[test]
fn f16_products_and_gradients_are_within_f16_tolerance_of_f32_on_every_path() {
    for params in ["{}", r#"{"simd": "portable"}"#] {
        engine::install();
        let _scope =
            engine::scoped_kernel_at(&Device::Cpu, Some(cpu_kernel(params)), Precision::F16)
                .expect("scope");
        assert_eq!(
            engine::products_precision(&Device::Cpu),
            Precision::F16,
            "{params}"
        );
    }
    for (m, k, n) in [(1, 1, 1), (7, 13, 5), (33, 70, 65), (64, 31, 97)] {
        for (c, (what, vars, f)) in cases(m, k, n).into_iter().enumerate() {
            let inputs: Vec<&Var> = vars.iter().collect();
            let half = run("{}", Precision::F16, &inputs, &*f);
            let full = run("{}", Precision::F32, &inputs, &*f);
            // Operands rounded to 11 significant bits, sums of up to 97 terms in f32.
            let tol = 3e-3;
            assert_close(&format!("{what} values"), &half.y, &full.y, tol);
            for (i, (a, b)) in half.grads.iter().zip(&full.grads).enumerate() {
                assert_close(&format!("{what} grad of input {i}"), a, b, tol);
            }
            if k > 1 {
                assert!(half.y != full.y, "{what}: the f16 product is the f32 one");
            }
            // Plain products (no other fused op, whose rounding follows the instruction set):
            // the portable path gives the same bits.
            if [0, 2, 3].contains(&c) {
                let portable = run(r#"{"simd": "portable"}"#, Precision::F16, &inputs, &*f);
                assert!(
                    portable.y == half.y,
                    "{what}: the portable path's values differ"
                );
                assert!(
                    portable.grads == half.grads,
                    "{what}: the portable path's gradients differ"
                );
            }
        }
    }
}

#[test]
fn f16_products_are_deterministic() {
    for (what, vars, f) in cases(67, 129, 45) {
        let inputs: Vec<&Var> = vars.iter().collect();
        let a = run("{}", Precision::F16, &inputs, &*f);
        let b = run(r#"{"threads": 1}"#, Precision::F16, &inputs, &*f);
        assert!(a.y == b.y, "{what}: values differ between runs");
        assert!(a.grads == b.grads, "{what}: gradients differ between runs");
    }
}

/// f16 ends at 65504: a product whose operand lies beyond it is infinite, where f32 and bf16
/// multiply it finitely. That is what loss scaling watches for.
#[test]
fn f16_products_overflow_to_infinity_beyond_f16s_range() {
    let x = input(&[2, 3], 1);
    let big = CT::from_vec(
        vec![1.0e5f32, 1.0, 1.0, 2.0, 3.0, 4.0],
        (3, 2),
        &Device::Cpu,
    )
    .expect("w");
    let w = Var::from_tensor(&big).expect("var");
    let f = |t: &[Tensor]| t[0].matmul(&t[1]).expect("matmul");
    let half = run("{}", Precision::F16, &[&x, &w], &f);
    let full = run("{}", Precision::F32, &[&x, &w], &f);
    assert!(full.y.iter().all(|v| v.is_finite()), "{:?}", full.y);
    // Column 0 meets 1e5 (→ inf) for every row with a non-zero x[i][0].
    assert!(
        half.y[0].is_infinite() && half.y[2].is_infinite(),
        "{:?}",
        half.y
    );
    assert!(
        half.y[1].is_finite() && half.y[3].is_finite(),
        "{:?}",
        half.y
    );
}
