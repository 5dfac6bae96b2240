//! `hf`: any Hugging Face `tokenizer.json`, plus [`Loaded`], the wrapper `bpe` shares.
//!
//! The file is used as written, except for what the parameters ask for (extra special
//! tokens, padding, truncation). The end-of-text token must exist, because the data
//! pipeline cannot join documents without it; the error lists the file's special tokens so
//! the user can pick the right one.

use std::path::{Path, PathBuf};

use codex_plugin_api::{bail, Describe, Error, Result, Tokenizer};
use serde::Deserialize;
use tokenizers::{AddedToken, PaddingDirection, PaddingParams, PaddingStrategy, TruncationParams};

use crate::{params, EOT_TOKEN};

/// A Hugging Face tokenizer with the ids the pipeline needs resolved once.
pub(crate) struct Loaded {
    inner: tokenizers::Tokenizer,
    eot_id: u32,
    pad_id: Option<u32>,
    /// One past the largest id: the size of an embedding table that covers every id
    /// (added tokens may leave gaps, so this can exceed the number of tokens).
    vocab_size: usize,
    /// Where it came from, for error messages.
    origin: String,
}

impl Loaded {
    /// Parse a saved `tokenizer.json` (what [`Loaded::to_json`] wrote for a run) and wrap it.
    pub(crate) fn restore(
        saved: &str,
        eot_token: &str,
        pad_token: Option<&str>,
        component: &str,
    ) -> Result<Loaded> {
        let origin = format!("the `{component}` tokenizer saved with the run");
        let inner = parse_json(saved)
            .map_err(|e| Error::msg(format!("{origin} is not a valid tokenizer.json: {e}")))?;
        Loaded::new(inner, eot_token, pad_token, origin)
    }

    /// Wrap `inner`; `eot_token` and `pad_token` must be in its vocabulary.
    pub(crate) fn new(
        mut inner: tokenizers::Tokenizer,
        eot_token: &str,
        pad_token: Option<&str>,
        origin: String,
    ) -> Result<Loaded> {
        // Documents are text, never markup: a document spelling `<|endoftext|>` must not
        // produce the boundary id. This flag is runtime-only (not in tokenizer.json), so it
        // is set on every load.
        inner.set_encode_special_tokens(true);
        let eot_id = lookup(&inner, eot_token, "eot_token", &origin)?;
        let pad_id = match pad_token {
            Some(t) => Some(lookup(&inner, t, "pad_token", &origin)?),
            None => inner.get_padding().map(|p| p.pad_id),
        };
        let vocab_size = inner
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&m| m as usize + 1);
        Ok(Loaded {
            inner,
            eot_id,
            pad_id,
            vocab_size,
            origin,
        })
    }

    pub(crate) fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::msg(format!("{}: cannot encode text: {e}", self.origin)))?;
        Ok(encoding.get_ids().to_vec())
    }

    pub(crate) fn decode(&self, ids: &[u32]) -> Result<String> {
        // The library silently drops ids it does not know; a wrong id is a bug upstream
        // (a model with a larger vocabulary, a stale checkpoint) and must not vanish.
        if let Some(bad) = ids.iter().find(|&&id| self.inner.id_to_token(id).is_none()) {
            bail!(
                "id {bad} is not in the vocabulary of {} ({} ids): check that the model and \
                 the tokenizer belong together",
                self.origin,
                self.vocab_size
            );
        }
        self.inner
            .decode(ids, true)
            .map_err(|e| Error::msg(format!("{}: cannot decode ids: {e}", self.origin)))
    }

    pub(crate) fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub(crate) fn eot_id(&self) -> u32 {
        self.eot_id
    }

    pub(crate) fn pad_id(&self) -> Option<u32> {
        self.pad_id
    }

    pub(crate) fn to_json(&self) -> Result<String> {
        self.inner
            .to_string(true)
            .map_err(|e| Error::msg(format!("{}: cannot serialise tokenizer: {e}", self.origin)))
    }
}

/// Parse a `tokenizer.json`. Its JSON syntax is checked first: tokenizers 0.23 panics, rather
/// than returning an error, on a syntax error inside the `decoder` object (found by the
/// `tokenizer_json` fuzz target; its input is in tests/fixtures/fuzz/tokenizer_json/).
fn parse_json(text: &str) -> std::result::Result<tokenizers::Tokenizer, String> {
    serde_json::from_str::<serde::de::IgnoredAny>(text).map_err(|e| e.to_string())?;
    text.parse().map_err(|e: tokenizers::Error| e.to_string())
}

fn lookup(inner: &tokenizers::Tokenizer, token: &str, field: &str, origin: &str) -> Result<u32> {
    if let Some(id) = inner.token_to_id(token) {
        return Ok(id);
    }
    let mut specials: Vec<String> = inner
        .get_added_tokens_decoder()
        .into_values()
        .filter(|t| t.special)
        .map(|t| format!("{:?}", t.content))
        .collect();
    specials.sort();
    let known = if specials.is_empty() {
        "it has no special tokens".to_string()
    } else {
        format!("its special tokens are {}", specials.join(", "))
    };
    bail!(
        "{field} {token:?} is not in the vocabulary of {origin}: {known}; set `{field}` to one \
         of them, or list {token:?} in `add_special_tokens` to add it"
    )
}

/// Which side `hf` pads batches on.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum PaddingSide {
    Right,
    Left,
}

/// Truncation of every encoding.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Truncation {
    /// Keep at most this many ids of each encoded text (the end is cut). Required.
    max_length: usize,
}

/// The parameters of `hf`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HfParams {
    /// The `tokenizer.json`, relative to the config's directory. Required.
    path: String,
    /// The token that separates documents. Default: `<|endoftext|>`.
    #[serde(default = "default_eot")]
    eot_token: String,
    /// The padding token. Default: the one in the file's `padding` section, else none.
    #[serde(default)]
    pad_token: Option<String>,
    /// `right` or `left`. Default: the file's, else `right`. Needs a padding token.
    #[serde(default)]
    padding_side: Option<PaddingSide>,
    /// Truncation. Default: the file's, else none.
    #[serde(default)]
    truncation: Option<Truncation>,
    /// Special tokens added to the vocabulary (ids after the existing ones). Default: none.
    #[serde(default)]
    add_special_tokens: Vec<String>,
}

fn default_eot() -> String {
    EOT_TOKEN.to_string()
}

/// Any Hugging Face `tokenizer.json`.
pub(crate) struct Hf(Loaded);

impl Describe for Hf {
    const NAME: &'static str = "hf";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "any Hugging Face tokenizer.json (BPE, WordPiece, Unigram)";

    fn check_params(params: &str) -> codex_plugin_api::Result<()> {
        codex_plugin_api::strict::parse_params::<HfParams>(params).map(drop)
    }
}

fn resolve(base_dir: &str, path: &str) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() || base_dir.is_empty() {
        p.to_path_buf()
    } else {
        Path::new(base_dir).join(p)
    }
}

impl Tokenizer for Hf {
    fn create(params: &str, base_dir: &str, _corpus: &[&str]) -> Result<Self> {
        let p: HfParams = params::parse(Self::NAME, params)?;
        let path = resolve(base_dir, &p.path);
        let shown = path.display().to_string();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "tokenizer file {shown} not found: set `path` to a tokenizer.json (relative \
                 paths start at the config's directory)"
            ),
            Err(e) => bail!("cannot read tokenizer file {shown}: {e}"),
        };
        let mut inner = parse_json(&text).map_err(|e| {
            Error::msg(format!(
                "{shown}: not a valid tokenizer.json: {e}: point `path` at a file saved by \
                 Hugging Face tokenizers"
            ))
        })?;
        if !p.add_special_tokens.is_empty() {
            let added: Vec<AddedToken> = p
                .add_special_tokens
                .iter()
                .map(|t| AddedToken::from(t.clone(), true))
                .collect();
            inner
                .add_special_tokens(added)
                .map_err(|e| Error::msg(format!("{shown}: cannot add special tokens: {e}")))?;
        }
        configure_padding(&mut inner, p.pad_token.as_deref(), p.padding_side, &shown)?;
        if let Some(t) = &p.truncation {
            if t.max_length == 0 {
                bail!("truncation.max_length must be at least 1, found 0");
            }
            inner
                .with_truncation(Some(TruncationParams {
                    max_length: t.max_length,
                    ..TruncationParams::default()
                }))
                .map_err(|e| Error::msg(format!("truncation: {e}")))?;
        }
        let pad_token = p.pad_token.as_deref();
        Ok(Hf(Loaded::new(inner, &p.eot_token, pad_token, shown)?))
    }

    /// The saved form already holds the added tokens, padding and truncation the parameters
    /// asked for; the file at `path` may have changed since.
    fn restore(params: &str, _base_dir: &str, saved: &str) -> Result<Self> {
        let p: HfParams = params::parse(Self::NAME, params)?;
        Loaded::restore(saved, &p.eot_token, p.pad_token.as_deref(), Self::NAME).map(Hf)
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

/// Padding lives in the tokenizer itself so that `to_json` carries it into the run
/// directory. The strategy is "longest in the batch", so encoding one text never pads.
fn configure_padding(
    inner: &mut tokenizers::Tokenizer,
    pad_token: Option<&str>,
    side: Option<PaddingSide>,
    shown: &str,
) -> Result<()> {
    let direction = side.map(|s| match s {
        PaddingSide::Right => PaddingDirection::Right,
        PaddingSide::Left => PaddingDirection::Left,
    });
    match pad_token {
        Some(token) => {
            let Some(pad_id) = inner.token_to_id(token) else {
                // Reported with the list of special tokens by `Loaded::new`.
                return Ok(());
            };
            let previous = inner.get_padding().cloned().unwrap_or_default();
            inner.with_padding(Some(PaddingParams {
                strategy: PaddingStrategy::BatchLongest,
                direction: direction.unwrap_or(previous.direction),
                pad_id,
                pad_token: token.to_string(),
                ..previous
            }));
        }
        None => {
            if let Some(direction) = direction {
                match inner.get_padding_mut() {
                    Some(p) => p.direction = direction,
                    None => bail!(
                        "padding_side needs a padding token, and {shown} defines none: set \
                         `pad_token` too"
                    ),
                }
            }
        }
    }
    // A file may ask for fixed-length padding; encoding one document must never pad (the
    // pipeline pads windows itself, with targets it can ignore), so only the batch-longest
    // strategy is kept.
    if let Some(p) = inner.get_padding_mut() {
        p.strategy = PaddingStrategy::BatchLongest;
        p.pad_to_multiple_of = None;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// tokenizers 0.23 panics on this (a syntax error inside `decoder`); loading must fail
    /// with the parser's message instead.
    #[test]
    fn a_syntax_error_in_the_decoder_is_an_error_not_a_panic() {
        let text = r#"{"version": "1.0", "decoder": {"type": "ByteLevel", "x"}}"#;
        let error = super::parse_json(text).expect_err("not JSON");
        assert!(error.contains("expected `:`"), "{error}");
    }
}
