//! Rotary position embeddings in the "rotate half" convention of Hugging Face LLaMA.
//!
//! The cos and sin tables for every position the model accepts are computed once, in f64 as
//! HF does before casting, when the model is created, and kept as f32 host tensors (constants,
//! not parameters: nothing is declared, nothing is checkpointed). A forward pass narrows them to
//! its sequence length once ([`Rotary::window`]) and rotates queries and keys of every head with
//! the host's `rotary` op, which casts the tables to the activations' dtype.

use codex_plugin_api::{bail, DType, Result, Tensor};

/// The rotary tables for positions `0..positions`: `cos` and `sin` of `p · θ^(−2i/d)` for
/// `i < d/2`, each `[positions, d/2]` row-major, computed in f64 and rounded to f32.
pub fn rotary_tables(positions: usize, head_dim: usize, theta: f64) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let inv_freq: Vec<f64> = (0..half)
        .map(|i| theta.powf(-((2 * i) as f64) / head_dim as f64))
        .collect();
    let mut cos = Vec::with_capacity(positions * half);
    let mut sin = Vec::with_capacity(positions * half);
    for p in 0..positions {
        for f in &inv_freq {
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
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            bail!("rotary embeddings rotate pairs of dimensions: head_dim must be even and positive, found {head_dim}");
        }
        let half = head_dim / 2;
        let (cos, sin) = rotary_tables(positions, head_dim, theta);
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
}

/// The rotary tables of one sequence length.
#[derive(Debug)]
pub struct RotaryWindow {
    cos: Tensor,
    sin: Tensor,
}

impl RotaryWindow {
    /// Rotate `x`, `[batch, heads, t, head_dim]`.
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
