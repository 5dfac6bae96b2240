//! Data: documents from files, tokenized once into a content-addressed cache, served as
//! batches of token windows whose order is a pure function of (seed, epoch).
//!
//! The stages are separate functions because the tokenizer sits in the middle: a `bpe`
//! tokenizer is trained on the training documents, so a run calls, in order,
//! 1. [`load_documents`] — read the sources, preprocess, hold out validation documents;
//! 2. create the tokenizer with [`SplitDocuments::corpus`] as its corpus;
//! 3. [`TokenizerFingerprint::of`] and [`TokenCache::load_or_build`] (or [`token_streams`])
//!    for each split;
//! 4. [`TrainBatches::new`] and [`ValBatches::new`].
//!
//! Only this module reads data files; it knows nothing about tensors (batches are plain
//! `Vec<u32>` and a shape) nor about where a tokenizer comes from.
//!
//! The token cache lives in the user's cache directory ([`default_cache_dir`]) unless the
//! config names one: never in the directory a run is started from, and shared by every
//! experiment, which is safe because its files are named by content.

pub mod batch;
pub mod cache;
pub mod chat;
pub mod error;
pub mod select;
pub mod sft;
pub mod source;
pub mod split;
pub mod tokenize;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use codex_plugin_api::tokenizer::TokenizerBox;

pub use batch::{
    pack_best_fit, window_order, BatchShape, DataCursor, TokenBatch, TrainBatches, ValBatches,
    IGNORE_INDEX,
};
pub use cache::{CacheKey, CacheOutcome, Cached, TokenCache, Tokens};
pub use codex_formats::config::data as config;
pub use config::{DataConfig, Overlong, Preprocess, ReadSettings, Sft, Source, Undecodable};
pub use error::DataError;
pub use select::check_glob;
pub use sft::{SftEncoder, SftReport};
pub use source::{read_sources, DataReport, Document, Read, Skipped, SkippedFile};
pub use split::{hold_out, load_documents, preprocess, SplitDocuments};
pub use tokenize::{tokenize, TokenizerFingerprint};

/// The token streams of both splits.
#[derive(Debug)]
pub struct TokenStreams {
    /// The training stream.
    pub train: Cached,
    /// The validation stream; `None` when there are no validation documents.
    pub val: Option<Cached>,
}

/// Tokenize both splits of `docs` through `cache`.
pub fn token_streams(
    docs: &SplitDocuments,
    tokenizer: &TokenizerBox,
    fingerprint: &TokenizerFingerprint,
    cache: &TokenCache,
    preprocess: &Preprocess,
) -> Result<TokenStreams, DataError> {
    let train = cache.load_or_build(&docs.train, tokenizer, fingerprint, preprocess)?;
    let val = if docs.val.is_empty() {
        None
    } else {
        Some(cache.load_or_build(&docs.val, tokenizer, fingerprint, preprocess)?)
    };
    Ok(TokenStreams { train, val })
}

/// Supervised fine-tuning examples fitted into rows: the stream, where each row is in it,
/// and what fitting them did.
#[derive(Debug)]
pub struct SftRows {
    /// The stream of examples ([`sft::LEARN`] marks what the loss counts).
    pub tokens: Tokens,
    /// (start, length) of each row's ids in `tokens`.
    pub rows: Vec<(usize, usize)>,
    /// Examples cut or left out.
    pub report: sft::SftReport,
}

/// The examples `docs` of `split` encoded by `encoder` through `cache`, fitted into rows of
/// `seq_len + 1` ids as `overlong` says; what was cut or left out is logged.
pub fn sft_rows(
    split: &'static str,
    docs: &[Document],
    encoder: &sft::SftEncoder,
    fingerprint: &TokenizerFingerprint,
    cache: &TokenCache,
    seq_len: usize,
    overlong: Overlong,
) -> Result<SftRows, DataError> {
    let key = CacheKey::sft(docs, fingerprint, &encoder.settings_key());
    let cached = cache.load_or_build_with(&key, docs.len(), || encoder.encode_all(docs))?;
    let origins: Vec<String> = docs.iter().map(|d| d.origin.clone()).collect();
    let (rows, report) = sft::fit_examples(&cached.tokens, seq_len + 1, overlong, &origins)?;
    if report.truncated > 0 {
        tracing::warn!(
            "{split}: {} of {} examples are longer than a row (seq_len {seq_len} + 1 tokens) and \
             were cut, losing {} tokens (`data.sft.overlong: error` refuses them)",
            report.truncated,
            report.examples,
            report.truncated_tokens
        );
    }
    if report.without_targets > 0 {
        tracing::warn!(
            "{split}: {} of {} examples have no token the loss counts{} and are left out",
            report.without_targets,
            report.examples,
            if report.truncated > 0 {
                " (after cutting)"
            } else {
                ""
            }
        );
    }
    if !report.examples_named.is_empty() {
        tracing::warn!("  e.g. {}", report.examples_named.join(", "));
    }
    Ok(SftRows {
        tokens: cached.tokens,
        rows,
        report,
    })
}

/// The id that pads validation inputs: the tokenizer's pad id, else its end-of-text id.
pub fn pad_id(tokenizer: &TokenizerBox) -> u32 {
    tokenizer
        .pad_id()
        .into_option()
        .unwrap_or(tokenizer.eot_id())
}

/// The token cache directory of `config`: its `cache_dir` relative to `base_dir` when set,
/// else [`default_cache_dir`].
pub fn cache_dir(config: &DataConfig, base_dir: &Path) -> Result<PathBuf, DataError> {
    match &config.cache_dir {
        Some(dir) => Ok(base_dir.join(dir)),
        None => default_cache_dir(),
    }
}

/// The user's token cache directory: `$CODEX_ML_CACHE` when set, else
/// `$XDG_CACHE_HOME/codex-ml` (an absolute `XDG_CACHE_HOME`, as the XDG base directory
/// specification asks), else `~/.cache/codex-ml`.
pub fn default_cache_dir() -> Result<PathBuf, DataError> {
    cache_dir_from(|name| std::env::var_os(name)).ok_or_else(|| DataError::Setting {
        field: "data.cache_dir",
        message: "no user cache directory (HOME is not set): set data.cache_dir, or the CODEX_ML_CACHE environment variable".to_string(),
    })
}

/// [`default_cache_dir`] with the environment read through `var`.
fn cache_dir_from(var: impl Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    let set = |name| var(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = set("CODEX_ML_CACHE") {
        return Some(dir);
    }
    if let Some(dir) = set("XDG_CACHE_HOME").filter(|d| d.is_absolute()) {
        return Some(dir.join("codex-ml"));
    }
    set("HOME").map(|home| home.join(".cache").join("codex-ml"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_is_in_the_user_cache_directory() {
        let check = |vars: &[(&str, &str)], expected: Option<&str>| {
            let found = cache_dir_from(|name| {
                vars.iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| OsString::from(v))
            });
            assert_eq!(found, expected.map(PathBuf::from), "{vars:?}");
        };
        let home = ("HOME", "/home/u");
        check(&[home], Some("/home/u/.cache/codex-ml"));
        check(&[home, ("XDG_CACHE_HOME", "/xdg")], Some("/xdg/codex-ml"));
        check(
            &[home, ("XDG_CACHE_HOME", "rel")],
            Some("/home/u/.cache/codex-ml"),
        );
        check(
            &[home, ("XDG_CACHE_HOME", "")],
            Some("/home/u/.cache/codex-ml"),
        );
        check(
            &[home, ("XDG_CACHE_HOME", "/xdg"), ("CODEX_ML_CACHE", "/c")],
            Some("/c"),
        );
        check(
            &[home, ("CODEX_ML_CACHE", "")],
            Some("/home/u/.cache/codex-ml"),
        );
        check(&[], None);
    }
}
