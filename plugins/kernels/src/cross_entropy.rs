//! Cross-entropy over the last dimension from logits and class indices.
//!
//! The forward pass returns sums (loss, counted tokens, correct arg-max predictions) rather
//! than means, as the host's `cross_entropy` does, plus each row's log-sum-exp so that the
//! backward pass computes `softmax − onehot` in one read of the logits: the softmax is never
//! stored. Logits of the benchmark's LM head are tens of megabytes, so each pass is a single
//! streaming read with the exponential vectorised.

use codex_plugin_api::{BufferMut, BufferView};
use rayon::prelude::*;

use crate::buffer::{
    expect_attrs, expect_shape, finite, floats, indices, inputs, outputs, rows_cols, Floats, Out,
    Result,
};
use crate::error::KernelError;
use crate::par::{rows_per_block, rows_per_task};
use crate::simd::{self, multiversion};
use crate::Ctx;

multiversion! {
    /// `(log Σ exp x, first index of max x)` of one row.
    fn row_stats<M>(x: &[f32]) -> (f32, usize) {
        let m = simd::max(x);
        let mut acc = [0.0f32; simd::LANES];
        let mut chunks = x.chunks_exact(simd::LANES);
        for c in &mut chunks {
            for i in 0..simd::LANES {
                acc[i] += simd::exp::<M>(c[i] - m);
            }
        }
        let mut s = simd::sum(&acc);
        for &v in chunks.remainder() {
            s += simd::exp::<M>(v - m);
        }
        // Find the first maximum a chunk at a time so the scan stays vectorised.
        let mut arg = 0;
        for (k, c) in x.chunks(simd::LANES).enumerate() {
            if c.iter().fold(false, |hit, &v| hit | (v == m)) {
                arg = k * simd::LANES + c.iter().position(|&v| v == m).unwrap_or(0);
                break;
            }
        }
        (m + s.ln(), arg)
    }
}

multiversion! {
    /// `dx = scale·(exp(x − lse) − onehot(target))` for one row.
    fn row_grad<M>(x: &[f32], lse: f32, target: usize, scale: f32, dx: &mut [f32]) {
        for (dx, &x) in dx.iter_mut().zip(x) {
            *dx = scale * simd::exp::<M>(x - lse);
        }
        if let Some(d) = dx.get_mut(target) {
            *d -= scale;
        }
    }
}

/// Validate `ignore_index` and every target; targets are then safe to index with.
fn check_targets(op: &'static str, targets: &[u32], classes: usize, ignore: f64) -> Result<()> {
    if ignore.fract() != 0.0 {
        return Err(KernelError::Attr {
            op,
            name: "ignore_index",
            found: ignore,
            expected: "an integer",
        });
    }
    for (row, &t) in targets.iter().enumerate() {
        if (t as usize) >= classes && t as f64 != ignore {
            return Err(KernelError::Target {
                op,
                row,
                target: t,
                classes,
                ignore,
            });
        }
    }
    Ok(())
}

/// Fail unless `shape` holds one element as `[]` or `[1]`.
fn expect_scalar(op: &'static str, name: &'static str, shape: &[usize]) -> Result<()> {
    if shape.is_empty() || shape == [1] {
        Ok(())
    } else {
        Err(KernelError::Shape {
            op,
            name,
            found: shape.to_vec(),
            expected: "[1] or []".into(),
        })
    }
}

pub(crate) fn fwd(
    ctx: &Ctx,
    ins: &[BufferView<'_>],
    attrs: &[f64],
    outs: &mut [BufferMut<'_>],
) -> Result<()> {
    const OP: &str = "cross_entropy.fwd";
    let [logits, targets] = inputs::<2>(OP, ins)?;
    let [loss, tokens, correct, lse] = outputs::<4>(OP, outs)?;
    expect_attrs(OP, attrs, 1)?;
    let ignore = finite(OP, "ignore_index", attrs[0])?;
    let logits = floats(OP, "logits", logits, Floats::F32OrBf16)?;
    let (n, v) = rows_cols(OP, "logits", logits.shape)?;
    let lead = &logits.shape[..logits.shape.len() - 1];
    let (tshape, targets) = indices(OP, "targets", targets)?;
    expect_shape(OP, "targets", tshape, lead)?;
    let mut loss = Out::open(OP, "loss_sum", loss, Floats::F32, false)?;
    expect_scalar(OP, "loss_sum", loss.shape())?;
    let mut tokens = Out::open(OP, "tokens", tokens, Floats::F32, false)?;
    expect_scalar(OP, "tokens", tokens.shape())?;
    let mut correct = Out::open(OP, "correct", correct, Floats::F32, false)?;
    expect_scalar(OP, "correct", correct.shape())?;
    let mut lse = Out::open(OP, "lse", lse, Floats::F32, false)?;
    expect_shape(OP, "lse", lse.shape(), lead)?;
    check_targets(OP, &targets, v, ignore)?;

    let (mut sum, mut count, mut hits) = (0.0f64, 0u64, 0u64);
    if v > 0 && n > 0 {
        let (level, rows) = (ctx.level, rows_per_block(n, v));
        let mut blocks = vec![(0.0f64, 0u64, 0u64); n.div_ceil(rows)];
        lse.data()
            .par_chunks_mut(rows)
            .zip(
                logits
                    .data
                    .par_chunks(rows * v)
                    .zip(targets.par_chunks(rows)),
            )
            .zip(blocks.par_iter_mut())
            .for_each(|((lb, (xb, tb)), out)| {
                for ((l, xr), &t) in lb.iter_mut().zip(xb.chunks_exact(v)).zip(tb) {
                    let (s, arg) = row_stats(level, xr);
                    *l = s;
                    if t as f64 != ignore {
                        let t = t as usize;
                        out.0 += (s - xr[t]) as f64;
                        out.1 += 1;
                        out.2 += u64::from(arg == t);
                    }
                }
            });
        for (s, c, h) in blocks {
            sum += s;
            count += c;
            hits += h;
        }
    } else {
        lse.data().fill(f32::NEG_INFINITY);
    }
    loss.data().fill(sum as f32);
    tokens.data().fill(count as f32);
    correct.data().fill(hits as f32);
    loss.finish();
    tokens.finish();
    correct.finish();
    lse.finish();
    Ok(())
}

pub(crate) fn bwd(
    ctx: &Ctx,
    ins: &[BufferView<'_>],
    attrs: &[f64],
    outs: &mut [BufferMut<'_>],
) -> Result<()> {
    const OP: &str = "cross_entropy.bwd";
    let [logits, targets, lse] = inputs::<3>(OP, ins)?;
    let [dlogits] = outputs::<1>(OP, outs)?;
    expect_attrs(OP, attrs, 2)?;
    let ignore = finite(OP, "ignore_index", attrs[0])?;
    let scale = finite(OP, "grad_scale", attrs[1])? as f32;
    let logits = floats(OP, "logits", logits, Floats::F32OrBf16)?;
    let (_, v) = rows_cols(OP, "logits", logits.shape)?;
    let lead = &logits.shape[..logits.shape.len() - 1];
    let (tshape, targets) = indices(OP, "targets", targets)?;
    expect_shape(OP, "targets", tshape, lead)?;
    let lse = floats(OP, "lse", lse, Floats::F32)?;
    expect_shape(OP, "lse", lse.shape, lead)?;
    let mut dl = Out::open(OP, "dlogits", dlogits, Floats::F32OrBf16, false)?;
    expect_shape(OP, "dlogits", dl.shape(), logits.shape)?;
    check_targets(OP, &targets, v, ignore)?;
    if v > 0 {
        let (level, rows) = (ctx.level, rows_per_task(v));
        dl.data()
            .par_chunks_mut(rows * v)
            .zip(logits.data.par_chunks(rows * v))
            .zip(targets.par_chunks(rows).zip(lse.data.par_chunks(rows)))
            .for_each(|((db, xb), (tb, lb))| {
                for (((dr, xr), &t), &l) in db
                    .chunks_exact_mut(v)
                    .zip(xb.chunks_exact(v))
                    .zip(tb)
                    .zip(lb)
                {
                    if t as f64 == ignore {
                        dr.fill(0.0);
                    } else {
                        row_grad(level, xr, l, t as usize, scale, dr);
                    }
                }
            });
    }
    dl.finish();
    Ok(())
}
