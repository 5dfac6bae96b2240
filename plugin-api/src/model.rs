//! Models: declare named parameters, build the forward graph from token ids to logits.
//!
//! A model is written only against [`Tensor`] handles and the host's op table, never against
//! an engine, so the same code runs on every device and every host feature that works on
//! named parameters (checkpoints, casting, freezing, LoRA, export) works for it. Construction
//! declares the parameters; `forward` is pure apart from dropout, whose masks come from the
//! seed in [`ForwardCtx`], so a step can be replayed exactly.
//!
//! Generation adds positions one at a time, and a model that recomputed every earlier position
//! for each new one would make generation quadratic in its length. So a model also answers
//! [`Model::forward_cached`]: the logits of new positions only, given a [`KvCache`] that holds
//! what it kept of the earlier ones (each layer's keys and values). The cache is a value the
//! host owns and lends by `&mut` for each call, rather than state inside the model, so that one
//! model serves several sequences and a failed call can be undone: the adapter restores the
//! cache as it was when the model returns an error, and advances its position count only
//! after a call succeeds. The default `forward_cached` keeps the token ids in the cache and
//! re-runs [`Model::forward`] on all of them, which is right for every model; the host has one
//! code path for models with and without caching.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

use abi_stable::sabi_trait;
use abi_stable::std_types::{RBox, ROption, RResult, RStr, RString, RVec};
use abi_stable::StableAbi;

use crate::bail;
use crate::component::{decl, ComponentDecl, Describe, Factory};
use crate::error::{guard, PluginError, Result};
use crate::ops::ops;
use crate::params::{Store, TensorStoreRef};
use crate::tensor::{Tensor, TensorId};

/// Per-call settings of a forward pass.
#[repr(C)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq)]
pub struct ForwardCtx {
    /// Training mode: dropout active.
    pub train: bool,
    /// Seed for this call's dropout masks; the trainer derives it from (run seed, step,
    /// micro-step) so that resumed runs draw the same masks.
    pub seed: u64,
}

/// What the host tells a model constructor.
#[repr(C)]
#[derive(StableAbi)]
pub struct ModelEnv<'a> {
    /// Vocabulary size of the run's tokenizer.
    pub vocab_size: usize,
    /// Where parameters are declared.
    pub store: TensorStoreRef<'a>,
}

/// The time axis of cached keys and values, laid out `[batch, heads, time, head_dim]` as the
/// `attention` op takes them.
const TIME_AXIS: usize = 2;

/// One layer's cached keys and values, and the position count when they were last appended
/// to (so that a second append in the same call is caught).
#[repr(C)]
#[derive(StableAbi, Debug)]
struct CachedLayer {
    keys: TensorId,
    values: TensorId,
    appended_at: usize,
}

/// What a model keeps of the positions it has already processed, so that
/// [`Model::forward_cached`] computes only new ones: per layer, the keys and values of every
/// processed position, and the number of those positions.
///
/// The host creates it empty, lends it to each `forward_cached` call of one sequence and drops
/// it when the sequence is done; dropping or clearing it releases the tensors it holds. A
/// model reads [`KvCache::len`] (the position of its first new token) and calls
/// [`KvCache::append`] once per layer and call; the position count advances after the call
/// succeeds, by the number of new positions.
///
/// The tensors it keeps are cut from the autograd graph: the cache serves inference only.
#[repr(C)]
#[derive(StableAbi)]
pub struct KvCache {
    len: usize,
    /// Layers `0, 1, 2, ...`, in the order of their first append.
    layers: RVec<CachedLayer>,
    /// The token ids so far, for models that cache nothing (the default `forward_cached`).
    ids: ROption<TensorId>,
}

/// Retained copies of a cache's handles, to restore it after a failed call.
struct Saved {
    layers: Vec<(Tensor, Tensor, usize)>,
    ids: Option<Tensor>,
}

impl KvCache {
    /// An empty cache: no positions processed.
    pub fn new() -> KvCache {
        KvCache {
            len: 0,
            layers: RVec::new(),
            ids: ROption::RNone,
        }
    }

    /// The number of positions processed so far: the position of the first token of the
    /// next call.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no position has been processed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Append this call's `keys` and `values` of `layer` (each `[batch, heads, t, head_dim]`)
    /// to those of the earlier positions, and return all of them (`[batch, heads, len + t,
    /// head_dim]`), to attend over. Call it once per layer and call; layers are numbered from
    /// 0, and the first call appends them in order.
    ///
    /// Ops: for a layer's first append `detach(keys)`, `detach(values)` (kept; `keys` and
    /// `values` themselves are returned); later `cat([cached keys, keys], 2)`,
    /// `cat([cached values, values], 2)` (returned), then `detach` of each (kept).
    pub fn append(
        &mut self,
        layer: usize,
        keys: &Tensor,
        values: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (len, known) = (self.len, self.layers.len());
        let (all_keys, all_values) = match self.layers.get(layer) {
            Some(cached) if cached.appended_at == len => {
                bail!("the cache of layer {layer} was appended to twice in one call")
            }
            Some(cached) => {
                let join = |cached: TensorId, new: &Tensor, what: &str| {
                    let cached = Tensor::retain(cached);
                    Tensor::cat(&[&cached, new], TIME_AXIS).map_err(|e| {
                        e.context(format!("appending {what} to the cache of layer {layer}"))
                    })
                };
                (
                    join(cached.keys, keys, "keys")?,
                    join(cached.values, values, "values")?,
                )
            }
            None if layer > known => bail!(
                "layer {layer} appended to the cache before layer {known}: number the layers \
                 from 0 and append them in order"
            ),
            None if len > 0 => bail!(
                "the cache of layer {layer} is empty, but {len} positions were processed: \
                 append to every layer at every call"
            ),
            None => (keys.clone(), values.clone()),
        };
        let kept = CachedLayer {
            keys: all_keys.detach()?.into_id(),
            values: all_values.detach()?.into_id(),
            appended_at: len,
        };
        if layer == known {
            self.layers.push(kept);
        } else {
            let old = std::mem::replace(&mut self.layers[layer], kept);
            release(old.keys);
            release(old.values);
        }
        Ok((all_keys, all_values))
    }

    /// Forget every position: release the tensors and start again from position 0.
    pub fn clear(&mut self) {
        for layer in self.layers.drain(..) {
            release(layer.keys);
            release(layer.values);
        }
        if let ROption::RSome(ids) = std::mem::replace(&mut self.ids, ROption::RNone) {
            release(ids);
        }
        self.len = 0;
    }

    /// Keep `input` (`[batch, t]` ids) after the ids kept so far; returns all of them.
    ///
    /// Ops: the first time `retain(input)`, later `cat([kept ids, input], 1)`.
    fn append_ids(&mut self, input: &Tensor) -> Result<Tensor> {
        let all = match &self.ids {
            ROption::RSome(kept) => Tensor::cat(&[&Tensor::retain(*kept), input], 1)?,
            ROption::RNone => input.clone(),
        };
        if let ROption::RSome(old) =
            std::mem::replace(&mut self.ids, ROption::RSome(all.clone().into_id()))
        {
            release(old);
        }
        Ok(all)
    }

    fn save(&self) -> Saved {
        Saved {
            layers: self
                .layers
                .iter()
                .map(|l| {
                    (
                        Tensor::retain(l.keys),
                        Tensor::retain(l.values),
                        l.appended_at,
                    )
                })
                .collect(),
            ids: self
                .ids
                .as_ref()
                .map(|&id| Tensor::retain(id))
                .into_option(),
        }
    }

    /// Put back what [`KvCache::save`] kept; the position count never changed in between.
    fn restore(&mut self, saved: Saved) {
        let len = self.len;
        self.clear();
        self.len = len;
        self.layers = saved
            .layers
            .into_iter()
            .map(|(keys, values, appended_at)| CachedLayer {
                keys: keys.into_id(),
                values: values.into_id(),
                appended_at,
            })
            .collect();
        self.ids = saved.ids.map(Tensor::into_id).into();
    }
}

fn release(id: TensorId) {
    (ops().release())(id);
}

impl Default for KvCache {
    fn default() -> Self {
        KvCache::new()
    }
}

impl Drop for KvCache {
    fn drop(&mut self) {
        self.clear();
    }
}

impl std::fmt::Debug for KvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCache")
            .field("len", &self.len)
            .field("layers", &self.layers.len())
            .field("keeps_ids", &self.ids.is_some())
            .finish()
    }
}

/// The ABI face of a model (implemented by [`declare`]'s adapter; hosts call it).
#[sabi_trait]
pub trait ModelAbi: Send + Sync {
    /// `input` u32 `[batch, time]` → logits `[batch, time, vocab]` (owned).
    fn forward(&self, input: TensorId, ctx: ForwardCtx) -> RResult<TensorId, PluginError>;
    /// The longest sequence the model accepts.
    fn max_positions(&self) -> usize;
    /// The model's resolved configuration as JSON (saved with checkpoints).
    fn config_json(&self) -> RString;
    /// The parameter that sets `max_positions`, if one does.
    fn max_positions_param(&self) -> ROption<RString>;
    /// `input` u32 `[batch, t]`, continuing the sequence whose `cache.len()` earlier positions
    /// `cache` holds → logits `[batch, t, vocab]` of the new positions (owned). On success the
    /// cache holds `len + t` positions; on error it is as before the call.
    #[sabi(last_prefix_field)]
    fn forward_cached(
        &self,
        input: TensorId,
        cache: &mut KvCache,
    ) -> RResult<TensorId, PluginError>;
}

/// An owned model object.
pub type ModelBox = ModelAbi_TO<'static, RBox<()>>;

/// A model constructor: `(params as JSON, env)`.
pub type ModelFactory = extern "C" fn(RStr<'_>, ModelEnv<'_>) -> RResult<ModelBox, PluginError>;

/// What model authors implement.
pub trait Model: Describe + Send + Sync + Sized + 'static {
    /// Parse `params` (JSON, strictly) and declare every parameter in `store`.
    fn create(params: &str, vocab_size: usize, store: &mut Store<'_, '_>) -> Result<Self>;
    /// Token ids `[batch, time]` → logits `[batch, time, vocab]`.
    fn forward(&self, input: &Tensor, ctx: ForwardCtx) -> Result<Tensor>;
    /// The longest sequence accepted.
    fn max_positions(&self) -> usize;
    /// Resolved configuration as JSON.
    fn config_json(&self) -> String;
    /// The name of the parameter (in `params`) that sets [`Model::max_positions`], so that
    /// the host can tell a user which one to raise (`n_positions`). Default: none.
    fn max_positions_param(&self) -> Option<&str> {
        None
    }
    /// Logits `[batch, t, vocab]` of the positions in `input` (`[batch, t]` token ids), which
    /// continue a sequence whose first [`KvCache::len`] positions were processed by earlier
    /// calls with the same `cache`; inference mode (no dropout). They equal the last `t`
    /// positions of [`Model::forward`] on the whole sequence, within floating-point rounding.
    ///
    /// The host checks `input`'s shape and that `cache.len() + t` is at most
    /// [`Model::max_positions`] before the call, advances the cache by `t` after it succeeds,
    /// and restores the cache as it was if it fails.
    ///
    /// To compute only the new positions, a model gives new token `i` the position
    /// `cache.len() + i` (learned or rotary), passes each layer's keys and values of the new
    /// positions through [`KvCache::append`], and attends with the new queries over all the
    /// keys it returns: `Tensor::attention` with `causal` aligns the mask to the last key
    /// when there are fewer queries than keys. `codex_nn::Heads::causal_cached` does these
    /// steps.
    ///
    /// The default keeps the ids in the cache and runs [`Model::forward`] on all of them:
    /// right for every model, at the cost of recomputing every earlier position at each call.
    fn forward_cached(&self, input: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let start = cache.len();
        let t = input.shape()?.get(1).copied().unwrap_or(0);
        let ids = cache.append_ids(input)?;
        let ctx = ForwardCtx {
            train: false,
            seed: 0,
        };
        self.forward(&ids, ctx)?.narrow(1, start, t)
    }
}

struct Adapter<M>(M);

impl<M: Model> ModelAbi for Adapter<M> {
    fn forward(&self, input: TensorId, ctx: ForwardCtx) -> RResult<TensorId, PluginError> {
        guard(M::NAME, "forward", || {
            let input = Tensor::retain(input);
            self.0.forward(&input, ctx).map(Tensor::into_id)
        })
    }
    fn max_positions(&self) -> usize {
        self.0.max_positions()
    }
    fn config_json(&self) -> RString {
        self.0.config_json().into()
    }
    fn max_positions_param(&self) -> ROption<RString> {
        self.0.max_positions_param().map(RString::from).into()
    }
    fn forward_cached(
        &self,
        input: TensorId,
        cache: &mut KvCache,
    ) -> RResult<TensorId, PluginError> {
        guard(M::NAME, "forward_cached", || {
            let input = Tensor::retain(input);
            let shape = input.shape()?;
            let &[b, t] = shape.as_slice() else {
                bail!("input must be token ids of shape [batch, time], found shape {shape:?}");
            };
            if b == 0 || t == 0 {
                bail!("input must hold at least one token, found shape [{b}, {t}]");
            }
            let (len, max) = (cache.len(), self.0.max_positions());
            if len.saturating_add(t) > max {
                bail!(
                    "the cache holds {len} positions and the input adds {t}, but the model takes \
                     at most {max} positions; start a new cache with at most the last {max}"
                );
            }
            let saved = cache.save();
            let run = catch_unwind(AssertUnwindSafe(|| {
                let logits = self.0.forward_cached(&input, cache)?;
                let shape = logits.shape()?;
                if !matches!(shape.as_slice(), &[lb, lt, _] if lb == b && lt == t) {
                    bail!(
                        "forward_cached returned logits of shape {shape:?} for input of shape \
                         [{b}, {t}]; expected [{b}, {t}, vocab]"
                    );
                }
                Ok(logits)
            }));
            match run {
                Ok(Ok(logits)) => {
                    cache.len = len + t;
                    Ok(logits.into_id())
                }
                Ok(Err(e)) => {
                    cache.restore(saved);
                    Err(e)
                }
                Err(panic) => {
                    cache.restore(saved);
                    resume_unwind(panic)
                }
            }
        })
    }
}

extern "C" fn factory<M: Model>(
    params: RStr<'_>,
    mut env: ModelEnv<'_>,
) -> RResult<ModelBox, PluginError> {
    guard(M::NAME, "create", || {
        let mut store = Store::new(&mut env.store);
        let m = M::create(params.as_str(), env.vocab_size, &mut store)?;
        Ok(ModelAbi_TO::from_value(
            Adapter(m),
            abi_stable::sabi_trait::TD_Opaque,
        ))
    })
}

/// The declaration of model type `M`, for `builtin!` or a plugin's root module.
pub fn declare<M: Model>() -> ComponentDecl {
    decl::<M>(Factory::Model(factory::<M>))
}
