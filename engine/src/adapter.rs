//! LoRA adapters on declared weights, applied where the weight enters a matrix product.
//!
//! Models issue their linear layers as op-table calls — `matmul(x, W)` for a weight stored
//! `[in, out]` (GPT-2's `Conv1D`), `matmul(x, transpose(W))` for `[out, in]` (`nn.Linear`),
//! with a `narrow` of the weight's outputs first where one projection is split (GPT-2's
//! `c_attn`). The engine sees every one of those calls, so it can adapt any model, built-in or
//! third-party, without the model knowing: a weight with an adapter attached ([`Lora`]) is
//! followed through `transpose` and `narrow` (the handle remembers the [`View`]), and a
//! `matmul` whose right operand is such a view adds `scale · (dropout(x) · Aᵀ) · Bᵀ`, with
//! the rows of `B` that the view's outputs select. That is what PEFT's `lora.Linear` computes
//! (`lora_B(lora_A(dropout(x))) * scaling`), in either layout.
//!
//! Which layout a weight has cannot be read off its shape (a square `q_proj` looks the same
//! either way), so the host first runs one forward pass under [`probe`], which records how
//! every parameter enters a product, and shapes `A` (`[r, in]`) and `B` (`[out, r]`) from
//! that. A weight used in a way the adapter cannot follow (a slice of its inputs, both
//! layouts) is refused at its first use, never silently left unadapted.
//!
//! Dropout on the adapter's input is drawn, like every dropout of a run, from the seed of the
//! forward call ([`set_forward`]) mixed with a stable number of the weight's name, so a resumed
//! run replays its masks.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{DType, Tensor};
use codex_plugin_api::TensorId;
use sha2::{Digest, Sha256};

use super::fusion::Origin;
use super::handles::{self, Entry, Leaf};
use super::{nn, ops, Result, TensorError};

/// An adapter attached to a frozen weight `W`: `W`'s products gain `scale · x · Aᵀ · Bᵀ`.
pub(crate) struct Lora {
    pub(crate) a: Arc<Leaf>,
    pub(crate) b: Arc<Leaf>,
    pub(crate) scale: f64,
    pub(crate) dropout: f64,
    /// `W` is stored `[in, out]`.
    pub(crate) in_out: bool,
    /// Mixed into the forward call's seed for this adapter's dropout mask.
    site: u64,
}

impl Lora {
    pub(crate) fn new(
        a: Arc<Leaf>,
        b: Arc<Leaf>,
        scale: f64,
        dropout: f64,
        in_out: bool,
        name: &str,
    ) -> Lora {
        let digest = Sha256::digest(name.as_bytes());
        let mut site = [0u8; 8];
        site.copy_from_slice(&digest[..8]);
        Lora {
            a,
            b,
            scale,
            dropout,
            in_out,
            site: u64::from_le_bytes(site),
        }
    }
}

/// How a tensor is derived from a declared weight `W`: a slice `start..start + len` of `W`'s
/// dimension `dim` (if any), then transposed (if `transposed`).
#[derive(Clone)]
pub(crate) struct View {
    leaf: Arc<Leaf>,
    narrow: Option<(usize, usize, usize)>,
    transposed: bool,
}

/// How a weight entered a matrix product during [`probe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeightUse {
    /// The product read the weight as `[in, out]` (`x · W`); otherwise `[out, in]` (`x · Wᵀ`).
    pub in_out: bool,
}

thread_local! {
    /// (training, seed) of the forward call in progress on this thread.
    static CALL: Cell<(bool, u64)> = const { Cell::new((false, 0)) };
    static PROBE: RefCell<Option<BTreeMap<String, Vec<WeightUse>>>> = const { RefCell::new(None) };
}

/// Tell adapters on this thread whether the forward call that follows trains (dropout on) and
/// the seed its dropout masks come from; `set_forward(false, 0)` after it.
pub fn set_forward(train: bool, seed: u64) {
    CALL.with(|c| c.set((train, seed)));
}

/// Run `f` (one forward pass) and return, with its result, how each parameter entered a
/// matrix product as its right operand, by name (every use, in order).
pub fn probe<T>(f: impl FnOnce() -> T) -> (T, BTreeMap<String, Vec<WeightUse>>) {
    PROBE.with(|p| *p.borrow_mut() = Some(BTreeMap::new()));
    let out = f();
    let uses = PROBE.with(|p| p.borrow_mut().take()).unwrap_or_default();
    (out, uses)
}

fn probing() -> bool {
    PROBE.with(|p| p.borrow().is_some())
}

/// Whether views of `leaf` are followed: a 2-D parameter that has an adapter, is being
/// probed, or is trainable (its gradient then goes to its slot directly from a fused product,
/// `autograd::Direct`).
fn tracked(leaf: &Leaf) -> bool {
    leaf.is_param()
        && leaf.var.rank() == 2
        && (leaf.lora().is_some() || probing() || leaf.trainable())
}

impl View {
    /// The declared weight.
    pub(crate) fn leaf(&self) -> &Arc<Leaf> {
        &self.leaf
    }

    /// The slice of the weight, `(dim, start, len)`, if the view is one.
    pub(crate) fn slice(&self) -> Option<(usize, usize, usize)> {
        self.narrow
    }

    /// Whether the view is the (sliced) weight's transpose.
    pub(crate) fn transposed(&self) -> bool {
        self.transposed
    }
}

/// The view of a weight that `entry` is, if it is one being followed.
pub(crate) fn view_of(entry: &Entry) -> Option<View> {
    match entry {
        Entry::Leaf(leaf) if tracked(leaf) => Some(View {
            leaf: leaf.clone(),
            narrow: None,
            transposed: false,
        }),
        Entry::Derived(_, origin) => match &**origin {
            Origin::Weight(view) => Some(view.clone()),
            _ => None,
        },
        _ => None,
    }
}

/// Op-table `transpose` of a followed weight: the transposed view; `None` for anything else.
pub(crate) fn transpose(x: TensorId, d1: usize, d2: usize) -> Result<Option<TensorId>> {
    let entry = handles::entry(x)?;
    let Some(mut view) = view_of(&entry) else {
        return Ok(None);
    };
    if (d1.min(d2), d1.max(d2)) != (0, 1) {
        return Ok(None);
    }
    let y = ops::transpose(&entry.tensor(), d1, d2)?;
    view.transposed = !view.transposed;
    Ok(Some(handles::insert_derived(
        y,
        Some(Arc::new(Origin::Weight(view))),
    )))
}

/// Op-table `narrow`: of a followed weight, the sliced view; otherwise the plain slice.
pub(crate) fn narrow(x: TensorId, dim: usize, start: usize, len: usize) -> Result<TensorId> {
    let entry = handles::entry(x)?;
    let y = ops::narrow(&entry.tensor(), dim, start, len)?;
    let origin = match view_of(&entry) {
        Some(mut view) if view.narrow.is_none() && dim < 2 => {
            let wdim = if view.transposed { 1 - dim } else { dim };
            view.narrow = Some((wdim, start, len));
            Some(Arc::new(Origin::Weight(view)))
        }
        _ => None,
    };
    Ok(handles::insert_derived(y, origin))
}

/// Op-table `matmul` whose right operand is a followed weight: recorded while probing, and
/// with the adapter's term added when the weight has one. `None` for any other product (and
/// for a weight followed only for its gradient).
pub(crate) fn matmul(a: TensorId, b: TensorId) -> Result<Option<TensorId>> {
    let Some(view) = view_of(&handles::entry(b)?) else {
        return Ok(None);
    };
    if view.leaf.lora().is_none() && !probing() {
        // Followed only for its gradient: the product is `fusion`'s.
        return Ok(None);
    }
    let in_out = !view.transposed;
    PROBE.with(|p| {
        if let Some(uses) = p.borrow_mut().as_mut() {
            uses.entry(view.leaf.name.clone())
                .or_default()
                .push(WeightUse { in_out });
        }
    });
    let (ta, tb) = (handles::tensor(a)?, handles::tensor(b)?);
    let base = ops::matmul(&ta, &tb)?;
    let Some(lora) = view.leaf.lora() else {
        return Ok(Some(handles::insert(base)));
    };
    let name = &view.leaf.name;
    if in_out != lora.in_out {
        return Err(TensorError::Invalid(format!(
            "the adapter on `{name}` cannot follow it: the model reads it both as [in, out] \
             and as [out, in]"
        )));
    }
    let out_dim = if in_out { 1 } else { 0 };
    let b_rows = match view.narrow {
        None => lora.b.tensor(),
        Some((dim, start, len)) if dim == out_dim => lora.b.tensor().narrow(0, start, len)?,
        Some(_) => {
            return Err(TensorError::Invalid(format!(
                "the adapter on `{name}` cannot follow it: the model multiplies by a slice \
                 of its inputs, which LoRA does not adapt"
            )))
        }
    };
    let (train, seed) = CALL.with(Cell::get);
    let a = lora.a.tensor();
    let h = match (train && lora.dropout > 0.0, DroppedProduct::fits(&ta, &a)) {
        (false, _) => ops::matmul(&ta, &a.t()?)?,
        (true, true) => ta.apply_op2(
            &a,
            DroppedProduct {
                p: lora.dropout,
                seed: mix(seed, lora.site),
            },
        )?,
        (true, false) => ops::matmul(
            &nn::dropout(&ta, lora.dropout, mix(seed, lora.site))?,
            &a.t()?,
        )?,
    };
    // Scaled at rank width, where it costs least: every `[rows, out]` intermediate stays
    // alive in the graph until the backward pass.
    let h = (h * lora.scale)?;
    let y = (base + ops::matmul(&h, &b_rows.t()?)?)?;
    Ok(Some(handles::insert(y)))
}

/// `dropout(x) · Aᵀ` for an adapter's input `x` `[rows, in]` and `A` `[r, in]`, as one node
/// that keeps no mask and no dropped copy of `x` for the backward pass: both are drawn again
/// from the seed there (the mask is the one `nn::dropout` draws, the values those it gives).
/// With the mask and the copy, dropout on the adapters' inputs held two activations' worth of
/// memory per adapted weight until backward.
struct DroppedProduct {
    p: f64,
    seed: u64,
}

impl DroppedProduct {
    /// Whether the fused node takes `x · Aᵀ`: 2-D, f32 or bf16 on the CPU, one dtype.
    fn fits(x: &Tensor, a: &Tensor) -> bool {
        x.rank() == 2
            && a.rank() == 2
            && x.dim(1).ok() == a.dim(1).ok()
            && x.device().is_cpu()
            && x.dtype() == a.dtype()
            && matches!(x.dtype(), DType::F32 | DType::BF16)
            && x.is_contiguous()
    }

    /// 0 where `x` is dropped, `1 / (1 − p)` elsewhere: `nn::dropout`'s mask.
    fn mask(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let keep = nn::dropout_keep_mask(x.elem_count(), self.p, self.seed);
        Tensor::from_vec(keep, x.shape(), x.device())?
            .to_dtype(x.dtype())?
            .affine(1.0 / (1.0 - self.p), 0.0)
    }

    /// `x` with its dropped elements zeroed and the others scaled by `1 / (1 − p)`.
    fn dropped(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.mul(&self.mask(x)?)
    }
}

impl candle_core::CustomOp2 for DroppedProduct {
    fn name(&self) -> &'static str {
        "lora_dropout_matmul"
    }

    fn cpu_fwd(
        &self,
        xs: &candle_core::CpuStorage,
        xl: &candle_core::Layout,
        as_: &candle_core::CpuStorage,
        al: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::backend::BackendStorage as _;
        // The dropped copy lives only for this product.
        let x = match (xs, xl.contiguous_offsets()) {
            (candle_core::CpuStorage::F32(v), Some((start, end))) => {
                Tensor::from_slice(&v[start..end], xl.dims(), &candle_core::Device::Cpu)?
            }
            (candle_core::CpuStorage::BF16(v), Some((start, end))) => {
                Tensor::from_slice(&v[start..end], xl.dims(), &candle_core::Device::Cpu)?
            }
            _ => {
                candle_core::bail!("lora_dropout_matmul: the input must be contiguous f32 or bf16")
            }
        };
        let dropped = self.dropped(&x)?;
        let (storage, layout) = dropped.storage_and_layout();
        let candle_core::Storage::Cpu(ds) = &*storage else {
            candle_core::bail!("lora_dropout_matmul: the input is not on the cpu");
        };
        let (m, k) = (xl.dims()[0], xl.dims()[1]);
        let n = al.dims()[0];
        // `A` is `[r, in]`; the product reads it as `Aᵀ` through a transposed layout.
        let at = al.transpose(0, 1)?;
        Ok((ds.matmul(as_, (1, m, n, k), layout, &at)?, (m, n).into()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        _h: &Tensor,
        dh: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let mask = self.mask(x)?;
        let dx = dh.matmul(a)?.mul(&mask)?;
        let da = dh.t()?.matmul(&x.detach().mul(&mask)?)?;
        Ok((Some(dx), Some(da)))
    }
}

/// `W + scale · (B · A)` in `W`'s own layout (transposed for `[in, out]`): the weight with its
/// adapter merged, as PEFT's `merge_and_unload` computes it.
pub(crate) fn merged(leaf: &Leaf) -> Result<Option<Tensor>> {
    let Some(lora) = leaf.lora() else {
        return Ok(None);
    };
    let ba = lora
        .b
        .var
        .as_tensor()
        .detach()
        .matmul(&lora.a.var.as_tensor().detach())?;
    let ba = if lora.in_out { ba.t()? } else { ba };
    Ok(Some(
        (leaf.var.as_tensor().detach() + (ba * lora.scale)?)?.contiguous()?,
    ))
}

/// SplitMix64's finaliser over the call seed and the adapter's site number.
fn mix(call_seed: u64, site: u64) -> u64 {
    let mut z = call_seed ^ site.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
