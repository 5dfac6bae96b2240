//! Optimizers: own per-parameter state, update parameters in place.
//!
//! State lives in host tensors declared by name ([`Store::state`]), never inside the plugin,
//! so the host can checkpoint and restore it exactly. Parameters and state share one namespace;
//! the state of parameter `p` is named `optimizer.<p>.<slot>` (`optimizer.<p>.exp_avg`, ...; see
//! [`crate::params`]). The learning rate arrives with every step ([`OptimStep::lr`]) and only
//! there: schedules belong to the trainer, the optimizer only applies them, so its constructor
//! is not given one.

use abi_stable::sabi_trait;
use abi_stable::std_types::{RBox, RResult, RSlice, RStr, RString};
use abi_stable::StableAbi;

use crate::component::{decl, ComponentDecl, Describe, Factory};
use crate::error::{guard, PluginError, Result};
use crate::params::{params_from_abi, ParamInfo, Store, TensorStoreRef};
use crate::tensor::{Tensor, TensorId};

/// One parameter's gradient for this step (borrowed handles).
#[repr(C)]
#[derive(StableAbi, Copy, Clone, Debug)]
pub struct ParamGrad {
    /// Index into the parameter list the optimizer was created with.
    pub index: usize,
    /// The parameter.
    pub param: TensorId,
    /// Its gradient, already accumulated and clipped.
    pub grad: TensorId,
}

/// Per-step settings.
#[repr(C)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq)]
pub struct OptimStep {
    /// Learning rate for this step, from the schedule.
    pub lr: f64,
    /// 1-based count of optimizer steps, this one included (for bias correction).
    pub step: u64,
}

/// The ABI face of an optimizer.
#[sabi_trait]
pub trait OptimizerAbi: Send {
    /// Update the given parameters in place.
    fn step(&mut self, grads: RSlice<'_, ParamGrad>, step: OptimStep) -> RResult<(), PluginError>;
    /// Resolved configuration as JSON.
    #[sabi(last_prefix_field)]
    fn config_json(&self) -> RString;
}

/// An owned optimizer object.
pub type OptimizerBox = OptimizerAbi_TO<'static, RBox<()>>;

/// An optimizer constructor: `(params as JSON, store)`. The store's `params()` lists the
/// parameters to optimise; state is declared with `declare_state`.
pub type OptimizerFactory =
    extern "C" fn(RStr<'_>, TensorStoreRef<'_>) -> RResult<OptimizerBox, PluginError>;

/// A gradient handed to [`Optimizer::step`].
#[derive(Debug)]
pub struct Grad {
    /// Index into the parameter list passed to [`Optimizer::create`].
    pub index: usize,
    /// The parameter (update it with [`Tensor::assign`]).
    pub param: Tensor,
    /// Its gradient.
    pub grad: Tensor,
}

/// What optimizer authors implement.
pub trait Optimizer: Describe + Send + Sized + 'static {
    /// Parse `params` (JSON, strictly); declare the state of the parameters `infos` in
    /// `store`, as `optimizer.<parameter>.<slot>`.
    fn create(params: &str, infos: &[ParamInfo], store: &mut Store<'_, '_>) -> Result<Self>;
    /// Apply one update, at the learning rate `step.lr`.
    fn step(&mut self, grads: &[Grad], step: OptimStep) -> Result<()>;
    /// Resolved configuration as JSON.
    fn config_json(&self) -> String;
}

struct Adapter<O>(O);

impl<O: Optimizer> OptimizerAbi for Adapter<O> {
    fn step(&mut self, grads: RSlice<'_, ParamGrad>, step: OptimStep) -> RResult<(), PluginError> {
        guard(O::NAME, "step", || {
            let grads: Vec<Grad> = grads
                .iter()
                .map(|g| Grad {
                    index: g.index,
                    param: Tensor::retain(g.param),
                    grad: Tensor::retain(g.grad),
                })
                .collect();
            self.0.step(&grads, step)
        })
    }
    fn config_json(&self) -> RString {
        self.0.config_json().into()
    }
}

extern "C" fn factory<O: Optimizer>(
    params: RStr<'_>,
    mut store: TensorStoreRef<'_>,
) -> RResult<OptimizerBox, PluginError> {
    guard(O::NAME, "create", || {
        let infos = params_from_abi(store.params());
        let mut store = Store::new(&mut store);
        let o = O::create(params.as_str(), &infos, &mut store)?;
        Ok(OptimizerAbi_TO::from_value(
            Adapter(o),
            abi_stable::sabi_trait::TD_Opaque,
        ))
    })
}

/// The declaration of optimizer type `O`.
pub fn declare<O: Optimizer>() -> ComponentDecl {
    decl::<O>(Factory::Optimizer(factory::<O>))
}
