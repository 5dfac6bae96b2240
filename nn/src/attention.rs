//! Causal self-attention helpers: splitting projections into heads, attending, merging back.
//!
//! Models differ in how they project (one fused `c_attn` or separate q, k and v), in what
//! they do to the heads (rotary embeddings) and in where dropout goes, so this module offers
//! the shared steps rather than one attention layer. [`Heads`] fixes the shapes of one forward
//! pass. The residual stream is `[batch · positions, heads · head_dim]`, 2-D so that every
//! projection is one 2-D product the host can fuse with its bias add; heads are
//! `[batch, heads, positions, head_dim]`.
//!
//! Two ways to split, because the host treats them differently: [`Heads::split`] is a view (a
//! reshape and a transpose), the pattern on which the host fuses attention with the projections
//! that feed it ([`Heads::causal`]); [`Heads::split_contiguous`] copies the heads into their own
//! layout, for models that transform them first (rotary embeddings) and attend with the
//! composed ops ([`Heads::causal_probs`]). Scores are scaled by `1/√head_dim` through the
//! queries rather than the scores: that touches `t · d` values per head instead of `t · t`.

use codex_plugin_api::{Result, Tensor};

/// The shapes of multi-head attention in one forward pass.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Heads {
    /// Sequences in the batch.
    pub batch: usize,
    /// Positions per sequence.
    pub positions: usize,
    /// Attention heads.
    pub heads: usize,
    /// Dimensions per head.
    pub head_dim: usize,
}

impl Heads {
    /// `1/√head_dim`, the scale of the attention scores.
    pub fn scale(&self) -> f64 {
        1.0 / (self.head_dim as f64).sqrt()
    }

    fn split_shape(&self) -> [usize; 4] {
        [self.batch, self.positions, self.heads, self.head_dim]
    }

    /// `[batch · positions, heads · head_dim]` → `[batch, heads, positions, head_dim]`, as a
    /// view.
    ///
    /// Ops: `reshape(x, [b, t, h, d])`, `transpose(·, 1, 2)`.
    pub fn split(&self, x: &Tensor) -> Result<Tensor> {
        x.reshape(&self.split_shape())?.transpose(1, 2)
    }

    /// Like [`Heads::split`], copied into a contiguous tensor.
    ///
    /// Ops: `reshape(x, [b, t, h, d])`, `permute(·, [0, 2, 1, 3])`, `contiguous`.
    pub fn split_contiguous(&self, x: &Tensor) -> Result<Tensor> {
        x.reshape(&self.split_shape())?
            .permute(&[0, 2, 1, 3])?
            .contiguous()
    }

    /// `[batch, heads, positions, head_dim]` → `[batch · positions, heads · head_dim]`.
    ///
    /// Ops: `permute(y, [0, 2, 1, 3])`, `reshape(·, [b · t, h · d])`.
    pub fn merge(&self, y: &Tensor) -> Result<Tensor> {
        y.permute(&[0, 2, 1, 3])?
            .reshape(&[self.batch * self.positions, self.heads * self.head_dim])
    }

    /// Causal attention `softmax(scale · q · kᵀ, future masked) · v` in one op: the host runs
    /// a fused kernel when one is active.
    ///
    /// Ops: `attention(q, k, v, true, scale)`.
    pub fn causal(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        q.attention(k, v, true, self.scale())
    }

    /// The attention probabilities `softmax(scale · q · kᵀ)` with the future masked out by
    /// `mask` (`[t, t]`, 1 above the diagonal, from `Tensor::causal_mask`): for a model that
    /// acts on them (dropout) before multiplying by `v`.
    ///
    /// Ops: `affine(q, scale, 0)`, `transpose(k, 2, 3)`, `matmul`, `masked_fill(·, mask, −∞)`,
    /// `softmax(·, 3)`.
    pub fn causal_probs(&self, q: &Tensor, k: &Tensor, mask: &Tensor) -> Result<Tensor> {
        q.affine(self.scale(), 0.0)?
            .matmul(&k.transpose(2, 3)?)?
            .masked_fill(mask, f64::NEG_INFINITY)?
            .softmax(3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check, input, trace};

    const HEADS: Heads = Heads {
        batch: 2,
        positions: 3,
        heads: 4,
        head_dim: 16,
    };

    #[test]
    fn split_is_a_view_and_merge_undoes_it() {
        let t = trace(|_| {
            let q = HEADS.split(&input("q"))?;
            let y = HEADS.causal(&q, &input("k"), &input("v"))?;
            HEADS.merge(&y)?;
            Ok(())
        });
        check(
            &t,
            "reshape(q, [2, 3, 4, 16]) -> %1
             transpose(%1, 1, 2) -> %2
             attention(%2, k, v, true, 0.25) -> %3
             permute(%3, [0, 2, 1, 3]) -> %4
             reshape(%4, [6, 64]) -> %5",
        );
    }

    #[test]
    fn contiguous_split_copies_and_probabilities_are_masked_softmax() {
        let t = trace(|_| {
            let q = HEADS.split_contiguous(&input("q"))?;
            HEADS.causal_probs(&q, &input("k"), &input("mask"))?;
            Ok(())
        });
        check(
            &t,
            "reshape(q, [2, 3, 4, 16]) -> %1
             permute(%1, [0, 2, 1, 3]) -> %2
             contiguous(%2) -> %3
             affine(%3, 0.25, 0) -> %4
             transpose(k, 2, 3) -> %5
             matmul(%4, %5) -> %6
             masked_fill(%6, mask, -inf) -> %7
             softmax(%7, 3) -> %8",
        );
    }
}
