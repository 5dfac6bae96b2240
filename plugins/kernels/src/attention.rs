//! Causal scaled-dot-product attention, forward and backward, one head per task.
//!
//! Queries may be fewer than keys (`t ≤ s`: new positions attending over a key/value cache
//! as well as over themselves); the mask is then aligned to the last key, so query `i` sees
//! keys `0..=s − t + i`, as flash-attention does. Query rows are processed in blocks of
//! [`BLOCK`]; a block's scores against every key it may see are computed into a `BLOCK × s`
//! scratch, so the `t × s` matrix of a head is never stored and the scratch stays in L1/L2 for
//! the sequence lengths of CPU training. Because a whole score row is at hand, the softmax is
//! the plain two-pass one and needs none of flash attention's online rescaling. The forward
//! pass saves the log-sum-exp of each row; the backward pass recomputes the probabilities from
//! it.
//!
//! Every product is one shape, `C += A·B` with all three row-major ([`matmul_acc`]): keys and
//! values are transposed once per head so that `Q·Kᵀ` and `dO·Vᵀ` take that shape too, and
//! its inner loop is a register tile of 4 rows × 32 columns that LLVM keeps in vector
//! registers.

use codex_plugin_api::{BufferMut, BufferView};
use rayon::prelude::*;

use crate::buffer::{
    expect_attrs, expect_shape, finite, floats, inputs, outputs, Floats, Out, Result,
};
use crate::error::KernelError;
use crate::simd::{self, multiversion, Level};
use crate::Ctx;

/// Query rows per block.
const BLOCK: usize = 32;
/// Register tile of [`matmul_acc`]: rows.
const MR: usize = 4;
// The register tile below names its four rows one by one.
const _: () = assert!(MR == 4);
/// Register tile of [`matmul_acc`]: columns.
const NR: usize = 32;

multiversion! {
    /// `C[m×n] += A[m×k] · B[k×n]`, row-major with leading dimensions `lda`, `ldb`, `ldc`.
    fn matmul_acc<M>(
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        lda: usize,
        b: &[f32],
        ldb: usize,
        c: &mut [f32],
        ldc: usize,
    ) {
        let mut i0 = 0;
        while i0 < m {
            let mr = MR.min(m - i0);
            let mut j0 = 0;
            while j0 < n {
                let nr = NR.min(n - j0);
                if mr == MR && nr == NR {
                    // Row slices and zipped iterators leave the inner loop free of bounds
                    // checks and of pointer reloads, so it is loads and FMAs only.
                    let row = |r: usize| &a[(i0 + r) * lda..(i0 + r) * lda + k];
                    let (a0, a1, a2, a3) = (row(0), row(1), row(2), row(3));
                    let mut acc = [[0.0f32; NR]; MR];
                    let rows = a0.iter().zip(a1).zip(a2).zip(a3).zip(b.chunks(ldb));
                    for ((((&x0, &x1), &x2), &x3), brow) in rows {
                        let Some(brow) = brow.get(j0..j0 + NR).and_then(|s| <&[f32; NR]>::try_from(s).ok()) else {
                            break;
                        };
                        for q in 0..NR {
                            acc[0][q] = M::fma(x0, brow[q], acc[0][q]);
                            acc[1][q] = M::fma(x1, brow[q], acc[1][q]);
                            acc[2][q] = M::fma(x2, brow[q], acc[2][q]);
                            acc[3][q] = M::fma(x3, brow[q], acc[3][q]);
                        }
                    }
                    for (r, acc) in acc.iter().enumerate() {
                        let crow = &mut c[(i0 + r) * ldc + j0..(i0 + r) * ldc + j0 + NR];
                        for (cv, &av) in crow.iter_mut().zip(acc) {
                            *cv += av;
                        }
                    }
                } else {
                    for r in i0..i0 + mr {
                        let crow = &mut c[r * ldc + j0..r * ldc + j0 + nr];
                        for p in 0..k {
                            let av = a[r * lda + p];
                            let brow = &b[p * ldb + j0..p * ldb + j0 + nr];
                            for (cv, &bv) in crow.iter_mut().zip(brow) {
                                *cv = M::fma(av, bv, *cv);
                            }
                        }
                    }
                }
                j0 += nr;
            }
            i0 += mr;
        }
    }
}

multiversion! {
    /// Scale a score row, softmax its first `valid` entries in place and zero the rest;
    /// returns the row's log-sum-exp.
    fn softmax_prefix<M>(row: &mut [f32], valid: usize, scale: f32) -> f32 {
        let (live, masked) = row.split_at_mut(valid.min(row.len()));
        masked.fill(0.0);
        for s in live.iter_mut() {
            *s *= scale;
        }
        let mx = simd::max(live);
        for s in live.iter_mut() {
            *s = simd::exp::<M>(*s - mx);
        }
        let l = simd::sum(live);
        let inv = 1.0 / l;
        for s in live.iter_mut() {
            *s *= inv;
        }
        mx + l.ln()
    }
}

multiversion! {
    /// Recompute probabilities `exp(scale·s − lse)` for the first `valid` entries of a score
    /// row and zero the rest.
    fn probs_from_lse<M>(row: &mut [f32], valid: usize, scale: f32, lse: f32) {
        let (live, masked) = row.split_at_mut(valid.min(row.len()));
        masked.fill(0.0);
        for s in live.iter_mut() {
            *s = simd::exp::<M>(M::fma(*s, scale, -lse));
        }
    }
}

multiversion! {
    /// `ds = p ⊙ (dp − D)·scale` over a row, in place in `dp`.
    fn grad_scores<M>(p: &[f32], dp: &mut [f32], d: f32, scale: f32) {
        for (dp, &p) in dp.iter_mut().zip(p) {
            *dp = p * (*dp - d) * scale;
        }
    }
}

multiversion! {
    /// `⟨a, b⟩`.
    fn dot<M>(a: &[f32], b: &[f32]) -> f32 {
        simd::dot::<M>(a, b)
    }
}

/// `dst[c×r] = srcᵀ` for the `r × c` block of `src` with row stride `lds`.
fn transpose(src: &[f32], lds: usize, r: usize, c: usize, dst: &mut [f32]) {
    for i in 0..r {
        for j in 0..c {
            dst[j * r + i] = src[i * lds + j];
        }
    }
}

/// Shapes shared by both directions: `(heads, t, d)` from `[..., t, d]`.
fn head_dims(op: &'static str, shape: &[usize]) -> Result<(usize, usize, usize)> {
    match shape {
        [lead @ .., t, d] => Ok((lead.iter().product(), *t, *d)),
        _ => Err(KernelError::Shape {
            op,
            name: "q",
            found: shape.to_vec(),
            expected: "[..., t, d] with at least two dimensions".into(),
        }),
    }
}

/// The number of keys `s` of `name` (`[..., s, d]`, the leading dimensions and `d` of q's
/// `[..., t, d]`), at least `t`.
fn key_count(op: &'static str, name: &'static str, shape: &[usize], q: &[usize]) -> Result<usize> {
    let r = q.len();
    let fits = shape.len() == r
        && shape[..r - 2] == q[..r - 2]
        && shape[r - 1] == q[r - 1]
        && shape[r - 2] >= q[r - 2];
    if fits {
        Ok(shape[r - 2])
    } else {
        Err(KernelError::Shape {
            op,
            name,
            found: shape.to_vec(),
            expected: format!(
                "q's leading dimensions {:?}, then s ≥ {} keys of {} dimensions",
                &q[..r - 2],
                q[r - 2],
                q[r - 1]
            ),
        })
    }
}

/// Per-task scratch.
struct Scratch {
    kt: Vec<f32>,
    vt: Vec<f32>,
    s: Vec<f32>,
    dp: Vec<f32>,
    pt: Vec<f32>,
}

impl Scratch {
    /// For `s` keys of `d` dimensions.
    fn new(s: usize, d: usize) -> Scratch {
        Scratch {
            kt: vec![0.0; d * s],
            vt: vec![0.0; d * s],
            s: vec![0.0; BLOCK * s],
            dp: vec![0.0; BLOCK * s],
            pt: vec![0.0; BLOCK * s],
        }
    }
}

/// The shape of one head: `t` queries, `s ≥ t` keys, `d` dimensions.
#[derive(Copy, Clone)]
struct HeadShape {
    t: usize,
    s: usize,
    d: usize,
}

/// One head of the forward pass.
#[allow(clippy::too_many_arguments)]
fn head_fwd(
    level: Level,
    HeadShape { t, s: n, d }: HeadShape,
    scale: f32,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    lse: &mut [f32],
    sc: &mut Scratch,
) {
    // Query i sees keys 0..=off + i.
    let off = n - t;
    transpose(k, d, n, d, &mut sc.kt);
    out.fill(0.0);
    let mut i0 = 0;
    while i0 < t {
        let r = BLOCK.min(t - i0);
        let cols = off + i0 + r;
        let s = &mut sc.s[..r * n];
        s.fill(0.0);
        matmul_acc(level, r, cols, d, &q[i0 * d..], d, &sc.kt, n, s, n);
        for (rr, row) in s.chunks_exact_mut(n).enumerate() {
            lse[i0 + rr] = softmax_prefix(level, &mut row[..cols], off + i0 + rr + 1, scale);
        }
        matmul_acc(level, r, d, cols, s, n, v, d, &mut out[i0 * d..], d);
        i0 += r;
    }
}

/// One head's forward tensors and output gradient: `(q, k, v, out, lse, dout)`.
type HeadInputs<'a> = (
    &'a [f32],
    &'a [f32],
    &'a [f32],
    &'a [f32],
    &'a [f32],
    &'a [f32],
);

/// One head of the backward pass; `dk` and `dv` are accumulated from zero.
fn head_bwd(
    level: Level,
    HeadShape { t, s: n, d }: HeadShape,
    scale: f32,
    (q, k, v, out, lse, dout): HeadInputs<'_>,
    (dq, dk, dv): (&mut [f32], &mut [f32], &mut [f32]),
    sc: &mut Scratch,
) {
    let off = n - t;
    transpose(k, d, n, d, &mut sc.kt);
    transpose(v, d, n, d, &mut sc.vt);
    dq.fill(0.0);
    dk.fill(0.0);
    dv.fill(0.0);
    let mut i0 = 0;
    while i0 < t {
        let r = BLOCK.min(t - i0);
        let cols = off + i0 + r;
        let (s, dp, pt) = (&mut sc.s[..r * n], &mut sc.dp[..r * n], &mut sc.pt[..r * n]);
        s.fill(0.0);
        dp.fill(0.0);
        let (qb, dob) = (&q[i0 * d..(i0 + r) * d], &dout[i0 * d..(i0 + r) * d]);
        matmul_acc(level, r, cols, d, qb, d, &sc.kt, n, s, n);
        matmul_acc(level, r, cols, d, dob, d, &sc.vt, n, dp, n);
        for rr in 0..r {
            let i = i0 + rr;
            let row = &mut s[rr * n..rr * n + cols];
            probs_from_lse(level, row, off + i + 1, scale, lse[i]);
            let delta = dot(level, &dout[i * d..(i + 1) * d], &out[i * d..(i + 1) * d]);
            grad_scores(level, row, &mut dp[rr * n..rr * n + cols], delta, scale);
        }
        // dV += Pᵀ·dO and dK += dSᵀ·Q over the keys this block sees.
        transpose(s, n, r, cols, pt);
        matmul_acc(level, cols, d, r, pt, r, dob, d, dv, d);
        transpose(dp, n, r, cols, pt);
        matmul_acc(level, cols, d, r, pt, r, qb, d, dk, d);
        // dQ = dS·K.
        matmul_acc(level, r, d, cols, dp, n, k, d, &mut dq[i0 * d..], d);
        i0 += r;
    }
}

pub(crate) fn fwd(
    ctx: &Ctx,
    ins: &[BufferView<'_>],
    attrs: &[f64],
    outs: &mut [BufferMut<'_>],
) -> Result<()> {
    const OP: &str = "causal_attention.fwd";
    let [q, k, v] = inputs::<3>(OP, ins)?;
    let [out, lse] = outputs::<2>(OP, outs)?;
    expect_attrs(OP, attrs, 1)?;
    let scale = finite(OP, "scale", attrs[0])? as f32;
    let q = floats(OP, "q", q, Floats::F32OrBf16)?;
    let (heads, t, d) = head_dims(OP, q.shape)?;
    let lead = &q.shape[..q.shape.len() - 1];
    let k = floats(OP, "k", k, Floats::F32OrBf16)?;
    let n = key_count(OP, "k", k.shape, q.shape)?;
    let v = floats(OP, "v", v, Floats::F32OrBf16)?;
    expect_shape(OP, "v", v.shape, k.shape)?;
    let mut out = Out::open(OP, "out", out, Floats::F32OrBf16, false)?;
    expect_shape(OP, "out", out.shape(), q.shape)?;
    let mut lse = Out::open(OP, "lse", lse, Floats::F32, false)?;
    expect_shape(OP, "lse", lse.shape(), lead)?;
    if heads > 0 && t > 0 {
        let (level, td, nd) = (ctx.level, t * d, n * d);
        let shape = HeadShape { t, s: n, d };
        if d == 0 {
            // Every score is 0: uniform probabilities over the visible keys.
            for (i, l) in lse.data().iter_mut().enumerate() {
                *l = ((n - t + i % t + 1) as f32).ln();
            }
        } else {
            out.data()
                .par_chunks_mut(td)
                .zip(lse.data().par_chunks_mut(t))
                .zip(
                    q.data
                        .par_chunks(td)
                        .zip(k.data.par_chunks(nd))
                        .zip(v.data.par_chunks(nd)),
                )
                .for_each_init(
                    || Scratch::new(n, d),
                    |sc, ((o, l), ((q, k), v))| head_fwd(level, shape, scale, q, k, v, o, l, sc),
                );
        }
    }
    out.finish();
    lse.finish();
    Ok(())
}

pub(crate) fn bwd(
    ctx: &Ctx,
    ins: &[BufferView<'_>],
    attrs: &[f64],
    outs: &mut [BufferMut<'_>],
) -> Result<()> {
    const OP: &str = "causal_attention.bwd";
    let [q, k, v, out, lse, dout] = inputs::<6>(OP, ins)?;
    let [dq, dk, dv] = outputs::<3>(OP, outs)?;
    expect_attrs(OP, attrs, 1)?;
    let scale = finite(OP, "scale", attrs[0])? as f32;
    let q = floats(OP, "q", q, Floats::F32OrBf16)?;
    let (heads, t, d) = head_dims(OP, q.shape)?;
    let lead = &q.shape[..q.shape.len() - 1];
    let k = floats(OP, "k", k, Floats::F32OrBf16)?;
    let n = key_count(OP, "k", k.shape, q.shape)?;
    let v = floats(OP, "v", v, Floats::F32OrBf16)?;
    expect_shape(OP, "v", v.shape, k.shape)?;
    let out = floats(OP, "out", out, Floats::F32OrBf16)?;
    expect_shape(OP, "out", out.shape, q.shape)?;
    let lse = floats(OP, "lse", lse, Floats::F32)?;
    expect_shape(OP, "lse", lse.shape, lead)?;
    let dout = floats(OP, "dout", dout, Floats::F32OrBf16)?;
    expect_shape(OP, "dout", dout.shape, q.shape)?;
    let mut dq = Out::open(OP, "dq", dq, Floats::F32OrBf16, false)?;
    expect_shape(OP, "dq", dq.shape(), q.shape)?;
    let mut dk = Out::open(OP, "dk", dk, Floats::F32OrBf16, false)?;
    expect_shape(OP, "dk", dk.shape(), k.shape)?;
    let mut dv = Out::open(OP, "dv", dv, Floats::F32OrBf16, false)?;
    expect_shape(OP, "dv", dv.shape(), k.shape)?;
    if heads > 0 && t > 0 && d > 0 {
        let (level, td, nd) = (ctx.level, t * d, n * d);
        let shape = HeadShape { t, s: n, d };
        let ins = q
            .data
            .par_chunks(td)
            .zip(k.data.par_chunks(nd))
            .zip(v.data.par_chunks(nd))
            .zip(out.data.par_chunks(td))
            .zip(lse.data.par_chunks(t))
            .zip(dout.data.par_chunks(td));
        dq.data()
            .par_chunks_mut(td)
            .zip(dk.data().par_chunks_mut(nd))
            .zip(dv.data().par_chunks_mut(nd))
            .zip(ins)
            .for_each_init(
                || Scratch::new(n, d),
                |sc, (((dq, dk), dv), (((((q, k), v), o), l), dout))| {
                    head_bwd(level, shape, scale, (q, k, v, o, l, dout), (dq, dk, dv), sc)
                },
            );
    }
    dq.finish();
    dk.finish();
    dv.finish();
    Ok(())
}
