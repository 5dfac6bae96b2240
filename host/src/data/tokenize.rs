//! Documents → one stream of token ids, in parallel.
//!
//! Documents are encoded independently on rayon's pool and concatenated in document order,
//! each followed by the tokenizer's end-of-text id (unless its template already ended it with
//! that id), so the stream is the same whatever the thread count. Ids are checked against
//! the vocabulary here, where the document that produced a bad one can still be named.

use abi_stable::std_types::{RResult, RStr};
use codex_plugin_api::tokenizer::TokenizerBox;
use rayon::prelude::*;

use super::error::DataError;
use super::source::Document;

/// Encode `docs` and join them, each followed by the end-of-text id (once: a tokenizer whose
/// template adds it, as `add_eos_token` does, gets no second one).
pub fn tokenize(docs: &[Document], tokenizer: &TokenizerBox) -> Result<Vec<u32>, DataError> {
    let vocab = tokenizer.vocab_size();
    let eot = tokenizer.eot_id();
    if eot as usize >= vocab {
        return Err(DataError::Tokenizer(format!(
            "end-of-text id {eot} is outside the vocabulary ({vocab} ids)"
        )));
    }
    let encoded: Vec<Vec<u32>> = docs
        .par_iter()
        .map(|doc| {
            let ids = match tokenizer.encode(RStr::from(doc.text.as_str())) {
                RResult::ROk(ids) => ids.into_vec(),
                RResult::RErr(e) => {
                    return Err(DataError::Tokenize {
                        origin: doc.origin.clone(),
                        message: e.message.into_string(),
                    })
                }
            };
            if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                return Err(DataError::Tokenize {
                    origin: doc.origin.clone(),
                    message: format!("id {bad} is outside the vocabulary ({vocab} ids)"),
                });
            }
            Ok(ids)
        })
        .collect::<Result<_, _>>()?;
    let total = encoded.iter().map(|ids| ids.len() + 1).sum();
    let mut stream = Vec::with_capacity(total);
    for ids in encoded {
        stream.extend_from_slice(&ids);
        if ids.last() != Some(&eot) {
            stream.push(eot);
        }
    }
    Ok(stream)
}

/// What identifies a tokenizer's behaviour, for the token cache key: its `tokenizer.json`
/// when it has one, with its parameters but `path` (so the same vocabulary under another
/// registry name or path is the same tokenizer, and a setting the file does not record, such
/// as `split_special_tokens`, still counts), otherwise its registry name and parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizerFingerprint(String);

impl TokenizerFingerprint {
    /// The fingerprint of `tokenizer`, created as `name` with `params` (JSON).
    pub fn of(tokenizer: &TokenizerBox, name: &str, params: &str) -> Result<Self, DataError> {
        let json = match tokenizer.to_json() {
            RResult::ROk(json) => json.into_option(),
            RResult::RErr(e) => return Err(DataError::Tokenizer(e.message.into_string())),
        };
        // Key order and spacing in the config must not matter: re-serialise (serde_json's
        // maps are sorted).
        let parsed = serde_json::from_str::<serde_json::Value>(params);
        let text = match json {
            Some(json) => {
                let settings = match parsed {
                    Ok(serde_json::Value::Object(mut map)) => {
                        map.remove("path");
                        serde_json::Value::Object(map).to_string()
                    }
                    Ok(other) => other.to_string(),
                    Err(_) => params.to_string(),
                };
                format!("json\n{json}\nsettings\n{settings}")
            }
            None => {
                let canonical = parsed.map_or_else(|_| params.to_string(), |v| v.to_string());
                format!("name\n{name}\nparams\n{canonical}")
            }
        };
        Ok(TokenizerFingerprint(format!(
            "{text}\neot {}\nvocab {}",
            tokenizer.eot_id(),
            tokenizer.vocab_size()
        )))
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}
