//! `gelu_erf` and `gelu_tanh` against f64 references.

use codex_plugin_api::DType;

use super::*;

fn gelu_erf(x: f64) -> f64 {
    0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))
}

fn gelu_erf_grad(x: f64) -> f64 {
    0.5 * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))
        + x * (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt()
}

const K0: f64 = 0.797_884_560_802_865_4;
const K1: f64 = 0.044_715;

fn gelu_tanh(x: f64) -> f64 {
    0.5 * x * (1.0 + (K0 * (x + K1 * x * x * x)).tanh())
}

fn gelu_tanh_grad(x: f64) -> f64 {
    let th = (K0 * (x + K1 * x * x * x)).tanh();
    0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * K0 * (1.0 + 3.0 * K1 * x * x)
}

fn check(
    form: &str,
    f: fn(f64) -> f64,
    g: fn(f64) -> f64,
    shape: &[usize],
    dtype: DType,
    seed: u64,
) {
    let len: usize = shape.iter().product();
    let mut r = rng(seed);
    let mut x = uniform(&mut r, len, -8.0, 8.0);
    // Cover the region where erf and tanh saturate, and exact zeros.
    for (i, v) in x.iter_mut().enumerate().take(4) {
        *v = [0.0, -12.0, 12.0, -3.5][i];
    }
    let x = quantise(dtype, &x);
    let dy = quantise(dtype, &uniform(&mut r, len, -1.0, 1.0));
    let y: Vec<f64> = x.iter().map(|&v| f(v)).collect();
    let dx: Vec<f64> = x.iter().zip(&dy).map(|(&v, d)| g(v) * d).collect();
    let grad: Vec<f64> = x
        .iter()
        .zip(&dy)
        .map(|(&v, d)| d * fd(|x| f(x[0]), &[v], 1e-5)[0])
        .collect();
    assert_close(
        &format!("{form} analytic vs finite differences"),
        &dx,
        &grad,
        FD_TOL,
    );
    for (name, k) in kernels() {
        let what = format!("{form} {name} {dtype:?} {shape:?}");
        let mut out = [Buf::zeros(dtype, shape)];
        run(
            &k,
            &format!("{form}.fwd"),
            &[&Buf::floats(dtype, shape, &x)],
            &[],
            &mut out,
        )
        .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_close(&format!("{what} y"), &out[0].values(), &y, tol(dtype, 1.0));
        let mut out = [Buf::zeros(dtype, shape)];
        let ins = [
            &Buf::floats(dtype, shape, &x),
            &Buf::floats(dtype, shape, &dy),
        ];
        run(&k, &format!("{form}.bwd"), &ins, &[], &mut out)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_close(
            &format!("{what} dx"),
            &out[0].values(),
            &dx,
            tol(dtype, 1.0),
        );
    }
}

#[test]
fn gelu_matches_reference() {
    let shapes: &[&[usize]] = &[&[5], &[3, 7], &[2, 17, 33], &[100_003]];
    for (i, s) in shapes.iter().enumerate() {
        for dtype in [DType::F32, DType::BF16] {
            check("gelu_erf", gelu_erf, gelu_erf_grad, s, dtype, i as u64);
            check(
                "gelu_tanh",
                gelu_tanh,
                gelu_tanh_grad,
                s,
                dtype,
                50 + i as u64,
            );
        }
    }
}
