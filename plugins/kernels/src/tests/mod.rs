//! Tests of every op against straightforward f64 references.
//!
//! Each op family has one `check` helper driven by a table of shapes: it builds seeded
//! random inputs, runs the op through the same entry point the host uses, and compares the
//! outputs with an f64 reference; backward passes are compared with the analytic f64
//! gradient and with central finite differences of the f64 forward, which also checks the
//! analytic reference itself. Every check runs with the detected instruction set and with
//! the portable one, on the global pool and on a dedicated one-thread pool, and in f32 and
//! bf16 where the op takes bf16.

mod attention;
mod cross_entropy;
mod errors;
mod gelu;
mod norm;
mod optim;
mod reduce;
mod softmax;

use codex_plugin_api::{BufferMut, BufferView, DType};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::buffer::{bf16_to_f32, f32_to_bf16};
use crate::{CpuKernel, KernelError};

/// An owned buffer the tests hand to the kernel.
#[derive(Clone, Debug)]
pub(crate) struct Buf {
    pub(crate) dtype: DType,
    pub(crate) shape: Vec<usize>,
    bytes: Vec<u8>,
    /// Hand the kernel the bytes one byte off 4-byte alignment.
    misaligned: bool,
}

impl Buf {
    fn from_bytes(dtype: DType, shape: &[usize], data: Vec<u8>) -> Buf {
        Buf {
            dtype,
            shape: shape.to_vec(),
            bytes: data,
            misaligned: false,
        }
    }

    /// Floats stored as `dtype` (f32 or bf16), rounded to nearest.
    pub(crate) fn floats(dtype: DType, shape: &[usize], vals: &[f64]) -> Buf {
        let mut data = Vec::new();
        for &v in vals {
            match dtype {
                DType::BF16 => data.extend(f32_to_bf16(v as f32).to_ne_bytes()),
                _ => data.extend((v as f32).to_ne_bytes()),
            }
        }
        Buf::from_bytes(dtype, shape, data)
    }

    /// Zeros of `dtype`.
    pub(crate) fn zeros(dtype: DType, shape: &[usize]) -> Buf {
        let n: usize = shape.iter().product();
        Buf::floats(dtype, shape, &vec![0.0; n])
    }

    /// u32 indices.
    pub(crate) fn u32s(shape: &[usize], vals: &[u32]) -> Buf {
        Buf::from_bytes(
            DType::U32,
            shape,
            vals.iter().flat_map(|v| v.to_ne_bytes()).collect(),
        )
    }

    /// Raw bytes with any dtype and shape, for malformed calls.
    pub(crate) fn raw(dtype: DType, shape: &[usize], len: usize) -> Buf {
        Buf::from_bytes(dtype, shape, vec![0; len])
    }

    /// The same values, stored one byte off 4-byte alignment.
    pub(crate) fn misaligned(mut self) -> Buf {
        self.misaligned = true;
        self
    }

    fn payload(&self) -> &[u8] {
        &self.bytes
    }

    /// The values as f64.
    pub(crate) fn values(&self) -> Vec<f64> {
        let p = self.payload();
        match self.dtype {
            DType::BF16 => p
                .chunks_exact(2)
                .map(|c| bf16_to_f32(u16::from_ne_bytes([c[0], c[1]])) as f64)
                .collect(),
            _ => p
                .chunks_exact(4)
                .map(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]]) as f64)
                .collect(),
        }
    }
}

/// Run `op` on copies of the buffers laid out as each asks (aligned unless `misaligned`).
pub(crate) fn run(
    k: &CpuKernel,
    op: &str,
    ins: &[&Buf],
    attrs: &[f64],
    outs: &mut [Buf],
) -> Result<(), KernelError> {
    // Lay every payload out at the alignment it asks for: aligned ones in a Vec<u32>,
    // misaligned ones at byte offset 1 of one.
    fn layout(b: &Buf) -> (Vec<u32>, usize) {
        let payload = &b.bytes[..];
        let off = usize::from(b.misaligned);
        let mut words = vec![0u32; (payload.len() + off).div_ceil(4) + 1];
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut words);
        bytes[off..off + payload.len()].copy_from_slice(payload);
        (words, off)
    }
    let in_store: Vec<(Vec<u32>, usize)> = ins.iter().map(|b| layout(b)).collect();
    let mut out_store: Vec<(Vec<u32>, usize)> = outs.iter().map(layout).collect();
    let views: Vec<BufferView<'_>> = ins
        .iter()
        .zip(&in_store)
        .map(|(b, (w, off))| {
            let bytes: &[u8] = bytemuck::cast_slice(w);
            BufferView {
                dtype: b.dtype,
                shape: &b.shape,
                data: &bytes[*off..*off + b.bytes.len()],
            }
        })
        .collect();
    let lens: Vec<usize> = outs.iter().map(|b| b.bytes.len()).collect();
    let mut muts: Vec<BufferMut<'_>> = outs
        .iter()
        .zip(out_store.iter_mut())
        .zip(&lens)
        .map(|((b, (w, off)), &len)| {
            let bytes: &mut [u8] = bytemuck::cast_slice_mut(w);
            BufferMut {
                dtype: b.dtype,
                shape: &b.shape,
                data: &mut bytes[*off..*off + len],
            }
        })
        .collect();
    let r = k.call(op, &views, attrs, &mut muts);
    drop(muts);
    for (b, (w, off)) in outs.iter_mut().zip(&out_store) {
        let bytes: &[u8] = bytemuck::cast_slice(w);
        let len = b.bytes.len();
        b.bytes.copy_from_slice(&bytes[*off..*off + len]);
    }
    r
}

/// The kernels every check runs on: detected and portable instruction sets, global pool and
/// a one-thread pool.
pub(crate) fn kernels() -> Vec<(&'static str, CpuKernel)> {
    let mut v = Vec::new();
    for (name, params) in [
        ("auto", ""),
        ("portable", r#"{"simd": "portable"}"#),
        ("auto, 1 thread", r#"{"threads": 1}"#),
    ] {
        match CpuKernel::new(params) {
            Ok(k) => v.push((name, k)),
            Err(e) => panic!("cannot build the {name} kernel: {e}"),
        }
    }
    v
}

/// Seeded generator.
pub(crate) fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// `n` values uniform on `[lo, hi)`.
pub(crate) fn uniform(rng: &mut ChaCha8Rng, n: usize, lo: f64, hi: f64) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

/// Values as `dtype` stores them.
pub(crate) fn quantise(dtype: DType, vals: &[f64]) -> Vec<f64> {
    match dtype {
        DType::BF16 => vals
            .iter()
            .map(|&v| bf16_to_f32(f32_to_bf16(v as f32)) as f64)
            .collect(),
        _ => vals.iter().map(|&v| v as f32 as f64).collect(),
    }
}

/// Tolerance for comparing a kernel's `dtype` output with an f64 reference of size `scale`:
/// `(absolute, relative)`.
pub(crate) fn tol(dtype: DType, scale: f64) -> (f64, f64) {
    match dtype {
        DType::BF16 => (2e-2 * scale, 1e-2),
        _ => (2e-5 * scale, 1e-4),
    }
}

/// Fail unless every `|got − want| ≤ atol + rtol·|want|`.
#[track_caller]
pub(crate) fn assert_close(what: &str, got: &[f64], want: &[f64], (atol, rtol): (f64, f64)) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = (g - w).abs() <= atol + rtol * w.abs();
        assert!(
            ok,
            "{what}[{i}]: got {g}, want {w} (atol {atol:e}, rtol {rtol:e})"
        );
    }
}

/// Largest magnitude, at least 1.
pub(crate) fn scale(v: &[f64]) -> f64 {
    v.iter().fold(1.0f64, |m, x| m.max(x.abs()))
}

/// Central finite differences of `f` at `x`.
pub(crate) fn fd(f: impl Fn(&[f64]) -> f64, x: &[f64], h: f64) -> Vec<f64> {
    let mut x = x.to_vec();
    (0..x.len())
        .map(|i| {
            let x0 = x[i];
            x[i] = x0 + h;
            let up = f(&x);
            x[i] = x0 - h;
            let down = f(&x);
            x[i] = x0;
            (up - down) / (2.0 * h)
        })
        .collect()
}

/// `Σ a·b`.
pub(crate) fn dotf(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Tight tolerance for comparing an analytic f64 gradient with finite differences.
pub(crate) const FD_TOL: (f64, f64) = (1e-6, 1e-5);
