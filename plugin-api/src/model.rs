//! Models: declare named parameters, build the forward graph from token ids to logits.
//!
//! A model is written only against [`Tensor`] handles and the host's op table, never against
//! an engine, so the same code runs on every device and every host feature that works on
//! named parameters (checkpoints, casting, freezing, LoRA, export) works for it. Construction
//! declares the parameters; `forward` is pure apart from dropout, whose masks come from the
//! seed in [`ForwardCtx`], so a step can be replayed exactly.

use abi_stable::sabi_trait;
use abi_stable::std_types::{RBox, ROption, RResult, RStr, RString};
use abi_stable::StableAbi;

use crate::component::{decl, ComponentDecl, Describe, Factory};
use crate::error::{guard, PluginError, Result};
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
    #[sabi(last_prefix_field)]
    fn max_positions_param(&self) -> ROption<RString>;
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
