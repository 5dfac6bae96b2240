//! `adamw.step` against `torch.optim.AdamW`'s update, over several steps.

use codex_plugin_api::DType;

use super::*;

/// One step of torch's single-tensor AdamW, in f64.
#[allow(clippy::too_many_arguments)]
fn torch_step(
    p: &mut [f64],
    m: &mut [f64],
    v: &mut [f64],
    g: &[f64],
    lr: f64,
    b1: f64,
    b2: f64,
    eps: f64,
    wd: f64,
    step: f64,
) {
    for i in 0..p.len() {
        p[i] *= 1.0 - lr * wd;
        m[i] += (1.0 - b1) * (g[i] - m[i]);
        v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
        let bc1 = 1.0 - b1.powf(step);
        let bc2 = 1.0 - b2.powf(step);
        let denom = v[i].sqrt() / bc2.sqrt() + eps;
        p[i] -= lr / bc1 * m[i] / denom;
    }
}

fn check(shape: &[usize], grad_dtype: DType, seed: u64) {
    let n: usize = shape.iter().product();
    let mut r = rng(seed);
    let (lr, b1, b2, eps, wd) = (6e-4, 0.9, 0.95, 1e-8, 0.1);
    let p = uniform(&mut r, n, -1.0, 1.0);
    let grads: Vec<Vec<f64>> = (0..3)
        .map(|_| quantise(grad_dtype, &uniform(&mut r, n, -0.1, 0.1)))
        .collect();
    for (name, k) in kernels() {
        let what = format!("{name} {grad_dtype:?} {shape:?}");
        let mut state = [
            Buf::floats(DType::F32, shape, &p),
            Buf::zeros(DType::F32, shape),
            Buf::zeros(DType::F32, shape),
        ];
        for (s, g) in grads.iter().enumerate() {
            let attrs = [lr, b1, b2, eps, wd, (s + 1) as f64];
            run(
                &k,
                "adamw.step",
                &[&Buf::floats(grad_dtype, shape, g)],
                &attrs,
                &mut state,
            )
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        }
        let (mut pr, mut mr, mut vr) = (quantise(DType::F32, &p), vec![0.0; n], vec![0.0; n]);
        for (s, g) in grads.iter().enumerate() {
            torch_step(
                &mut pr,
                &mut mr,
                &mut vr,
                g,
                lr,
                b1,
                b2,
                eps,
                wd,
                (s + 1) as f64,
            );
        }
        assert_close(
            &format!("{what} param"),
            &state[0].values(),
            &pr,
            (1e-6, 1e-6),
        );
        assert_close(&format!("{what} m"), &state[1].values(), &mr, (1e-8, 1e-5));
        assert_close(&format!("{what} v"), &state[2].values(), &vr, (1e-10, 1e-5));
    }
}

#[test]
fn adamw_follows_torch_over_three_steps() {
    for (i, shape) in [&[1][..], &[3], &[7, 5], &[1000, 33]].iter().enumerate() {
        check(shape, DType::F32, i as u64);
        check(shape, DType::BF16, 10 + i as u64);
    }
}

#[test]
fn adamw_updates_misaligned_buffers_in_place() {
    let k = CpuKernel::new("").unwrap_or_else(|e| panic!("{e}"));
    let g = Buf::floats(DType::F32, &[3], &[0.5, -0.5, 0.0]).misaligned();
    let mut state = [
        Buf::floats(DType::F32, &[3], &[1.0, 1.0, 1.0]).misaligned(),
        Buf::zeros(DType::F32, &[3]).misaligned(),
        Buf::zeros(DType::F32, &[3]).misaligned(),
    ];
    run(
        &k,
        "adamw.step",
        &[&g],
        &[0.1, 0.9, 0.999, 1e-8, 0.0, 1.0],
        &mut state,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // The first bias-corrected step moves each weight by lr·sign(g).
    assert_close("param", &state[0].values(), &[0.9, 1.1, 1.0], (1e-6, 0.0));
    assert_close("m", &state[1].values(), &[0.05, -0.05, 0.0], (1e-7, 0.0));
}
