//! `layer_norm` and `rms_norm` against f64 references.

use codex_plugin_api::DType;

use super::*;

const EPS: f64 = 1e-5;

/// Layer norm (`rms == false`) or RMS norm: `(y, mean, rstd)`.
fn reference(
    x: &[f64],
    w: &[f64],
    b: &[f64],
    c: usize,
    rms: bool,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut y, mut mean, mut rstd) = (Vec::new(), Vec::new(), Vec::new());
    for xr in x.chunks(c) {
        let m = if rms {
            0.0
        } else {
            xr.iter().sum::<f64>() / c as f64
        };
        let var = xr.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / c as f64;
        let r = 1.0 / (var + EPS).sqrt();
        for j in 0..c {
            y.push((xr[j] - m) * r * w[j] + if rms { 0.0 } else { b[j] });
        }
        mean.push(m);
        rstd.push(r);
    }
    (y, mean, rstd)
}

/// `(dx, dw, db)`.
fn reference_bwd(
    dy: &[f64],
    x: &[f64],
    w: &[f64],
    c: usize,
    rms: bool,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (_, mean, rstd) = reference(x, w, w, c, rms);
    let (mut dx, mut dw, mut db) = (Vec::new(), vec![0.0; c], vec![0.0; c]);
    for (i, (xr, dyr)) in x.chunks(c).zip(dy.chunks(c)).enumerate() {
        let xh: Vec<f64> = xr.iter().map(|v| (v - mean[i]) * rstd[i]).collect();
        let g: Vec<f64> = dyr.iter().zip(w).map(|(d, w)| d * w).collect();
        let a = if rms {
            0.0
        } else {
            g.iter().sum::<f64>() / c as f64
        };
        let bb = dotf(&g, &xh) / c as f64;
        for j in 0..c {
            dx.push(rstd[i] * (g[j] - a - xh[j] * bb));
            dw[j] += dyr[j] * xh[j];
            db[j] += dyr[j];
        }
    }
    (dx, dw, db)
}

fn check(shape: &[usize], rms: bool, dtype: DType, seed: u64) {
    let c = *shape.last().unwrap_or(&1);
    let lead = &shape[..shape.len() - 1];
    let len: usize = shape.iter().product();
    let mut r = rng(seed);
    let x = quantise(
        dtype,
        &uniform(&mut r, len, -3.0, 3.0)
            .iter()
            .map(|v| v + 0.5)
            .collect::<Vec<_>>(),
    );
    let w = quantise(dtype, &uniform(&mut r, c, 0.5, 1.5));
    let b = quantise(dtype, &uniform(&mut r, c, -0.5, 0.5));
    let dy = quantise(dtype, &uniform(&mut r, len, -1.0, 1.0));
    let (y, mean, rstd) = reference(&x, &w, &b, c, rms);
    let (dx, dw, db) = reference_bwd(&dy, &x, &w, c, rms);
    if len <= 300 {
        let loss = |x: &[f64], w: &[f64], b: &[f64]| dotf(&reference(x, w, b, c, rms).0, &dy);
        assert_close(
            "dx vs finite differences",
            &dx,
            &fd(|v| loss(v, &w, &b), &x, 1e-5),
            FD_TOL,
        );
        assert_close(
            "dw vs finite differences",
            &dw,
            &fd(|v| loss(&x, v, &b), &w, 1e-5),
            FD_TOL,
        );
        if !rms {
            assert_close(
                "db vs finite differences",
                &db,
                &fd(|v| loss(&x, &w, v), &b, 1e-5),
                FD_TOL,
            );
        }
    }
    let rows = ((len / c.max(1)) as f64).sqrt();
    let name = if rms { "rms_norm" } else { "layer_norm" };
    for (kname, k) in kernels() {
        let what = format!("{name} {kname} {dtype:?} {shape:?}");
        let (xb, wb, bb) = (
            Buf::floats(dtype, shape, &x),
            Buf::floats(dtype, &[c], &w),
            Buf::floats(dtype, &[c], &b),
        );
        let stat = || Buf::zeros(DType::F32, lead);
        if rms {
            let mut out = [Buf::zeros(dtype, shape), stat()];
            run(&k, "rms_norm.fwd", &[&xb, &wb], &[EPS], &mut out)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_close(&format!("{what} y"), &out[0].values(), &y, tol(dtype, 4.0));
            assert_close(
                &format!("{what} rstd"),
                &out[1].values(),
                &rstd,
                tol(DType::F32, 1.0),
            );
            let ins = [&Buf::floats(dtype, shape, &dy), &xb, &wb, &out[1]];
            let mut grads = [Buf::zeros(dtype, shape), Buf::zeros(dtype, &[c])];
            run(&k, "rms_norm.bwd", &ins, &[], &mut grads)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_close(
                &format!("{what} dx"),
                &grads[0].values(),
                &dx,
                tol(dtype, 4.0),
            );
            assert_close(
                &format!("{what} dw"),
                &grads[1].values(),
                &dw,
                tol(dtype, rows),
            );
        } else {
            let mut out = [Buf::zeros(dtype, shape), stat(), stat()];
            run(&k, "layer_norm.fwd", &[&xb, &wb, &bb], &[EPS], &mut out)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_close(&format!("{what} y"), &out[0].values(), &y, tol(dtype, 4.0));
            assert_close(
                &format!("{what} mean"),
                &out[1].values(),
                &mean,
                tol(DType::F32, 1.0),
            );
            assert_close(
                &format!("{what} rstd"),
                &out[2].values(),
                &rstd,
                tol(DType::F32, 1.0),
            );
            let ins = [&Buf::floats(dtype, shape, &dy), &xb, &wb, &out[1], &out[2]];
            let mut grads = [
                Buf::zeros(dtype, shape),
                Buf::zeros(dtype, &[c]),
                Buf::zeros(dtype, &[c]),
            ];
            run(&k, "layer_norm.bwd", &ins, &[], &mut grads)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_close(
                &format!("{what} dx"),
                &grads[0].values(),
                &dx,
                tol(dtype, 4.0),
            );
            assert_close(
                &format!("{what} dw"),
                &grads[1].values(),
                &dw,
                tol(dtype, rows),
            );
            assert_close(
                &format!("{what} db"),
                &grads[2].values(),
                &db,
                tol(dtype, rows),
            );
        }
    }
}

#[test]
fn norms_match_reference() {
    let shapes: &[&[usize]] = &[
        &[3],
        &[1, 1],
        &[1, 3],
        &[7, 5],
        &[2, 9, 33],
        &[300, 128],
        &[70, 384],
    ];
    for (i, s) in shapes.iter().enumerate() {
        for rms in [false, true] {
            check(s, rms, DType::F32, i as u64);
            check(s, rms, DType::BF16, 20 + i as u64);
        }
    }
}

#[test]
fn weight_gradients_do_not_depend_on_thread_count() {
    let (n, c) = (513, 96);
    let mut r = rng(9);
    let bufs: Vec<Buf> = [n * c, n * c, c]
        .iter()
        .zip([vec![n, c], vec![n, c], vec![c]])
        .map(|(&len, shape)| Buf::floats(DType::F32, &shape, &uniform(&mut r, len, -1.0, 1.0)))
        .collect();
    let stats = Buf::floats(DType::F32, &[n], &vec![0.1; n]);
    let mut results = Vec::new();
    for params in [
        r#"{"threads": 1}"#,
        r#"{"threads": 2}"#,
        r#"{"threads": 3}"#,
    ] {
        let k = CpuKernel::new(params).unwrap_or_else(|e| panic!("{e}"));
        let mut grads = [
            Buf::zeros(DType::F32, &[n, c]),
            Buf::zeros(DType::F32, &[c]),
            Buf::zeros(DType::F32, &[c]),
        ];
        let ins = [&bufs[0], &bufs[1], &bufs[2], &stats, &stats];
        run(&k, "layer_norm.bwd", &ins, &[], &mut grads).unwrap_or_else(|e| panic!("{e}"));
        results.push((grads[1].values(), grads[2].values()));
    }
    assert!(
        results.windows(2).all(|w| w[0] == w[1]),
        "dw/db differ between thread counts"
    );
}
