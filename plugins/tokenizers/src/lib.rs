//! The built-in tokenizers: `hf` (any `tokenizer.json`), `bpe` (a byte-level BPE trained on
//! the run's corpus) and `bytes` (one id per byte).
//!
//! `hf` and `bpe` share one wrapper around a Hugging Face [`tokenizers::Tokenizer`]
//! (`hf::Loaded`), so a trained `bpe` and the same `tokenizer.json` reloaded with `hf`
//! encode through exactly the same code: that is what makes a saved run reproducible.
//!
//! Conventions every tokenizer here keeps, because the data pipeline relies on them: encoding
//! adds only the special tokens a `tokenizer.json`'s own template asks for (none for `bpe` and
//! `bytes`), and text that happens to spell a special token (`<|endoftext|>` inside a
//! document) is encoded as ordinary text unless `hf`'s `split_special_tokens` says otherwise,
//! so a document cannot inject a document boundary by accident; decoding skips special tokens;
//! `decode(encode(x)) == x` for any text the vocabulary covers (all text, for the byte-level
//! ones).

#![warn(missing_docs, unreachable_pub)]

mod bpe;
mod bytes;
mod hf;
mod params;

use bpe::Bpe;
use bytes::Bytes;
use hf::Hf;

/// End-of-text token of `bpe` and `bytes`, and the default `eot_token` of `hf`.
pub const EOT_TOKEN: &str = "<|endoftext|>";
/// Padding token of `bpe` and `bytes`.
pub const PAD_TOKEN: &str = "<|pad|>";

codex_plugin_api::builtin!(codex_plugin_api::tokenizer::declare::<Hf>);
codex_plugin_api::builtin!(codex_plugin_api::tokenizer::declare::<Bpe>);
codex_plugin_api::builtin!(codex_plugin_api::tokenizer::declare::<Bytes>);
