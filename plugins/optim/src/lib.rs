//! Built-in optimizers, written only against `codex-plugin-api`.
//!
//! Every piece of state lives in host tensors declared by name
//! (`optimizer.<parameter>.<slot>`), so the host checkpoints and restores it exactly and a
//! resumed run continues bit for bit. The learning rate comes with each step from the
//! trainer's schedule; the factory's rate is only recorded in the resolved configuration.

#![warn(missing_docs, unreachable_pub)]

mod adamw;
mod roles;
mod sgd;

pub use adamw::AdamW;
pub use sgd::Sgd;

codex_plugin_api::builtin!(codex_plugin_api::optimizer::declare::<AdamW>);
codex_plugin_api::builtin!(codex_plugin_api::optimizer::declare::<Sgd>);
