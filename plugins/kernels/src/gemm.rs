//! Half-precision matrix products with f32 accumulation: `c = a · b` with `a` and `b` rounded
//! to bf16 or to f16 (IEEE half), both to nearest even, and the products summed in f32.
//!
//! The right operand of a training step's matmuls is nearly always a weight that does not
//! change between optimizer steps, so it is packed once by `bf16_gemm.pack` (or
//! `f16_gemm.pack`) into the layout the micro-kernel reads, and the host keeps the packed
//! buffer for as long as the weight is unchanged. The left operand (activations, or their
//! gradients) is rounded on every call, row by row, which costs one pass over it.
//!
//! # Packed layout
//!
//! `b: [k, n]` becomes panels of [`NR`] = 32 columns, the last one padded with zeros; in each
//! panel, rows in groups of `g` (k padded to a multiple of `g` with zero rows), and for each
//! group the 32 columns' `g` values side by side: `ceil(n / 32) · 32 · ceil(k / g) · g`
//! half values in all ([`packed_len`]). bf16 has `g = 2`, the pair layout `vdpbf16ps`
//! multiplies: one 32-bit broadcast of `a[i][2p], a[i][2p + 1]` against 16 such column pairs
//! adds two products into each of 16 f32 accumulators. f16 has `g = 1`: each row of a panel is
//! 32 f16 values, which `vcvtph2ps` widens to f32 for an f32 FMA against a broadcast `a[i][k]`.
//!
//! # Paths
//!
//! bf16 has one path, AVX512-BF16 (`vdpbf16ps`), chosen when the CPU has it; the kernel does
//! not offer the `bf16_gemm` ops otherwise, and the host then multiplies in f32. AMX tiles are
//! not used.
//!
//! f16 has three, and is offered everywhere: AVX-512 (`vcvtph2ps` on 16 lanes, with the
//! kernel's AVX-512 level), AVX2 with F16C (8 lanes, with its AVX2 level) and a portable one
//! (scalar conversion, for `"simd": "portable"` or a CPU with neither). AVX512-FP16's f16
//! arithmetic is not used: it would sum in f16. The product of two f16 values is exact in f32
//! (11 + 11 significant bits, exponents well inside f32's range), so an FMA and a multiply
//! followed by an add round alike, and the three paths give the same bits.
//!
//! Each element of `c` is a sum in a fixed order (`k` in increasing order; for bf16, pairs of
//! `k`, within a pair as the instruction adds), independent of the thread count: results are
//! reproducible on a machine.

use codex_plugin_api::{BufferMut, BufferView, DType};
use rayon::prelude::*;

use crate::buffer::{expect_attrs, f32_to_bf16, floats, inputs, outputs, Floats, Out, Result};
use crate::error::{dtype_name, KernelError};
use crate::simd::{Isa, Level};

/// Columns per packed panel (two 16-lane registers).
pub(crate) const NR: usize = 32;
/// Rows per micro-kernel tile.
const MR: usize = 8;
/// Rows of `a` per task: a block of `a` stays in cache while it meets every panel of `b`.
const MC: usize = 64;
/// Panels of `b` per task.
const PANELS_PER_TASK: usize = 4;

/// The half-precision format a product rounds its operands to.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum Half {
    /// bfloat16: 8 significant bits, f32's exponent range.
    Bf16,
    /// IEEE binary16: 11 significant bits, finite up to 65504.
    F16,
}

impl Half {
    /// The ops' names: `[pack, product]`.
    pub(crate) fn ops(self) -> [&'static str; 2] {
        match self {
            Half::Bf16 => ["bf16_gemm.pack", "bf16_gemm"],
            Half::F16 => ["f16_gemm.pack", "f16_gemm"],
        }
    }

    fn dtype(self) -> DType {
        match self {
            Half::Bf16 => DType::BF16,
            Half::F16 => DType::F16,
        }
    }

    /// Rows of `b` whose values sit side by side in a panel.
    fn group(self) -> usize {
        match self {
            Half::Bf16 => 2,
            Half::F16 => 1,
        }
    }

    /// `x` rounded to this format, as its bits.
    #[inline(always)]
    fn round(self, x: f32) -> u16 {
        match self {
            Half::Bf16 => f32_to_bf16(x),
            Half::F16 => f32_to_f16(x),
        }
    }
}

/// f32 to IEEE half bits, rounding to nearest even; beyond 65504 (after rounding) ±inf, NaN
/// stays NaN.
#[inline(always)]
pub(crate) fn f32_to_f16(x: f32) -> u16 {
    half::f16::from_f32(x).to_bits()
}

/// IEEE half bits to f32 (exact).
#[inline(always)]
pub(crate) fn f16_to_f32(b: u16) -> f32 {
    half::f16::from_bits(b).to_f32()
}

/// The number of half values `*_gemm.pack` writes for `b: [k, n]`.
pub(crate) fn packed_len(half: Half, k: usize, n: usize) -> usize {
    let g = half.group();
    n.div_ceil(NR) * NR * k.div_ceil(g) * g
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

/// How the f16 products run on this CPU at a kernel's instruction-set level.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum F16Path {
    /// `vcvtph2ps` on 16 lanes and FMA, with the AVX-512 level.
    Avx512,
    /// `vcvtph2ps` on 8 lanes (F16C) and FMA, with the AVX2 level.
    Avx2,
    /// Scalar conversion, multiply and add.
    Portable,
}

impl F16Path {
    /// The fastest path `level` allows. A `Level` naming AVX-512 or AVX2 proves the CPU has
    /// it; F16C is checked here (every AVX2 CPU known has it, but nothing promises it).
    pub(crate) fn for_level(level: Level) -> F16Path {
        match level.isa() {
            Isa::Avx512 => F16Path::Avx512,
            Isa::Avx2 if f16c() => F16Path::Avx2,
            _ => F16Path::Portable,
        }
    }

    /// Its name, for the log and the tests.
    pub(crate) fn name(self) -> &'static str {
        match self {
            F16Path::Avx512 => "avx512",
            F16Path::Avx2 => "avx2+f16c",
            F16Path::Portable => "portable",
        }
    }
}

fn f16c() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("f16c")
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

/// `bf16_gemm.pack` / `f16_gemm.pack`: `b: f32 [k, n]` (with `transposed = 1`, `[n, k]`
/// holding `bᵀ`) into the packed layout.
pub(crate) fn pack(
    half: Half,
    ins: &[BufferView<'_>],
    attrs: &[f64],
    outs: &mut [BufferMut<'_>],
) -> Result<()> {
    let op = half.ops()[0];
    let [b] = inputs::<1>(op, ins)?;
    let [packed] = outputs::<1>(op, outs)?;
    expect_attrs(op, attrs, 1)?;
    let transposed = flag(op, "transposed", attrs[0])?;
    let b = floats(op, "b", b, Floats::F32)?;
    let (r, c) = shape2(op, "b", b.shape)?;
    let (k, n) = if transposed { (c, r) } else { (r, c) };
    let len = packed_len(half, k, n);
    let out = packed_out(half, packed, len)?;
    let g = half.group();
    let (rs, cs) = if transposed { (1, c) } else { (c, 1) };
    // b[kk][j] is at kk·rs + j·cs.
    let panel_len = NR * k.div_ceil(g) * g;
    if len == 0 {
        return Ok(());
    }
    let simd = bf16x16::available();
    let fill = |p: usize, dst: &mut [u16]| {
        let j0 = p * NR;
        // Rows of the panel's full groups; a last partial group takes the general path below.
        let full = k / g;
        if j0 + NR <= n {
            // A full panel: straight-line loops over contiguous memory.
            if half == Half::Bf16 && simd {
                bf16_panel(simd, &b.data, (k, n), transposed, j0, dst);
            } else if transposed {
                // Column j of the panel is row j0 + j of the stored [n, k].
                for j in 0..NR {
                    let row = &b.data[(j0 + j) * k..(j0 + j) * k + g * full];
                    for (q, v) in row.chunks_exact(g).enumerate() {
                        for (e, &x) in v.iter().enumerate() {
                            dst[q * g * NR + g * j + e] = half.round(x);
                        }
                    }
                }
            } else {
                for (q, d) in dst.chunks_exact_mut(g * NR).take(full).enumerate() {
                    for e in 0..g {
                        let row = &b.data[(g * q + e) * n + j0..(g * q + e) * n + j0 + NR];
                        for (j, &x) in row.iter().enumerate() {
                            d[g * j + e] = half.round(x);
                        }
                    }
                }
            }
            if full * g == k {
                return;
            }
        }
        for (q, d) in dst.chunks_exact_mut(g * NR).enumerate() {
            for j in 0..NR {
                for e in 0..g {
                    let kk = g * q + e;
                    let col = j0 + j;
                    d[g * j + e] = if kk < k && col < n {
                        half.round(b.data[kk * rs + col * cs])
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

/// The full pairs of rows of a full bf16 panel (columns `j0..j0 + NR`) of `b: [k, n]`
/// (stored as `[n, k]` when `transposed`), a vector at a time.
fn bf16_panel(
    simd: bool,
    b: &[f32],
    (k, n): (usize, usize),
    transposed: bool,
    j0: usize,
    dst: &mut [u16],
) {
    let pairs = k / 2;
    if transposed {
        // Column j of the panel is stored row j0 + j: its pairs are consecutive values, so the
        // row rounds in order and each pair (one u32) goes to its group's slot for column j.
        let mut row = vec![0u16; 2 * pairs];
        for j in 0..NR {
            let src = &b[(j0 + j) * k..(j0 + j) * k + 2 * pairs];
            bf16x16::convert(simd, src, &mut row);
            for (q, pair) in row.chunks_exact(2).enumerate() {
                dst[q * 2 * NR + 2 * j..q * 2 * NR + 2 * j + 2].copy_from_slice(pair);
            }
        }
    } else {
        for (q, d) in dst.chunks_exact_mut(2 * NR).take(pairs).enumerate() {
            let lo = &b[2 * q * n + j0..2 * q * n + j0 + NR];
            let hi = &b[(2 * q + 1) * n + j0..(2 * q + 1) * n + j0 + NR];
            bf16x16::interleave(simd, lo, Some(hi), d);
        }
    }
}

/// The output buffer of `pack` as bytes, after checking dtype and length.
fn packed_out<'a>(half: Half, b: &'a mut BufferMut<'_>, len: usize) -> Result<&'a mut [u8]> {
    let op = half.ops()[0];
    if b.dtype != half.dtype() {
        return Err(KernelError::DType {
            op,
            name: "packed",
            found: dtype_name(b.dtype),
            expected: dtype_name(half.dtype()),
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

/// `bf16_gemm` / `f16_gemm`: `c = a · b` for `a: f32 [m, k]` (with `a_transposed = 1`,
/// `[k, m]` holding `aᵀ`) and `b` packed for `[k, n]`; `c: f32 [m, n]`. f16 runs on
/// `path`; bf16 needs AVX512-BF16.
pub(crate) fn gemm(
    half: Half,
    path: F16Path,
    ins: &[BufferView<'_>],
    attrs: &[f64],
    outs: &mut [BufferMut<'_>],
) -> Result<()> {
    let op = half.ops()[1];
    if half == Half::Bf16 && !supported() {
        return Err(KernelError::Params(
            "bf16_gemm needs a CPU with AVX512-BF16; multiply in f32 instead".into(),
        ));
    }
    let [a, packed] = inputs::<2>(op, ins)?;
    let [c] = outputs::<1>(op, outs)?;
    expect_attrs(op, attrs, 2)?;
    let a_t = flag(op, "a_transposed", attrs[0])?;
    let n = attrs[1];
    if !(n >= 0.0 && n.fract() == 0.0 && n < 1e15) {
        return Err(KernelError::Attr {
            op,
            name: "n",
            found: n,
            expected: "a whole number of columns",
        });
    }
    let n = n as usize;
    let a = floats(op, "a", a, Floats::F32)?;
    let (r, cc) = shape2(op, "a", a.shape)?;
    let (m, k) = if a_t { (cc, r) } else { (r, cc) };
    let len = packed_len(half, k, n);
    if packed.dtype != half.dtype() || packed.data.len() != 2 * len {
        return Err(KernelError::Shape {
            op,
            name: "packed",
            found: packed.shape.to_vec(),
            expected: format!(
                "{}, {len} values (b packed for [{k}, {n}])",
                dtype_name(half.dtype())
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
    let mut c = Out::open(op, "c", c, Floats::F32, false)?;
    if c.shape() != [m, n] {
        return Err(KernelError::Shape {
            op,
            name: "c",
            found: c.shape().to_vec(),
            expected: format!("[{m}, {n}]"),
        });
    }
    let out = c.data();
    if k == 0 {
        out.fill(0.0);
    } else if m > 0 && n > 0 {
        match half {
            Half::Bf16 => run_bf16(&pack_a_bf16(&a.data, m, k, a_t), pb, out, m, n, k),
            Half::F16 => run_f16(path, &pack_a_f16(&a.data, m, k, a_t), pb, out, m, n, k),
        }
    }
    c.finish();
    Ok(())
}

/// `a` as rows of bf16 pairs: row `i` is `kp` u32 words, word `p` holding `a[i][2p]` in its
/// low half and `a[i][2p + 1]` in its high half (zero past `k`). In memory, a row is the row's
/// bf16 values in order (x86-64 is little-endian, the only target with the bf16 products).
fn pack_a_bf16(a: &[f32], m: usize, k: usize, transposed: bool) -> Vec<u32> {
    let kp = k.div_ceil(2);
    let mut out = vec![0u32; m * kp];
    if kp == 0 {
        return out;
    }
    let simd = bf16x16::available();
    if !transposed {
        out.par_chunks_mut(kp)
            .zip(a.par_chunks(k))
            .for_each(|(dst, row)| {
                let dst: &mut [u16] = bytemuck::cast_slice_mut(dst);
                bf16x16::convert(simd, row, &mut dst[..k]);
            });
    } else {
        // a is stored as [k, m]: a[i][kk] = stored[kk·m + i], so pair p of rows i.. is stored
        // rows 2p and 2p + 1 side by side. A transpose in tiles of BLOCK rows × PAIRS pairs:
        // each tile's pairs are rounded into `tile` (in cache) reading stored rows in order,
        // then written out a row at a time as PAIRS consecutive words.
        const BLOCK: usize = 64;
        const PAIRS: usize = 16;
        out.par_chunks_mut(BLOCK * kp)
            .enumerate()
            .for_each(|(blk, dst)| {
                let i0 = blk * BLOCK;
                let rows = dst.len() / kp;
                let mut tile = [[0u32; BLOCK]; PAIRS];
                for p0 in (0..kp).step_by(PAIRS) {
                    let pairs = PAIRS.min(kp - p0);
                    for (dp, words) in tile.iter_mut().enumerate().take(pairs) {
                        let p = p0 + dp;
                        let lo = &a[2 * p * m + i0..2 * p * m + i0 + rows];
                        let hi = (2 * p + 1 < k)
                            .then(|| &a[(2 * p + 1) * m + i0..(2 * p + 1) * m + i0 + rows]);
                        bf16x16::interleave(
                            simd,
                            lo,
                            hi,
                            bytemuck::cast_slice_mut(&mut words[..rows]),
                        );
                    }
                    for (r, row) in dst.chunks_exact_mut(kp).enumerate() {
                        for (d, words) in row[p0..p0 + pairs].iter_mut().zip(&tile) {
                            *d = words[r];
                        }
                    }
                }
            });
    }
    out
}

/// Rounding f32 to bf16 a vector at a time: sixteen lanes of AVX-512F integer arithmetic that
/// round exactly as [`f32_to_bf16`] does (to nearest even, NaN kept quiet, subnormals kept),
/// so packing gives the same bits with or without it. Used where the bf16 products run, which
/// implies AVX-512F; the scalar loops remain for other CPUs and as the reference in tests.
mod bf16x16 {
    use crate::buffer::f32_to_bf16;

    /// Whether the vector loops can run on this CPU.
    pub(super) fn available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx512f")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// `dst[i] = bf16(src[i])` for every `i < src.len()`; `simd` from [`available`].
    pub(super) fn convert(simd: bool, src: &[f32], dst: &mut [u16]) {
        assert_eq!(src.len(), dst.len(), "convert: one output per input");
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: `simd` comes from `available()`: the CPU has AVX-512F.
            done = unsafe { x86::convert(src, dst) };
        }
        let _ = simd;
        for (d, &x) in dst[done..].iter_mut().zip(&src[done..]) {
            *d = f32_to_bf16(x);
        }
    }

    /// `dst[2j] = bf16(lo[j])` and `dst[2j + 1] = bf16(hi[j])` (0 without `hi`): two rows'
    /// values side by side, the pair layout of `vdpbf16ps`.
    pub(super) fn interleave(simd: bool, lo: &[f32], hi: Option<&[f32]>, dst: &mut [u16]) {
        assert!(
            dst.len() == 2 * lo.len() && hi.is_none_or(|h| h.len() == lo.len()),
            "interleave: two outputs per input pair"
        );
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: `simd` comes from `available()`: the CPU has AVX-512F.
            done = unsafe { x86::interleave(lo, hi, dst) };
        }
        let _ = simd;
        for j in done..lo.len() {
            dst[2 * j] = f32_to_bf16(lo[j]);
            dst[2 * j + 1] = hi.map_or(0, |h| f32_to_bf16(h[j]));
        }
    }

    #[cfg(target_arch = "x86_64")]
    mod x86 {
        use std::arch::x86_64::*;

        /// Sixteen f32 values (as bits) rounded to bf16, each in the low half of its lane with
        /// the high half zero: `(b + 0x7fff + lsb) >> 16`, and a NaN's top half with the quiet
        /// bit set.
        #[inline]
        #[target_feature(enable = "avx512f")]
        fn round(b: __m512i) -> __m512i {
            let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
            let bias = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb);
            let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(b, bias));
            let f = _mm512_castsi512_ps(b);
            let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(f, f);
            let quiet = _mm512_or_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(0x40));
            _mm512_mask_blend_epi32(nan, rounded, quiet)
        }

        /// [`super::convert`] on whole vectors; returns how many values it wrote.
        ///
        /// # Safety
        /// The CPU has AVX-512F; `dst` is at least as long as `src`.
        #[target_feature(enable = "avx512f")]
        pub(super) unsafe fn convert(src: &[f32], dst: &mut [u16]) -> usize {
            let whole = src.len() / 16 * 16;
            let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
            for i in (0..whole).step_by(16) {
                // SAFETY: values i..i + 16 exist in both (the loop's bound, the contract).
                unsafe {
                    let b = _mm512_loadu_si512(s.add(i) as *const _);
                    let h = _mm512_cvtepi32_epi16(round(b));
                    _mm256_storeu_si256(d.add(i) as *mut _, h);
                }
            }
            whole
        }

        /// [`super::interleave`] on whole vectors; returns how many pairs it wrote.
        ///
        /// # Safety
        /// The CPU has AVX-512F; `dst` holds two values per value of `lo`, and `hi` (if any)
        /// is as long as `lo`.
        #[target_feature(enable = "avx512f")]
        pub(super) unsafe fn interleave(lo: &[f32], hi: Option<&[f32]>, dst: &mut [u16]) -> usize {
            let whole = lo.len() / 16 * 16;
            let d = dst.as_mut_ptr();
            for j in (0..whole).step_by(16) {
                // SAFETY: values j..j + 16 of lo and hi, and 2j..2j + 32 of dst, exist.
                unsafe {
                    let l = round(_mm512_loadu_si512(lo.as_ptr().add(j) as *const _));
                    let h = match hi {
                        Some(hi) => _mm512_slli_epi32::<16>(round(_mm512_loadu_si512(
                            hi.as_ptr().add(j) as *const _,
                        ))),
                        None => _mm512_setzero_si512(),
                    };
                    _mm512_storeu_si512(d.add(2 * j) as *mut _, _mm512_or_si512(l, h));
                }
            }
            whole
        }
    }
}

/// `a` rounded to f16 and widened back, row-major `[m, k]`: the micro-kernels broadcast
/// f32 values.
fn pack_a_f16(a: &[f32], m: usize, k: usize, transposed: bool) -> Vec<f32> {
    let round = |x: f32| f16_to_f32(f32_to_f16(x));
    let mut out = vec![0f32; m * k];
    if k == 0 {
        return out;
    }
    if !transposed {
        out.par_chunks_mut(k)
            .zip(a.par_chunks(k))
            .for_each(|(dst, row)| {
                for (d, &x) in dst.iter_mut().zip(row) {
                    *d = round(x);
                }
            });
    } else {
        const BLOCK: usize = 64;
        out.par_chunks_mut(BLOCK * k)
            .enumerate()
            .for_each(|(blk, dst)| {
                let i0 = blk * BLOCK;
                let rows = dst.len() / k;
                for kk in 0..k {
                    let src = &a[kk * m + i0..kk * m + i0 + rows];
                    for (r, &x) in src.iter().enumerate() {
                        dst[r * k + kk] = round(x);
                    }
                }
            });
    }
    out
}

/// A raw pointer to `c` that tasks writing disjoint tiles share.
#[derive(Copy, Clone)]
struct CPtr(*mut f32);
// SAFETY: every task writes only its own rows × panels of `c` (see `tiles`).
unsafe impl Send for CPtr {}
unsafe impl Sync for CPtr {}

/// Every tile of `c: [m, n]`, in parallel: `tile(i, rows, p, cols, dst)` computes rows
/// `i..i + rows` (at most [`MR`]) of panel `p` (`cols` columns) into `dst`, the tile's first
/// element of `c` (row stride `n`).
///
/// A task is a block of [`MC`] rows against a group of panels, and each thread takes a run of
/// consecutive tasks. They run along the rows of `c` (a block of `a` meets every panel before
/// the next), or down its columns (a group of panels meets every block of `a`) when `b` is the
/// larger operand: an LM head's `b` is far larger than its `a`, and read along the rows it
/// would come from memory once per block of 64 rows. Every tile is computed alike in either
/// order.
///
/// # Safety
/// `tile` writes only its own tile, through `dst`.
unsafe fn tiles(
    c: &mut [f32],
    m: usize,
    n: usize,
    tile: impl Fn(usize, usize, usize, usize, *mut f32) + Sync,
) {
    let panels = n.div_ceil(NR);
    let row_blocks = m.div_ceil(MC);
    let panel_groups = panels.div_ceil(PANELS_PER_TASK);
    // The larger operand is read once, the smaller (more likely to stay in cache) again for
    // each block of the other. Both have `k` rows of pairs: `b` is the larger when n > m.
    let down_columns = n > m;
    let cp = CPtr(c.as_mut_ptr());
    let tile = &tile;
    (0..row_blocks * panel_groups)
        .into_par_iter()
        .for_each(move |task| {
            let cp = cp;
            let (rb, pg) = if down_columns {
                (task % row_blocks, task / row_blocks)
            } else {
                (task / panel_groups, task % panel_groups)
            };
            let rows = rb * MC..(rb * MC + MC).min(m);
            let panel_range =
                pg * PANELS_PER_TASK..(pg * PANELS_PER_TASK + PANELS_PER_TASK).min(panels);
            for p in panel_range {
                let cols = NR.min(n - p * NR);
                let mut i = rows.start;
                while i < rows.end {
                    let r = MR.min(rows.end - i);
                    // SAFETY: rows i..i+r and columns p·NR..p·NR+cols of c belong to this
                    // task alone.
                    let dst = unsafe { cp.0.add(i * n + p * NR) };
                    tile(i, r, p, cols, dst);
                    i += r;
                }
            }
        });
}

fn run_bf16(pa: &[u32], pb: &[u16], c: &mut [f32], m: usize, n: usize, k: usize) {
    let kp = k.div_ceil(2);
    let panel_len = NR * 2 * kp;
    // SAFETY: each call writes its own tile; `supported()` was checked by the caller.
    unsafe {
        tiles(c, m, n, |i, r, p, cols, dst| {
            let a = &pa[i * kp..(i + r) * kp];
            let b = &pb[p * panel_len..(p + 1) * panel_len];
            tile_bf16(r, a, b, kp, dst, n, cols);
        });
    }
}

fn run_f16(path: F16Path, pa: &[f32], pb: &[u16], c: &mut [f32], m: usize, n: usize, k: usize) {
    let panel_len = NR * k;
    // SAFETY: each call writes its own tile; `path` was chosen from a detected level.
    unsafe {
        tiles(c, m, n, |i, r, p, cols, dst| {
            let a = &pa[i * k..(i + r) * k];
            let b = &pb[p * panel_len..(p + 1) * panel_len];
            tile_f16(path, r, a, b, k, dst, n, cols);
        });
    }
}

/// One bf16 tile of up to [`MR`] rows × [`NR`] columns.
///
/// # Safety
/// The CPU has AVX512-BF16; `dst` points at `rows` rows of `ld` floats with `cols` writable
/// columns each; `a` holds `rows · kp` words and `b` `kp` pairs of 32 bf16 columns.
#[cfg(target_arch = "x86_64")]
unsafe fn tile_bf16(
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
                $($r => unsafe { micro_bf16::<$r>(a, b, kp, dst, ld, cols) },)*
                _ => unreachable!("tiles have 1 to MR rows"),
            }
        };
    }
    dispatch!(1 2 3 4 5 6 7 8)
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile_bf16(_: usize, _: &[u32], _: &[u16], _: usize, _: *mut f32, _: usize, _: usize) {
    unreachable!("bf16_gemm is only offered on x86-64 CPUs with AVX512-BF16")
}

/// The store masks of a 32-column tile with `cols` columns written.
#[cfg(target_arch = "x86_64")]
fn masks(cols: usize) -> (u16, u16) {
    let m0 = if cols >= 16 {
        0xffff
    } else {
        (1u32 << cols) as u16 - 1
    };
    let m1 = if cols >= 32 {
        0xffff
    } else if cols > 16 {
        (1u32 << (cols - 16)) as u16 - 1
    } else {
        0
    };
    (m0, m1)
}

/// The bf16 micro-kernel: `R` rows, two 16-column registers, accumulated over all of `k`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn micro_bf16<const R: usize>(
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
    let (m0, m1) = masks(cols);
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

/// One f16 tile of up to [`MR`] rows × [`NR`] columns on `path`.
///
/// # Safety
/// `path` is one the CPU can run; `dst` points at `rows` rows of `ld` floats with `cols`
/// writable columns each; `a` holds `rows · k` floats and `b` `k` rows of 32 f16 values.
#[allow(clippy::too_many_arguments)]
unsafe fn tile_f16(
    path: F16Path,
    rows: usize,
    a: &[f32],
    b: &[u16],
    k: usize,
    dst: *mut f32,
    ld: usize,
    cols: usize,
) {
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! dispatch {
            ($f:ident, $a:expr, $($r:literal)*) => {
                match rows {
                    $($r => unsafe { $f::<$r>($a, b, k, dst, ld, cols) },)*
                    _ => unreachable!("tiles have 1 to MR rows"),
                }
            };
        }
        match path {
            F16Path::Avx512 => return dispatch!(micro_f16_avx512, a, 1 2 3 4 5 6 7 8),
            F16Path::Avx2 => {
                // Four 8-lane registers a row: two rows at a time fit the 16 registers.
                let mut r0 = 0;
                while r0 < rows {
                    let r = 2.min(rows - r0);
                    let a = &a[r0 * k..(r0 + r) * k];
                    // SAFETY: rows r0.. of this tile (caller's contract).
                    let dst = unsafe { dst.add(r0 * ld) };
                    match r {
                        1 => unsafe { micro_f16_avx2::<1>(a, b, k, dst, ld, cols) },
                        _ => unsafe { micro_f16_avx2::<2>(a, b, k, dst, ld, cols) },
                    }
                    r0 += r;
                }
                return;
            }
            F16Path::Portable => {}
        }
    }
    // SAFETY: the caller's contract.
    unsafe { micro_f16_portable(rows, a, b, k, dst, ld, cols) }
}

/// The portable f16 micro-kernel: each product exact in f32, added in `k` order, as the
/// vector paths' FMAs add it.
unsafe fn micro_f16_portable(
    rows: usize,
    a: &[f32],
    b: &[u16],
    k: usize,
    dst: *mut f32,
    ld: usize,
    cols: usize,
) {
    let mut bf = [0f32; NR];
    let mut acc = [[0f32; NR]; MR];
    for kk in 0..k {
        for (d, &s) in bf.iter_mut().zip(&b[kk * NR..(kk + 1) * NR]) {
            *d = f16_to_f32(s);
        }
        for (r, acc) in acc.iter_mut().enumerate().take(rows) {
            let x = a[r * k + kk];
            for (c, &y) in acc.iter_mut().zip(&bf) {
                *c += x * y;
            }
        }
    }
    for (r, acc) in acc.iter().enumerate().take(rows) {
        // SAFETY: row r of the tile has `cols` writable floats at dst + r·ld.
        let row = unsafe { std::slice::from_raw_parts_mut(dst.add(r * ld), cols) };
        row.copy_from_slice(&acc[..cols]);
    }
}

/// The AVX-512 f16 micro-kernel: `R` rows, two 16-column registers, over all of `k`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn micro_f16_avx512<const R: usize>(
    a: &[f32],
    b: &[u16],
    k: usize,
    dst: *mut f32,
    ld: usize,
    cols: usize,
) {
    use std::arch::x86_64::*;
    let mut acc0 = [_mm512_setzero_ps(); R];
    let mut acc1 = [_mm512_setzero_ps(); R];
    let bp = b.as_ptr();
    let ap = a.as_ptr();
    for kk in 0..k {
        // SAFETY: b holds k rows of 32 f16 values and a holds R · k floats (caller's contract).
        let (b0, b1) = unsafe {
            (
                _mm512_cvtph_ps(_mm256_loadu_si256(bp.add(kk * NR) as *const _)),
                _mm512_cvtph_ps(_mm256_loadu_si256(bp.add(kk * NR + 16) as *const _)),
            )
        };
        for r in 0..R {
            let x = _mm512_set1_ps(unsafe { *ap.add(r * k + kk) });
            acc0[r] = _mm512_fmadd_ps(x, b0, acc0[r]);
            acc1[r] = _mm512_fmadd_ps(x, b1, acc1[r]);
        }
    }
    let (m0, m1) = masks(cols);
    for r in 0..R {
        // SAFETY: row r of the tile has `cols` writable floats at dst + r·ld; masked lanes
        // are not touched.
        unsafe {
            let row = dst.add(r * ld);
            _mm512_mask_storeu_ps(row, m0, acc0[r]);
            _mm512_mask_storeu_ps(row.add(16), m1, acc1[r]);
        }
    }
}

/// The AVX2 f16 micro-kernel: `R` rows (1 or 2), four 8-column registers, over all of `k`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn micro_f16_avx2<const R: usize>(
    a: &[f32],
    b: &[u16],
    k: usize,
    dst: *mut f32,
    ld: usize,
    cols: usize,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); 4]; R];
    let bp = b.as_ptr();
    let ap = a.as_ptr();
    for kk in 0..k {
        let mut bv = [_mm256_setzero_ps(); 4];
        for (q, v) in bv.iter_mut().enumerate() {
            // SAFETY: b holds k rows of 32 f16 values (caller's contract).
            *v = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(bp.add(kk * NR + 8 * q) as *const _) });
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            let x = _mm256_set1_ps(unsafe { *ap.add(r * k + kk) });
            for (c, &y) in acc.iter_mut().zip(&bv) {
                *c = _mm256_fmadd_ps(x, y, *c);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        let mut row = [0f32; NR];
        for (q, v) in acc.iter().enumerate() {
            // SAFETY: 8 floats into a 32-float array.
            unsafe { _mm256_storeu_ps(row.as_mut_ptr().add(8 * q), *v) };
        }
        // SAFETY: row r of the tile has `cols` writable floats at dst + r·ld.
        let out = unsafe { std::slice::from_raw_parts_mut(dst.add(r * ld), cols) };
        out.copy_from_slice(&row[..cols]);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::buffer::bf16_to_f32;

    /// `x` rounded as `half` rounds it.
    fn rounded(half: Half, x: f32) -> f64 {
        f64::from(match half {
            Half::Bf16 => bf16_to_f32(f32_to_bf16(x)),
            Half::F16 => f16_to_f32(f32_to_f16(x)),
        })
    }

    /// The exact product of the rounded operands, in f64.
    fn reference(half: Half, a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|kk| rounded(half, a[i * k + kk]) * rounded(half, b[kk * n + j]))
                    .sum();
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

    /// The f16 paths this CPU can run, best first.
    pub(crate) fn f16_paths() -> Vec<F16Path> {
        let mut paths = vec![F16Path::for_level(Level::detect())];
        if paths[0] == F16Path::Avx512 && f16c() {
            paths.push(F16Path::Avx2);
        }
        if paths[paths.len() - 1] != F16Path::Portable {
            paths.push(F16Path::Portable);
        }
        paths
    }

    /// `a · b` through the ops' buffer interface: `b` packed, then multiplied.
    #[allow(clippy::too_many_arguments)]
    fn product(
        half: Half,
        path: F16Path,
        a: &[f32],
        a_t: bool,
        b: &[f32],
        b_t: bool,
        (m, k, n): (usize, usize, usize),
    ) -> Vec<f32> {
        let (ashape, bshape) = (
            if a_t { [k, m] } else { [m, k] },
            if b_t { [n, k] } else { [k, n] },
        );
        let (ab, bb) = (bytes(a), bytes(b));
        let len = packed_len(half, k, n);
        let mut packed = vec![0u8; 2 * len];
        let pshape = [len];
        pack(
            half,
            &[view(&bb, &bshape, DType::F32)],
            &[if b_t { 1.0 } else { 0.0 }],
            &mut [BufferMut {
                dtype: half.dtype(),
                shape: &pshape,
                data: &mut packed,
            }],
        )
        .unwrap();
        let mut c = vec![0u8; 4 * m * n];
        let cshape = [m, n];
        gemm(
            half,
            path,
            &[
                view(&ab, &ashape, DType::F32),
                view(&packed, &pshape, half.dtype()),
            ],
            &[if a_t { 1.0 } else { 0.0 }, n as f64],
            &mut [BufferMut {
                dtype: DType::F32,
                shape: &cshape,
                data: &mut c,
            }],
        )
        .unwrap();
        c.chunks_exact(4)
            .map(|x| f32::from_ne_bytes([x[0], x[1], x[2], x[3]]))
            .collect()
    }

    /// Every orientation of `[m, k] · [k, n]` against the exact product of the rounded
    /// operands; returns the products (the last orientation's) for comparing paths.
    fn check(half: Half, path: F16Path, m: usize, k: usize, n: usize, seed: u64) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0..2.0)).collect();
        let b: Vec<f32> = (0..k * n).map(|_| rng.random_range(-2.0..2.0)).collect();
        let want = reference(half, &a, &b, m, k, n);
        let mut last = Vec::new();
        for (a_t, b_t) in [(false, false), (true, false), (false, true), (true, true)] {
            let ad = if a_t { transpose(&a, m, k) } else { a.clone() };
            let bd = if b_t { transpose(&b, k, n) } else { b.clone() };
            let got = product(half, path, &ad, a_t, &bd, b_t, (m, k, n));
            for (idx, (&got, want)) in got.iter().zip(&want).enumerate() {
                // Exact products summed in f32: the error is that of an f32 sum of k terms.
                let tol = 1e-5 * (k as f64).max(1.0) * 4.0 + 1e-6;
                assert!(
                    (f64::from(got) - want).abs() <= tol,
                    "{half:?} {path:?} m={m} k={k} n={n} a_t={a_t} b_t={b_t} at {idx}: {got} vs {want}"
                );
            }
            last = got;
        }
        last
    }

    /// Odd sizes, partial tiles and panels; the last but one has several row blocks and
    /// panel groups with `n > m`, which the tasks cover down the columns.
    const ODD_SHAPES: [(usize, usize, usize); 9] = [
        (1, 1, 1),
        (3, 5, 7),
        (8, 2, 32),
        (9, 33, 31),
        (17, 64, 65),
        (70, 129, 100),
        (130, 7, 97),
        (70, 9, 300),
        (5, 0, 3),
    ];

    /// Values where rounding to bf16 is delicate: ties both ways, the largest values that
    /// round up to infinity, subnormals, signed zeros, infinities, NaNs with payloads.
    fn awkward_values(len: usize, seed: u64) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        let special = [
            0x3f80_8000u32, // 1 + half an ulp of bf16: a tie, rounds to even (down)
            0x3f81_8000,    // a tie that rounds up
            0x3f80_8001,
            0x3f80_7fff,
            0x7f7f_ffff, // f32::MAX: rounds to +inf
            0xff7f_8000,
            0x007f_ffff, // the largest subnormal: rounds up to the smallest normal bf16
            0x0000_0001,
            0x8000_8000,
            0x0000_0000,
            0x8000_0000,
            0x7f80_0000,
            0xff80_0000,
            0x7fc0_0000,
            0x7f80_0001, // a signalling NaN: comes out quiet
            0xffbf_ffff,
        ];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..len)
            .map(|i| match rng.random_range(0..3) {
                0 => f32::from_bits(special[i % special.len()]),
                1 => f32::from_bits(rng.random()),
                _ => rng.random_range(-4.0..4.0),
            })
            .collect()
    }

    #[test]
    fn vector_rounding_to_bf16_gives_the_scalar_bits() {
        if !bf16x16::available() {
            eprintln!("this CPU has no AVX-512F: only the scalar rounding runs");
            return;
        }
        for len in [0, 1, 15, 16, 17, 31, 32, 33, 100, 1000] {
            let x = awkward_values(len, len as u64);
            let y = awkward_values(len, 1000 + len as u64);
            let (mut scalar, mut vector) = (vec![0u16; len], vec![0u16; len]);
            bf16x16::convert(false, &x, &mut scalar);
            bf16x16::convert(true, &x, &mut vector);
            assert_eq!(scalar, vector, "convert, {len} values");
            assert_eq!(
                scalar,
                x.iter().map(|&v| f32_to_bf16(v)).collect::<Vec<_>>(),
                "convert is f32_to_bf16"
            );
            for hi in [None, Some(y.as_slice())] {
                let (mut scalar, mut vector) = (vec![7u16; 2 * len], vec![9u16; 2 * len]);
                bf16x16::interleave(false, &x, hi, &mut scalar);
                bf16x16::interleave(true, &x, hi, &mut vector);
                assert_eq!(
                    scalar,
                    vector,
                    "interleave, {len} pairs, hi {}",
                    hi.is_some()
                );
                for j in 0..len {
                    assert_eq!(scalar[2 * j], f32_to_bf16(x[j]));
                    assert_eq!(scalar[2 * j + 1], hi.map_or(0, |h| f32_to_bf16(h[j])));
                }
            }
        }
    }

    #[test]
    fn bf16_products_match_the_rounded_reference_on_odd_shapes() {
        if !supported() {
            eprintln!("this CPU has no AVX512-BF16: the bf16 path is not offered, nothing to run");
            return;
        }
        for (i, &(m, k, n)) in ODD_SHAPES.iter().enumerate() {
            check(Half::Bf16, F16Path::Portable, m, k, n, i as u64);
        }
    }

    #[test]
    fn f16_products_match_the_rounded_reference_on_every_path_alike() {
        let paths = f16_paths();
        eprintln!(
            "f16 paths on this CPU: {}",
            paths
                .iter()
                .map(|p| p.name())
                .collect::<Vec<_>>()
                .join(", ")
        );
        assert_eq!(paths.last(), Some(&F16Path::Portable));
        for (i, &(m, k, n)) in ODD_SHAPES.iter().enumerate() {
            let results: Vec<Vec<f32>> = paths
                .iter()
                .map(|&p| check(Half::F16, p, m, k, n, 100 + i as u64))
                .collect();
            // Exact products added in the same order: the paths agree bit for bit.
            for (p, r) in paths.iter().zip(&results) {
                let same = r
                    .iter()
                    .zip(&results[0])
                    .all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "{p:?} differs from {:?} for {m}x{k}x{n}", paths[0]);
            }
        }
    }

    /// Relative error of products with both operands rounded, against the f32 operands'
    /// exact product: two roundings to `bits` significant bits.
    fn within_tolerance_of_f32(half: Half, path: F16Path, bits: i32) {
        use rand::{Rng, SeedableRng};
        let (m, k, n) = (37, 300, 45);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let b: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1.0..1.0)).collect();
        let c = product(half, path, &a, false, &b, false, (m, k, n));
        for i in 0..m {
            for j in 0..n {
                let exact: f64 = (0..k)
                    .map(|kk| f64::from(a[i * k + kk]) * f64::from(b[kk * n + j]))
                    .sum();
                let scale: f64 = (0..k)
                    .map(|kk| f64::from(a[i * k + kk] * b[kk * n + j]).abs())
                    .sum();
                let tol = scale * 2f64.powi(1 - bits);
                assert!(
                    (f64::from(c[i * n + j]) - exact).abs() <= tol,
                    "{half:?} at ({i}, {j})"
                );
            }
        }
    }

    #[test]
    fn half_products_stay_within_their_tolerance_of_f32() {
        if supported() {
            within_tolerance_of_f32(Half::Bf16, F16Path::Portable, 8);
        }
        for path in f16_paths() {
            within_tolerance_of_f32(Half::F16, path, 11);
        }
    }

    #[test]
    fn f16_rounds_to_nearest_even_and_overflows_to_infinity() {
        // 2049 lies halfway between 2048 and 2050: even wins. 65504 is the largest finite f16;
        // 65520 rounds up past it.
        assert_eq!(f16_to_f32(f32_to_f16(2049.0)), 2048.0);
        assert_eq!(f16_to_f32(f32_to_f16(2051.0)), 2052.0);
        assert_eq!(f16_to_f32(f32_to_f16(65504.0)), 65504.0);
        assert_eq!(f16_to_f32(f32_to_f16(65520.0)), f32::INFINITY);
        assert_eq!(f16_to_f32(f32_to_f16(-1e6)), f32::NEG_INFINITY);
        assert!(f16_to_f32(f32_to_f16(f32::NAN)).is_nan());
        // In a product: an operand beyond f16's range makes its row infinite (or NaN where an
        // infinity meets a zero), on every path.
        for path in f16_paths() {
            let a = [1.0e5, 1.0, 0.5, 0.25];
            let b = [1.0, 2.0, 3.0, 4.0];
            let c = product(Half::F16, path, &a, false, &b, false, (2, 2, 2));
            assert_eq!(&c[..2], &[f32::INFINITY, f32::INFINITY], "{path:?}");
            assert_eq!(&c[2..], &[1.25, 2.0], "{path:?}");
        }
    }

    #[test]
    fn bad_calls_are_refused() {
        for half in [Half::Bf16, Half::F16] {
            let b = bytes(&[1.0; 6]);
            let mut packed = vec![0u8; 2 * 10];
            let err = pack(
                half,
                &[view(&b, &[2, 3], DType::F32)],
                &[0.0],
                &mut [BufferMut {
                    dtype: half.dtype(),
                    shape: &[10],
                    data: &mut packed,
                }],
            )
            .unwrap_err();
            assert!(err.to_string().contains("packed"), "{err}");
            let len = packed_len(half, 2, 3);
            let mut packed = vec![0u8; 2 * len];
            let err = pack(
                half,
                &[view(&b, &[2, 3], DType::F32)],
                &[0.5],
                &mut [BufferMut {
                    dtype: half.dtype(),
                    shape: &[len],
                    data: &mut packed,
                }],
            )
            .unwrap_err();
            assert!(err.to_string().contains("transposed"), "{err}");
        }
        // A buffer packed in one format is refused by the other's product.
        let len = packed_len(Half::Bf16, 2, 3);
        let (a, packed, mut c) = (bytes(&[1.0; 4]), vec![0u8; 2 * len], vec![0u8; 4 * 6]);
        let err = gemm(
            Half::F16,
            F16Path::Portable,
            &[
                view(&a, &[2, 2], DType::F32),
                view(&packed, &[len], DType::BF16),
            ],
            &[0.0, 3.0],
            &mut [BufferMut {
                dtype: DType::F32,
                shape: &[2, 3],
                data: &mut c,
            }],
        )
        .unwrap_err();
        assert!(err.to_string().contains("f16"), "{err}");
    }
}
