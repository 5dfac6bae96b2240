//! Causal scaled-dot-product attention, forward and backward, one head per task, and its
//! packed form, where each query's keys also start at a per-query first key.
//!
//! Queries may be fewer than keys (`t ≤ s`: new positions attending over a key/value cache
//! as well as over themselves); the mask is then aligned to the last key, so query `i` sees
//! keys `0..=s − t + i`, as flash-attention does. Packing several examples into one row of a
//! batch confines each query to its own example: `packed_attention` takes a first key per
//! query (`starts`), and query `i` sees keys `starts_i..=s − t + i`. Both ops run the same
//! code; the causal one is the case without starts, where every first key is 0.
//!
//! Query rows are processed in blocks of [`BLOCK`]; a block's scores against every key it
//! may see — from the smallest first key among its rows up to its last row's own position —
//! are computed into a `BLOCK × s` scratch, so the `t × s` matrix of a head is never stored,
//! the scratch stays in L1/L2 for the sequence lengths of CPU training, and keys before a
//! block's examples cost nothing. Keys of the range that a row may not see (before its own
//! first key, or after its own position) get probability exactly 0. Because a whole score
//! row is at hand, the softmax is the plain two-pass one and needs none of flash attention's
//! online rescaling. The forward pass saves the log-sum-exp of each row; the backward pass
//! recomputes the probabilities from it.
//!
//! Every product is one shape, `C += A·B` with all three row-major ([`matmul_acc`]): keys and
//! values are transposed once per head so that `Q·Kᵀ` and `dO·Vᵀ` take that shape too, and
//! its inner loop is a register tile of 4 rows × 32 columns that LLVM keeps in vector
//! registers.

use std::borrow::Cow;

use codex_plugin_api::{BufferMut, BufferView};
use rayon::prelude::*;

use crate::buffer::{
    expect_attrs, expect_shape, finite, floats, indices, inputs, outputs, Floats, Out, Result,
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
    /// Scale a score row, softmax its entries `begin..end` in place and zero the rest;
    /// returns the row's log-sum-exp.
    fn softmax_window<M>(row: &mut [f32], begin: usize, end: usize, scale: f32) -> f32 {
        let (before, rest) = row.split_at_mut(begin.min(row.len()));
        before.fill(0.0);
        let (live, masked) = rest.split_at_mut(end.saturating_sub(begin).min(rest.len()));
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
    /// Recompute probabilities `exp(scale·s − lse)` for the entries `begin..end` of a score
    /// row and zero the rest.
    fn probs_from_lse<M>(row: &mut [f32], begin: usize, end: usize, scale: f32, lse: f32) {
        let (before, rest) = row.split_at_mut(begin.min(row.len()));
        before.fill(0.0);
        let (live, masked) = rest.split_at_mut(end.saturating_sub(begin).min(rest.len()));
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

/// Which keys a query sees.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum Mask {
    /// `causal_attention`: query `i` sees keys `0..=s − t + i`.
    Causal,
    /// `packed_attention`: query `i` sees keys `starts_i..=s − t + i`.
    Packed,
}

impl Mask {
    /// The op names of the forward and the backward pass.
    fn ops(self) -> (&'static str, &'static str) {
        match self {
            Mask::Causal => ("causal_attention.fwd", "causal_attention.bwd"),
            Mask::Packed => ("packed_attention.fwd", "packed_attention.bwd"),
        }
    }
}

/// The first key of every query of `packed_attention`: `[r, t]`, row `g / per_row` for
/// head `g`.
struct Starts<'a> {
    data: Cow<'a, [u32]>,
    t: usize,
    per_row: usize,
}

impl Starts<'_> {
    /// The first keys of head `g`'s `t` queries.
    fn row(&self, g: usize) -> &[u32] {
        let r = g / self.per_row;
        &self.data[r * self.t..(r + 1) * self.t]
    }
}

/// Split off the `starts` input that a packed op takes after its `n` attention buffers.
fn split_starts<'s, 'a>(
    mask: Mask,
    op: &'static str,
    ins: &'s [BufferView<'a>],
    n: usize,
) -> Result<(&'s [BufferView<'a>], Option<&'s BufferView<'a>>)> {
    match mask {
        Mask::Causal => Ok((ins, None)),
        Mask::Packed if ins.len() == n + 1 => Ok((&ins[..n], Some(&ins[n]))),
        Mask::Packed => Err(KernelError::Count {
            op,
            what: "inputs",
            expected: n + 1,
            found: ins.len(),
        }),
    }
}

/// Read and check `starts` for `heads` heads of `t` queries over `s` keys: u32 `[r, t]` with
/// `r` dividing `heads`, and no query's first key after its own position `s − t + i`.
fn read_starts<'a>(
    op: &'static str,
    v: &'a BufferView<'_>,
    HeadShape { t, s, .. }: HeadShape,
    heads: usize,
) -> Result<Starts<'a>> {
    let (shape, data) = indices(op, "starts", v)?;
    let rows = match *shape {
        // `r = 0` fits only zero heads.
        [r, n] if n == t && heads.is_multiple_of(r) => r,
        _ => {
            return Err(KernelError::Shape {
                op,
                name: "starts",
                found: shape.to_vec(),
                expected: format!(
                    "[r, {t}] with r dividing the {heads} heads of q, the product of its \
                     leading dimensions (e.g. [b, t] for q [b, h, t, d])"
                ),
            })
        }
    };
    let off = s - t;
    if let Some((i, &start)) = data
        .iter()
        .enumerate()
        .find(|&(i, &start)| start as usize > off + i % t)
    {
        return Err(KernelError::Start {
            op,
            row: i / t,
            position: i % t,
            start,
            last: off + i % t,
        });
    }
    Ok(Starts {
        data,
        t,
        per_row: heads.checked_div(rows).unwrap_or(1),
    })
}

/// The keys a block of queries `i0..i0 + r` computes scores for, `lo..hi`: from the smallest
/// first key among its rows to its last row's own position.
fn block_keys(starts: Option<&[u32]>, i0: usize, r: usize, off: usize) -> (usize, usize) {
    let lo = starts.and_then(|s| s[i0..i0 + r].iter().min());
    (lo.map_or(0, |&m| m as usize), off + i0 + r)
}

/// The keys query `i` sees, as columns `begin..end` of its block's scores from key `lo` on.
fn row_window(starts: Option<&[u32]>, i: usize, lo: usize, off: usize) -> (usize, usize) {
    let first = starts.map_or(0, |s| s[i] as usize);
    (first - lo, off + i + 1 - lo)
}

/// One head of the forward pass; `starts`, if any, holds the first key of each query.
#[allow(clippy::too_many_arguments)]
fn head_fwd(
    level: Level,
    HeadShape { t, s: n, d }: HeadShape,
    scale: f32,
    starts: Option<&[u32]>,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    lse: &mut [f32],
    sc: &mut Scratch,
) {
    // Query i sees keys starts_i..=off + i.
    let off = n - t;
    transpose(k, d, n, d, &mut sc.kt);
    out.fill(0.0);
    let mut i0 = 0;
    while i0 < t {
        let r = BLOCK.min(t - i0);
        // Scores of keys lo..hi, in columns 0..hi − lo of rows of n.
        let (lo, hi) = block_keys(starts, i0, r, off);
        let cols = hi - lo;
        let s = &mut sc.s[..r * n];
        s.fill(0.0);
        matmul_acc(level, r, cols, d, &q[i0 * d..], d, &sc.kt[lo..], n, s, n);
        for (rr, row) in s.chunks_exact_mut(n).enumerate() {
            let (begin, end) = row_window(starts, i0 + rr, lo, off);
            lse[i0 + rr] = softmax_window(level, &mut row[..cols], begin, end, scale);
        }
        let vb = &v[lo * d..];
        matmul_acc(level, r, d, cols, s, n, vb, d, &mut out[i0 * d..], d);
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
    starts: Option<&[u32]>,
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
        let (lo, hi) = block_keys(starts, i0, r, off);
        let cols = hi - lo;
        let (s, dp, pt) = (&mut sc.s[..r * n], &mut sc.dp[..r * n], &mut sc.pt[..r * n]);
        s.fill(0.0);
        dp.fill(0.0);
        let (qb, dob) = (&q[i0 * d..(i0 + r) * d], &dout[i0 * d..(i0 + r) * d]);
        matmul_acc(level, r, cols, d, qb, d, &sc.kt[lo..], n, s, n);
        matmul_acc(level, r, cols, d, dob, d, &sc.vt[lo..], n, dp, n);
        for rr in 0..r {
            let i = i0 + rr;
            let (begin, end) = row_window(starts, i, lo, off);
            let row = &mut s[rr * n..rr * n + cols];
            probs_from_lse(level, row, begin, end, scale, lse[i]);
            let delta = dot(level, &dout[i * d..(i + 1) * d], &out[i * d..(i + 1) * d]);
            grad_scores(level, row, &mut dp[rr * n..rr * n + cols], delta, scale);
        }
        // dV += Pᵀ·dO and dK += dSᵀ·Q over the keys this block sees.
        transpose(s, n, r, cols, pt);
        matmul_acc(level, cols, d, r, pt, r, dob, d, &mut dv[lo * d..], d);
        transpose(dp, n, r, cols, pt);
        matmul_acc(level, cols, d, r, pt, r, qb, d, &mut dk[lo * d..], d);
        // dQ = dS·K.
        let kb = &k[lo * d..];
        matmul_acc(level, r, d, cols, dp, n, kb, d, &mut dq[i0 * d..], d);
        i0 += r;
    }
}

/// `causal_attention.fwd` or `packed_attention.fwd`.
pub(crate) fn fwd(
    mask: Mask,
    ctx: &Ctx,
    ins: &[BufferView<'_>],
    attrs: &[f64],
    outs: &mut [BufferMut<'_>],
) -> Result<()> {
    let (op, _) = mask.ops();
    let (ins, starts) = split_starts(mask, op, ins, 3)?;
    let [q, k, v] = inputs::<3>(op, ins)?;
    let [out, lse] = outputs::<2>(op, outs)?;
    expect_attrs(op, attrs, 1)?;
    let scale = finite(op, "scale", attrs[0])? as f32;
    let q = floats(op, "q", q, Floats::F32OrBf16)?;
    let (heads, t, d) = head_dims(op, q.shape)?;
    let lead = &q.shape[..q.shape.len() - 1];
    let k = floats(op, "k", k, Floats::F32OrBf16)?;
    let n = key_count(op, "k", k.shape, q.shape)?;
    let v = floats(op, "v", v, Floats::F32OrBf16)?;
    expect_shape(op, "v", v.shape, k.shape)?;
    let mut out = Out::open(op, "out", out, Floats::F32OrBf16, false)?;
    expect_shape(op, "out", out.shape(), q.shape)?;
    let mut lse = Out::open(op, "lse", lse, Floats::F32, false)?;
    expect_shape(op, "lse", lse.shape(), lead)?;
    let shape = HeadShape { t, s: n, d };
    let starts = match starts {
        Some(v) => Some(read_starts(op, v, shape, heads)?),
        None => None,
    };
    if heads > 0 && t > 0 {
        let (level, td, nd) = (ctx.level, t * d, n * d);
        let row = |g: usize| starts.as_ref().map(|s| s.row(g));
        if d == 0 {
            // Every score is 0: uniform probabilities over the visible keys.
            for (i, l) in lse.data().iter_mut().enumerate() {
                let first = row(i / t).map_or(0, |s| s[i % t] as usize);
                *l = ((n - t + i % t + 1 - first) as f32).ln();
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
                .enumerate()
                .for_each_init(
                    || Scratch::new(n, d),
                    |sc, (g, ((o, l), ((q, k), v)))| {
                        head_fwd(level, shape, scale, row(g), q, k, v, o, l, sc)
                    },
                );
        }
    }
    out.finish();
    lse.finish();
    Ok(())
}

/// `causal_attention.bwd` or `packed_attention.bwd`.
pub(crate) fn bwd(
    mask: Mask,
    ctx: &Ctx,
    ins: &[BufferView<'_>],
    attrs: &[f64],
    outs: &mut [BufferMut<'_>],
) -> Result<()> {
    let (_, op) = mask.ops();
    let (ins, starts) = split_starts(mask, op, ins, 6)?;
    let [q, k, v, out, lse, dout] = inputs::<6>(op, ins)?;
    let [dq, dk, dv] = outputs::<3>(op, outs)?;
    expect_attrs(op, attrs, 1)?;
    let scale = finite(op, "scale", attrs[0])? as f32;
    let q = floats(op, "q", q, Floats::F32OrBf16)?;
    let (heads, t, d) = head_dims(op, q.shape)?;
    let lead = &q.shape[..q.shape.len() - 1];
    let k = floats(op, "k", k, Floats::F32OrBf16)?;
    let n = key_count(op, "k", k.shape, q.shape)?;
    let v = floats(op, "v", v, Floats::F32OrBf16)?;
    expect_shape(op, "v", v.shape, k.shape)?;
    let out = floats(op, "out", out, Floats::F32OrBf16)?;
    expect_shape(op, "out", out.shape, q.shape)?;
    let lse = floats(op, "lse", lse, Floats::F32)?;
    expect_shape(op, "lse", lse.shape, lead)?;
    let dout = floats(op, "dout", dout, Floats::F32OrBf16)?;
    expect_shape(op, "dout", dout.shape, q.shape)?;
    let mut dq = Out::open(op, "dq", dq, Floats::F32OrBf16, false)?;
    expect_shape(op, "dq", dq.shape(), q.shape)?;
    let mut dk = Out::open(op, "dk", dk, Floats::F32OrBf16, false)?;
    expect_shape(op, "dk", dk.shape(), k.shape)?;
    let mut dv = Out::open(op, "dv", dv, Floats::F32OrBf16, false)?;
    expect_shape(op, "dv", dv.shape(), k.shape)?;
    let shape = HeadShape { t, s: n, d };
    let starts = match starts {
        Some(v) => Some(read_starts(op, v, shape, heads)?),
        None => None,
    };
    if heads > 0 && t > 0 && d > 0 {
        let (level, td, nd) = (ctx.level, t * d, n * d);
        let row = |g: usize| starts.as_ref().map(|s| s.row(g));
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
            .enumerate()
            .for_each_init(
                || Scratch::new(n, d),
                |sc, (g, (((dq, dk), dv), (((((q, k), v), o), l), dout)))| {
                    let ins = (q, k, v, o, l, dout);
                    head_bwd(level, shape, scale, row(g), ins, (dq, dk, dv), sc)
                },
            );
    }
    dq.finish();
    dk.finish();
    dv.finish();
    Ok(())
}
