//! Named parameters and optimizer state, declared to the host.
//!
//! A model never allocates its weights: it declares each one by name, shape, role and
//! initialiser, and gets back a handle. Because the host knows every parameter by name,
//! checkpointing, dtype casting, freezing, LoRA injection and export to Hugging Face layouts
//! are host features that work for every model. Initial values are drawn by the host from a
//! generator seeded by the run seed and the parameter's name, so they are reproducible across
//! machines and independent of declaration order. Optimizers declare their state the same way.
//!
//! Parameters and state share one namespace: a name is declared once, whatever its kind, and
//! a second declaration of it is an error. Parameters are saved in a checkpoint's
//! `model.safetensors`, state tensors in `optimizer.safetensors`, each under its name. By
//! convention an optimizer names the state it keeps for a parameter
//! `optimizer.<parameter>.<slot>` — AdamW's first moment of `h.0.attn.c_attn.weight` is
//! `optimizer.h.0.attn.c_attn.weight.exp_avg` — so that a checkpoint reads as a map from each
//! parameter to its state, and a slot never collides with a parameter or with another
//! parameter's slots. The names are part of a checkpoint's contents: renaming a slot makes
//! checkpoints written before the change unresumable.

use abi_stable::sabi_trait;
use abi_stable::std_types::{RResult, RSlice, RStr, RString, RVec};
use abi_stable::StableAbi;

use crate::error::{from_abi, PluginError, Result};
use crate::tensor::{DType, Tensor, TensorId};

/// How a parameter's initial values are drawn.
#[repr(C, u8)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq)]
pub enum Init {
    /// All zeros.
    Zeros,
    /// All ones.
    Ones,
    /// Normal with mean 0 and this standard deviation.
    Normal {
        /// Standard deviation.
        std: f64,
    },
    /// Uniform on `[-bound, bound]`.
    Uniform {
        /// Half-width.
        bound: f64,
    },
}

/// What a parameter is, so optimizers can treat groups differently (e.g. no weight decay on
/// biases, norms and embeddings) without parsing names.
#[repr(u8)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq)]
pub enum ParamRole {
    /// A matrix of a linear layer.
    Weight,
    /// A bias vector.
    Bias,
    /// A normalisation gain or shift.
    Norm,
    /// An embedding table.
    Embedding,
}

impl ParamRole {
    /// Lowercase name, as used in configs.
    pub fn as_str(self) -> &'static str {
        match self {
            ParamRole::Weight => "weight",
            ParamRole::Bias => "bias",
            ParamRole::Norm => "norm",
            ParamRole::Embedding => "embedding",
        }
    }
}

/// A parameter as the host reports it to optimizers and trainers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamInfo {
    /// Full name, e.g. `transformer.h.0.attn.c_attn.weight`.
    pub name: String,
    /// A borrowed handle to the parameter (valid for the whole run).
    pub id: TensorId,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Element type of the stored values (optimizer state usually keeps f32 whatever this is).
    pub dtype: DType,
    /// Role declared by the model.
    pub role: ParamRole,
    /// False when frozen: no gradient is computed and optimizers skip it.
    pub trainable: bool,
}

/// A [`ParamInfo`] as it crosses the ABI.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct ParamInfoAbi {
    /// Full name.
    pub name: RString,
    /// A borrowed handle to the parameter.
    pub id: TensorId,
    /// Dimensions.
    pub shape: RVec<usize>,
    /// Element type.
    pub dtype: DType,
    /// Role declared by the model.
    pub role: ParamRole,
    /// False when frozen.
    pub trainable: bool,
}

impl From<ParamInfo> for ParamInfoAbi {
    fn from(p: ParamInfo) -> Self {
        ParamInfoAbi {
            name: p.name.into(),
            id: p.id,
            shape: p.shape.into(),
            dtype: p.dtype,
            role: p.role,
            trainable: p.trainable,
        }
    }
}

impl From<ParamInfoAbi> for ParamInfo {
    fn from(p: ParamInfoAbi) -> Self {
        ParamInfo {
            name: p.name.into_string(),
            id: p.id,
            shape: p.shape.into_vec(),
            dtype: p.dtype,
            role: p.role,
            trainable: p.trainable,
        }
    }
}

/// Plain copies of parameter descriptions that arrived over the ABI.
pub(crate) fn params_from_abi(params: RVec<ParamInfoAbi>) -> Vec<ParamInfo> {
    params.into_iter().map(ParamInfo::from).collect()
}

/// The host side of parameter and state declaration (implemented by the host).
#[sabi_trait]
pub trait TensorStore {
    /// Declare a trainable parameter; returns an owned handle.
    fn declare_param(
        &mut self,
        name: RStr<'_>,
        shape: RSlice<'_, usize>,
        role: ParamRole,
        init: Init,
    ) -> RResult<TensorId, PluginError>;

    /// Declare a non-trainable state tensor, saved in checkpoints under `name`; returns an
    /// owned handle. Optimizers keep their moments here, named `optimizer.<parameter>.<slot>`.
    fn declare_state(
        &mut self,
        name: RStr<'_>,
        shape: RSlice<'_, usize>,
        dtype: DType,
        init: Init,
    ) -> RResult<TensorId, PluginError>;

    /// Every parameter declared so far, in declaration order.
    #[sabi(last_prefix_field)]
    fn params(&self) -> RVec<ParamInfoAbi>;
}

/// The ffi-safe handle to the host's [`TensorStore`].
pub type TensorStoreRef<'a> = TensorStore_TO<'a, abi_stable::RMut<'a, ()>>;

/// Friendly wrapper over the host's store, handed to model and optimizer constructors.
pub struct Store<'a, 'b> {
    inner: &'a mut TensorStoreRef<'b>,
    prefix: String,
}

impl<'a, 'b> Store<'a, 'b> {
    #[doc(hidden)]
    pub fn new(inner: &'a mut TensorStoreRef<'b>) -> Self {
        Store {
            inner,
            prefix: String::new(),
        }
    }

    /// A view whose declarations are prefixed with `prefix.` (like `VarBuilder::pp`).
    pub fn pp<'c>(&'c mut self, prefix: &str) -> Store<'c, 'b> {
        let prefix = if self.prefix.is_empty() {
            prefix.to_string()
        } else {
            format!("{}.{prefix}", self.prefix)
        };
        Store {
            inner: self.inner,
            prefix,
        }
    }

    fn full_name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// Declare a trainable parameter.
    pub fn param(
        &mut self,
        name: &str,
        shape: &[usize],
        role: ParamRole,
        init: Init,
    ) -> Result<Tensor> {
        let full = self.full_name(name);
        from_abi(self.inner.declare_param(
            RStr::from(full.as_str()),
            RSlice::from_slice(shape),
            role,
            init,
        ))
        .map(Tensor::from_id)
    }

    /// Declare a state tensor saved in checkpoints (in `optimizer.safetensors`). An optimizer
    /// names the state of parameter `p` `optimizer.<p>.<slot>` (see the [module](self) docs).
    pub fn state(
        &mut self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        init: Init,
    ) -> Result<Tensor> {
        let full = self.full_name(name);
        from_abi(self.inner.declare_state(
            RStr::from(full.as_str()),
            RSlice::from_slice(shape),
            dtype,
            init,
        ))
        .map(Tensor::from_id)
    }

    /// Every parameter declared so far.
    pub fn params(&self) -> Vec<ParamInfo> {
        params_from_abi(self.inner.params())
    }
}
