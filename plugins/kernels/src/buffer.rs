//! Typed, validated access to the host's byte buffers.
//!
//! Kernels compute in f32 on `&[f32]` slices. A buffer that is f32 and 4-byte aligned (what
//! the host's allocator gives) is reinterpreted in place; a bf16 buffer, or an unaligned one,
//! is converted into a staging vector and, for outputs, written back by [`Out::finish`]. The
//! byte length is checked against shape and dtype before anything is read, so a malformed call
//! is an error rather than an out-of-bounds access.

use std::borrow::Cow;

use codex_plugin_api::{BufferMut, BufferView, DType};

use crate::error::{dtype_name, KernelError};

pub(crate) type Result<T, E = KernelError> = std::result::Result<T, E>;

/// Which dtypes a float buffer may have.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum Floats {
    /// f32 only (statistics, optimizer state, losses).
    F32,
    /// f32 or bf16 (activations and their gradients).
    F32OrBf16,
}

impl Floats {
    fn accepts(self, d: DType) -> bool {
        match self {
            Floats::F32 => d == DType::F32,
            Floats::F32OrBf16 => d == DType::F32 || d == DType::BF16,
        }
    }
    fn describe(self) -> &'static str {
        match self {
            Floats::F32 => "f32",
            Floats::F32OrBf16 => "f32 or bf16",
        }
    }
}

/// Number of elements of `shape`, or an error naming the buffer if it overflows.
fn numel(op: &'static str, name: &'static str, shape: &[usize], dtype: DType) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| KernelError::Bytes {
            op,
            name,
            shape: shape.to_vec(),
            dtype: dtype_name(dtype),
            found: 0,
            expected: usize::MAX,
        })
}

fn elem_size(d: DType) -> usize {
    match d {
        DType::F32 | DType::U32 => 4,
        DType::BF16 | DType::F16 => 2,
        DType::F64 | DType::I64 => 8,
        DType::U8 => 1,
    }
}

fn check_bytes(
    op: &'static str,
    name: &'static str,
    shape: &[usize],
    dtype: DType,
    len: usize,
) -> Result<usize> {
    let n = numel(op, name, shape, dtype)?;
    let expected = n
        .checked_mul(elem_size(dtype))
        .ok_or_else(|| KernelError::Bytes {
            op,
            name,
            shape: shape.to_vec(),
            dtype: dtype_name(dtype),
            found: len,
            expected: usize::MAX,
        })?;
    if len != expected {
        return Err(KernelError::Bytes {
            op,
            name,
            shape: shape.to_vec(),
            dtype: dtype_name(dtype),
            found: len,
            expected,
        });
    }
    Ok(n)
}

fn check_dtype(op: &'static str, name: &'static str, found: DType, ok: Floats) -> Result<()> {
    if ok.accepts(found) {
        Ok(())
    } else {
        Err(KernelError::DType {
            op,
            name,
            found: dtype_name(found),
            expected: ok.describe(),
        })
    }
}

/// `bf16` bits to f32 (exact).
#[inline(always)]
pub(crate) fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// f32 to `bf16` bits, rounding to nearest even; NaN stays NaN.
#[inline(always)]
pub(crate) fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        ((b >> 16) | 0x40) as u16
    } else {
        (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
    }
}

/// An input buffer as f32.
pub(crate) struct In<'a> {
    /// Its shape.
    pub(crate) shape: &'a [usize],
    /// Its values.
    pub(crate) data: Cow<'a, [f32]>,
}

/// Read input `name` as floats.
pub(crate) fn floats<'a>(
    op: &'static str,
    name: &'static str,
    v: &'a BufferView<'_>,
    ok: Floats,
) -> Result<In<'a>> {
    check_dtype(op, name, v.dtype, ok)?;
    let bytes: &'a [u8] = v.data;
    check_bytes(op, name, v.shape, v.dtype, bytes.len())?;
    let data = match v.dtype {
        DType::BF16 => Cow::Owned(
            bytes
                .chunks_exact(2)
                .map(|c| bf16_to_f32(u16::from_ne_bytes([c[0], c[1]])))
                .collect(),
        ),
        _ => match bytemuck::try_cast_slice::<u8, f32>(bytes) {
            Ok(s) => Cow::Borrowed(s),
            Err(_) => Cow::Owned(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
        },
    };
    Ok(In {
        shape: v.shape,
        data,
    })
}

/// Read input `name` as u32 indices.
pub(crate) fn indices<'a>(
    op: &'static str,
    name: &'static str,
    v: &'a BufferView<'_>,
) -> Result<(&'a [usize], Cow<'a, [u32]>)> {
    if v.dtype != DType::U32 {
        return Err(KernelError::DType {
            op,
            name,
            found: dtype_name(v.dtype),
            expected: "u32",
        });
    }
    let bytes: &'a [u8] = v.data;
    check_bytes(op, name, v.shape, v.dtype, bytes.len())?;
    let data = match bytemuck::try_cast_slice::<u8, u32>(bytes) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => Cow::Owned(
            bytes
                .chunks_exact(4)
                .map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
    };
    Ok((v.shape, data))
}

/// An output buffer seen as `&mut [f32]`, staged when it is bf16 or unaligned.
pub(crate) struct Out<'a> {
    shape: &'a [usize],
    dtype: DType,
    bytes: &'a mut [u8],
    staged: Option<Vec<f32>>,
}

impl<'a> Out<'a> {
    /// Open output `name` for writing; with `keep`, its current values are readable too
    /// (in-place updates).
    pub(crate) fn open(
        op: &'static str,
        name: &'static str,
        b: &'a mut BufferMut<'_>,
        ok: Floats,
        keep: bool,
    ) -> Result<Out<'a>> {
        check_dtype(op, name, b.dtype, ok)?;
        let shape: &'a [usize] = b.shape;
        let bytes: &'a mut [u8] = &mut *b.data;
        let n = check_bytes(op, name, shape, b.dtype, bytes.len())?;
        let dtype = b.dtype;
        let staged = match dtype {
            DType::BF16 => Some(if keep {
                bytes
                    .chunks_exact(2)
                    .map(|c| bf16_to_f32(u16::from_ne_bytes([c[0], c[1]])))
                    .collect()
            } else {
                vec![0.0; n]
            }),
            _ if bytemuck::try_cast_slice_mut::<u8, f32>(bytes).is_ok() => None,
            _ => Some(if keep {
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
                    .collect()
            } else {
                vec![0.0; n]
            }),
        };
        Ok(Out {
            shape,
            dtype,
            bytes,
            staged,
        })
    }

    /// Its shape.
    pub(crate) fn shape(&self) -> &'a [usize] {
        self.shape
    }

    /// The values to write.
    pub(crate) fn data(&mut self) -> &mut [f32] {
        match &mut self.staged {
            Some(v) => v,
            // The cast succeeded when the buffer was opened and nothing has changed since.
            None => bytemuck::try_cast_slice_mut::<u8, f32>(self.bytes).unwrap_or_default(),
        }
    }

    /// Write staged values back to the host's buffer.
    pub(crate) fn finish(self) {
        let Some(v) = self.staged else { return };
        if self.dtype == DType::BF16 {
            for (c, &x) in self.bytes.chunks_exact_mut(2).zip(&v) {
                c.copy_from_slice(&f32_to_bf16(x).to_ne_bytes());
            }
        } else {
            for (c, &x) in self.bytes.chunks_exact_mut(4).zip(&v) {
                c.copy_from_slice(&x.to_ne_bytes());
            }
        }
    }
}

/// Fail unless `shape == expected`; `what` describes the expectation for the message.
pub(crate) fn expect_shape(
    op: &'static str,
    name: &'static str,
    shape: &[usize],
    expected: &[usize],
) -> Result<()> {
    if shape == expected {
        Ok(())
    } else {
        Err(KernelError::Shape {
            op,
            name,
            found: shape.to_vec(),
            expected: format!("{expected:?}"),
        })
    }
}

/// Split `shape` into (product of leading dims, last dim); rank 0 is refused.
pub(crate) fn rows_cols(
    op: &'static str,
    name: &'static str,
    shape: &[usize],
) -> Result<(usize, usize)> {
    match shape.split_last() {
        Some((&c, lead)) => Ok((lead.iter().product(), c)),
        None => Err(KernelError::Shape {
            op,
            name,
            found: Vec::new(),
            expected: "at least one dimension".into(),
        }),
    }
}

/// The attribute count must be exactly `n`.
pub(crate) fn expect_attrs(op: &'static str, attrs: &[f64], n: usize) -> Result<()> {
    if attrs.len() == n {
        Ok(())
    } else {
        Err(KernelError::Count {
            op,
            what: "attrs",
            expected: n,
            found: attrs.len(),
        })
    }
}

/// Take exactly `N` inputs.
pub(crate) fn inputs<'s, 'a, const N: usize>(
    op: &'static str,
    v: &'s [BufferView<'a>],
) -> Result<&'s [BufferView<'a>; N]> {
    v.try_into().map_err(|_| KernelError::Count {
        op,
        what: "inputs",
        expected: N,
        found: v.len(),
    })
}

/// Take exactly `N` outputs.
pub(crate) fn outputs<'s, 'a, const N: usize>(
    op: &'static str,
    v: &'s mut [BufferMut<'a>],
) -> Result<&'s mut [BufferMut<'a>; N]> {
    let found = v.len();
    v.try_into().map_err(|_| KernelError::Count {
        op,
        what: "outputs",
        expected: N,
        found,
    })
}

/// A finite attribute.
pub(crate) fn finite(op: &'static str, name: &'static str, x: f64) -> Result<f64> {
    if x.is_finite() {
        Ok(x)
    } else {
        Err(KernelError::Attr {
            op,
            name,
            found: x,
            expected: "a finite number",
        })
    }
}

/// A positive finite attribute.
pub(crate) fn positive(op: &'static str, name: &'static str, x: f64) -> Result<f64> {
    if x.is_finite() && x > 0.0 {
        Ok(x)
    } else {
        Err(KernelError::Attr {
            op,
            name,
            found: x,
            expected: "a positive finite number",
        })
    }
}
