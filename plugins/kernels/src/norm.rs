//! Layer norm and RMS norm over the last dimension, forward and backward.
//!
//! The forward pass saves the per-row statistics (`mean`, `rstd`) so the backward pass needs
//! one read of `x` and `dy`. The weight and bias gradients are sums over every row — the
//! leading-dimension reduction that is slow when composed from primitives — so each block of
//! rows accumulates its own partial sums next to computing `dx`, and the partials are added
//! in block order at the end (see [`crate::par`]).

use codex_plugin_api::{BufferMut, BufferView};
use rayon::prelude::*;

use crate::buffer::{
    expect_attrs, expect_shape, floats, inputs, outputs, positive, rows_cols, Floats, Out, Result,
};
use crate::par::{add_partials, rows_per_block, rows_per_task};
use crate::simd::{self, multiversion};
use crate::Ctx;

multiversion! {
    /// Layer norm of one row; returns `(mean, rstd)`.
    fn ln_row_fwd<M>(x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32]) -> (f32, f32) {
        let c = x.len() as f32;
        let mean = simd::sum(x) / c;
        let mut acc = [0.0f32; simd::LANES];
        let mut chunks = x.chunks_exact(simd::LANES);
        for ch in &mut chunks {
            for i in 0..simd::LANES {
                let d = ch[i] - mean;
                acc[i] = M::fma(d, d, acc[i]);
            }
        }
        let mut var = simd::sum(&acc);
        for &v in chunks.remainder() {
            var += (v - mean) * (v - mean);
        }
        let rstd = 1.0 / (var / c + eps).sqrt();
        for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
            *y = M::fma((x - mean) * rstd, w, b);
        }
        (mean, rstd)
    }
}

multiversion! {
    /// Layer-norm backward of one row: writes `dx`, adds into `dw` and `db`.
    fn ln_row_bwd<M>(
        dy: &[f32],
        x: &[f32],
        w: &[f32],
        mean: f32,
        rstd: f32,
        dx: &mut [f32],
        dw: &mut [f32],
        db: &mut [f32],
    ) {
        let c = x.len();
        let mut sg = [0.0f32; simd::LANES];
        let mut sgx = [0.0f32; simd::LANES];
        let whole = c - c % simd::LANES;
        let mut k = 0;
        while k < whole {
            let (dy, x, w) = (&dy[k..k + simd::LANES], &x[k..k + simd::LANES], &w[k..k + simd::LANES]);
            for i in 0..simd::LANES {
                let g = dy[i] * w[i];
                let xh = (x[i] - mean) * rstd;
                sg[i] += g;
                sgx[i] = M::fma(g, xh, sgx[i]);
            }
            k += simd::LANES;
        }
        let (mut a, mut b) = (simd::sum(&sg), simd::sum(&sgx));
        for i in whole..c {
            let g = dy[i] * w[i];
            a += g;
            b += g * (x[i] - mean) * rstd;
        }
        let a = a / c as f32;
        let b = b / c as f32;
        for i in 0..c {
            let xh = (x[i] - mean) * rstd;
            let g = dy[i] * w[i];
            dx[i] = rstd * (g - a - xh * b);
            dw[i] = M::fma(dy[i], xh, dw[i]);
            db[i] += dy[i];
        }
    }
}

multiversion! {
    /// RMS norm of one row; returns `rstd`.
    fn rms_row_fwd<M>(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) -> f32 {
        let ms = simd::dot::<M>(x, x) / x.len() as f32;
        let rstd = 1.0 / (ms + eps).sqrt();
        for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
            *y = x * rstd * w;
        }
        rstd
    }
}

multiversion! {
    /// RMS-norm backward of one row: writes `dx`, adds into `dw`.
    fn rms_row_bwd<M>(dy: &[f32], x: &[f32], w: &[f32], rstd: f32, dx: &mut [f32], dw: &mut [f32]) {
        let c = x.len();
        let mut acc = [0.0f32; simd::LANES];
        let whole = c - c % simd::LANES;
        let mut k = 0;
        while k < whole {
            let (dy, x, w) = (&dy[k..k + simd::LANES], &x[k..k + simd::LANES], &w[k..k + simd::LANES]);
            for i in 0..simd::LANES {
                acc[i] = M::fma(dy[i] * w[i], x[i], acc[i]);
            }
            k += simd::LANES;
        }
        let mut s = simd::sum(&acc);
        for i in whole..c {
            s += dy[i] * w[i] * x[i];
        }
        // ⟨g, x̂⟩ / c with x̂ = x·rstd.
        let b = s * rstd / c as f32;
        for i in 0..c {
            let xh = x[i] * rstd;
            dx[i] = rstd * (dy[i] * w[i] - xh * b);
            dw[i] = M::fma(dy[i], xh, dw[i]);
        }
    }
}

pub(crate) fn layer_norm_fwd(
    ctx: &Ctx,
    ins: &[BufferView<'_>],
    attrs: &[f64],
    outs: &mut [BufferMut<'_>],
) -> Result<()> {
    const OP: &str = "layer_norm.fwd";
    let [x, w, b] = inputs::<3>(OP, ins)?;
    let [y, mean, rstd] = outputs::<3>(OP, outs)?;
    expect_attrs(OP, attrs, 1)?;
    let eps = positive(OP, "eps", attrs[0])? as f32;
    let x = floats(OP, "x", x, Floats::F32OrBf16)?;
    let (_, c) = rows_cols(OP, "x", x.shape)?;
    let lead = &x.shape[..x.shape.len() - 1];
    let w = floats(OP, "w", w, Floats::F32OrBf16)?;
    expect_shape(OP, "w", w.shape, &[c])?;
    let b = floats(OP, "b", b, Floats::F32OrBf16)?;
    expect_shape(OP, "b", b.shape, &[c])?;
    let mut y = Out::open(OP, "y", y, Floats::F32OrBf16, false)?;
    expect_shape(OP, "y", y.shape(), x.shape)?;
    let mut mean = Out::open(OP, "mean", mean, Floats::F32, false)?;
    expect_shape(OP, "mean", mean.shape(), lead)?;
    let mut rstd = Out::open(OP, "rstd", rstd, Floats::F32, false)?;
    expect_shape(OP, "rstd", rstd.shape(), lead)?;
    if c > 0 {
        let (level, rows) = (ctx.level, rows_per_task(c));
        let (w, b) = (&w.data[..], &b.data[..]);
        y.data()
            .par_chunks_mut(rows * c)
            .zip(x.data.par_chunks(rows * c))
            .zip(
                mean.data()
                    .par_chunks_mut(rows)
                    .zip(rstd.data().par_chunks_mut(rows)),
            )
            .for_each(|((yb, xb), (mb, rb))| {
                for (((yr, xr), m), r) in yb
                    .chunks_exact_mut(c)
                    .zip(xb.chunks_exact(c))
                    .zip(mb)
                    .zip(rb)
                {
                    (*m, *r) = ln_row_fwd(level, xr, w, b, eps, yr);
                }
            });
    }
    y.finish();
    mean.finish();
    rstd.finish();
    Ok(())
}

pub(crate) fn layer_norm_bwd(
    ctx: &Ctx,
    ins: &[BufferView<'_>],
    attrs: &[f64],
    outs: &mut [BufferMut<'_>],
) -> Result<()> {
    const OP: &str = "layer_norm.bwd";
    let [dy, x, w, mean, rstd] = inputs::<5>(OP, ins)?;
    let [dx, dw, db] = outputs::<3>(OP, outs)?;
    expect_attrs(OP, attrs, 0)?;
    let x = floats(OP, "x", x, Floats::F32OrBf16)?;
    let (n, c) = rows_cols(OP, "x", x.shape)?;
    let lead = &x.shape[..x.shape.len() - 1];
    let dy = floats(OP, "dy", dy, Floats::F32OrBf16)?;
    expect_shape(OP, "dy", dy.shape, x.shape)?;
    let w = floats(OP, "w", w, Floats::F32OrBf16)?;
    expect_shape(OP, "w", w.shape, &[c])?;
    let mean = floats(OP, "mean", mean, Floats::F32)?;
    expect_shape(OP, "mean", mean.shape, lead)?;
    let rstd = floats(OP, "rstd", rstd, Floats::F32)?;
    expect_shape(OP, "rstd", rstd.shape, lead)?;
    let mut dx = Out::open(OP, "dx", dx, Floats::F32OrBf16, false)?;
    expect_shape(OP, "dx", dx.shape(), x.shape)?;
    let mut dw = Out::open(OP, "dw", dw, Floats::F32OrBf16, false)?;
    expect_shape(OP, "dw", dw.shape(), &[c])?;
    let mut db = Out::open(OP, "db", db, Floats::F32OrBf16, false)?;
    expect_shape(OP, "db", db.shape(), &[c])?;
    if c > 0 && n > 0 {
        let (level, rows) = (ctx.level, rows_per_block(n, c));
        let blocks = n.div_ceil(rows);
        let mut partials = vec![0.0f32; blocks * 2 * c];
        let w = &w.data[..];
        dx.data()
            .par_chunks_mut(rows * c)
            .zip(
                x.data
                    .par_chunks(rows * c)
                    .zip(dy.data.par_chunks(rows * c)),
            )
            .zip(mean.data.par_chunks(rows).zip(rstd.data.par_chunks(rows)))
            .zip(partials.par_chunks_mut(2 * c))
            .for_each(|(((dxb, (xb, dyb)), (mb, rb)), part)| {
                let (pw, pb) = part.split_at_mut(c);
                let rows = dxb
                    .chunks_exact_mut(c)
                    .zip(xb.chunks_exact(c))
                    .zip(dyb.chunks_exact(c));
                for (((dxr, xr), dyr), (&m, &r)) in rows.zip(mb.iter().zip(rb)) {
                    ln_row_bwd(level, dyr, xr, w, m, r, dxr, pw, pb);
                }
            });
        let mut sums = vec![0.0f32; 2 * c];
        add_partials(&partials, 2 * c, &mut sums);
        dw.data().copy_from_slice(&sums[..c]);
        db.data().copy_from_slice(&sums[c..]);
    } else {
        dw.data().fill(0.0);
        db.data().fill(0.0);
    }
    dx.finish();
    dw.finish();
    db.finish();
    Ok(())
}

pub(crate) fn rms_norm_fwd(
    ctx: &Ctx,
    ins: &[BufferView<'_>],
    attrs: &[f64],
    outs: &mut [BufferMut<'_>],
) -> Result<()> {
    const OP: &str = "rms_norm.fwd";
    let [x, w] = inputs::<2>(OP, ins)?;
    let [y, rstd] = outputs::<2>(OP, outs)?;
    expect_attrs(OP, attrs, 1)?;
    let eps = positive(OP, "eps", attrs[0])? as f32;
    let x = floats(OP, "x", x, Floats::F32OrBf16)?;
    let (_, c) = rows_cols(OP, "x", x.shape)?;
    let lead = &x.shape[..x.shape.len() - 1];
    let w = floats(OP, "w", w, Floats::F32OrBf16)?;
    expect_shape(OP, "w", w.shape, &[c])?;
    let mut y = Out::open(OP, "y", y, Floats::F32OrBf16, false)?;
    expect_shape(OP, "y", y.shape(), x.shape)?;
    let mut rstd = Out::open(OP, "rstd", rstd, Floats::F32, false)?;
    expect_shape(OP, "rstd", rstd.shape(), lead)?;
    if c > 0 {
        let (level, rows) = (ctx.level, rows_per_task(c));
        let w = &w.data[..];
        y.data()
            .par_chunks_mut(rows * c)
            .zip(x.data.par_chunks(rows * c))
            .zip(rstd.data().par_chunks_mut(rows))
            .for_each(|((yb, xb), rb)| {
                for ((yr, xr), r) in yb.chunks_exact_mut(c).zip(xb.chunks_exact(c)).zip(rb) {
                    *r = rms_row_fwd(level, xr, w, eps, yr);
                }
            });
    }
    y.finish();
    rstd.finish();
    Ok(())
}

pub(crate) fn rms_norm_bwd(
    ctx: &Ctx,
    ins: &[BufferView<'_>],
    attrs: &[f64],
    outs: &mut [BufferMut<'_>],
) -> Result<()> {
    const OP: &str = "rms_norm.bwd";
    let [dy, x, w, rstd] = inputs::<4>(OP, ins)?;
    let [dx, dw] = outputs::<2>(OP, outs)?;
    expect_attrs(OP, attrs, 0)?;
    let x = floats(OP, "x", x, Floats::F32OrBf16)?;
    let (n, c) = rows_cols(OP, "x", x.shape)?;
    let lead = &x.shape[..x.shape.len() - 1];
    let dy = floats(OP, "dy", dy, Floats::F32OrBf16)?;
    expect_shape(OP, "dy", dy.shape, x.shape)?;
    let w = floats(OP, "w", w, Floats::F32OrBf16)?;
    expect_shape(OP, "w", w.shape, &[c])?;
    let rstd = floats(OP, "rstd", rstd, Floats::F32)?;
    expect_shape(OP, "rstd", rstd.shape, lead)?;
    let mut dx = Out::open(OP, "dx", dx, Floats::F32OrBf16, false)?;
    expect_shape(OP, "dx", dx.shape(), x.shape)?;
    let mut dw = Out::open(OP, "dw", dw, Floats::F32OrBf16, false)?;
    expect_shape(OP, "dw", dw.shape(), &[c])?;
    if c > 0 && n > 0 {
        let (level, rows) = (ctx.level, rows_per_block(n, c));
        let blocks = n.div_ceil(rows);
        let mut partials = vec![0.0f32; blocks * c];
        let w = &w.data[..];
        dx.data()
            .par_chunks_mut(rows * c)
            .zip(
                x.data
                    .par_chunks(rows * c)
                    .zip(dy.data.par_chunks(rows * c)),
            )
            .zip(rstd.data.par_chunks(rows))
            .zip(partials.par_chunks_mut(c))
            .for_each(|(((dxb, (xb, dyb)), rb), pw)| {
                let rows = dxb
                    .chunks_exact_mut(c)
                    .zip(xb.chunks_exact(c))
                    .zip(dyb.chunks_exact(c));
                for (((dxr, xr), dyr), &r) in rows.zip(rb) {
                    rms_row_bwd(level, dyr, xr, w, r, dxr, pw);
                }
            });
        add_partials(&partials, c, dw.data());
    } else {
        dw.data().fill(0.0);
    }
    dx.finish();
    dw.finish();
    Ok(())
}
