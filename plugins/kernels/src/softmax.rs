//! Softmax over the last dimension, forward and backward.
//!
//! Each row is independent and small enough to stay in L1, so a row is read three times
//! (max, exponentials with their sum, scaling) at vector speed rather than fusing passes
//! with an online rescaling that would not vectorise as well.

use codex_plugin_api::{BufferMut, BufferView};
use rayon::prelude::*;

use crate::buffer::{
    expect_attrs, expect_shape, floats, inputs, outputs, rows_cols, Floats, Out, Result,
};
use crate::par::rows_per_task;
use crate::simd::{self, multiversion};
use crate::Ctx;

multiversion! {
    /// `y = softmax(x)` for one row.
    pub(crate) fn row_fwd<M>(x: &[f32], y: &mut [f32]) {
        let m = simd::max(x);
        for (y, &x) in y.iter_mut().zip(x) {
            *y = simd::exp::<M>(x - m);
        }
        let inv = 1.0 / simd::sum(y);
        for y in y.iter_mut() {
            *y *= inv;
        }
    }
}

multiversion! {
    /// `dx = y ⊙ (dy − ⟨y, dy⟩)` for one row.
    fn row_bwd<M>(y: &[f32], dy: &[f32], dx: &mut [f32]) {
        let s = simd::dot::<M>(y, dy);
        for ((dx, &y), &dy) in dx.iter_mut().zip(y).zip(dy) {
            *dx = y * (dy - s);
        }
    }
}

pub(crate) fn fwd(
    ctx: &Ctx,
    ins: &[BufferView<'_>],
    attrs: &[f64],
    outs: &mut [BufferMut<'_>],
) -> Result<()> {
    const OP: &str = "softmax_last_dim.fwd";
    let [x] = inputs::<1>(OP, ins)?;
    let [y] = outputs::<1>(OP, outs)?;
    expect_attrs(OP, attrs, 0)?;
    let x = floats(OP, "x", x, Floats::F32OrBf16)?;
    let (_, n) = rows_cols(OP, "x", x.shape)?;
    let mut y = Out::open(OP, "y", y, Floats::F32OrBf16, false)?;
    expect_shape(OP, "y", y.shape(), x.shape)?;
    if n > 0 {
        let level = ctx.level;
        let chunk = rows_per_task(n) * n;
        y.data()
            .par_chunks_mut(chunk)
            .zip(x.data.par_chunks(chunk))
            .for_each(|(yb, xb)| {
                for (yr, xr) in yb.chunks_exact_mut(n).zip(xb.chunks_exact(n)) {
                    row_fwd(level, xr, yr);
                }
            });
    }
    y.finish();
    Ok(())
}

pub(crate) fn bwd(
    ctx: &Ctx,
    ins: &[BufferView<'_>],
    attrs: &[f64],
    outs: &mut [BufferMut<'_>],
) -> Result<()> {
    const OP: &str = "softmax_last_dim.bwd";
    let [y, dy] = inputs::<2>(OP, ins)?;
    let [dx] = outputs::<1>(OP, outs)?;
    expect_attrs(OP, attrs, 0)?;
    let y = floats(OP, "y", y, Floats::F32OrBf16)?;
    let dy = floats(OP, "dy", dy, Floats::F32OrBf16)?;
    let (_, n) = rows_cols(OP, "y", y.shape)?;
    expect_shape(OP, "dy", dy.shape, y.shape)?;
    let mut dx = Out::open(OP, "dx", dx, Floats::F32OrBf16, false)?;
    expect_shape(OP, "dx", dx.shape(), y.shape)?;
    if n > 0 {
        let level = ctx.level;
        let chunk = rows_per_task(n) * n;
        dx.data()
            .par_chunks_mut(chunk)
            .zip(y.data.par_chunks(chunk).zip(dy.data.par_chunks(chunk)))
            .for_each(|(dxb, (yb, dyb))| {
                for ((dxr, yr), dyr) in dxb
                    .chunks_exact_mut(n)
                    .zip(yb.chunks_exact(n))
                    .zip(dyb.chunks_exact(n))
                {
                    row_bwd(level, yr, dyr, dxr);
                }
            });
    }
    dx.finish();
    Ok(())
}
