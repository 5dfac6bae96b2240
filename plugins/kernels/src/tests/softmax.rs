//! `softmax_last_dim` against an f64 reference.

use codex_plugin_api::DType;

use super::*;

fn reference(x: &[f64], n: usize) -> Vec<f64> {
    let mut y = vec![0.0; x.len()];
    for (xr, yr) in x.chunks(n).zip(y.chunks_mut(n)) {
        let m = xr.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = xr.iter().map(|v| (v - m).exp()).sum();
        for (y, x) in yr.iter_mut().zip(xr) {
            *y = (x - m).exp() / s;
        }
    }
    y
}

fn reference_bwd(y: &[f64], dy: &[f64], n: usize) -> Vec<f64> {
    let mut dx = vec![0.0; y.len()];
    for ((yr, dyr), dxr) in y.chunks(n).zip(dy.chunks(n)).zip(dx.chunks_mut(n)) {
        let s = dotf(yr, dyr);
        for ((dx, y), dy) in dxr.iter_mut().zip(yr).zip(dyr) {
            *dx = y * (dy - s);
        }
    }
    dx
}

fn check(shape: &[usize], dtype: DType, seed: u64) {
    let n = *shape.last().unwrap_or(&1);
    let len: usize = shape.iter().product();
    let mut r = rng(seed);
    let x = quantise(dtype, &uniform(&mut r, len, -6.0, 6.0));
    let dy = quantise(dtype, &uniform(&mut r, len, -1.0, 1.0));
    let y = reference(&x, n);
    let dx = reference_bwd(&y, &dy, n);
    if len <= 400 {
        let grad = fd(|x| dotf(&reference(x, n), &dy), &x, 1e-5);
        assert_close("softmax analytic vs finite differences", &dx, &grad, FD_TOL);
    }
    for (name, k) in kernels() {
        let what = format!("{name} {dtype:?} {shape:?}");
        let mut out = [Buf::zeros(dtype, shape)];
        run(
            &k,
            "softmax_last_dim.fwd",
            &[&Buf::floats(dtype, shape, &x)],
            &[],
            &mut out,
        )
        .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_close(&format!("{what} y"), &out[0].values(), &y, tol(dtype, 1.0));
        let yq = Buf::floats(dtype, shape, &y);
        let mut out = [Buf::zeros(dtype, shape)];
        run(
            &k,
            "softmax_last_dim.bwd",
            &[&yq, &Buf::floats(dtype, shape, &dy)],
            &[],
            &mut out,
        )
        .unwrap_or_else(|e| panic!("{what}: {e}"));
        let want = reference_bwd(&quantise(dtype, &y), &dy, n);
        assert_close(
            &format!("{what} dx"),
            &out[0].values(),
            &want,
            tol(dtype, 1.0),
        );
    }
}

#[test]
fn softmax_matches_reference() {
    let shapes: &[&[usize]] = &[
        &[1],
        &[1, 1],
        &[3, 7],
        &[2, 3, 17],
        &[5, 64],
        &[4, 100],
        &[2, 1000],
    ];
    for (i, s) in shapes.iter().enumerate() {
        check(s, DType::F32, i as u64);
        check(s, DType::BF16, 100 + i as u64);
    }
}

#[test]
fn softmax_of_huge_logits_is_finite() {
    let x = [1e30, 0.0, -1e30, 3e38];
    let k = CpuKernel::new("").unwrap_or_else(|e| panic!("{e}"));
    let mut out = [Buf::zeros(DType::F32, &[2, 2])];
    run(
        &k,
        "softmax_last_dim.fwd",
        &[&Buf::floats(DType::F32, &[2, 2], &x)],
        &[],
        &mut out,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_close("y", &out[0].values(), &[1.0, 0.0, 0.0, 1.0], (1e-6, 0.0));
}
