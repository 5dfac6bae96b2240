//! The built-in `cpu` kernel behind the op table: every dispatched op must give the values and
//! gradients of the primitive composition it replaces.
//!
//! Each case runs the same op-table calls twice on the same inputs, once with the kernel
//! active on this thread (`scoped_kernel`) and once with plain ops, over shapes with odd sizes,
//! in f32 and bf16. Inputs are candle `Var`s behind plain handles, so gradients come from
//! candle's own `backward` of `Σ y·w` with fixed irregular weights `w`: that exercises the
//! custom ops' backward exactly as a training step does. `attention` and `adamw_update` are
//! also checked against references written directly in candle and in f64; every fused op's
//! gradient is checked against central finite differences of the kernel's own forward pass;
//! the fusions of a matmul with the bias add or cross-entropy consuming it are compared like
//! any op; and a short `gpt2` training run must follow the same loss curve with and without
//! the kernel.

use codex_engine::candle::{DType as CD, Device, Tensor as CT, Var};
use codex_engine::{self as engine, ParamStore};
use codex_plugin_api::abi_stable::std_types::{RResult, RStr};
use codex_plugin_api::kernel::KernelBox;
use codex_plugin_api::optimizer::ParamGrad;
use codex_plugin_api::tensor::AdamWHyper;
use codex_plugin_api::{ComponentKind, DType, Factory, GeluForm, Init, ParamRole, Tensor};

use crate::model::{batch, build_gpt2, build_model, builtin, TRAIN};

pub(crate) fn cpu_kernel() -> KernelBox {
    let Factory::Kernel(factory) = builtin("cpu", ComponentKind::Kernel).factory else {
        panic!("cpu is registered with a factory of another kind");
    };
    match factory(RStr::from("{}")) {
        RResult::ROk(k) => k,
        RResult::RErr(e) => panic!("the cpu kernel does not build: {e}"),
    }
}

/// Deterministic, irregular values in about [-2, 2].
pub(crate) fn values(n: usize, salt: u32) -> Vec<f32> {
    (0..n as u32)
        .map(|i| {
            let h = (i.wrapping_mul(2_654_435_761) ^ salt.wrapping_mul(40_503)) % 10_007;
            (h as f32 / 10_007.0) * 4.0 - 2.0
        })
        .collect()
}

pub(crate) fn input(shape: &[usize], salt: u32, dtype: CD) -> Var {
    let n = shape.iter().product();
    let t = CT::from_vec(values(n, salt), shape, &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .expect("input");
    Var::from_tensor(&t).expect("var")
}

pub(crate) fn flat(t: &CT) -> Vec<f32> {
    t.to_dtype(CD::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .expect("read back")
}

/// Output values and the gradient of every input, for one run of `f`.
struct Run {
    y: Vec<f32>,
    grads: Vec<Vec<f32>>,
}

/// Run `f` on handles to `inputs` with the kernel on or off, then back-propagate `Σ y·w`.
fn run(kernel: bool, inputs: &[&Var], f: &dyn Fn(&[Tensor]) -> Tensor) -> Run {
    engine::install();
    let _scope =
        engine::scoped_kernel(&Device::Cpu, kernel.then(cpu_kernel)).expect("kernel scope");
    let handles: Vec<Tensor> = inputs
        .iter()
        .map(|v| Tensor::from_id(engine::insert(v.as_tensor().clone())))
        .collect();
    let y = engine::get(f(&handles).id()).expect("result");
    let w = CT::from_vec(values(y.elem_count(), 99), y.shape(), &Device::Cpu).expect("weights");
    let loss = y
        .to_dtype(CD::F32)
        .and_then(|y| y.mul(&w))
        .and_then(|p| p.sum_all())
        .expect("loss");
    let grads = loss.backward().expect("backward");
    Run {
        y: flat(&y),
        grads: inputs
            .iter()
            .map(|v| {
                let g = grads
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("no gradient for an input"));
                flat(g)
            })
            .collect(),
    }
}

fn tolerance(dtype: CD) -> f32 {
    match dtype {
        CD::BF16 => 3e-2,
        _ => 2e-4,
    }
}

/// `|a − b| ≤ tol·(1 + max|b|)` element by element.
pub(crate) fn assert_close(what: &str, found: &[f32], expected: &[f32], tol: f32) {
    assert_eq!(found.len(), expected.len(), "{what}: lengths differ");
    let scale = 1.0 + expected.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    for (i, (f, e)) in found.iter().zip(expected).enumerate() {
        assert!(
            (f - e).abs() <= tol * scale,
            "{what}[{i}]: kernel {f}, plain ops {e} (tolerance {})",
            tol * scale
        );
    }
}

/// Kernel on versus off: values and every input's gradient.
fn compare(what: &str, dtype: CD, inputs: &[&Var], f: &dyn Fn(&[Tensor]) -> Tensor) {
    let fused = run(true, inputs, f);
    let plain = run(false, inputs, f);
    let tol = tolerance(dtype);
    assert_close(&format!("{what} {dtype:?} values"), &fused.y, &plain.y, tol);
    for (i, (a, b)) in fused.grads.iter().zip(&plain.grads).enumerate() {
        assert_close(&format!("{what} {dtype:?} grad of input {i}"), a, b, tol);
    }
}

const SHAPES: [&[usize]; 4] = [&[1, 1], &[3, 5], &[2, 3, 37], &[4, 130]];
const DTYPES: [CD; 2] = [CD::F32, CD::BF16];

#[test]
fn softmax_matches_primitives_on_every_dim() {
    for dtype in DTYPES {
        for shape in SHAPES {
            let x = input(shape, 1, dtype);
            for dim in 0..shape.len() {
                compare(
                    &format!("softmax {shape:?} dim {dim}"),
                    dtype,
                    &[&x],
                    &|t| t[0].softmax(dim).expect("softmax"),
                );
            }
        }
    }
}

#[test]
fn layer_norm_and_rms_norm_match_primitives() {
    for dtype in DTYPES {
        for shape in SHAPES {
            let c = shape[shape.len() - 1];
            let x = input(shape, 2, dtype);
            let w = input(&[c], 3, dtype);
            let b = input(&[c], 4, dtype);
            compare(
                &format!("layer_norm {shape:?}"),
                dtype,
                &[&x, &w, &b],
                &|t| t[0].layer_norm(&t[1], &t[2], 1e-5).expect("layer_norm"),
            );
            compare(&format!("rms_norm {shape:?}"), dtype, &[&x, &w], &|t| {
                t[0].rms_norm(&t[1], 1e-6).expect("rms_norm")
            });
        }
    }
}

#[test]
fn gelu_both_forms_match_primitives() {
    for dtype in DTYPES {
        for shape in SHAPES {
            let x = input(shape, 5, dtype);
            for form in [GeluForm::Erf, GeluForm::Tanh] {
                compare(&format!("gelu {form:?} {shape:?}"), dtype, &[&x], &|t| {
                    t[0].gelu(form).expect("gelu")
                });
            }
        }
    }
}

#[test]
fn cross_entropy_matches_primitives_with_ignored_rows() {
    for dtype in DTYPES {
        for (n, v) in [(1, 2), (7, 5), (33, 129)] {
            let logits = input(&[n, v], 6, dtype);
            // Every third row ignored.
            let targets: Vec<u32> = (0..n as u32)
                .map(|i| {
                    if i % 3 == 2 {
                        u32::MAX
                    } else {
                        (i * 7) % v as u32
                    }
                })
                .collect();
            let counted = targets.iter().filter(|&&t| t != u32::MAX).count() as f64;
            let sums = std::cell::RefCell::new(Vec::new());
            for kernel in [true, false] {
                let r = run(kernel, &[&logits], &|t| {
                    let ids = Tensor::from_u32(&targets, &[n], &t[0]).expect("targets");
                    let ce = t[0].cross_entropy(&ids, u32::MAX).expect("cross_entropy");
                    assert_eq!(ce.tokens.to_scalar().expect("tokens"), counted);
                    let correct = ce.correct.to_scalar().expect("correct");
                    sums.borrow_mut().push(correct as f32);
                    ce.loss_sum
                });
                let mut s = sums.borrow_mut();
                s.push(r.y[0]);
                s.extend_from_slice(&r.grads[0]);
            }
            let sums = sums.into_inner();
            let (a, b) = sums.split_at(sums.len() / 2);
            assert_close(
                &format!("cross_entropy [{n}, {v}] {dtype:?}: correct, loss, gradient"),
                a,
                b,
                tolerance(dtype),
            );
        }
    }
}

#[test]
fn bias_adds_and_leading_sums_match_primitives() {
    for dtype in DTYPES {
        for (a_shape, b_shape) in [
            (&[5, 3][..], &[3][..]),
            (&[2, 7, 33], &[33]),
            (&[2, 7, 33], &[7, 33]),
            (&[1, 1], &[1]),
        ] {
            let a = input(a_shape, 7, dtype);
            let b = input(b_shape, 8, dtype);
            compare(
                &format!("add {a_shape:?} + {b_shape:?}"),
                dtype,
                &[&a, &b],
                &|t| t[0].add(&t[1]).expect("add"),
            );
            compare(
                &format!("add {b_shape:?} + {a_shape:?}"),
                dtype,
                &[&a, &b],
                &|t| t[1].add(&t[0]).expect("add"),
            );
            let lead = a_shape.len() - b_shape.len();
            let dims: Vec<usize> = (0..lead).collect();
            for keepdim in [false, true] {
                compare(
                    &format!("sum {a_shape:?} over {dims:?} keepdim {keepdim}"),
                    dtype,
                    &[&a],
                    &|t| t[0].sum(&dims, keepdim).expect("sum"),
                );
            }
        }
    }
}

#[test]
fn matmul_then_bias_add_fuses_with_the_same_values_and_gradients() {
    for dtype in DTYPES {
        for (m, k, n) in [(1, 1, 1), (7, 13, 5), (33, 16, 65)] {
            let x = input(&[m, k], 21, dtype);
            let w = input(&[k, n], 22, dtype);
            let b = input(&[n], 23, dtype);
            let what = format!("x [{m}, {k}] · w [{k}, {n}] + b");
            compare(&what, dtype, &[&x, &w, &b], &|t| {
                t[0].matmul(&t[1])
                    .and_then(|a| a.add(&t[2]))
                    .expect("linear")
            });
            compare(&format!("b + {what}"), dtype, &[&x, &w, &b], &|t| {
                t[0].matmul(&t[1])
                    .and_then(|a| t[2].add(&a))
                    .expect("linear")
            });
            // A strided slice of a wider weight, as a fused q/k/v projection takes it, and a
            // product used twice: the second use back-propagates through the plain matmul.
            let wide = input(&[k, 3 * n], 24, dtype);
            compare(
                &format!("{what}, w a slice"),
                dtype,
                &[&x, &wide, &b],
                &|t| {
                    let w = t[1].narrow(1, n, n).expect("narrow");
                    let a = t[0].matmul(&w).expect("matmul");
                    let y = a.add(&t[2]).expect("add");
                    y.mul(&a).expect("second use")
                },
            );
        }
    }
}

#[test]
fn matmul_then_cross_entropy_fuses_with_the_same_values_and_gradients() {
    for dtype in DTYPES {
        for (n, k, v) in [(1, 1, 2), (7, 5, 9), (33, 16, 129)] {
            let x = input(&[n, k], 31, dtype);
            let w = input(&[v, k], 32, dtype);
            let targets: Vec<u32> = (0..n as u32)
                .map(|i| {
                    if i % 4 == 3 {
                        u32::MAX
                    } else {
                        (i * 5) % v as u32
                    }
                })
                .collect();
            // As a language model does it: logits `x · wᵀ` reshaped to `[1, n, v]` by the
            // model and back to `[n, v]` for the loss.
            compare(
                &format!("cross_entropy of x [{n}, {k}] · wᵀ [{k}, {v}]"),
                dtype,
                &[&x, &w],
                &|t| {
                    let logits = t[0]
                        .matmul(&t[1].transpose(0, 1).expect("wT"))
                        .and_then(|l| l.reshape(&[1, n, v]))
                        .and_then(|l| l.reshape(&[n, v]))
                        .expect("logits");
                    let ids = Tensor::from_u32(&targets, &[n], &t[0]).expect("targets");
                    logits
                        .cross_entropy(&ids, u32::MAX)
                        .expect("cross_entropy")
                        .loss_sum
                },
            );
        }
    }
}

/// Central finite differences of `Σ y·w` (the loss [`run`] differentiates) with the kernel
/// on, at a few elements of every input, against the kernel's analytic gradient. f32 only:
/// bf16 has too few bits for a difference quotient.
fn finite_differences(what: &str, inputs: &[&Var], f: &dyn Fn(&[Tensor]) -> Tensor) {
    let analytic = run(true, inputs, f);
    let loss_at = |values: &[CT]| -> f64 {
        let vars: Vec<Var> = values
            .iter()
            .map(|t| Var::from_tensor(t).expect("var"))
            .collect();
        let refs: Vec<&Var> = vars.iter().collect();
        let y = run(true, &refs, f).y;
        let w = values_f64(y.len());
        y.iter().zip(&w).map(|(a, b)| f64::from(*a) * b).sum()
    };
    let eps = 1e-2f32;
    for (i, var) in inputs.iter().enumerate() {
        let base = flat(var.as_tensor());
        let n = base.len();
        // A handful of elements spread over the tensor, first and last included.
        let picks: Vec<usize> = (0..5).map(|j| j * (n - 1) / 4).collect();
        for &e in &picks {
            let shifted = |delta: f32| -> Vec<CT> {
                inputs
                    .iter()
                    .enumerate()
                    .map(|(j, v)| {
                        let mut data = flat(v.as_tensor());
                        if j == i {
                            data[e] += delta;
                        }
                        CT::from_vec(data, v.as_tensor().shape(), &Device::Cpu).expect("input")
                    })
                    .collect()
            };
            let numeric =
                (loss_at(&shifted(eps)) - loss_at(&shifted(-eps))) / (2.0 * f64::from(eps));
            let exact = f64::from(analytic.grads[i][e]);
            assert!(
                (numeric - exact).abs() <= 2e-2 * (1.0 + exact.abs()),
                "{what}: d loss / d input {i}[{e}]: kernel {exact}, finite differences {numeric}"
            );
        }
    }
}

/// The weights of [`run`]'s loss, in f64.
fn values_f64(n: usize) -> Vec<f64> {
    values(n, 99).into_iter().map(f64::from).collect()
}

#[test]
fn fused_gradients_match_finite_differences() {
    let f32_ = CD::F32;
    let x = input(&[3, 7], 41, f32_);
    finite_differences("softmax", &[&x], &|t| t[0].softmax(1).expect("softmax"));
    for form in [GeluForm::Erf, GeluForm::Tanh] {
        finite_differences(&format!("gelu {form:?}"), &[&x], &|t| {
            t[0].gelu(form).expect("gelu")
        });
    }
    let w = input(&[7], 42, f32_);
    let b = input(&[7], 43, f32_);
    finite_differences("layer_norm", &[&x, &w, &b], &|t| {
        t[0].layer_norm(&t[1], &t[2], 1e-5).expect("layer_norm")
    });
    finite_differences("rms_norm", &[&x, &w], &|t| {
        t[0].rms_norm(&t[1], 1e-6).expect("rms_norm")
    });
    finite_differences("bias add", &[&x, &b], &|t| t[0].add(&t[1]).expect("add"));
    finite_differences("sum over rows", &[&x], &|t| {
        t[0].sum(&[0], false).expect("sum")
    });
    let (q, k, v) = (
        input(&[2, 5, 3], 44, f32_),
        input(&[2, 5, 3], 45, f32_),
        input(&[2, 5, 3], 46, f32_),
    );
    finite_differences("attention", &[&q, &k, &v], &|t| {
        t[0].attention(&t[1], &t[2], true, 0.6).expect("attention")
    });
    let (k, v) = (input(&[2, 8, 3], 49, f32_), input(&[2, 8, 3], 50, f32_));
    finite_differences("attention over more keys", &[&q, &k, &v], &|t| {
        t[0].attention(&t[1], &t[2], true, 0.6).expect("attention")
    });
    let mw = input(&[7, 4], 47, f32_);
    let mb = input(&[4], 48, f32_);
    finite_differences("matmul + bias", &[&x, &mw, &mb], &|t| {
        t[0].matmul(&t[1])
            .and_then(|a| a.add(&t[2]))
            .expect("linear")
    });
    let targets = [2u32, u32::MAX, 0];
    finite_differences("cross_entropy", &[&x], &|t| {
        let ids = Tensor::from_u32(&targets, &[3], &t[0]).expect("targets");
        t[0].cross_entropy(&ids, u32::MAX).expect("ce").loss_sum
    });
    finite_differences("matmul + cross_entropy", &[&x, &mw], &|t| {
        let ids = Tensor::from_u32(&targets, &[3], &t[0]).expect("targets");
        t[0].matmul(&t[1])
            .and_then(|l| l.cross_entropy(&ids, u32::MAX))
            .expect("ce")
            .loss_sum
    });
}

/// `softmax(scale·q·kᵀ [causal]) · v` written directly in candle, in f32, with the causal
/// mask built by hand: query `i` of `t` sees keys `0..=s − t + i` of `s`.
fn attention_reference(q: &CT, k: &CT, v: &CT, causal: bool, scale: f64) -> Vec<f32> {
    let f = |t: &CT| t.to_dtype(CD::F32).expect("f32");
    let (q, k, v) = (f(q), f(k), f(v));
    let r = q.rank();
    let (t, s) = (q.dim(r - 2).expect("t"), k.dim(r - 2).expect("s"));
    let mut scores = q
        .matmul(
            &k.transpose(r - 2, r - 1)
                .expect("kT")
                .contiguous()
                .expect("kT"),
        )
        .and_then(|x| x.affine(scale, 0.0))
        .expect("scores")
        .to_vec3::<f32>()
        .expect("3-d scores");
    for head in scores.iter_mut() {
        for (i, row) in head.iter_mut().enumerate() {
            if causal {
                row.iter_mut()
                    .skip(s - t + i + 1)
                    .for_each(|x| *x = f32::NEG_INFINITY);
            }
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let sum: f32 = row.iter().map(|x| (x - m).exp()).sum();
            row.iter_mut().for_each(|x| *x = (*x - m).exp() / sum);
        }
    }
    let n = scores.len();
    let p: Vec<f32> = scores.into_iter().flatten().flatten().collect();
    let p = CT::from_vec(p, (n, t, s), &Device::Cpu).expect("probs");
    flat(&p.matmul(&v).expect("out"))
}

#[test]
fn attention_matches_primitives_and_a_direct_reference() {
    for dtype in DTYPES {
        for (bh, t, d) in [(1, 1, 1), (3, 5, 7), (2, 33, 16), (1, 70, 9)] {
            let q = input(&[bh, t, d], 11, dtype);
            let k = input(&[bh, t, d], 12, dtype);
            let v = input(&[bh, t, d], 13, dtype);
            let scale = 1.0 / (d as f64).sqrt();
            for causal in [true, false] {
                let what = format!("attention [{bh}, {t}, {d}] causal {causal}");
                compare(&what, dtype, &[&q, &k, &v], &|x| {
                    x[0].attention(&x[1], &x[2], causal, scale)
                        .expect("attention")
                });
                let want =
                    attention_reference(q.as_tensor(), k.as_tensor(), v.as_tensor(), causal, scale);
                for kernel in [true, false] {
                    let got = run(kernel, &[&q, &k, &v], &|x| {
                        x[0].attention(&x[1], &x[2], causal, scale)
                            .expect("attention")
                    });
                    assert_close(
                        &format!("{what} {dtype:?} kernel {kernel} vs reference"),
                        &got.y,
                        &want,
                        tolerance(dtype),
                    );
                }
            }
        }
    }
    // Fewer queries than keys: new positions over a key/value cache and themselves, the
    // causal mask aligned to the last key. One query (a decoding step), a few, and blocks.
    for dtype in DTYPES {
        for (bh, t, s, d) in [(1, 1, 1, 4), (3, 1, 9, 7), (2, 4, 11, 16), (1, 33, 70, 9)] {
            let q = input(&[bh, t, d], 21, dtype);
            let k = input(&[bh, s, d], 22, dtype);
            let v = input(&[bh, s, d], 23, dtype);
            let scale = 1.0 / (d as f64).sqrt();
            let what = format!("attention of {t} queries over {s} keys");
            compare(&what, dtype, &[&q, &k, &v], &|x| {
                x[0].attention(&x[1], &x[2], true, scale)
                    .expect("attention")
            });
            let want =
                attention_reference(q.as_tensor(), k.as_tensor(), v.as_tensor(), true, scale);
            for kernel in [true, false] {
                let got = run(kernel, &[&q, &k, &v], &|x| {
                    x[0].attention(&x[1], &x[2], true, scale)
                        .expect("attention")
                });
                assert_close(
                    &format!("{what} {dtype:?} kernel {kernel} vs reference"),
                    &got.y,
                    &want,
                    tolerance(dtype),
                );
            }
        }
    }
    // Four dimensions, as a model calls it.
    let q = input(&[2, 3, 17, 8], 14, CD::F32);
    let k = input(&[2, 3, 17, 8], 15, CD::F32);
    let v = input(&[2, 3, 17, 8], 16, CD::F32);
    compare("attention [2, 3, 17, 8]", CD::F32, &[&q, &k, &v], &|x| {
        x[0].attention(&x[1], &x[2], true, 0.3).expect("attention")
    });
    // Heads split off `[b, t, h·d]` projections by a reshape and a transpose: strided inputs.
    for dtype in DTYPES {
        let (b, t, h, d) = (2, 9, 3, 5);
        let q = input(&[b * t, h * d], 17, dtype);
        let k = input(&[b * t, h * d], 18, dtype);
        let v = input(&[b * t, h * d], 19, dtype);
        compare("attention of strided heads", dtype, &[&q, &k, &v], &|x| {
            let heads = |t_: &Tensor| {
                t_.reshape(&[b, t, h, d])
                    .and_then(|r| r.transpose(1, 2))
                    .expect("heads")
            };
            heads(&x[0])
                .attention(&heads(&x[1]), &heads(&x[2]), true, 0.4)
                .and_then(|y| y.permute(&[0, 2, 1, 3]))
                .and_then(|y| y.reshape(&[b * t, h * d]))
                .expect("attention")
        });
    }
}

#[test]
fn attention_rejects_mismatched_shapes() {
    engine::install();
    let q = Tensor::from_id(engine::insert(
        input(&[2, 5, 8], 1, CD::F32).as_tensor().clone(),
    ));
    let k = Tensor::from_id(engine::insert(
        input(&[2, 4, 8], 2, CD::F32).as_tensor().clone(),
    ));
    let err = q
        .attention(&k, &k, true, 1.0)
        .expect_err("causal with 5 queries and 4 keys")
        .to_string();
    assert!(
        err.contains("attention") && err.contains("found 5 queries and 4 keys"),
        "{err}"
    );
    let bad = Tensor::from_id(engine::insert(
        input(&[2, 5, 3], 3, CD::F32).as_tensor().clone(),
    ));
    let err = q
        .attention(&bad, &bad, false, 1.0)
        .expect_err("head dims differ")
        .to_string();
    assert!(err.contains("[.., t, d]"), "{err}");
}

/// `torch.optim.AdamW` on one tensor in f64.
fn adamw_reference(p: &mut [f64], m: &mut [f64], v: &mut [f64], g: &[f32], h: AdamWHyper) {
    let t = h.step as i32;
    let (bc1, bc2) = (1.0 - h.beta1.powi(t), 1.0 - h.beta2.powi(t));
    for i in 0..p.len() {
        let g = f64::from(g[i]);
        p[i] *= 1.0 - h.lr * h.weight_decay;
        m[i] = h.beta1 * m[i] + (1.0 - h.beta1) * g;
        v[i] = h.beta2 * v[i] + (1.0 - h.beta2) * g * g;
        p[i] -= h.lr / bc1 * m[i] / (v[i].sqrt() / bc2.sqrt() + h.eps);
    }
}

#[test]
fn adamw_update_matches_torch_with_and_without_kernel() {
    engine::install();
    let shape = [7usize, 13];
    let n = 7 * 13;
    for kernel in [true, false] {
        let _scope =
            engine::scoped_kernel(&Device::Cpu, kernel.then(cpu_kernel)).expect("kernel scope");
        let mut store = ParamStore::new(Device::Cpu, 3);
        let p = Tensor::from_id(
            store
                .declare_param("w", &shape, ParamRole::Weight, Init::Normal { std: 1.0 })
                .expect("param"),
        );
        let state = |store: &mut ParamStore, name: &str| {
            Tensor::from_id(
                store
                    .declare_state(name, &shape, DType::F32, Init::Zeros)
                    .expect("state"),
            )
        };
        let m = state(&mut store, "w.exp_avg");
        let v = state(&mut store, "w.exp_avg_sq");
        let mut rp: Vec<f64> = p
            .to_vec_f32()
            .expect("p")
            .into_iter()
            .map(f64::from)
            .collect();
        let (mut rm, mut rv) = (vec![0.0; n], vec![0.0; n]);
        for step in 1..=3u64 {
            let g = values(n, step as u32 + 20);
            let grad = Tensor::from_f32(&g, &shape, DType::F32, &p).expect("grad");
            let h = AdamWHyper {
                lr: 0.01 * step as f64,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: if step == 2 { 0.0 } else { 0.1 },
                step,
            };
            p.adamw_update(&grad, &m, &v, h).expect("adamw_update");
            adamw_reference(&mut rp, &mut rm, &mut rv, &g, h);
            let read = |t: &Tensor| t.to_vec_f32().expect("read back");
            let want = |r: &[f64]| r.iter().map(|&x| x as f32).collect::<Vec<_>>();
            let at = format!("kernel {kernel} step {step}");
            assert_close(&format!("param {at}"), &read(&p), &want(&rp), 1e-5);
            assert_close(&format!("exp_avg {at}"), &read(&m), &want(&rm), 1e-5);
            assert_close(&format!("exp_avg_sq {at}"), &read(&v), &want(&rv), 1e-5);
        }
        let err = p
            .adamw_update(
                &Tensor::from_f32(&[0.0; 3], &[3], DType::F32, &p).expect("grad"),
                &m,
                &v,
                AdamWHyper {
                    lr: 0.1,
                    beta1: 0.9,
                    beta2: 0.95,
                    eps: 1e-8,
                    weight_decay: 0.0,
                    step: 1,
                },
            )
            .expect_err("wrong gradient shape")
            .to_string();
        assert!(
            err.contains("adamw_update") && err.contains("one shape"),
            "{err}"
        );
    }
}

/// Five AdamW steps of a small `gpt2` (through its registered factory and the `adamw`
/// optimizer's), returning the loss before each step.
fn gpt2_losses(kernel: bool) -> Vec<f64> {
    let _scope = engine::scoped_kernel(&Device::Cpu, kernel.then(cpu_kernel)).expect("scope");
    let params = r#"{"n_layer": 2, "n_head": 2, "n_embd": 24, "n_positions": 16, "activation_function": "gelu"}"#;
    let vocab = 31;
    let mut built = build_gpt2(params, vocab, 5).expect("gpt2 builds");
    let Factory::Optimizer(factory) = builtin("adamw", ComponentKind::Optimizer).factory else {
        panic!("adamw is registered with a factory of another kind");
    };
    let mut opt = match factory(
        RStr::from(r#"{"betas": [0.9, 0.95], "weight_decay": 0.1, "no_decay": []}"#),
        built.store.as_tensor_store(),
    ) {
        RResult::ROk(o) => o,
        RResult::RErr(e) => panic!("adamw does not build: {e}"),
    };
    let data = batch(3, 13, vocab as u32);
    let mut losses = Vec::new();
    for step in 1..=5u64 {
        let loss = built.loss(&data, TRAIN);
        losses.push(loss.to_scalar().expect("loss"));
        loss.backward().expect("backward");
        let infos = built.params();
        let held: Vec<(usize, Tensor, Tensor)> = infos
            .iter()
            .enumerate()
            .map(|(i, info)| {
                let p = Tensor::retain(info.id);
                let g = p
                    .grad()
                    .expect("grad")
                    .expect("every parameter has a gradient");
                (i, p, g)
            })
            .collect();
        let grads: Vec<ParamGrad> = held
            .iter()
            .map(|(index, p, g)| ParamGrad {
                index: *index,
                param: p.id(),
                grad: g.id(),
            })
            .collect();
        let r = opt.step(
            grads.as_slice().into(),
            codex_plugin_api::OptimStep { lr: 3e-3, step },
        );
        if let RResult::RErr(e) = r {
            panic!("optimizer step: {e}");
        }
        built.store.zero_grads();
    }
    losses
}

/// Every parameter's gradient after two backward passes (accumulated in its slot) of the
/// built-in model `name`, with the kernel or without.
fn model_grads(name: &str, params: &str, kernel: bool) -> Vec<(String, Vec<f32>)> {
    let _scope = engine::scoped_kernel(&Device::Cpu, kernel.then(cpu_kernel)).expect("scope");
    let vocab = 29;
    let built = build_model(name, params, vocab, 9).expect("model builds");
    for (b, t) in [(2, 7), (3, 5)] {
        built
            .loss(&batch(b, t, vocab as u32), TRAIN)
            .backward()
            .expect("backward");
    }
    built
        .params()
        .iter()
        .map(|info| {
            let g = Tensor::retain(info.id)
                .grad()
                .expect("grad")
                .unwrap_or_else(|| panic!("{name}: {} has no gradient", info.name));
            (info.name.clone(), g.to_vec_f32().expect("read back"))
        })
        .collect()
}

/// With the kernel, fused products send their weights' gradients to the slots themselves:
/// whole weights, GPT-2's q/k/v slices of `c_attn`, `[out, in]` weights used transposed, a tied
/// embedding that is also the LM head. Each slot must hold what candle's own backward gives,
/// over two accumulated backward passes.
#[test]
fn fused_products_give_every_weight_the_gradient_of_the_composed_path() {
    let models = [
        (
            "gpt2",
            r#"{"n_layer": 2, "n_head": 2, "n_embd": 16, "n_positions": 12,
                "embd_pdrop": 0.0, "attn_pdrop": 0.0, "resid_pdrop": 0.0}"#,
        ),
        (
            "llama",
            r#"{"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
                "num_attention_heads": 2, "max_position_embeddings": 12}"#,
        ),
        (
            "llama",
            r#"{"model_type": "qwen2", "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2,
                "max_position_embeddings": 12, "tie_word_embeddings": false}"#,
        ),
    ];
    for (name, params) in models {
        let fused = model_grads(name, params, true);
        let plain = model_grads(name, params, false);
        assert_eq!(fused.len(), plain.len());
        for ((param, a), (_, b)) in fused.iter().zip(&plain) {
            assert_close(&format!("{name}: gradient of {param}"), a, b, 1e-4);
        }
    }
}

#[test]
fn gpt2_trains_along_the_same_loss_curve_with_and_without_the_kernel() {
    let fused = gpt2_losses(true);
    let plain = gpt2_losses(false);
    assert!(
        fused[4] < fused[0] - 0.05,
        "the loss did not fall with the kernel: {fused:?}"
    );
    for (i, (a, b)) in fused.iter().zip(&plain).enumerate() {
        assert!(
            (a - b).abs() <= 1e-3 * b.abs().max(1.0),
            "step {i}: loss {a} with the kernel, {b} without ({fused:?} vs {plain:?})"
        );
    }
}

/// A short training run through the config, with `kernel: "cpu"` or without: the train and
/// validation loss records.
fn run_losses(dir: &std::path::Path, kernel: bool) -> Vec<(String, u64, f64)> {
    use codex_host::run::{self as session, RunOptions};
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/data/code");
    let text = format!(
        r#"(
    experiment: "kernels",
    seed: 11,
    data: (train: [Text(paths: ["{data}/*"])], val_fraction: 0.34, cache_dir: "{cache}"),
    tokenizer: (name: "bytes"),
    model: (name: "gpt2", params: (n_layer: 2, n_head: 2, n_embd: 32, n_positions: 32,
        embd_pdrop: 0.0, attn_pdrop: 0.0, resid_pdrop: 0.0)),
    optimizer: (name: "adamw", lr: 3e-3),
    train: (max_steps: 12, seq_len: 32, batch_size: 4, eval_every: 6, log_every: 2),
    sinks: [],
    {kernel}
)"#,
        data = data.display(),
        cache = codex_tests::token_cache().display(),
        kernel = if kernel {
            r#"kernel: "cpu","#
        } else {
            r#"kernel: "none","#
        },
    );
    let name = if kernel { "fused" } else { "plain" };
    let path = dir.join(format!("{name}.ron"));
    std::fs::write(&path, text).expect("write the config");
    let config = codex_host::config::Config::load(&path, &[]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.kernel.as_deref(), kernel.then_some("cpu"));
    let registry = codex_host::plugins::registry::Registry::with_builtins().expect("registry");
    let options = RunOptions {
        run_dir: Some(dir.join(name)),
        runs_root: dir.join("runs"),
        stop: None,
        progress: false,
        allow_plugin_change: false,
        retune: false,
        skip_batches: 0,
    };
    let summary = session::run(&config, &registry, &options).unwrap_or_else(|e| panic!("{e:#}"));
    std::fs::read_to_string(summary.run_dir.join("metrics.ndjson"))
        .expect("metrics")
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a json record"))
        .filter(|r| r["name"] == "loss")
        .map(|r| {
            (
                r["split"].as_str().unwrap_or_default().to_string(),
                r["step"].as_u64().expect("step"),
                r["value"].as_f64().expect("value"),
            )
        })
        .collect()
}

#[test]
fn the_config_switch_gives_the_same_loss_curve_with_kernels_on_and_off() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let fused = run_losses(tmp.path(), true);
    let plain = run_losses(tmp.path(), false);
    assert_eq!(fused.len(), plain.len(), "{fused:?} vs {plain:?}");
    assert!(
        fused.iter().filter(|r| r.0 == "train").count() >= 6 && fused.iter().any(|r| r.0 == "val"),
        "{fused:?}"
    );
    for (a, b) in fused.iter().zip(&plain) {
        assert_eq!((&a.0, a.1), (&b.0, b.1), "records differ in order");
        assert!(
            (a.2 - b.2).abs() <= 2e-3 * b.2.abs().max(1.0),
            "{} loss at step {}: {} with the kernel, {} without",
            a.0,
            a.1,
            a.2,
            b.2
        );
    }
    // Fused ops round differently: identical bits everywhere would mean the run never used
    // the kernel (say, on a thread that lost the config's setting).
    assert!(
        fused
            .iter()
            .zip(&plain)
            .any(|(a, b)| a.2.to_bits() != b.2.to_bits()),
        "the run with `kernel: \"cpu\"` gave bit-identical losses: the kernel was not used"
    );
}

#[test]
fn reshapes_back_to_a_shape_are_plain_tensors_never_the_parameter() {
    engine::install();
    for kernel in [true, false] {
        let _scope =
            engine::scoped_kernel(&Device::Cpu, kernel.then(cpu_kernel)).expect("kernel scope");
        let mut store = ParamStore::new(Device::Cpu, 3);
        let p = Tensor::from_id(
            store
                .declare_param("w", &[2, 3], ParamRole::Weight, Init::Zeros)
                .expect("param"),
        );
        let same = p.reshape(&[2, 3]).expect("reshape");
        let back = p
            .reshape(&[3, 2])
            .and_then(|r| r.reshape(&[2, 3]))
            .expect("reshape");
        let value = Tensor::from_f32(&[1.0; 6], &[2, 3], DType::F32, &p).expect("value");
        for r in [&same, &back] {
            let err = r.assign(&value).expect_err("a reshape is not assignable");
            assert!(err.to_string().contains("not a declared"), "{err}");
        }
        assert_eq!(p.to_vec_f32().expect("read"), vec![0.0; 6]);
    }
}
