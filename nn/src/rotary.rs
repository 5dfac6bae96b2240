//! Rotary position embeddings in the "rotate half" convention of Hugging Face LLaMA.
//!
//! The cos and sin tables for every position the model accepts are computed once, in f64 as
//! HF does before casting, when the model is created, and kept as f32 host tensors (constants,
//! not parameters: nothing is declared, nothing is checkpointed). A forward pass narrows them to
//! its sequence length once ([`Rotary::window`]) and rotates queries and keys of every head with
//! the host's `rotary` op, which casts the tables to the activations' dtype.

use codex_plugin_api::{bail, DType, Result, Tensor};

use crate::Positions;

/// The rotary tables for positions `0..positions`: `cos` and `sin` of `p · θ^(−2i/d)` for
/// `i < d/2`, each `[positions, d/2]` row-major, computed in f64 and rounded to f32.
pub fn rotary_tables(positions: usize, head_dim: usize, theta: f64) -> (Vec<f32>, Vec<f32>) {
    rotary_tables_from(positions, &inverse_frequencies(head_dim, theta))
}

/// The default frequencies `θ^(−2i/d)` for `i < d/2`, in f64.
pub fn inverse_frequencies(head_dim: usize, theta: f64) -> Vec<f64> {
    (0..head_dim / 2)
        .map(|i| theta.powf(-((2 * i) as f64) / head_dim as f64))
        .collect()
}

/// How a model stretches its rotary frequencies to reach past the context it was trained on:
/// the `rope_scaling` of a Hugging Face config, for the kinds codex-ml implements.
#[derive(Copy, Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Every frequency divided by `factor` (`"linear"`: positions interpolated).
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// LLaMA 3.1's scaling (`"llama3"`): wavelengths longer than
    /// `original_max_position_embeddings / low_freq_factor` divided by `factor`, shorter than
    /// `original_max_position_embeddings / high_freq_factor` kept, smoothly blended between.
    Llama3 {
        /// The divisor of the low frequencies.
        factor: f64,
        /// Where the low frequencies start, as a divisor of the original context.
        low_freq_factor: f64,
        /// Where the high frequencies start, as a divisor of the original context.
        high_freq_factor: f64,
        /// The context length the model was trained with before scaling.
        original_max_position_embeddings: f64,
    },
}

impl RopeScaling {
    /// Apply the scaling to frequencies from [`inverse_frequencies`], as transformers'
    /// `_compute_linear_scaling_rope_parameters` and `_compute_llama3_parameters` do.
    pub fn apply(&self, inv_freq: &[f64]) -> Vec<f64> {
        match *self {
            RopeScaling::Linear { factor } => inv_freq.iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let low_freq_wavelen = old / low_freq_factor;
                let high_freq_wavelen = old / high_freq_factor;
                inv_freq
                    .iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_freq_wavelen {
                            f
                        } else if wavelen > low_freq_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

/// The rotary tables for positions `0..positions` with the given frequencies (`head_dim / 2`
/// of them): `cos` and `sin` of `p · f`, each `[positions, head_dim / 2]`, computed in f64 and
/// rounded to f32.
pub fn rotary_tables_from(positions: usize, inv_freq: &[f64]) -> (Vec<f32>, Vec<f32>) {
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(positions * half);
    let mut sin = Vec::with_capacity(positions * half);
    for p in 0..positions {
        for f in inv_freq {
            let angle = p as f64 * f;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    (cos, sin)
}

/// Rotary tables for every position a model accepts, held by the host.
#[derive(Debug)]
pub struct Rotary {
    /// `[positions, head_dim / 2]`, f32.
    cos: Tensor,
    /// `[positions, head_dim / 2]`, f32.
    sin: Tensor,
    positions: usize,
}

impl Rotary {
    /// Tables for positions `0..positions` of heads of `head_dim` (even) dimensions with base
    /// `theta`, as f32 tensors on the device of `like` whatever its dtype.
    ///
    /// Ops: `from_f32` for cos, then for sin.
    pub fn new(positions: usize, head_dim: usize, theta: f64, like: &Tensor) -> Result<Self> {
        Self::scaled(positions, head_dim, theta, None, like)
    }

    /// Like [`Rotary::new`], with the frequencies stretched by `scaling` when there is one.
    ///
    /// Ops: `from_f32` for cos, then for sin.
    pub fn scaled(
        positions: usize,
        head_dim: usize,
        theta: f64,
        scaling: Option<RopeScaling>,
        like: &Tensor,
    ) -> Result<Self> {
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            bail!("rotary embeddings rotate pairs of dimensions: head_dim must be even and positive, found {head_dim}");
        }
        let half = head_dim / 2;
        let mut inv_freq = inverse_frequencies(head_dim, theta);
        if let Some(scaling) = scaling {
            inv_freq = scaling.apply(&inv_freq);
        }
        let (cos, sin) = rotary_tables_from(positions, &inv_freq);
        let cos = Tensor::from_f32(&cos, &[positions, half], DType::F32, like)?;
        let sin = Tensor::from_f32(&sin, &[positions, half], DType::F32, like)?;
        Ok(Rotary {
            cos,
            sin,
            positions,
        })
    }

    /// The number of positions the tables cover.
    pub fn positions(&self) -> usize {
        self.positions
    }

    /// The tables of positions `0..t`, for one forward pass (views, no copy).
    ///
    /// Ops: `narrow(cos, 0, 0, t)`, `narrow(sin, 0, 0, t)`.
    pub fn window(&self, t: usize) -> Result<RotaryWindow> {
        self.window_at(0, t)
    }

    /// The tables of positions `start..start + t`: for `t` new positions after `start`
    /// earlier ones kept in a key/value cache (views, no copy).
    ///
    /// Ops: `narrow(cos, 0, start, t)`, `narrow(sin, 0, start, t)`.
    pub fn window_at(&self, start: usize, t: usize) -> Result<RotaryWindow> {
        if start.saturating_add(t) > self.positions {
            bail!(
                "the rotary tables cover positions 0..{}, not {start}..{}",
                self.positions,
                start.saturating_add(t)
            );
        }
        Ok(RotaryWindow {
            cos: self.cos.narrow(0, start, t)?,
            sin: self.sin.narrow(0, start, t)?,
        })
    }

    /// The tables of a forward pass's positions: [`Rotary::window_at`] for a span, and for
    /// packed rows each token's row of the tables (`[b, t, head_dim / 2]`).
    ///
    /// Ops: `narrow` twice as [`Rotary::window_at`]; packed: `embedding(cos, positions)`,
    /// `embedding(sin, positions)`.
    pub fn window_for(&self, positions: &Positions) -> Result<RotaryWindow> {
        match positions {
            Positions::Span { start, t } => self.window_at(*start, *t),
            Positions::Packed(p) => Ok(RotaryWindow {
                cos: self.cos.embedding(p)?,
                sin: self.sin.embedding(p)?,
            }),
        }
    }
}

/// The rotary tables of one sequence length.
#[derive(Debug)]
pub struct RotaryWindow {
    cos: Tensor,
    sin: Tensor,
}

impl RotaryWindow {
    /// Rotate `x`, `[batch, heads, t, head_dim]` (with tables per row for packed rows).
    ///
    /// Ops: `rotary(x, cos, sin)`.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        x.rotary(&self.cos, &self.sin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check, input, trace};

    #[test]
    fn rotary_tables_follow_hf() {
        let (cos, sin) = rotary_tables(3, 4, 10_000.0);
        assert_eq!((cos.len(), sin.len()), (6, 6));
        // Position 0 is the identity rotation.
        assert!(cos[..2].iter().all(|v| (v - 1.0).abs() < 1e-7));
        assert!(sin[..2].iter().all(|v| v.abs() < 1e-7));
        // Position 2, frequencies 1 and 10000^(-1/2) = 0.01.
        assert!((cos[4] - 2f32.cos()).abs() < 1e-6 && (sin[4] - 2f32.sin()).abs() < 1e-6);
        assert!((cos[5] - 0.02f32.cos()).abs() < 1e-6 && (sin[5] - 0.02f32.sin()).abs() < 1e-6);
    }

    #[test]
    fn scaling_follows_hf() {
        let f = inverse_frequencies(8, 10_000.0);
        assert_eq!(RopeScaling::Linear { factor: 4.0 }.apply(&f)[1], f[1] / 4.0);
        // Wavelengths 2π, 2π·10, 2π·100, 2π·1000 against an original context of 64: high
        // frequencies (wavelength < 64/4 = 16) kept, low ones (> 64/1 = 64) divided, the one
        // between blended.
        let llama3 = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64.0,
        };
        let g = llama3.apply(&f);
        assert_eq!((g[0], g[2], g[3]), (f[0], f[2] / 8.0, f[3] / 8.0));
        let smooth = (64.0 / (2.0 * std::f64::consts::PI / f[1]) - 1.0) / 3.0;
        assert!((g[1] - ((1.0 - smooth) * f[1] / 8.0 + smooth * f[1])).abs() < 1e-15);
        assert!(g[1] < f[1] && g[1] > f[1] / 8.0);
    }

    #[test]
    fn tables_are_made_once_and_narrowed_per_pass() {
        let t = trace(|_| {
            let rotary = Rotary::new(16, 4, 10_000.0, &input("like"))?;
            let window = rotary.window(5)?;
            window.apply(&input("q"))?;
            window.apply(&input("k"))?;
            // One new position after five cached ones.
            rotary.window_at(5, 1)?.apply(&input("q6"))?;
            rotary.window_at(15, 1)?;
            rotary.window_at(16, 1)?;
            Ok(())
        });
        check(
            &t,
            "from_f32(32 values, [16, 2], F32, like like) -> %1
             from_f32(32 values, [16, 2], F32, like like) -> %2
             narrow(%1, 0, 0, 5) -> %3
             narrow(%2, 0, 0, 5) -> %4
             rotary(q, %3, %4) -> %5
             rotary(k, %3, %4) -> %6
             narrow(%1, 0, 5, 1) -> %7
             narrow(%2, 0, 5, 1) -> %8
             rotary(q6, %7, %8) -> %9
             narrow(%1, 0, 15, 1) -> %10
             narrow(%2, 0, 15, 1) -> %11
             error: the rotary tables cover positions 0..16, not 16..17",
        );
        let t = trace(|_| {
            Rotary::new(16, 4, 10_000.0, &input("like"))?
                .window(17)
                .map(drop)
        });
        assert!(
            t.contains("error: the rotary tables cover positions 0..16, not 0..17"),
            "{t}"
        );
    }

    #[test]
    fn odd_head_dims_are_refused() {
        let t = trace(|_| Rotary::new(16, 5, 10_000.0, &input("like")).map(drop));
        assert!(
            t.contains("head_dim must be even and positive, found 5"),
            "{t}"
        );
    }
}
