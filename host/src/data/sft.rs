//! Supervised fine-tuning examples → token ids, each marked with whether it carries the loss.
//!
//! Examples are read by [`super::source`] as documents whose text is the example's JSON
//! (`{"messages": [...]}` or `{"prompt": ..., "completion": ...}`), so the validation split
//! and the token cache treat them by content like any document. Here they are tokenized as
//! TRL's `SFTTrainer` tokenizes them:
//!
//! - a conversation is rendered by the chat template ([`super::chat`]) and the text encoded
//!   with special tokens parsed and none added (`apply_chat_template(tokenize=True)`); with
//!   `assistant_only_loss` the loss is on the tokens the template's `{% generation %}` blocks
//!   cover, found as transformers finds them (the token holding a block's first character
//!   through the one holding its last), or, with a template that has no such blocks, on each
//!   assistant message and its end-of-turn text, found by rendering the conversation before
//!   and through it;
//! - a prompt/completion pair of strings is encoded as `prompt` and as `prompt + completion`
//!   (the completion ending in the end-of-sequence token, added when missing), both with the
//!   tokenizer's own special tokens; one of lists of messages is rendered as the prompt with
//!   the generation prompt and as the whole conversation. With `completion_only_loss` the
//!   loss is on the tokens after the prompt's.
//!
//! Encoding goes through the tokenizer's `tokenizer.json` with the Hugging Face library
//! itself, because a chat template writes special tokens as text (`<|im_start|>`) that must
//! become their ids, and because finding the assistant's tokens needs each token's offsets;
//! so supervised fine-tuning needs a tokenizer that has a `tokenizer.json` (`hf`, `bpe`).
//!
//! An example is stored in the token stream as its length followed by its ids, each with
//! [`LEARN`] set when the loss counts it as a target.

use std::path::{Path, PathBuf};

use abi_stable::std_types::RResult;
use codex_plugin_api::tokenizer::TokenizerBox;
use rayon::prelude::*;
use serde::Serialize;
use serde_json::Value as Json;

use super::chat::{self, ChatTemplate, Rendered};
use super::config::{DataConfig, Overlong, Sft, Source};
use super::error::DataError;
use super::source::Document;

/// The canonical field of a conversation in an example's document.
pub(crate) const MESSAGES: &str = "messages";
/// The canonical field of a prompt.
pub(crate) const PROMPT: &str = "prompt";
/// The canonical field of a completion.
pub(crate) const COMPLETION: &str = "completion";

/// Set on an id in the stream when the loss counts it as a target.
pub const LEARN: u32 = 1 << 31;

/// Byte offsets `(start, end)` of a token in the text it came from.
type Span = (usize, usize);

/// One tokenized example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// The ids.
    pub ids: Vec<u32>,
    /// Per id, whether the loss counts it as a target.
    pub learn: Vec<bool>,
}

/// How examples become ids: the tokenizer's `tokenizer.json`, the chat template, the settings.
pub struct SftEncoder {
    inner: tokenizers::Tokenizer,
    vocab: usize,
    eos: String,
    template: Option<ChatTemplate>,
    /// Why there is no template, when there is none.
    no_template: String,
    settings: Sft,
}

impl std::fmt::Debug for SftEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SftEncoder")
            .field(
                "template",
                &self.template.as_ref().map(ChatTemplate::origin),
            )
            .field("settings", &self.settings)
            .finish()
    }
}

/// The directory of the `hf` tokenizer's `tokenizer.json`, from its parameters.
pub fn tokenizer_dir(name: &str, params: &serde_json::Value) -> Option<PathBuf> {
    if name != "hf" {
        return None;
    }
    let path = Path::new(params.get("path")?.as_str()?);
    path.parent().map(Path::to_path_buf)
}

impl SftEncoder {
    /// The encoder of `config`'s examples with `tokenizer`, whose `tokenizer.json` lives in
    /// `tokenizer_dir` when known (where its chat template is looked for).
    pub fn new(
        config: &DataConfig,
        tokenizer: &TokenizerBox,
        tokenizer_dir: Option<&Path>,
    ) -> Result<Self, DataError> {
        Self::build(
            config,
            tokenizer,
            load_template(&config.sft, tokenizer_dir)?,
        )
    }

    /// The encoder of a run resumed or evaluated from `checkpoint`: with the chat template the
    /// checkpoint keeps ([`chat::SAVED_FILE`]) when it has one, else as [`SftEncoder::new`].
    pub fn restored(
        config: &DataConfig,
        tokenizer: &TokenizerBox,
        tokenizer_dir: Option<&Path>,
        checkpoint: &Path,
    ) -> Result<Self, DataError> {
        let path = checkpoint.join(chat::SAVED_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Self::new(config, tokenizer, tokenizer_dir)
            }
            Err(e) => {
                return Err(DataError::Setting {
                    field: "chat template",
                    message: format!("reading {}: {e}", path.display()),
                })
            }
        };
        let template =
            ChatTemplate::from_saved(&text, &path).map_err(|message| DataError::Setting {
                field: "chat template",
                message,
            })?;
        Self::build(config, tokenizer, (Some(template), String::new()))
    }

    /// The encoder with `template`, or without one for the reason given.
    fn build(
        config: &DataConfig,
        tokenizer: &TokenizerBox,
        (template, no_template): (Option<ChatTemplate>, String),
    ) -> Result<Self, DataError> {
        let json = match tokenizer.to_json() {
            RResult::ROk(json) => json.into_option(),
            RResult::RErr(e) => return Err(DataError::Tokenizer(e.message.into_string())),
        };
        let Some(json) = json else {
            return Err(DataError::Setting {
                field: "tokenizer",
                message: "supervised fine-tuning data (`Chat`, `PromptCompletion`) needs a \
                          tokenizer with a tokenizer.json: use `hf` (or `bpe`)"
                    .to_string(),
            });
        };
        let mut inner: tokenizers::Tokenizer = json
            .parse()
            .map_err(|e: tokenizers::Error| DataError::Tokenizer(e.to_string()))?;
        // Rows are cut and padded by the batches, which count what they cut.
        inner
            .with_truncation(None)
            .map_err(|e| DataError::Tokenizer(e.to_string()))?;
        inner.with_padding(None);
        let eot = tokenizer.eot_id();
        let eos = inner
            .id_to_token(eot)
            .ok_or_else(|| DataError::Tokenizer(format!("end-of-text id {eot} has no token")))?;
        let chat_sources = config
            .train
            .iter()
            .chain(&config.val)
            .any(|s| matches!(s, Source::Chat { .. }));
        if chat_sources && template.is_none() {
            return Err(DataError::Setting {
                field: "data.sft.chat_template",
                message: format!(
                    "`Chat` sources need a chat template, and {no_template}: set \
                     `data.sft.chat_template` to a Jinja file (or a tokenizer_config.json that \
                     has one)"
                ),
            });
        }
        Ok(SftEncoder {
            vocab: tokenizer.vocab_size(),
            inner,
            eos,
            template,
            no_template,
            settings: config.sft.clone(),
        })
    }

    /// The chat template, if there is one.
    pub fn template(&self) -> Option<&ChatTemplate> {
        self.template.as_ref()
    }

    /// What besides the documents and the tokenizer decides the ids: for the cache key.
    pub fn settings_key(&self) -> String {
        serde_json::json!({
            "template": self.template.as_ref().map(ChatTemplate::source),
            "specials": self.template.as_ref().map(ChatTemplate::specials),
            "eos": self.eos,
            "assistant_only_loss": self.settings.assistant_only_loss,
            "completion_only_loss": self.settings.completion_only_loss,
        })
        .to_string()
    }

    /// Encode every example, in parallel, into one stream (each: length, then ids with
    /// [`LEARN`]).
    pub fn encode_all(&self, docs: &[Document]) -> Result<Vec<u32>, DataError> {
        let examples: Vec<Example> = docs
            .par_iter()
            .map(|doc| self.encode(doc))
            .collect::<Result<_, _>>()?;
        let mut stream = Vec::with_capacity(examples.iter().map(|e| e.ids.len() + 1).sum());
        for e in examples {
            stream.push(e.ids.len() as u32);
            stream.extend(
                e.ids
                    .iter()
                    .zip(&e.learn)
                    .map(|(&id, &learn)| if learn { id | LEARN } else { id }),
            );
        }
        Ok(stream)
    }

    /// Encode one example.
    pub fn encode(&self, doc: &Document) -> Result<Example, DataError> {
        let record = |message: String| DataError::Tokenize {
            origin: doc.origin.clone(),
            message,
        };
        let value: Json =
            serde_json::from_str(&doc.text).map_err(|e| record(format!("not an example: {e}")))?;
        let example = if let Some(messages) = value.get(MESSAGES) {
            let only = self.settings.assistant_only_loss;
            let rendered = if only {
                self.render_assistant(doc, messages)?
            } else {
                self.render(doc, messages, false)?
            };
            let (ids, offsets) = self.ids(&rendered.text, false, doc)?;
            let learn = if only {
                assistant_mask(&rendered, &offsets)
            } else {
                vec![true; ids.len()]
            };
            Example { ids, learn }
        } else {
            let (Some(prompt), Some(completion)) = (value.get(PROMPT), value.get(COMPLETION))
            else {
                return Err(record("neither messages nor prompt and completion".into()));
            };
            let (prompt_ids, ids) = match (prompt, completion) {
                (Json::String(p), Json::String(c)) => {
                    let mut c = c.clone();
                    if !c.ends_with(&self.eos) {
                        c.push_str(&self.eos);
                    }
                    (
                        self.ids(p, true, doc)?.0,
                        self.ids(&format!("{p}{c}"), true, doc)?.0,
                    )
                }
                (Json::Array(p), Json::Array(c)) => {
                    let whole = Json::Array(p.iter().chain(c).cloned().collect());
                    let prompt_text = self.render(doc, prompt, true)?.text;
                    let whole_text = self.render(doc, &whole, false)?.text;
                    (
                        self.ids(&prompt_text, false, doc)?.0,
                        self.ids(&whole_text, false, doc)?.0,
                    )
                }
                _ => return Err(record("prompt and completion of different kinds".into())),
            };
            if !ids.starts_with(&prompt_ids) {
                tracing::warn!(
                    "{}: the prompt's tokens are not the start of the prompt and completion's \
                     (the tokenizer merges across the boundary): the loss starts after the \
                     prompt's token count, as TRL does",
                    doc.origin
                );
            }
            let split = prompt_ids.len().min(ids.len());
            let learn = (0..ids.len())
                .map(|i| !self.settings.completion_only_loss || i >= split)
                .collect();
            Example { ids, learn }
        };
        if let Some(bad) = example.ids.iter().find(|&&id| id as usize >= self.vocab) {
            return Err(record(format!(
                "id {bad} is outside the vocabulary ({} ids)",
                self.vocab
            )));
        }
        Ok(example)
    }

    /// The ids of `text` as examples are encoded: special tokens parsed, and the
    /// tokenizer's own added when `add_special`.
    pub fn text_ids(&self, text: &str, add_special: bool) -> Result<Vec<u32>, DataError> {
        let doc = Document {
            origin: "text".to_string(),
            text: String::new(),
        };
        Ok(self.ids(text, add_special, &doc)?.0)
    }

    fn render(&self, doc: &Document, messages: &Json, gen: bool) -> Result<Rendered, DataError> {
        let Some(template) = &self.template else {
            return Err(DataError::Render {
                origin: doc.origin.clone(),
                message: format!(
                    "a conversation needs a chat template, and {}: set \
                     `data.sft.chat_template`",
                    self.no_template
                ),
            });
        };
        template
            .render(messages, gen)
            .map_err(|message| DataError::Render {
                origin: doc.origin.clone(),
                message,
            })
    }

    /// `messages` rendered with the assistant's text found ([`ChatTemplate::render_assistant`]).
    fn render_assistant(&self, doc: &Document, messages: &Json) -> Result<Rendered, DataError> {
        let Some(template) = &self.template else {
            return self.render(doc, messages, false);
        };
        template
            .render_assistant(messages)
            .map_err(|message| DataError::Render {
                origin: doc.origin.clone(),
                message,
            })
    }

    /// Ids and byte offsets of `text`, special tokens parsed; `add_special` adds the
    /// tokenizer's own (its post-processor's beginning-of-sequence token, say).
    fn ids(
        &self,
        text: &str,
        add_special: bool,
        doc: &Document,
    ) -> Result<(Vec<u32>, Vec<Span>), DataError> {
        let encoding = self
            .inner
            .encode(text, add_special)
            .map_err(|e| DataError::Tokenize {
                origin: doc.origin.clone(),
                message: e.to_string(),
            })?;
        if encoding.get_ids().iter().any(|&id| id & LEARN != 0) {
            return Err(DataError::Tokenize {
                origin: doc.origin.clone(),
                message: "an id of 2^31 or more".to_string(),
            });
        }
        Ok((encoding.get_ids().to_vec(), encoding.get_offsets().to_vec()))
    }
}

/// The chat template `settings` name, else the tokenizer's own; `None` with the reason when
/// there is none.
fn load_template(
    settings: &Sft,
    tokenizer_dir: Option<&Path>,
) -> Result<(Option<ChatTemplate>, String), DataError> {
    let (file, field) = match (&settings.chat_template, tokenizer_dir) {
        (Some(file), _) => (PathBuf::from(file), "data.sft.chat_template"),
        (None, Some(dir)) => match chat::find_in(dir) {
            Some(file) => (file, "tokenizer"),
            None => {
                return Ok((
                    None,
                    format!(
                        "the tokenizer's directory {} has neither chat_template.jinja nor \
                         tokenizer_config.json",
                        dir.display()
                    ),
                ))
            }
        },
        (None, None) => {
            return Ok((
                None,
                "the tokenizer is not an `hf` tokenizer.json with a directory to look in"
                    .to_string(),
            ))
        }
    };
    let bad = |message: String| DataError::Setting {
        field,
        message: format!("{}: {message}", file.display()),
    };
    if settings.chat_template.is_some() && !file.is_file() {
        return Err(DataError::MissingFile { path: file });
    }
    let Some(source) = chat::read_template(&file).map_err(bad)? else {
        return Ok((None, format!("{} has no `chat_template`", file.display())));
    };
    let specials = match tokenizer_dir {
        Some(dir) => chat::read_specials(dir).map_err(|message| DataError::Setting {
            field: "tokenizer",
            message,
        })?,
        None => serde_json::Map::new(),
    };
    let template = ChatTemplate::new(&source, file.display().to_string(), specials)
        .map_err(|message| DataError::Setting { field, message })?;
    Ok((Some(template), String::new()))
}

/// Which ids the template's generation blocks cover, as transformers' `apply_chat_template`
/// with `return_assistant_tokens_mask` finds them: from the token holding a block's first
/// byte through the one holding its last (to the end when that one has none), stopping at a
/// block whose first byte no token holds.
pub fn assistant_mask(rendered: &Rendered, offsets: &[(usize, usize)]) -> Vec<bool> {
    let token_at = |byte: usize| offsets.iter().position(|&(s, e)| s <= byte && byte < e);
    let mut mask = vec![false; offsets.len()];
    for span in &rendered.assistant {
        let Some(first) = token_at(span.start) else {
            break;
        };
        let last = match token_at(span.end - 1) {
            Some(last) if last > 0 => last + 1,
            _ => offsets.len(),
        };
        for m in &mut mask[first..last.max(first)] {
            *m = true;
        }
    }
    mask
}

/// What fitting examples into rows did: cut or left out, counted, a few named.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SftReport {
    /// Examples.
    pub examples: usize,
    /// Examples longer than a row, cut to its length.
    pub truncated: usize,
    /// Tokens those lost.
    pub truncated_tokens: u64,
    /// Examples left out because no token of theirs carries the loss (within the row).
    pub without_targets: usize,
    /// The first few examples cut or left out (`path:line`), each once.
    pub examples_named: Vec<String>,
}

/// The examples of a stream, as (start, length) of their ids, cut to `max_len` ids and
/// without those that keep no target, with what that did. `origins` are the documents the
/// examples came from, in order, for messages.
pub fn fit_examples(
    stream: &[u32],
    max_len: usize,
    overlong: Overlong,
    origins: &[String],
) -> Result<(Vec<(usize, usize)>, SftReport), DataError> {
    let mut report = SftReport::default();
    let mut rows = Vec::new();
    let mut at = 0usize;
    let mut index = 0usize;
    let origin = |i: usize| {
        origins
            .get(i)
            .cloned()
            .unwrap_or_else(|| format!("example {i}"))
    };
    while at < stream.len() {
        let len = stream[at] as usize;
        let start = at + 1;
        let end = start + len;
        if end > stream.len() {
            return Err(DataError::Tokenizer(
                "the token cache's example stream is cut short".to_string(),
            ));
        }
        report.examples += 1;
        let mut kept = len;
        if len > max_len {
            if overlong == Overlong::Error {
                return Err(DataError::Overlong {
                    origin: origin(index),
                    tokens: len,
                    max: max_len,
                });
            }
            kept = max_len;
            report.truncated += 1;
            report.truncated_tokens += (len - max_len) as u64;
            if report.examples_named.len() < 5 {
                report.examples_named.push(origin(index));
            }
        }
        // Token 0 is never a target.
        let targets = stream[start..start + kept]
            .iter()
            .skip(1)
            .filter(|&&id| id & LEARN != 0)
            .count();
        if targets == 0 {
            report.without_targets += 1;
            if report.examples_named.len() < 5
                && report.examples_named.last() != Some(&origin(index))
            {
                report.examples_named.push(origin(index));
            }
        } else {
            rows.push((start, kept));
        }
        at = end;
        index += 1;
    }
    Ok((rows, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One byte range, as a list.
    fn one(start: usize, end: usize) -> Vec<std::ops::Range<usize>> {
        std::iter::once(start..end).collect()
    }

    #[test]
    fn the_mask_runs_from_the_first_to_the_last_token_of_each_block() {
        let rendered = Rendered {
            text: "ab cd ef".into(),
            assistant: one(3, 5),
        };
        // tokens: "ab", " cd", " ef"
        let offsets = [(0, 2), (2, 5), (5, 8)];
        assert_eq!(assistant_mask(&rendered, &offsets), [false, true, false]);
        let tail = Rendered {
            text: "ab cd ef".into(),
            assistant: one(6, 8),
        };
        assert_eq!(assistant_mask(&tail, &offsets), [false, false, true]);
    }

    #[test]
    fn examples_are_cut_counted_or_refused() {
        let l = LEARN;
        // Three examples: 3 ids (2 learnable), 5 ids (learnable at the end), 2 ids (none).
        let stream = [3, 1, 2 | l, 3 | l, 5, 1, 2, 3, 4 | l, 5 | l, 2, 7, 8];
        let origins: Vec<String> = ["a:1", "a:2", "a:3"].map(String::from).to_vec();
        let (rows, report) = fit_examples(&stream, 4, Overlong::Truncate, &origins).expect("fit");
        assert_eq!(rows, [(1, 3), (5, 4)]);
        assert_eq!(report.truncated, 1);
        assert_eq!(report.truncated_tokens, 1);
        assert_eq!(report.without_targets, 1);
        assert_eq!(report.examples_named, ["a:2", "a:3"]);
        let err = fit_examples(&stream, 4, Overlong::Error, &origins).expect_err("refused");
        assert!(err.to_string().starts_with("a:2: "), "{err}");
        // Cut to 3 ids, the second example keeps no target.
        let (rows, report) = fit_examples(&stream, 3, Overlong::Truncate, &origins).expect("fit");
        assert_eq!(rows, [(1, 3)]);
        assert_eq!(report.without_targets, 2);
    }
}
