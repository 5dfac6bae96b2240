//! bf16 matrix products with f32 accumulation: `c = a · b` with `a` and `b` rounded to bf16.
//!
//! The right operand of a training step's matmuls is nearly always a weight that does not
//! change between optimizer steps, so it is packed once by `bf16_gemm.pack` into the layout
//! the micro-kernel reads, and the host keeps the packed buffer for as long as the weight is
//! unchanged. The left operand (activations, or their gradients) is rounded to bf16 on every
//! call, row by row, which costs one pass over it.
//!
//! # Packed layout
//!
//! `b: [k, n]` becomes panels of [`NR`] = 32 columns, the last one padded with zeros; in each
//! panel, for every pair of rows `(2p, 2p + 1)` (k padded to even with a zero row), the 32
//! columns' pairs `b[2p][j], b[2p + 1][j]` side by side: `ceil(n / 32) · 32 · ceil(k / 2) · 2`
//! bf16 values in all ([`packed_len`]). That is the pair layout `vdpbf16ps` multiplies: one
//! 32-bit broadcast of `a[i][2p], a[i][2p + 1]` against 16 such column pairs adds two products
//! into each of 16 f32 accumulators.
//!
//! # Paths
//!
//! The only path is AVX512-BF16 (`vdpbf16ps`), chosen when the CPU has it; the kernel does not
//! offer the `bf16_gemm` ops otherwise, and the host then multiplies in f32. AMX tiles are
//! not used.
//!
//! Each element of `c` is a sum in a fixed order (pairs of `k` in increasing order, within a
//! pair as the instruction adds), independent of the thread count: results are reproducible
//! on a machine.

use codex_plugin_api::{BufferMut, BufferView, DType};
use rayon::prelude::*;

use crate::buffer::{expect_attrs, f32_to_bf16, floats, inputs, outputs, Floats, Out, Result};
use crate::error::{dtype_name, KernelError};

/// Columns per packed panel (two 16-lane registers).
pub(crate) const NR: usize = 32;
/// Rows per micro-kernel tile.
const MR: usize = 8;
/// Rows of `a` per task: a block of `a` stays in cache while it meets every panel of `b`.
const MC: usize = 64;
/// Panels of `b` per task.
const PANELS_PER_TASK: usize = 4;

/// The number of bf16 values `bf16_gemm.pack` writes for `b: [k, n]`.
pub(crate) fn packed_len(k: usize, n: usize) -> usize {
    n.div_ceil(NR) * NR * k.div_ceil(2) * 2
}

/// Whether this CPU can run the bf16 products.
pub(crate) fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512bf16") && is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn flag(op: &'static str, name: &'static str, x: f64) -> Result<bool> {
    if x == 0.0 || x == 1.0 {
        Ok(x == 1.0)
    } else {
        Err(KernelError::Attr {
            op,
            name,
            found: x,
            expected: "0 or 1",
        })
    }
}

fn shape2(op: &'static str, name: &'static str, shape: &[usize]) -> Result<(usize, usize)> {
    match *shape {
        [r, c] => Ok((r, c)),
        _ => Err(KernelError::Shape {
            op,
            name,
            found: shape.to_vec(),
            expected: "two dimensions".into(),
        }),
    }
}

/// `bf16_gemm.pack`: `b: f32 [k, n]` (with `transposed = 1`, `[n, k]` holding `bᵀ`) into the
/// packed layout.
pub(crate) fn pack(
    ins: &[BufferView<'_>],
    attrs: &[f64],
    outs: &mut [BufferMut<'_>],
) -> Result<()> {
    const OP: &str = "bf16_gemm.pack";
    let [b] = inputs::<1>(OP, ins)?;
    let [packed] = outputs::<1>(OP, outs)?;
    expect_attrs(OP, attrs, 1)?;
    let transposed = flag(OP, "transposed", attrs[0])?;
    let b = floats(OP, "b", b, Floats::F32)?;
    let (r, c) = shape2(OP, "b", b.shape)?;
    let (k, n) = if transposed { (c, r) } else { (r, c) };
    let len = packed_len(k, n);
    let out = packed_out(OP, packed, len)?;
    let (rs, cs) = if transposed { (1, c) } else { (c, 1) };
    // b[kk][j] is at kk·rs + j·cs.
    let panel_len = NR * k.div_ceil(2) * 2;
    if len == 0 {
        return Ok(());
    }
    let fill = |p: usize, dst: &mut [u16]| {
        let j0 = p * NR;
        if j0 + NR <= n {
            // A full panel: straight-line loops over contiguous memory, which the compiler
            // vectorises; only a last odd row of `k` takes the general path below.
            let full = k / 2;
            if transposed {
                // Column j of the panel is row j0 + j of the stored [n, k]: its pairs are
                // adjacent values.
                for j in 0..NR {
                    let row = &b.data[(j0 + j) * k..(j0 + j) * k + 2 * full];
                    for (q, v) in row.chunks_exact(2).enumerate() {
                        dst[q * 2 * NR + 2 * j] = f32_to_bf16(v[0]);
                        dst[q * 2 * NR + 2 * j + 1] = f32_to_bf16(v[1]);
                    }
                }
            } else {
                for (q, d) in dst.chunks_exact_mut(2 * NR).take(full).enumerate() {
                    let lo = &b.data[2 * q * n + j0..2 * q * n + j0 + NR];
                    let hi = &b.data[(2 * q + 1) * n + j0..(2 * q + 1) * n + j0 + NR];
                    for ((d, &l), &h) in d.chunks_exact_mut(2).zip(lo).zip(hi) {
                        d[0] = f32_to_bf16(l);
                        d[1] = f32_to_bf16(h);
                    }
                }
            }
            if full * 2 == k {
                return;
            }
        }
        for (pair, d) in dst.chunks_exact_mut(2 * NR).enumerate() {
            for j in 0..NR {
                for e in 0..2 {
                    let kk = 2 * pair + e;
                    let col = j0 + j;
                    d[2 * j + e] = if kk < k && col < n {
                        f32_to_bf16(b.data[kk * rs + col * cs])
                    } else {
                        0
                    };
                }
            }
        }
    };
    match bytemuck::try_cast_slice_mut::<u8, u16>(out) {
        Ok(dst) => dst
            .par_chunks_mut(panel_len)
            .enumerate()
            .for_each(|(p, d)| fill(p, d)),
        Err(_) => {
            let mut staged = vec![0u16; len];
            staged
                .par_chunks_mut(panel_len)
                .enumerate()
                .for_each(|(p, d)| fill(p, d));
            for (o, v) in out.chunks_exact_mut(2).zip(&staged) {
                o.copy_from_slice(&v.to_ne_bytes());
            }
        }
    }
    Ok(())
}

/// The output buffer of `pack` as bytes, after checking dtype and length.
fn packed_out<'a>(op: &'static str, b: &'a mut BufferMut<'_>, len: usize) -> Result<&'a mut [u8]> {
    if b.dtype != DType::BF16 {
        return Err(KernelError::DType {
            op,
            name: "packed",
            found: dtype_name(b.dtype),
            expected: "bf16",
        });
    }
    let n: usize = b.shape.iter().product();
    if n != len || b.data.len() != 2 * len {
        return Err(KernelError::Shape {
            op,
            name: "packed",
            found: b.shape.to_vec(),
            expected: format!("{len} values in all (see the packed layout)"),
        });
    }
    Ok(&mut *b.data)
}

/// `bf16_gemm`: `c = a · b` for `a: f32 [m, k]` (with `a_transposed = 1`, `[k, m]` holding
/// `aᵀ`) and `b` packed for `[k, n]`; `c: f32 [m, n]`.
pub(crate) fn gemm(
    ins: &[BufferView<'_>],
    attrs: &[f64],
    outs: &mut [BufferMut<'_>],
) -> Result<()> {
    const OP: &str = "bf16_gemm";
    if !supported() {
        return Err(KernelError::Params(
            "bf16_gemm needs a CPU with AVX512-BF16; multiply in f32 instead".into(),
        ));
    }
    let [a, packed] = inputs::<2>(OP, ins)?;
    let [c] = outputs::<1>(OP, outs)?;
    expect_attrs(OP, attrs, 2)?;
    let a_t = flag(OP, "a_transposed", attrs[0])?;
    let n = attrs[1];
    if !(n >= 0.0 && n.fract() == 0.0 && n < 1e15) {
        return Err(KernelError::Attr {
            op: OP,
            name: "n",
            found: n,
            expected: "a whole number of columns",
        });
    }
    let n = n as usize;
    let a = floats(OP, "a", a, Floats::F32)?;
    let (r, cc) = shape2(OP, "a", a.shape)?;
    let (m, k) = if a_t { (cc, r) } else { (r, cc) };
    if packed.dtype != DType::BF16 || packed.data.len() != 2 * packed_len(k, n) {
        return Err(KernelError::Shape {
            op: OP,
            name: "packed",
            found: packed.shape.to_vec(),
            expected: format!(
                "bf16, {} values (b packed for [{k}, {n}])",
                packed_len(k, n)
            ),
        });
    }
    let packed_b: Vec<u16>;
    let pb: &[u16] = match bytemuck::try_cast_slice::<u8, u16>(packed.data) {
        Ok(s) => s,
        Err(_) => {
            packed_b = packed
                .data
                .chunks_exact(2)
                .map(|x| u16::from_ne_bytes([x[0], x[1]]))
                .collect();
            &packed_b
        }
    };
    let mut c = Out::open(OP, "c", c, Floats::F32, false)?;
    if c.shape() != [m, n] {
        return Err(KernelError::Shape {
            op: OP,
            name: "c",
            found: c.shape().to_vec(),
            expected: format!("[{m}, {n}]"),
        });
    }
    let kp = k.div_ceil(2);
    let pa = pack_a(&a.data, m, k, a_t);
    let out = c.data();
    if kp == 0 {
        out.fill(0.0);
    } else if m > 0 && n > 0 {
        run(&pa, pb, out, m, n, kp);
    }
    c.finish();
    Ok(())
}

/// `a` as rows of bf16 pairs: row `i` is `kp` u32 words, word `p` holding `a[i][2p]` in its
/// low half and `a[i][2p + 1]` in its high half (zero past `k`).
fn pack_a(a: &[f32], m: usize, k: usize, transposed: bool) -> Vec<u32> {
    let kp = k.div_ceil(2);
    let mut out = vec![0u32; m * kp];
    if kp == 0 {
        return out;
    }
    if !transposed {
        out.par_chunks_mut(kp)
            .zip(a.par_chunks(k.max(1)))
            .for_each(|(dst, row)| {
                let (pairs, rest) = row.split_at(k - k % 2);
                for (d, p) in dst.iter_mut().zip(pairs.chunks_exact(2)) {
                    *d = u32::from(f32_to_bf16(p[0])) | (u32::from(f32_to_bf16(p[1])) << 16);
                }
                if let Some(&x) = rest.first() {
                    dst[kp - 1] = u32::from(f32_to_bf16(x));
                }
            });
    } else {
        // a is stored as [k, m]: a[i][kk] = stored[kk·m + i]. Rows of the result in blocks,
        // reading stored rows in order.
        const BLOCK: usize = 64;
        out.par_chunks_mut(BLOCK * kp)
            .enumerate()
            .for_each(|(blk, dst)| {
                let i0 = blk * BLOCK;
                let rows = dst.len() / kp;
                for p in 0..kp {
                    let lo = &a[2 * p * m..2 * p * m + m];
                    let hi = (2 * p + 1 < k).then(|| &a[(2 * p + 1) * m..(2 * p + 2) * m]);
                    for r in 0..rows {
                        let i = i0 + r;
                        let h = hi.map_or(0, |h| u32::from(f32_to_bf16(h[i])));
                        dst[r * kp + p] = u32::from(f32_to_bf16(lo[i])) | (h << 16);
                    }
                }
            });
    }
    out
}

/// A raw pointer to `c` that tasks writing disjoint tiles share.
#[derive(Copy, Clone)]
struct CPtr(*mut f32);
// SAFETY: every task writes only its own rows × panels of `c` (see `run`).
unsafe impl Send for CPtr {}
unsafe impl Sync for CPtr {}

fn run(pa: &[u32], pb: &[u16], c: &mut [f32], m: usize, n: usize, kp: usize) {
    let panels = n.div_ceil(NR);
    let row_blocks = m.div_ceil(MC);
    let panel_groups = panels.div_ceil(PANELS_PER_TASK);
    let cp = CPtr(c.as_mut_ptr());
    let panel_len = NR * 2 * kp;
    (0..row_blocks * panel_groups)
        .into_par_iter()
        .for_each(move |task| {
            let cp = cp;
            let (rb, pg) = (task / panel_groups, task % panel_groups);
            let rows = rb * MC..(rb * MC + MC).min(m);
            let panel_range =
                pg * PANELS_PER_TASK..(pg * PANELS_PER_TASK + PANELS_PER_TASK).min(panels);
            for p in panel_range {
                let b = &pb[p * panel_len..(p + 1) * panel_len];
                let cols = NR.min(n - p * NR);
                let mut i = rows.start;
                while i < rows.end {
                    let r = MR.min(rows.end - i);
                    let a = &pa[i * kp..(i + r) * kp];
                    // SAFETY: rows i..i+r and columns p·NR..p·NR+cols of c belong to this
                    // task alone; `supported()` was checked by the caller.
                    unsafe {
                        let dst = cp.0.add(i * n + p * NR);
                        tile(r, a, b, kp, dst, n, cols);
                    }
                    i += r;
                }
            }
        });
}

/// One tile of up to [`MR`] rows × [`NR`] columns.
///
/// # Safety
/// The CPU has AVX512-BF16; `dst` points at `rows` rows of `ld` floats with `cols` writable
/// columns each; `a` holds `rows · kp` words and `b` `kp` pairs of 32 bf16 columns.
#[cfg(target_arch = "x86_64")]
unsafe fn tile(
    rows: usize,
    a: &[u32],
    b: &[u16],
    kp: usize,
    dst: *mut f32,
    ld: usize,
    cols: usize,
) {
    macro_rules! dispatch {
        ($($r:literal)*) => {
            match rows {
                $($r => unsafe { micro::<$r>(a, b, kp, dst, ld, cols) },)*
                _ => unreachable!("tiles have 1 to MR rows"),
            }
        };
    }
    dispatch!(1 2 3 4 5 6 7 8)
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile(_: usize, _: &[u32], _: &[u16], _: usize, _: *mut f32, _: usize, _: usize) {
    unreachable!("bf16_gemm is only offered on x86-64 CPUs with AVX512-BF16")
}

/// The micro-kernel: `R` rows, two 16-column registers, accumulated over all of `k`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn micro<const R: usize>(
    a: &[u32],
    b: &[u16],
    kp: usize,
    dst: *mut f32,
    ld: usize,
    cols: usize,
) {
    use std::arch::x86_64::*;
    let mut acc0 = [_mm512_setzero_ps(); R];
    let mut acc1 = [_mm512_setzero_ps(); R];
    let bp = b.as_ptr();
    let ap = a.as_ptr();
    for p in 0..kp {
        // SAFETY: b holds kp · 64 bf16 values and a holds R · kp words (caller's contract).
        let (b0, b1) = unsafe {
            (
                _mm512_loadu_si512(bp.add(p * 2 * NR) as *const _),
                _mm512_loadu_si512(bp.add(p * 2 * NR + 32) as *const _),
            )
        };
        // SAFETY: both are 64 bytes of plain bits; the pairs are bf16 values.
        let (b0, b1) = (
            std::mem::transmute::<__m512i, __m512bh>(b0),
            std::mem::transmute::<__m512i, __m512bh>(b1),
        );
        for r in 0..R {
            let x = unsafe { *ap.add(r * kp + p) };
            let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(x as i32));
            acc0[r] = _mm512_dpbf16_ps(acc0[r], x, b0);
            acc1[r] = _mm512_dpbf16_ps(acc1[r], x, b1);
        }
    }
    let m0: __mmask16 = if cols >= 16 {
        0xffff
    } else {
        (1u32 << cols) as u16 - 1
    };
    let m1: __mmask16 = if cols >= 32 {
        0xffff
    } else if cols > 16 {
        (1u32 << (cols - 16)) as u16 - 1
    } else {
        0
    };
    for r in 0..R {
        // SAFETY: row r of the tile has `cols` writable floats at dst + r·ld (caller's contract);
        // masked lanes are not touched.
        unsafe {
            let row = dst.add(r * ld);
            _mm512_mask_storeu_ps(row, m0, acc0[r]);
            _mm512_mask_storeu_ps(row.add(16), m1, acc1[r]);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::buffer::bf16_to_f32;

    /// The exact product of the bf16-rounded operands, in f64.
    fn reference(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let r = |x: f32| f64::from(bf16_to_f32(f32_to_bf16(x)));
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|kk| r(a[i * k + kk]) * r(b[kk * n + j])).sum();
            }
        }
        c
    }

    fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        let mut t = vec![0.0; x.len()];
        for i in 0..rows {
            for j in 0..cols {
                t[j * rows + i] = x[i * cols + j];
            }
        }
        t
    }

    fn bytes(x: &[f32]) -> Vec<u8> {
        x.iter().flat_map(|v| v.to_ne_bytes()).collect()
    }

    fn view<'a>(data: &'a [u8], shape: &'a [usize], dtype: DType) -> BufferView<'a> {
        BufferView { dtype, shape, data }
    }

    /// Pack `b` and multiply through the ops' buffer interface, in all four orientations.
    fn check(m: usize, k: usize, n: usize, seed: u64) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0..2.0)).collect();
        let b: Vec<f32> = (0..k * n).map(|_| rng.random_range(-2.0..2.0)).collect();
        let want = reference(&a, &b, m, k, n);
        for (a_t, b_t) in [(false, false), (true, false), (false, true), (true, true)] {
            let (ad, ashape) = if a_t {
                (transpose(&a, m, k), [k, m])
            } else {
                (a.clone(), [m, k])
            };
            let (bd, bshape) = if b_t {
                (transpose(&b, k, n), [n, k])
            } else {
                (b.clone(), [k, n])
            };
            let (ab, bb) = (bytes(&ad), bytes(&bd));
            let len = packed_len(k, n);
            let mut packed = vec![0u8; 2 * len];
            let pshape = [len];
            pack(
                &[view(&bb, &bshape, DType::F32)],
                &[if b_t { 1.0 } else { 0.0 }],
                &mut [BufferMut {
                    dtype: DType::BF16,
                    shape: &pshape,
                    data: &mut packed,
                }],
            )
            .unwrap();
            let mut c = vec![0u8; 4 * m * n];
            let cshape = [m, n];
            gemm(
                &[
                    view(&ab, &ashape, DType::F32),
                    view(&packed, &pshape, DType::BF16),
                ],
                &[if a_t { 1.0 } else { 0.0 }, n as f64],
                &mut [BufferMut {
                    dtype: DType::F32,
                    shape: &cshape,
                    data: &mut c,
                }],
            )
            .unwrap();
            for (idx, (got, want)) in c.chunks_exact(4).zip(&want).enumerate() {
                let got = f64::from(f32::from_ne_bytes([got[0], got[1], got[2], got[3]]));
                // Exact bf16 products summed in f32: the error is that of an f32 sum of k terms.
                let tol = 1e-5 * (k as f64).max(1.0) * 4.0 + 1e-6;
                assert!(
                    (got - want).abs() <= tol,
                    "m={m} k={k} n={n} a_t={a_t} b_t={b_t} at {idx}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn bf16_products_match_the_rounded_reference_on_odd_shapes() {
        if !supported() {
            eprintln!("this CPU has no AVX512-BF16: the bf16 path is not offered, nothing to run");
            return;
        }
        for (i, &(m, k, n)) in [
            (1, 1, 1),
            (3, 5, 7),
            (8, 2, 32),
            (9, 33, 31),
            (17, 64, 65),
            (70, 129, 100),
            (130, 7, 97),
            (5, 0, 3),
        ]
        .iter()
        .enumerate()
        {
            check(m, k, n, i as u64);
        }
    }

    #[test]
    fn bf16_products_stay_within_bf16_tolerance_of_f32() {
        if !supported() {
            return;
        }
        use rand::{Rng, SeedableRng};
        let (m, k, n) = (37, 300, 45);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let b: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1.0..1.0)).collect();
        let pa = pack_a(&a, m, k, false);
        let mut pb = vec![0u16; packed_len(k, n)];
        let bb = bytes(&b);
        let bshape = [k, n];
        let pshape = [pb.len()];
        let mut pbytes = vec![0u8; 2 * pb.len()];
        pack(
            &[view(&bb, &bshape, DType::F32)],
            &[0.0],
            &mut [BufferMut {
                dtype: DType::BF16,
                shape: &pshape,
                data: &mut pbytes,
            }],
        )
        .unwrap();
        for (d, s) in pb.iter_mut().zip(pbytes.chunks_exact(2)) {
            *d = u16::from_ne_bytes([s[0], s[1]]);
        }
        let mut c = vec![0.0f32; m * n];
        run(&pa, &pb, &mut c, m, n, k.div_ceil(2));
        for i in 0..m {
            for j in 0..n {
                let exact: f64 = (0..k)
                    .map(|kk| f64::from(a[i * k + kk]) * f64::from(b[kk * n + j]))
                    .sum();
                let scale: f64 = (0..k)
                    .map(|kk| f64::from(a[i * k + kk] * b[kk * n + j]).abs())
                    .sum();
                // Two roundings to 8 significant bits: relative 2⁻⁸ of the absolute sum.
                assert!((f64::from(c[i * n + j]) - exact).abs() <= scale / 128.0);
            }
        }
    }

    #[test]
    fn bad_calls_are_refused() {
        let b = bytes(&[1.0; 6]);
        let mut packed = vec![0u8; 2 * 10];
        let err = pack(
            &[view(&b, &[2, 3], DType::F32)],
            &[0.0],
            &mut [BufferMut {
                dtype: DType::BF16,
                shape: &[10],
                data: &mut packed,
            }],
        )
        .unwrap_err();
        assert!(err.to_string().contains("packed"), "{err}");
        let mut packed = vec![0u8; 2 * packed_len(2, 3)];
        let err = pack(
            &[view(&b, &[2, 3], DType::F32)],
            &[0.5],
            &mut [BufferMut {
                dtype: DType::BF16,
                shape: &[packed_len(2, 3)],
                data: &mut packed,
            }],
        )
        .unwrap_err();
        assert!(err.to_string().contains("transposed"), "{err}");
    }
}
