//! Where the tokens of a forward pass sit in their sequences.
//!
//! Usually every row of the input is one sequence, from position 0 in training and from the
//! cache's length in generation: positions `start..start + t`, the same for every row, which
//! blocks read as views ([`Embedding::rows`](crate::Embedding::rows),
//! [`Rotary::window_at`](crate::Rotary::window_at)). When the host packs several examples into
//! a row (supervised fine-tuning with packing), each example starts again at 0, and the host
//! says where through `Tensor::packed_positions`; blocks then look positions up per token.
//! [`Positions::of`] asks the host once per forward pass, and the blocks take what it returns,
//! so a model built from them gives every example the positions it would have alone.

use codex_plugin_api::{Result, Tensor};

/// The positions of one forward pass's `[b, t]` tokens.
#[derive(Debug)]
pub enum Positions {
    /// `start..start + t` in every row.
    Span {
        /// The first position: 0, or the number of positions a key/value cache holds.
        start: usize,
        /// Positions per row.
        t: usize,
    },
    /// Per token, u32 `[b, t]`: rows packed with several examples, each from position 0.
    Packed(Tensor),
}

impl Positions {
    /// The positions of `input` (`[b, t]` ids) after `start` cached ones: packed when the host
    /// packed the rows (never with a cache), else `start..start + t`.
    ///
    /// Ops: `packed_positions(input)`.
    pub fn of(input: &Tensor, start: usize, t: usize) -> Result<Positions> {
        match input.packed_positions()? {
            Some(positions) if start == 0 => Ok(Positions::Packed(positions)),
            Some(_) => codex_plugin_api::bail!(
                "packed rows cannot continue a key/value cache of {start} positions"
            ),
            None => Ok(Positions::Span { start, t }),
        }
    }

    /// The mask for [`Heads::causal_probs`](crate::Heads::causal_probs), non-zero where key
    /// `j` is hidden from query `i`: after it (`[t, t]`, from `Tensor::causal_mask`), and, for
    /// packed rows, before the start of its example too (`[b, 1, t, t]`, made on the host
    /// from the positions: query `i` at position `p` sees keys `i − p..=i`).
    ///
    /// Ops: `causal_mask(t, like)`; packed: `to_vec_u32(positions)`, `from_u32`.
    pub fn causal_mask(&self, like: &Tensor) -> Result<Tensor> {
        match self {
            Positions::Span { t, .. } => Tensor::causal_mask(*t, like),
            Positions::Packed(positions) => {
                let shape = positions.shape()?;
                let &[b, t] = shape.as_slice() else {
                    codex_plugin_api::bail!("packed positions are [b, t], found {shape:?}");
                };
                let positions = positions.to_vec_u32()?;
                let mut mask = vec![1u32; b * t * t];
                for (at, &p) in positions.iter().enumerate() {
                    let i = at % t;
                    let Some(first) = i.checked_sub(p as usize) else {
                        codex_plugin_api::bail!(
                            "position {p} of token {i} of a packed row is past the row's start"
                        );
                    };
                    mask[at * t + first..=at * t + i].fill(0);
                }
                Tensor::from_u32(&mask, &[b, 1, t, t], like)
            }
        }
    }
}
