//! The stable ABI between the codex-ml host and its components.
//!
//! This is the only crate a plugin depends on. It knows nothing about the tensor engine
//! (candle), the WASM runtime (wasmtime) or the command line (clap): the host owns every
//! tensor, parameter, gradient and device, and components reach them through opaque
//! [`TensorId`] handles and the host's [`OpTable`].
//!
//! Layers, from the wire up:
//! - **ABI types** (`*Abi` traits, [`OpTable`] and [`OpTableExt`], [`ComponentDecl`]):
//!   `abi_stable` prefix types and `#[sabi_trait]` objects whose layouts the host checks when it
//!   loads a plugin.
//! - **Authoring traits** ([`Model`], [`Optimizer`], [`Tokenizer`], [`Sink`], [`Tracker`],
//!   [`Trainer`], [`Kernel`]): plain Rust traits plugin authors implement, with [`Tensor`]
//!   and [`Result`]. They take and return plain Rust types (`&str`, `String`, slices, `Vec`,
//!   `Option`) and so do the types they are handed ([`ParamInfo`], [`Record`], [`RunInfo`],
//!   [`BufferView`], ...), and so does the builder of element-wise updates ([`Program`],
//!   [`Expr`]; see [`elementwise`]); `abi_stable`'s `RStr`, `RVec`, ... appear only in the ABI
//!   layer (`ParamInfoAbi`, `RecordAbi`, [`elementwise::ElemInstr`], ...). Each kind's
//!   `declare::<T>()` wraps an implementation in an adapter that converts between the two and
//!   catches panics on the plugin side ([`guard`]) — a panic must never cross the ABI.
//! - **Registration**: `builtin!` (feature `builtin`) for components compiled into codex-ml, and
//!   [`export_plugin!`] for native plugins.
//!
//! The version is [`API_VERSION`]; see `docs/plugins-native.md` for the compatibility promise.

#![warn(missing_docs, unreachable_pub)]
// `#[sabi_trait]` expands to impl blocks inside functions; nothing to fix on our side.
#![allow(non_local_definitions)]

pub mod component;
pub mod elementwise;
pub mod error;
pub mod kernel;
pub mod model;
pub mod ops;
pub mod optimizer;
pub mod params;
pub mod plugin;
pub mod sink;
#[cfg(feature = "strict")]
pub mod strict;
pub mod tensor;
pub mod tokenizer;
pub mod tracker;
pub mod trainer;
#[doc(hidden)]
pub mod untrusted;

pub use component::{ComponentDecl, ComponentKind, Describe, Factory, ParamsCheck, Registrar};
pub use elementwise::{Expr, Program};
pub use error::{guard, Error, PluginError, Result};
pub use kernel::{BufferMut, BufferView, DeviceKind, Kernel};
pub use model::{ForwardCtx, KvCache, Model};
pub use ops::{ops, OpTable, OpTableExt, OpTableExtRef, OpTableRef};
pub use optimizer::{Grad, OptimStep, Optimizer};
pub use params::{Init, ParamInfo, ParamRole, Store};
pub use plugin::{ApiVersion, API_VERSION};
pub use sink::{Record, Sink};
pub use tensor::{CrossEntropy, DType, GeluForm, Tensor, TensorId};
pub use tokenizer::Tokenizer;
pub use tracker::{RunInfo, RunStatus, Tracker};
pub use trainer::{
    Batch, EvalTotals, LossScaling, Schedule, ScheduleKind, Session, TrainOutcome, TrainSettings,
    Trainer,
};

#[doc(hidden)]
pub use abi_stable;
#[cfg(feature = "builtin")]
#[doc(hidden)]
pub use inventory;
