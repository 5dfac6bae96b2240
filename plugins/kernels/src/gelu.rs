//! GELU, exact (erf) and tanh-approximated, forward and backward.
//!
//! Elementwise, so the only thing that matters is that the loop vectorises: the erf, exp and
//! tanh used are the branch-free approximations of [`crate::simd`], not libm calls.

use codex_plugin_api::{BufferMut, BufferView};
use rayon::prelude::*;

use crate::buffer::{expect_attrs, expect_shape, floats, inputs, outputs, Floats, Out, Result};
use crate::par::rows_per_task;
use crate::simd::{self, multiversion};
use crate::Ctx;

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1/√(2π).
const INV_SQRT_2PI: f32 = 0.398_942_3;
/// √(2/π).
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const TANH_K: f32 = 0.044_715;

/// Which GELU.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum Form {
    Erf,
    Tanh,
}

multiversion! {
    fn erf_fwd<M>(x: &[f32], y: &mut [f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = 0.5 * x * (1.0 + simd::erf::<M>(x * FRAC_1_SQRT_2));
        }
    }
}

multiversion! {
    fn erf_bwd<M>(x: &[f32], dy: &[f32], dx: &mut [f32]) {
        for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
            let cdf = 0.5 * (1.0 + simd::erf::<M>(x * FRAC_1_SQRT_2));
            let pdf = simd::exp::<M>(-0.5 * x * x) * INV_SQRT_2PI;
            *dx = dy * M::fma(x, pdf, cdf);
        }
    }
}

multiversion! {
    fn tanh_fwd<M>(x: &[f32], y: &mut [f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            let u = SQRT_2_OVER_PI * M::fma(TANH_K * x, x * x, x);
            *y = 0.5 * x * (1.0 + simd::tanh::<M>(u));
        }
    }
}

multiversion! {
    fn tanh_bwd<M>(x: &[f32], dy: &[f32], dx: &mut [f32]) {
        for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
            let x2 = x * x;
            let u = SQRT_2_OVER_PI * M::fma(TANH_K * x, x2, x);
            let th = simd::tanh::<M>(u);
            let du = SQRT_2_OVER_PI * M::fma(3.0 * TANH_K, x2, 1.0);
            let d = 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * du;
            *dx = dy * d;
        }
    }
}

pub(crate) fn fwd(
    form: Form,
    ctx: &Ctx,
    ins: &[BufferView<'_>],
    attrs: &[f64],
    outs: &mut [BufferMut<'_>],
) -> Result<()> {
    let op = match form {
        Form::Erf => "gelu_erf.fwd",
        Form::Tanh => "gelu_tanh.fwd",
    };
    let [x] = inputs::<1>(op, ins)?;
    let [y] = outputs::<1>(op, outs)?;
    expect_attrs(op, attrs, 0)?;
    let x = floats(op, "x", x, Floats::F32OrBf16)?;
    let mut y = Out::open(op, "y", y, Floats::F32OrBf16, false)?;
    expect_shape(op, "y", y.shape(), x.shape)?;
    let (level, chunk) = (ctx.level, rows_per_task(1));
    let f = match form {
        Form::Erf => erf_fwd,
        Form::Tanh => tanh_fwd,
    };
    y.data()
        .par_chunks_mut(chunk)
        .zip(x.data.par_chunks(chunk))
        .for_each(|(yc, xc)| f(level, xc, yc));
    y.finish();
    Ok(())
}

pub(crate) fn bwd(
    form: Form,
    ctx: &Ctx,
    ins: &[BufferView<'_>],
    attrs: &[f64],
    outs: &mut [BufferMut<'_>],
) -> Result<()> {
    let op = match form {
        Form::Erf => "gelu_erf.bwd",
        Form::Tanh => "gelu_tanh.bwd",
    };
    let [x, dy] = inputs::<2>(op, ins)?;
    let [dx] = outputs::<1>(op, outs)?;
    expect_attrs(op, attrs, 0)?;
    let x = floats(op, "x", x, Floats::F32OrBf16)?;
    let dy = floats(op, "dy", dy, Floats::F32OrBf16)?;
    expect_shape(op, "dy", dy.shape, x.shape)?;
    let mut dx = Out::open(op, "dx", dx, Floats::F32OrBf16, false)?;
    expect_shape(op, "dx", dx.shape(), x.shape)?;
    let (level, chunk) = (ctx.level, rows_per_task(1));
    let f = match form {
        Form::Erf => erf_bwd,
        Form::Tanh => tanh_bwd,
    };
    dx.data()
        .par_chunks_mut(chunk)
        .zip(x.data.par_chunks(chunk).zip(dy.data.par_chunks(chunk)))
        .for_each(|(dxc, (xc, dyc))| f(level, xc, dyc, dxc));
    dx.finish();
    Ok(())
}
