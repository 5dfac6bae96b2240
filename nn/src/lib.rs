//! Building blocks for codex-ml models: linear layers, embeddings, layer and RMS norms, rotary
//! position embeddings, causal self-attention helpers, MLPs, seeded dropout, and the positions
//! of a forward pass (packed rows included).
//!
//! Every block is a thin layer over [`codex_plugin_api`]: it declares its parameters by name
//! through a [`Store`](codex_plugin_api::Store) — with the names Hugging Face models use, so
//! checkpoints, LoRA targets and exports work on them unchanged — and its `forward` is a fixed,
//! documented sequence of op-table calls. Blocks add no behaviour of their own: no state beyond
//! parameter handles and constants, no randomness except the seeds handed to the host's dropout,
//! no engine. That is what lets the built-in `gpt2`, the LLaMA example and third-party models
//! share them without a change in the numbers: a model built from blocks issues exactly the ops
//! it would issue written out by hand, so the host's fused kernels (a bias add on a matmul,
//! attention on split projections) recognise the same patterns.
//!
//! The crate depends on `codex-plugin-api` only and defines no ABI types: a native plugin uses
//! it like any other Rust library, and the host checks nothing new when it loads one.

#![warn(missing_docs, unreachable_pub)]

pub mod attention;
pub mod dropout;
pub mod embedding;
pub mod linear;
pub mod mlp;
pub mod norm;
pub mod positions;
pub mod rotary;

#[cfg(test)]
mod testing;

pub use attention::Heads;
pub use dropout::{dropout, site_seed};
pub use embedding::Embedding;
pub use linear::{Linear, WeightLayout};
pub use mlp::{GeluMlp, SwiGlu};
pub use norm::{LayerNorm, RmsNorm};
pub use positions::Positions;
pub use rotary::{
    inverse_frequencies, rotary_tables, rotary_tables_from, RopeScaling, Rotary, RotaryWindow,
};
