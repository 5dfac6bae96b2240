//! The codex-ml host: everything behind the `codex-ml` binary.
//!
//! The host owns the registry of components, the experiment and manifest files, the run
//! directory and the data; tensors live in `codex-engine`. Components — built-in or plugin — reach
//! it only through `codex-plugin-api`.

#![warn(missing_docs, unreachable_pub)]

pub mod adapter;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub use codex_formats::diagnostics;
pub mod fsio;
pub mod hf;
pub mod inference;
pub mod logging;
pub mod metrics;
pub mod plugins;
pub mod report;
pub mod run;
pub mod rundir;

// Built-in component crates register through `inventory`; a crate the binary never
// references is silently dropped by the linker, so each one is named here.
use codex_kernels as _;
use codex_models as _;
use codex_optim as _;
use codex_sinks as _;
use codex_tokenizers as _;
use codex_trackers as _;
use codex_trainer as _;
