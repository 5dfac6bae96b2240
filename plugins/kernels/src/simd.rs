//! Portable inner loops, compiled several times for the instruction sets the CPU has.
//!
//! The binary must run on any x86-64, so nothing here is built with `-C target-cpu`. Instead
//! [`multiversion!`] compiles one plain-Rust loop body three times — for AVX-512, for AVX2+FMA
//! and for the baseline — and picks one at run time from a [`Level`] detected once. The bodies
//! are simple slice loops with fixed-width accumulator arrays that LLVM vectorises at
//! whatever width the enabled features allow; no intrinsics are needed, so the baseline copy
//! is the same code and non-x86 targets compile it unchanged.
//!
//! `f32::exp`, `erf` and `tanh` from libm are calls that stop vectorisation, so the
//! transcendental functions here are branch-free polynomial approximations written in that
//! same plain style; [`Mode`] lets a body use fused multiply-add where the copy is built with
//! FMA and a separate multiply and add where it is not (a libm `fmaf` call would be slow).

/// The instruction set a multiversioned body runs with.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// SSE2 on x86-64, or whatever the target's baseline is.
    Portable,
    /// AVX2 with FMA.
    Avx2,
    /// AVX-512 F/VL/BW/DQ with AVX2 and FMA.
    Avx512,
}

/// A detected instruction set. Only [`Level::detect`] and [`Level::portable`] make one, so a
/// `Level` naming AVX-512 proves the CPU has it: that is what makes the dispatch sound.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) struct Level(Isa);

impl Level {
    /// The best instruction set this CPU supports.
    pub(crate) fn detect() -> Level {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            let avx512 = is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512dq");
            if avx2 && avx512 {
                return Level(Isa::Avx512);
            }
            if avx2 {
                return Level(Isa::Avx2);
            }
        }
        Level(Isa::Portable)
    }

    /// The baseline, available everywhere; results are then the same on every x86-64.
    pub(crate) fn portable() -> Level {
        Level(Isa::Portable)
    }

    /// The instruction set.
    pub(crate) fn isa(self) -> Isa {
        self.0
    }
}

/// How a body computes `a * b + c`.
pub(crate) trait Mode {
    /// `a * b + c`, fused where the copy has FMA.
    fn fma(a: f32, b: f32, c: f32) -> f32;
}

/// Copies built with FMA.
pub(crate) struct Fused;
/// The baseline copy.
pub(crate) struct Plain;

impl Mode for Fused {
    #[inline(always)]
    fn fma(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

impl Mode for Plain {
    #[inline(always)]
    fn fma(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// Define `fn name(level: Level, args..) -> R` whose body is compiled once per [`Isa`].
///
/// The body is generic over the [`Mode`] type parameter named in `<M>`; every function it
/// calls must be `#[inline(always)]` to be compiled with the copy's features.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident<$m:ident>($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name(level: $crate::simd::Level, $($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn imp<$m: $crate::simd::Mode>($($arg: $ty),*) $(-> $ret)? $body

            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn v4($($arg: $ty),*) $(-> $ret)? {
                    imp::<$crate::simd::Fused>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn v3($($arg: $ty),*) $(-> $ret)? {
                    imp::<$crate::simd::Fused>($($arg),*)
                }
                match level.isa() {
                    // SAFETY: a `Level` names AVX-512 only when `Level::detect` found every
                    // feature `v4` is compiled with.
                    $crate::simd::Isa::Avx512 => unsafe { v4($($arg),*) },
                    // SAFETY: likewise for AVX2 and FMA.
                    $crate::simd::Isa::Avx2 => unsafe { v3($($arg),*) },
                    $crate::simd::Isa::Portable => imp::<$crate::simd::Plain>($($arg),*),
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                let _ = level;
                imp::<$crate::simd::Plain>($($arg),*)
            }
        }
    };
}
pub(crate) use multiversion;

/// Accumulator lanes for reductions: two AVX-512 registers, enough independent chains to
/// hide the add latency.
pub(crate) const LANES: usize = 32;

/// `Σ x`.
#[inline(always)]
pub(crate) fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    let mut tail = 0.0;
    for &v in chunks.remainder() {
        tail += v;
    }
    hsum(&acc) + tail
}

/// `Σ x·y`.
#[inline(always)]
pub(crate) fn dot<M: Mode>(x: &[f32], y: &[f32]) -> f32 {
    let n = x.len().min(y.len());
    let (x, y) = (&x[..n], &y[..n]);
    let mut acc = [0.0f32; LANES];
    let mut xc = x.chunks_exact(LANES);
    let mut yc = y.chunks_exact(LANES);
    for (a, b) in (&mut xc).zip(&mut yc) {
        for i in 0..LANES {
            acc[i] = M::fma(a[i], b[i], acc[i]);
        }
    }
    let mut tail = 0.0;
    for (&a, &b) in xc.remainder().iter().zip(yc.remainder()) {
        tail = M::fma(a, b, tail);
    }
    hsum(&acc) + tail
}

/// `max x`, `-inf` for an empty slice; NaN propagates.
#[inline(always)]
pub(crate) fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            // A NaN lane stays NaN: `v > NaN` is false and `v != v` only for NaN.
            #[allow(clippy::eq_op)]
            let take = c[i] > acc[i] || c[i] != c[i];
            acc[i] = if take { c[i] } else { acc[i] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in acc.iter().chain(chunks.remainder()) {
        if v.is_nan() {
            return f32::NAN;
        }
        m = if v > m { v } else { m };
    }
    m
}

/// Pairwise sum of the accumulator lanes.
#[inline(always)]
fn hsum(acc: &[f32; LANES]) -> f32 {
    let mut a = *acc;
    let mut w = LANES / 2;
    while w > 0 {
        for i in 0..w {
            a[i] += a[i + w];
        }
        w /= 2;
    }
    a[0]
}

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5·2²³: adding it rounds to an integer held in the low mantissa bits.
const SHIFT: f32 = 12_582_912.0;

/// `eˣ`, relative error about 2e-7 over the range where the result is a normal float.
///
/// Inputs below -87.3 give about 1e-38 rather than 0 and inputs above 88 saturate at
/// about 1.6e38: every caller subtracts a maximum first or only needs the saturation. NaN
/// propagates.
#[inline(always)]
pub(crate) fn exp<M: Mode>(x: f32) -> f32 {
    // Comparisons rather than `max`/`min` so that NaN is kept.
    let x = if x < -87.3 { -87.3 } else { x };
    let x = if x > 88.0 { 88.0 } else { x };
    let t = M::fma(x, LOG2E, SHIFT);
    let n = t - SHIFT;
    let ni = t.to_bits().wrapping_sub(SHIFT.to_bits()) as i32;
    let r = M::fma(n, -LN2_HI, x);
    let r = M::fma(n, -LN2_LO, r);
    // Cephes expf polynomial on |r| <= ln2/2.
    let mut p = 1.987_569_1e-4;
    p = M::fma(p, r, 1.398_199_9e-3);
    p = M::fma(p, r, 8.333_452e-3);
    p = M::fma(p, r, 4.166_579_6e-2);
    p = M::fma(p, r, 1.666_666_5e-1);
    p = M::fma(p, r, 5e-1);
    let p = M::fma(p * r, r, r) + 1.0;
    let scale = f32::from_bits((ni.wrapping_add(127) as u32) << 23);
    p * scale
}

/// `erf(x)`, absolute and relative error below 5e-7 (a few ulp): a rational approximation on [-4, 4]
/// (outside it erf is ±1 in f32).
#[inline(always)]
pub(crate) fn erf<M: Mode>(x: f32) -> f32 {
    let x = if x < -4.0 { -4.0 } else { x };
    let x = if x > 4.0 { 4.0 } else { x };
    let x2 = x * x;
    let mut p = -2.726_142e-10;
    p = M::fma(p, x2, 2.770_681_4e-8);
    p = M::fma(p, x2, -2.101_024e-6);
    p = M::fma(p, x2, -5.692_506_4e-5);
    p = M::fma(p, x2, -7.349_906e-4);
    p = M::fma(p, x2, -2.954_6e-3);
    p = M::fma(p, x2, -1.609_603_3e-2);
    p *= x;
    let mut q = -1.456_607_2e-5;
    q = M::fma(q, x2, -2.133_740_6e-4);
    q = M::fma(q, x2, -1.682_827e-3);
    q = M::fma(q, x2, -7.373_329e-3);
    q = M::fma(q, x2, -1.426_474e-2);
    p / q
}

/// `tanh(x)` through `1 - 2/(e²ˣ + 1)`; absolute error below 3e-7, which is what GELU needs
/// (it uses `1 + tanh`).
#[inline(always)]
pub(crate) fn tanh<M: Mode>(x: f32) -> f32 {
    1.0 - 2.0 / (exp::<M>(2.0 * x) + 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn levels() -> Vec<Level> {
        let mut v = vec![Level::portable()];
        if Level::detect() != Level::portable() {
            v.push(Level::detect());
        }
        v
    }

    multiversion! {
        fn map_exp<M>(x: &[f32], y: &mut [f32]) {
            for (y, &x) in y.iter_mut().zip(x) {
                *y = exp::<M>(x);
            }
        }
    }
    multiversion! {
        fn map_erf<M>(x: &[f32], y: &mut [f32]) {
            for (y, &x) in y.iter_mut().zip(x) {
                *y = erf::<M>(x);
            }
        }
    }
    multiversion! {
        fn map_tanh<M>(x: &[f32], y: &mut [f32]) {
            for (y, &x) in y.iter_mut().zip(x) {
                *y = tanh::<M>(x);
            }
        }
    }
    multiversion! {
        fn reduce<M>(x: &[f32]) -> (f32, f32, f32) {
            (sum(x), dot::<M>(x, x), max(x))
        }
    }

    fn grid(lo: f32, hi: f32, n: usize) -> Vec<f32> {
        (0..=n)
            .map(|i| lo + (hi - lo) * i as f32 / n as f32)
            .collect()
    }

    /// Worst error of `f` against `reference` over `xs`, relative to `max(|ref|, floor)`.
    fn check(
        f: fn(Level, &[f32], &mut [f32]),
        reference: fn(f64) -> f64,
        xs: &[f32],
        floor: f64,
        tol: f64,
    ) {
        for level in levels() {
            let mut y = vec![0.0; xs.len()];
            f(level, xs, &mut y);
            for (&x, &y) in xs.iter().zip(&y) {
                let r = reference(x as f64);
                let err = (y as f64 - r).abs() / r.abs().max(floor);
                assert!(
                    err <= tol,
                    "{level:?} x={x}: got {y}, want {r} (error {err:e})"
                );
            }
        }
    }

    #[test]
    fn exp_is_accurate_over_its_range() {
        check(map_exp, f64::exp, &grid(-87.0, 88.0, 200_000), 0.0, 4e-7);
    }

    #[test]
    fn exp_keeps_nan_and_saturates() {
        for level in levels() {
            let mut y = [0.0; 4];
            map_exp(
                level,
                &[f32::NAN, f32::NEG_INFINITY, f32::INFINITY, -200.0],
                &mut y,
            );
            assert!(y[0].is_nan(), "{level:?}");
            assert!(y[1] >= 0.0 && y[1] < 1e-37, "{level:?}: {}", y[1]);
            assert!(y[2] > 1e38 && y[2].is_finite(), "{level:?}: {}", y[2]);
            assert!(y[3] >= 0.0 && y[3] < 1e-37, "{level:?}: {}", y[3]);
        }
    }

    #[test]
    fn erf_is_accurate() {
        check(map_erf, libm::erf, &grid(-6.0, 6.0, 200_001), 0.0, 5e-7);
    }

    #[test]
    fn tanh_is_accurate_in_absolute_terms() {
        check(map_tanh, f64::tanh, &grid(-20.0, 20.0, 200_001), 1.0, 4e-7);
    }

    #[test]
    fn reductions_match_f64() {
        for n in [0usize, 1, 3, 31, 32, 33, 100, 1000] {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let s: f64 = x.iter().map(|&v| v as f64).sum();
            let d: f64 = x.iter().map(|&v| (v as f64).powi(2)).sum();
            let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            for level in levels() {
                let (gs, gd, gm) = reduce(level, &x);
                assert!(
                    (gs as f64 - s).abs() <= 1e-5 * (1.0 + d.sqrt()),
                    "{level:?} n={n}"
                );
                assert!((gd as f64 - d).abs() <= 1e-5 * (1.0 + d), "{level:?} n={n}");
                assert_eq!(gm, m, "{level:?} n={n}");
            }
        }
        for level in levels() {
            let mut x = vec![1.0f32; 70];
            x[45] = f32::NAN;
            assert!(reduce(level, &x).2.is_nan(), "{level:?}");
        }
    }
}
