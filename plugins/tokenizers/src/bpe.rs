//! `bpe`: a byte-level BPE trained on the run's training documents.
//!
//! The setup is GPT-2's (byte-level pre-tokenizer without a prefix space, the full
//! 256-byte alphabet, byte-level decoder and post-processor), so every text encodes and
//! decodes exactly. Training is deterministic: the same documents give a byte-identical
//! `tokenizer.json`, which the host saves in the run directory; reloading that file with
//! `hf` gives the same ids, because both go through [`Loaded`].

use codex_plugin_api::{bail, Describe, Error, Result, Tokenizer};
use serde::Deserialize;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, PaddingParams};

use crate::hf::Loaded;
use crate::{params, EOT_TOKEN, PAD_TOKEN};

/// 256 byte tokens plus the two special tokens.
const MIN_VOCAB: usize = 258;

/// The parameters of `bpe`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BpeParams {
    /// Target vocabulary size, special tokens included; at least 258. Required.
    vocab_size: usize,
    /// A pair must occur this often to be merged. Default: 2.
    #[serde(default = "default_min_frequency")]
    min_frequency: u64,
}

fn default_min_frequency() -> u64 {
    2
}

/// Byte-level BPE trained on the corpus.
pub(crate) struct Bpe(Loaded);

impl Describe for Bpe {
    const NAME: &'static str = "bpe";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "byte-level BPE trained on the training documents";

    fn check_params(params: &str) -> codex_plugin_api::Result<()> {
        codex_plugin_api::strict::parse_params::<BpeParams>(params).map(drop)
    }
}

impl Tokenizer for Bpe {
    fn create(params: &str, _base_dir: &str, corpus: &[&str]) -> Result<Self> {
        let p: BpeParams = params::parse(Self::NAME, params)?;
        if p.vocab_size < MIN_VOCAB {
            bail!(
                "vocab_size {} is too small: a byte-level bpe needs at least {MIN_VOCAB} \
                 (256 bytes and 2 special tokens)",
                p.vocab_size
            );
        }
        if corpus.iter().all(|d| d.is_empty()) {
            bail!(
                "no training text to learn a vocabulary from ({} documents, all empty): add \
                 training data, or reload a trained tokenizer.json with the `hf` tokenizer",
                corpus.len()
            );
        }
        Ok(Bpe(train(&p, corpus)?))
    }

    /// The vocabulary and merges learnt by the run, from its saved `tokenizer.json`.
    fn restore(params: &str, _base_dir: &str, saved: &str) -> Result<Self> {
        let _: BpeParams = params::parse(Self::NAME, params)?;
        Loaded::restore(saved, EOT_TOKEN, Some(PAD_TOKEN), true, Self::NAME).map(Bpe)
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.0.encode(text)
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.0.decode(ids)
    }

    fn vocab_size(&self) -> usize {
        self.0.vocab_size()
    }

    fn eot_id(&self) -> u32 {
        self.0.eot_id()
    }

    fn pad_id(&self) -> Option<u32> {
        self.0.pad_id()
    }

    fn to_json(&self) -> Result<Option<String>> {
        self.0.to_json().map(Some)
    }
}

fn train(p: &BpeParams, corpus: &[&str]) -> Result<Loaded> {
    let specials = vec![
        AddedToken::from(EOT_TOKEN, true),
        AddedToken::from(PAD_TOKEN, true),
    ];
    let mut trainer = TrainerWrapper::BpeTrainer(
        BpeTrainerBuilder::new()
            .vocab_size(p.vocab_size)
            .min_frequency(p.min_frequency)
            .show_progress(false)
            .special_tokens(specials)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build(),
    );
    let byte_level = ByteLevel::default().add_prefix_space(false);
    let mut tokenizer = tokenizers::Tokenizer::new(BPE::default());
    tokenizer
        .with_pre_tokenizer(Some(byte_level))
        .with_post_processor(Some(byte_level))
        .with_decoder(Some(byte_level));
    tokenizer
        .train(&mut trainer, corpus.iter().copied())
        .map_err(|e| Error::msg(format!("training failed: {e}")))?;
    let pad_id = tokenizer
        .token_to_id(PAD_TOKEN)
        .ok_or_else(|| Error::msg(format!("training produced no {PAD_TOKEN} token")))?;
    // Recorded in tokenizer.json so that `hf` finds the padding token when it reloads
    // the file; "longest in the batch" never pads a single encoding.
    tokenizer.with_padding(Some(PaddingParams {
        pad_id,
        pad_token: PAD_TOKEN.to_string(),
        ..PaddingParams::default()
    }));
    Loaded::new(
        tokenizer,
        EOT_TOKEN,
        Some(PAD_TOKEN),
        true,
        "the trained bpe".to_string(),
    )
}
