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

pub mod batch;
pub mod cache;
pub mod config;
pub mod error;
pub mod source;
pub mod split;
pub mod tokenize;

use codex_plugin_api::tokenizer::TokenizerBox;

pub use batch::{
    window_order, BatchShape, DataCursor, TokenBatch, TrainBatches, ValBatches, IGNORE_INDEX,
};
pub use cache::{CacheKey, CacheOutcome, Cached, TokenCache, Tokens};
pub use config::{DataConfig, Preprocess, Source};
pub use error::DataError;
pub use source::{read_sources, Document};
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

/// The id that pads validation inputs: the tokenizer's pad id, else its end-of-text id.
pub fn pad_id(tokenizer: &TokenizerBox) -> u32 {
    tokenizer
        .pad_id()
        .into_option()
        .unwrap_or(tokenizer.eot_id())
}

impl DataConfig {
    /// The token cache directory: `cache_dir` relative to `base_dir` when set, else the
    /// `CODEX_ML_CACHE` environment variable when set (one cache shared by every experiment,
    /// wherever it is started), else `.cache/tokens` under `runs_dir`.
    pub fn resolve_cache_dir(
        &self,
        base_dir: &std::path::Path,
        runs_dir: &std::path::Path,
    ) -> std::path::PathBuf {
        match &self.cache_dir {
            Some(dir) => base_dir.join(dir),
            None => match std::env::var_os("CODEX_ML_CACHE") {
                Some(dir) if !dir.is_empty() => dir.into(),
                _ => runs_dir.join(".cache").join("tokens"),
            },
        }
    }
}
