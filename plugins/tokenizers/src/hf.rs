//! `hf`: any Hugging Face `tokenizer.json`, plus [`Loaded`], the wrapper `bpe` shares.
//!
//! The file is used as written, except for what the parameters ask for (extra special tokens,
//! the padding token, the bos/eos template of `tokenizer_config.json`, whether special-token
//! text is text) and its `truncation` section, which is dropped: documents are split into
//! windows, never cut. The end-of-text token must exist, because the data pipeline cannot join
//! documents without it; the error lists the file's special tokens so the user can pick the
//! right one.
//!
//! Encoding applies the file's post-processor, as transformers' `tokenizer(text)` does: a
//! LLaMA-3 `tokenizer.json` adds its bos token to every document. `add_bos_token` and
//! `add_eos_token` replace that template the way transformers does when `tokenizer_config.json`
//! sets either of them.

use std::path::{Path, PathBuf};

use codex_plugin_api::{bail, Describe, Error, Result, Tokenizer};
use serde::Deserialize;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PaddingParams, PaddingStrategy};

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
        split_special_tokens: bool,
        component: &str,
    ) -> Result<Loaded> {
        let origin = format!("the `{component}` tokenizer saved with the run");
        let inner = parse_json(saved)
            .map_err(|e| Error::msg(format!("{origin} is not a valid tokenizer.json: {e}")))?;
        Loaded::new(inner, eot_token, pad_token, split_special_tokens, origin)
    }

    /// Wrap `inner`; `eot_token` and `pad_token` must be in its vocabulary. With
    /// `split_special_tokens`, text that spells a special token is encoded as text.
    pub(crate) fn new(
        mut inner: tokenizers::Tokenizer,
        eot_token: &str,
        pad_token: Option<&str>,
        split_special_tokens: bool,
        origin: String,
    ) -> Result<Loaded> {
        // By default documents are text, never markup: a document spelling `<|endoftext|>`
        // must not produce the boundary id. This flag is runtime-only (not in
        // tokenizer.json), so it is set on every load.
        inner.set_encode_special_tokens(split_special_tokens);
        // A saved file may ask for truncation; the pipeline splits documents into windows
        // instead, so no text is ever cut.
        inner
            .with_truncation(None)
            .map_err(|e| Error::msg(format!("{origin}: {e}")))?;
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
            .encode(text, true)
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

/// The parameters of `hf`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HfParams {
    /// The `tokenizer.json`, relative to the config's directory. Required.
    path: String,
    /// The token that separates documents, appended to each one. Default: `<|endoftext|>`.
    #[serde(default = "default_eot")]
    eot_token: String,
    /// The token of padding positions (the tail of the last validation window): their
    /// targets are ignored, so it never changes a loss. Default: the one in the file's
    /// `padding` section, else `eot_token`.
    #[serde(default)]
    pad_token: Option<String>,
    /// `true` encodes text that spells a special token (`<|endoftext|>` inside a document) as
    /// plain text, so training data can never inject a boundary; `false` turns it into the
    /// special token, as transformers' tokenizers do by default. Default: `true`.
    #[serde(default = "default_true")]
    split_special_tokens: bool,
    /// Add `bos_token` before every text, as `tokenizer_config.json`'s `add_bos_token`: when
    /// this or `add_eos_token` is set, the two replace the file's post-processor, as in
    /// transformers. Default: unset, the file's post-processor decides.
    #[serde(default)]
    add_bos_token: Option<bool>,
    /// Add `eot_token` after every text, as `tokenizer_config.json`'s `add_eos_token` (a
    /// document already ending with it gets no second one). Default: unset.
    #[serde(default)]
    add_eos_token: Option<bool>,
    /// The token `add_bos_token` adds. Required with `add_bos_token: true`.
    #[serde(default)]
    bos_token: Option<String>,
    /// Special tokens added to the vocabulary (ids after the existing ones). Default: none.
    #[serde(default)]
    add_special_tokens: Vec<String>,
    /// Refused: windows are padded on the right only, where causal attention cannot see the
    /// padding, so a side has no effect.
    #[serde(default)]
    padding_side: Option<serde::de::IgnoredAny>,
    /// Refused: documents are split into windows, never cut.
    #[serde(default)]
    truncation: Option<serde::de::IgnoredAny>,
}

fn default_true() -> bool {
    true
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
        refuse_meaningless(&codex_plugin_api::strict::parse_params::<HfParams>(params)?)
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
        configure_padding(&mut inner, p.pad_token.as_deref());
        configure_template(&mut inner, &p, &shown)?;
        let pad_token = p.pad_token.as_deref();
        let split = p.split_special_tokens;
        Ok(Hf(Loaded::new(
            inner,
            &p.eot_token,
            pad_token,
            split,
            shown,
        )?))
    }

    /// The saved form already holds the added tokens, padding and truncation the parameters
    /// asked for; the file at `path` may have changed since.
    fn restore(params: &str, _base_dir: &str, saved: &str) -> Result<Self> {
        let p: HfParams = params::parse(Self::NAME, params)?;
        let (eot, pad) = (&p.eot_token, p.pad_token.as_deref());
        Loaded::restore(saved, eot, pad, p.split_special_tokens, Self::NAME).map(Hf)
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

/// Padding lives in the tokenizer itself so that `to_json` carries the padding token into the
/// run directory. The strategy is "longest in the batch", so encoding one text never pads.
fn configure_padding(inner: &mut tokenizers::Tokenizer, pad_token: Option<&str>) {
    if let Some(token) = pad_token {
        // An unknown token is reported with the list of special tokens by `Loaded::new`.
        if let Some(pad_id) = inner.token_to_id(token) {
            let previous = inner.get_padding().cloned().unwrap_or_default();
            inner.with_padding(Some(PaddingParams {
                pad_id,
                pad_token: token.to_string(),
                ..previous
            }));
        }
    }
    // A file may ask for fixed-length padding; encoding one document must never pad (the
    // pipeline pads windows itself, with targets it can ignore), so only the batch-longest
    // strategy is kept.
    if let Some(p) = inner.get_padding_mut() {
        p.strategy = PaddingStrategy::BatchLongest;
        p.pad_to_multiple_of = None;
    }
}

/// Refuse the settings that mean nothing for training windows.
fn refuse_meaningless(p: &HfParams) -> Result<()> {
    if p.padding_side.is_some() {
        bail!(
            "padding_side has no effect in codex-ml: windows are padded on the right only, \
             where causal attention never sees the padding and its targets are ignored; remove \
             `padding_side` (an exported tokenizer.json keeps the file's own padding side)"
        );
    }
    if p.truncation.is_some() {
        bail!(
            "truncation is not applied to training text: a document longer than a window is \
             split into windows, so no token is dropped; remove `truncation` (the file's own \
             truncation section is ignored for the same reason)"
        );
    }
    Ok(())
}

/// Refuse the settings that mean nothing here, and replace the post-processor with a bos/eos
/// template when `add_bos_token` or `add_eos_token` is set, as transformers does.
fn configure_template(inner: &mut tokenizers::Tokenizer, p: &HfParams, shown: &str) -> Result<()> {
    refuse_meaningless(p)?;
    if p.add_bos_token.is_none() && p.add_eos_token.is_none() {
        return Ok(());
    }
    let id_of = |field: &str, token: &str| {
        inner.token_to_id(token).ok_or_else(|| {
            Error::msg(format!(
                "{field} {token:?} is not in the vocabulary of {shown}: set `{field}` to one of \
                 its tokens"
            ))
        })
    };
    let mut single = Vec::new();
    let mut specials = Vec::new();
    if p.add_bos_token == Some(true) {
        let Some(bos) = &p.bos_token else {
            bail!("add_bos_token needs the token to add: set `bos_token` too");
        };
        specials.push((bos.clone(), id_of("bos_token", bos)?));
        single.push(format!("{bos}:0"));
    }
    single.push("$A:0".to_string());
    if p.add_eos_token == Some(true) {
        specials.push((p.eot_token.clone(), id_of("eot_token", &p.eot_token)?));
        single.push(format!("{}:0", p.eot_token));
    }
    let pair: Vec<String> = single
        .iter()
        .cloned()
        .chain(
            single
                .iter()
                .map(|piece| piece.replace(":0", ":1").replace("$A", "$B")),
        )
        .collect();
    let template = TemplateProcessing::builder()
        .try_single(single)
        .and_then(|b| b.try_pair(pair))
        .map_err(|e| Error::msg(format!("{shown}: cannot build the bos/eos template: {e}")))?
        .special_tokens(specials)
        .build()
        .map_err(|e| Error::msg(format!("{shown}: cannot build the bos/eos template: {e}")))?;
    inner.with_post_processor(Some(template));
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
