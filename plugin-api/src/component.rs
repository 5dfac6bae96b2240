//! Component declarations and the one registration path every origin shares.
//!
//! Whatever its origin — compiled into the binary, a native plugin, a WASM plugin — a
//! component reaches the host as a [`ComponentDecl`]: its kind, registry name, version, a
//! one-line description, and a factory. Built-ins submit theirs with `builtin!`
//! (`inventory`); native plugins hand theirs to the host's [`Registrar`] from their root
//! module (see [`crate::plugin`]).

use abi_stable::sabi_trait;
use abi_stable::std_types::{RResult, RStr, RString};
use abi_stable::StableAbi;

use crate::error::{guard, PluginError, Result};
use crate::kernel::KernelBox;
use crate::model::{ModelBox, ModelEnv};
use crate::optimizer::OptimizerBox;
use crate::params::TensorStoreRef;
use crate::sink::{SinkBox, SinkEnv};
use crate::tokenizer::{TokenizerBox, TokenizerEnv};
use crate::tracker::TrackerBox;
use crate::trainer::TrainerBox;

/// The seven kinds of component.
#[repr(u8)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ComponentKind {
    /// Text ⇄ token ids.
    Tokenizer,
    /// Declares parameters and builds the forward graph.
    Model,
    /// Owns per-parameter state and updates parameters.
    Optimizer,
    /// Receives metric records.
    Sink,
    /// Follows a run's lifecycle: params, metrics, artifacts, status.
    Tracker,
    /// The training loop itself.
    Trainer,
    /// Fast implementations of named ops for a device.
    Kernel,
}

impl ComponentKind {
    /// Every kind, in display order.
    pub const ALL: [ComponentKind; 7] = [
        ComponentKind::Tokenizer,
        ComponentKind::Model,
        ComponentKind::Optimizer,
        ComponentKind::Sink,
        ComponentKind::Tracker,
        ComponentKind::Trainer,
        ComponentKind::Kernel,
    ];

    /// The lowercase name used in configs and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            ComponentKind::Tokenizer => "tokenizer",
            ComponentKind::Model => "model",
            ComponentKind::Optimizer => "optimizer",
            ComponentKind::Sink => "sink",
            ComponentKind::Tracker => "tracker",
            ComponentKind::Trainer => "trainer",
            ComponentKind::Kernel => "kernel",
        }
    }

    /// Parse a lowercase kind name.
    pub fn parse(s: &str) -> Option<ComponentKind> {
        ComponentKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// The constructor of a component, by kind. The signatures are those of the
/// `*Factory` aliases in each kind's module, spelled out because `abi_stable` derives
/// layouts only for function pointers written inline.
#[repr(C, u8)]
#[derive(StableAbi, Copy, Clone)]
pub enum Factory {
    /// Builds a tokenizer.
    Tokenizer(extern "C" fn(RStr<'_>, TokenizerEnv<'_>) -> RResult<TokenizerBox, PluginError>),
    /// Builds a model.
    Model(extern "C" fn(RStr<'_>, ModelEnv<'_>) -> RResult<ModelBox, PluginError>),
    /// Builds an optimizer.
    Optimizer(extern "C" fn(RStr<'_>, TensorStoreRef<'_>) -> RResult<OptimizerBox, PluginError>),
    /// Builds a sink.
    Sink(extern "C" fn(RStr<'_>, SinkEnv<'_>) -> RResult<SinkBox, PluginError>),
    /// Builds a tracker.
    Tracker(extern "C" fn(RStr<'_>) -> RResult<TrackerBox, PluginError>),
    /// Builds a trainer.
    Trainer(extern "C" fn(RStr<'_>) -> RResult<TrainerBox, PluginError>),
    /// Builds a kernel.
    Kernel(extern "C" fn(RStr<'_>) -> RResult<KernelBox, PluginError>),
}

impl Factory {
    /// The kind this factory builds.
    pub fn kind(&self) -> ComponentKind {
        match self {
            Factory::Tokenizer(_) => ComponentKind::Tokenizer,
            Factory::Model(_) => ComponentKind::Model,
            Factory::Optimizer(_) => ComponentKind::Optimizer,
            Factory::Sink(_) => ComponentKind::Sink,
            Factory::Tracker(_) => ComponentKind::Tracker,
            Factory::Trainer(_) => ComponentKind::Trainer,
            Factory::Kernel(_) => ComponentKind::Kernel,
        }
    }
}

/// What a component tells the registry about itself.
#[repr(C)]
#[derive(StableAbi, Clone)]
pub struct ComponentDecl {
    /// Registry name: short, lowercase (`adamw`). Native plugins' components are registered
    /// as `PLUGIN/NAME` by the host.
    pub name: RString,
    /// The component's own version.
    pub version: RString,
    /// One line for `codex-ml list`.
    pub description: RString,
    /// Its constructor; the kind follows from it.
    pub factory: Factory,
    /// Checks parameters (JSON) without building anything: the host calls it when it checks a
    /// config, before any data is read or any directory is made. An error's message starts
    /// with the path of the bad value inside the parameters when there is one
    /// (`n_layr: unknown field ...`, `betas[1]: invalid type ...`), as
    /// `strict::parse_params` writes it.
    pub check: extern "C" fn(RStr<'_>) -> RResult<(), PluginError>,
}

/// The type of [`ComponentDecl::check`] (spelled out there, as `abi_stable` needs).
pub type ParamsCheck = extern "C" fn(RStr<'_>) -> RResult<(), PluginError>;

/// A [`ParamsCheck`] that accepts any parameters, for components whose parameters are only
/// known when they are built.
pub extern "C" fn accept_any_params(_: RStr<'_>) -> RResult<(), PluginError> {
    RResult::ROk(())
}

impl ComponentDecl {
    /// The component's kind.
    pub fn kind(&self) -> ComponentKind {
        self.factory.kind()
    }
}

/// Name, version and description of a component type, shared by every kind's authoring trait.
pub trait Describe {
    /// Registry name.
    const NAME: &'static str;
    /// Version, usually `env!("CARGO_PKG_VERSION")`.
    const VERSION: &'static str;
    /// One line for `codex-ml list`.
    const DESCRIPTION: &'static str;

    /// Check `params` (the component's parameters as JSON; empty or `null` for none) the way
    /// building the component would, without building it: unknown fields, wrong types, values
    /// out of range. The host calls it when it checks a config, so that a mistake is reported
    /// with its place in the user's file before any work starts. Parsing with
    /// `strict::parse_params` into the type `create` parses is usually all it takes.
    /// The default accepts anything.
    fn check_params(params: &str) -> Result<()> {
        let _ = params;
        Ok(())
    }
}

/// [`Describe::check_params`] behind the ABI. The error carries the check's own message (the
/// path of the bad value first), not wrapped like other calls' errors; a panic is reported as
/// [`guard`] reports it.
extern "C" fn check_params<C: Describe>(params: RStr<'_>) -> RResult<(), PluginError> {
    let checked = guard(C::NAME, "check_params", || {
        Ok(C::check_params(params.as_str()).err())
    });
    match checked {
        RResult::ROk(None) => RResult::ROk(()),
        RResult::ROk(Some(e)) => RResult::RErr(PluginError::new(e.message())),
        RResult::RErr(panicked) => RResult::RErr(panicked),
    }
}

pub(crate) fn decl<C: Describe>(factory: Factory) -> ComponentDecl {
    ComponentDecl {
        name: C::NAME.into(),
        version: C::VERSION.into(),
        description: C::DESCRIPTION.into(),
        factory,
        check: check_params::<C>,
    }
}

/// The host's side of registration, handed to a native plugin's `register` function.
#[sabi_trait]
pub trait Registrar {
    /// Add one component.
    #[sabi(last_prefix_field)]
    fn add(&mut self, decl: ComponentDecl) -> RResult<(), PluginError>;
}

/// The ffi-safe handle to the host's [`Registrar`].
pub type RegistrarRef<'a> = Registrar_TO<'a, abi_stable::RMut<'a, ()>>;

/// A built-in component, submitted with [`builtin!`] next to its implementation.
#[cfg(feature = "builtin")]
#[doc(hidden)]
pub struct Builtin {
    /// Builds the declaration.
    pub declare: fn() -> ComponentDecl,
    /// `module_path!()` of the submission, named in duplicate-name errors.
    pub source: &'static str,
}

#[cfg(feature = "builtin")]
inventory::collect!(Builtin);

/// Every built-in submission linked into this binary.
#[cfg(feature = "builtin")]
#[doc(hidden)]
pub fn builtins() -> impl Iterator<Item = &'static Builtin> {
    inventory::iter::<Builtin>.into_iter()
}

/// Register a built-in component: `builtin!(codex_plugin_api::model::declare::<Gpt2>);`.
///
/// Only for crates linked into the codex-ml binary (feature `builtin`); the binary must
/// reference the crate, or `inventory` silently drops its registrations.
#[cfg(feature = "builtin")]
#[macro_export]
macro_rules! builtin {
    ($declare:expr) => {
        $crate::inventory::submit! {
            $crate::component::Builtin { declare: $declare, source: ::core::module_path!() }
        }
    };
}
