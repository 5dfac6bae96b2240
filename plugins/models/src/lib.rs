//! Built-in models, written only against `codex-plugin-api`.
//!
//! They use exactly the tensor handles, op table and authoring traits a third-party plugin
//! uses, which is what proves that API complete: nothing here links the tensor engine.

#![warn(missing_docs, unreachable_pub)]

mod gpt2;
mod llama;

pub use gpt2::Gpt2;
pub use llama::Llama;

codex_plugin_api::builtin!(codex_plugin_api::model::declare::<Gpt2>);
codex_plugin_api::builtin!(codex_plugin_api::model::declare::<Llama>);
