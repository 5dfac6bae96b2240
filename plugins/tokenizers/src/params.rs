//! Strict parsing of a tokenizer's JSON parameters, shared so every tokenizer reports a
//! bad key the same way: the tokenizer, the field path and what serde expected.

use codex_plugin_api::Error;
use serde::de::DeserializeOwned;

/// Parse `params` into `T`. An empty string or `null` means "no parameters" (`{}`), so a
/// config that omits `params` gets the defaults rather than a parse error.
pub(crate) fn parse<T: DeserializeOwned>(tokenizer: &str, params: &str) -> Result<T, Error> {
    let trimmed = params.trim();
    let text = if trimmed.is_empty() || trimmed == "null" {
        "{}"
    } else {
        trimmed
    };
    let mut de = serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            Error::msg(format!(
                "invalid parameters for tokenizer `{tokenizer}`: {inner}"
            ))
        } else {
            Error::msg(format!(
                "invalid parameters for tokenizer `{tokenizer}`: {path}: {inner}"
            ))
        }
    })
}
