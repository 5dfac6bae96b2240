//! Embedding tables: token embeddings, learned positions, and the LM head tied to a table.
//!
//! One type serves all three because all three are the same `[rows, dim]` parameter read in
//! different ways: rows picked by id (a gather whose gradient the host scatters back), a
//! leading block of rows taken as a view (learned positions `0..t` need no lookup, so no
//! gather and no scatter), and the whole table used as the output projection `x · Wᵀ` when the
//! LM head is tied to the token embedding (GPT-2), which declares no parameter of its own.

use codex_plugin_api::{Init, ParamRole, Result, Store, Tensor};

use crate::Positions;

/// A `[rows, dim]` table declared as `NAME.weight` with role embedding.
#[derive(Debug)]
pub struct Embedding {
    weight: Tensor,
}

impl Embedding {
    /// Declare `NAME.weight`, `[rows, dim]`, initialised by `init`.
    pub fn new(
        store: &mut Store<'_, '_>,
        name: &str,
        rows: usize,
        dim: usize,
        init: Init,
    ) -> Result<Self> {
        let weight = store
            .pp(name)
            .param("weight", &[rows, dim], ParamRole::Embedding, init)?;
        Ok(Embedding { weight })
    }

    /// The rows picked by `ids` (u32 of any shape): shape `ids.shape + [dim]`.
    ///
    /// Ops: `embedding(W, ids)`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.weight.embedding(ids)
    }

    /// Rows `start..start + len` as a view: learned positions for a sequence, without a lookup.
    ///
    /// Ops: `narrow(W, 0, start, len)`.
    pub fn rows(&self, start: usize, len: usize) -> Result<Tensor> {
        self.weight.narrow(0, start, len)
    }

    /// Learned positions for a forward pass: rows `start..start + t` as a view (`[t, dim]`,
    /// added to every row of the batch), or for packed rows the row of each token's position
    /// (`[b, t, dim]`).
    ///
    /// Ops: `narrow(W, 0, start, t)`; packed: `embedding(W, positions)`.
    pub fn at(&self, positions: &Positions) -> Result<Tensor> {
        match positions {
            Positions::Span { start, t } => self.rows(*start, *t),
            Positions::Packed(p) => self.forward(p),
        }
    }

    /// `x · Wᵀ` for `x` `[n, dim]`: logits over the rows, the LM head tied to this table.
    ///
    /// Ops: `transpose(W, 0, 1)`, `matmul(x, ·)`.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        x.matmul(&self.weight.transpose(0, 1)?)
    }

    /// The table.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check, input, trace};

    #[test]
    fn a_table_is_looked_up_viewed_and_tied() {
        let t = trace(|s| {
            let mut tr = s.pp("transformer");
            let wte = Embedding::new(&mut tr, "wte", 50, 8, Init::Normal { std: 0.02 })?;
            let x = wte.forward(&input("ids"))?;
            wte.rows(0, 5)?;
            wte.logits(&x)?;
            Ok(())
        });
        check(
            &t,
            "param transformer.wte.weight [50, 8] embedding Normal { std: 0.02 }
             embedding(transformer.wte.weight, ids) -> %1
             narrow(transformer.wte.weight, 0, 0, 5) -> %2
             transpose(transformer.wte.weight, 0, 1) -> %3
             matmul(%1, %3) -> %4",
        );
    }
}
