//! Rows packed with several examples: their positions, and attention confined to each example.
//!
//! Supervised fine-tuning may pack several short examples into one row of a batch instead of
//! padding each to the longest. Two things must then hold for every example to be computed as
//! it would be alone: its positions start at 0 (learned position embeddings and rotary tables
//! read them), and its queries see only its own keys. The host uploads such a batch's input
//! ids with the position of every token within its example ([`upload_packed`]); the handle
//! carries that [`Packing`] (as its fusion origin, so `retain` keeps it), and the op table's
//! `packed_positions` hands the positions to the model. While the host runs the forward pass
//! over such input ([`forward_pass`]), causal attention over the rows' positions looks up
//! where each query's example starts ([`active_starts`]) and masks everything before it: the
//! kernel's `packed_attention` ops, or the composed path's mask.
//!
//! A model that never asks for the positions would give an example after the first in a row
//! the positions that follow the previous one's; [`forward_pass`] reports whether it asked, and
//! the host refuses to go on when it did not.

use std::cell::RefCell;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use codex_plugin_api::TensorId;

use super::fusion::Origin;
use super::handles::{self, Entry};
use super::{Result, TensorError};

/// The layout of a batch of packed rows.
pub(crate) struct Packing {
    /// `[b, t]`.
    dims: [usize; 2],
    /// u32 `[b, t]`: each token's position within its example.
    positions: Tensor,
    /// u32 `[b, t]`: the index in its row of the first token of each token's example.
    starts: Tensor,
    /// `starts`, on the host, for masks built there.
    starts_host: Vec<u32>,
}

impl Packing {
    /// `[b, t]`.
    pub(crate) fn dims(&self) -> [usize; 2] {
        self.dims
    }

    /// u32 `[b, t]`: where each query's example starts in its row.
    pub(crate) fn starts(&self) -> &Tensor {
        &self.starts
    }

    /// u8 `[b, 1, t, t]`, 1 where key `j` is hidden from query `i`: after it, or before the
    /// start of its example.
    pub(crate) fn mask(&self, device: &Device) -> Result<Tensor> {
        let [b, t] = self.dims;
        let mut mask = vec![1u8; b * t * t];
        for (row, starts) in self.starts_host.chunks(t.max(1)).enumerate() {
            for (i, &start) in starts.iter().enumerate() {
                let at = (row * t + i) * t;
                mask[at + start as usize..=at + i].fill(0);
            }
        }
        Ok(Tensor::from_vec(mask, (b, 1, t, t), device)?)
    }
}

thread_local! {
    /// The packing of the forward pass in progress on this thread, and whether the model
    /// asked for its positions.
    static ACTIVE: RefCell<Option<(Arc<Packing>, bool)>> = const { RefCell::new(None) };
}

fn invalid(message: impl Into<String>) -> TensorError {
    TensorError::Invalid(message.into())
}

/// Upload the input ids of packed rows, `shape = [b, t]`, with `positions` (row-major like
/// `ids`) the position of each token within its example: 0 where an example starts, one more
/// than the token before it elsewhere.
pub fn upload_packed(
    ids: Vec<u32>,
    positions: Vec<u32>,
    shape: &[usize],
    device: &Device,
) -> Result<TensorId> {
    let &[b, t] = shape else {
        return Err(invalid(format!(
            "packed rows are [batch, positions], found shape {shape:?}"
        )));
    };
    if ids.len() != b * t || positions.len() != b * t {
        return Err(invalid(format!(
            "packed rows of shape {shape:?} need {} ids and positions, found {} and {}",
            b * t,
            ids.len(),
            positions.len()
        )));
    }
    let mut starts_host = Vec::with_capacity(b * t);
    for (row, pos) in positions.chunks(t.max(1)).enumerate() {
        for (i, &p) in pos.iter().enumerate() {
            let continues = i > 0 && p == pos[i - 1].wrapping_add(1);
            if p != 0 && !continues {
                return Err(invalid(format!(
                    "position {p} at row {row}, index {i} of packed rows neither starts an \
                     example (0) nor follows the position before it"
                )));
            }
            starts_host.push((i - p as usize) as u32);
        }
    }
    let packing = Packing {
        dims: [b, t],
        positions: Tensor::from_vec(positions, (b, t), device)?,
        starts: Tensor::from_vec(starts_host.clone(), (b, t), device)?,
        starts_host,
    };
    let ids = Tensor::from_vec(ids, (b, t), device)?;
    Ok(handles::insert_derived(
        ids,
        Some(Arc::new(Origin::Packed(Arc::new(packing)))),
    ))
}

/// The packing a handle carries, if it is the input of packed rows.
fn packing_of(id: TensorId) -> Result<Option<Arc<Packing>>> {
    Ok(match handles::entry(id)? {
        Entry::Derived(_, origin) => match &*origin {
            Origin::Packed(p) => Some(p.clone()),
            _ => None,
        },
        Entry::Plain(_) | Entry::Leaf(_) => None,
    })
}

/// Op-table `packed_positions`: the positions of packed rows' tokens within their examples.
pub(crate) fn positions(input: TensorId) -> Result<Option<TensorId>> {
    let Some(packing) = packing_of(input)? else {
        return Ok(None);
    };
    ACTIVE.with(|a| {
        if let Some((active, asked)) = a.borrow_mut().as_mut() {
            if Arc::ptr_eq(active, &packing) {
                *asked = true;
            }
        }
    });
    Ok(Some(handles::insert(packing.positions.clone())))
}

/// What [`forward_pass`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassReport {
    /// The input was packed rows.
    pub packed: bool,
    /// The model asked for their positions (`packed_positions`).
    pub positions_read: bool,
}

/// Run `f`, a forward pass over `input`, with causal attention confined to each example when
/// `input` is packed rows, and report whether the model read their positions.
pub fn forward_pass<T>(input: TensorId, f: impl FnOnce() -> T) -> Result<(T, PassReport)> {
    let packing = packing_of(input)?;
    let packed = packing.is_some();
    let previous = ACTIVE.with(|a| a.replace(packing.map(|p| (p, false))));
    let out = f();
    let asked = ACTIVE
        .with(|a| a.replace(previous))
        .is_some_and(|(_, asked)| asked);
    Ok((
        out,
        PassReport {
            packed,
            positions_read: asked,
        },
    ))
}

/// For causal attention with queries `q_dims` (`[.., t, d]`) over `s` keys: the packing of
/// the forward pass in progress, or `None` when its rows are not packed. Attention over packed
/// rows must be over their `t` positions (`s = t`) with the batch first; anything else is an
/// error rather than attention that crosses examples.
pub(crate) fn active_starts(q_dims: &[usize], s: usize) -> Result<Option<Arc<Packing>>> {
    let Some(packing) = ACTIVE.with(|a| a.borrow().as_ref().map(|(p, _)| p.clone())) else {
        return Ok(None);
    };
    let [b, t] = packing.dims;
    let r = q_dims.len();
    let fits = r >= 3 && q_dims[0] == b && q_dims[r - 2] == t && s == t;
    if !fits {
        return Err(invalid(format!(
            "causal attention with queries {q_dims:?} over {s} keys, in a forward pass over \
             packed rows [{b}, {t}]: over packed rows, attention must be [{b}, .., {t}, d] \
             with {t} keys, so that it can be confined to each example"
        )));
    }
    Ok(Some(packing))
}
