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
//!
//! Incremental decoding ([`codex_plugin_api::Model::forward_cached`]) attends with the new
//! positions' queries over the keys and values of every position so far:
//! [`Heads::causal_cached`] appends the new keys and values to a [`KvCache`] and calls the
//! `attention` op, which aligns its causal mask to the last key when there are fewer queries
//! than keys. `Heads::positions` is then the number of new positions.

use codex_plugin_api::{KvCache, Result, Tensor};

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

    /// Causal attention of this pass's queries (positions `cache.len()..cache.len() + t`)
    /// over the keys and values of every earlier position, kept in layer `layer` of `cache`,
    /// and of this pass, which it appends there first. With an empty cache it is
    /// [`Heads::causal`] on the same tensors, so the host fuses it the same way.
    ///
    /// Ops: [`KvCache::append`]'s, then `attention(q, keys, values, true, scale)` on the keys
    /// and values it returns.
    pub fn causal_cached(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cache: &mut KvCache,
        layer: usize,
    ) -> Result<Tensor> {
        let (keys, values) = cache.append(layer, k, v)?;
        q.attention(&keys, &values, true, self.scale())
    }

    /// Grouped-query attention's keys or values for every query head:
    /// `[batch, kv_heads, positions, head_dim]` → `[batch, heads, positions, head_dim]`, each
    /// key/value head repeated for the `heads / kv_heads` query heads that share it, in the
    /// order of transformers' `repeat_kv` (query head `h` reads key/value head
    /// `h / (heads / kv_heads)`). `positions` is explicit because cached keys outnumber this
    /// pass's positions. With `kv_heads == heads` `x` comes back as it is.
    ///
    /// Ops (when `kv_heads < heads`): `reshape(x, [b, kv, 1, p, d])`, `cat` of `heads / kv`
    /// copies along dimension 2, `reshape(·, [b, heads, p, d])`.
    pub fn repeat_kv(&self, x: Tensor, kv_heads: usize, positions: usize) -> Result<Tensor> {
        if kv_heads == 0 || !self.heads.is_multiple_of(kv_heads) {
            codex_plugin_api::bail!(
                "{} query heads cannot share {kv_heads} key/value heads: the number of key/value \
                 heads must divide the number of attention heads",
                self.heads
            );
        }
        let n_rep = self.heads / kv_heads;
        if n_rep == 1 {
            return Ok(x);
        }
        let (b, d) = (self.batch, self.head_dim);
        let one = x.reshape(&[b, kv_heads, 1, positions, d])?;
        let copies = vec![&one; n_rep];
        Tensor::cat(&copies, 2)?.reshape(&[b, self.heads, positions, d])
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
    fn cached_attention_keeps_detached_keys_and_values_and_attends_over_them() {
        let one = Heads {
            positions: 1,
            ..HEADS
        };
        let mut refused = Vec::new();
        let t = trace(|_| {
            let mut cache = KvCache::new();
            let q = one.split(&input("q"))?;
            let (k, v) = (one.split(&input("k"))?, one.split(&input("v"))?);
            one.causal_cached(&q, &k, &v, &mut cache, 0)?;
            one.causal_cached(&q, &input("k1"), &input("v1"), &mut cache, 1)?;
            // Twice in one call: the cache would hold the new positions twice.
            refused.push(one.causal_cached(&q, &k, &v, &mut cache, 0));
            // A gap in the layers' numbers.
            refused.push(one.causal_cached(&q, &k, &v, &mut cache, 3));
            Ok(())
        });
        check(
            &t,
            "reshape(q, [2, 1, 4, 16]) -> %1
             transpose(%1, 1, 2) -> %2
             reshape(k, [2, 1, 4, 16]) -> %3
             transpose(%3, 1, 2) -> %4
             reshape(v, [2, 1, 4, 16]) -> %5
             transpose(%5, 1, 2) -> %6
             detach(%4) -> %7
             detach(%6) -> %8
             attention(%2, %4, %6, true, 0.25) -> %9
             detach(k1) -> %10
             detach(v1) -> %11
             attention(%2, k1, v1, true, 0.25) -> %12",
        );
        let refused: Vec<String> = refused
            .into_iter()
            .map(|r| r.expect_err("refused").to_string())
            .collect();
        assert_eq!(
            refused,
            [
                "the cache of layer 0 was appended to twice in one call",
                "layer 3 appended to the cache before layer 2: number the layers from 0 and \
                 append them in order",
            ]
        );
    }

    #[test]
    fn grouped_keys_are_repeated_per_query_head() {
        let t = trace(|_| {
            let heads = Heads {
                heads: 6,
                head_dim: 8,
                ..HEADS
            };
            heads.repeat_kv(input("v"), 6, 3)?;
            heads.repeat_kv(input("k"), 2, 5)?;
            heads.repeat_kv(input("k"), 4, 5).map(drop)
        });
        check(
            &t,
            "reshape(k, [2, 2, 1, 5, 8]) -> %1
             cat([%1, %1, %1], 2) -> %2
             reshape(%2, [2, 6, 5, 8]) -> %3
             error: 6 query heads cannot share 4 key/value heads: the number of key/value heads \
             must divide the number of attention heads",
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
