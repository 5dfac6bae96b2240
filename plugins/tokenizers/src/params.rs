//! Strict parsing of a tokenizer's JSON parameters, shared so every tokenizer reports a
//! bad key the same way: the tokenizer, the field path and what serde expected.

use codex_plugin_api::Error;
use serde::de::DeserializeOwned;

/// Parse `params` into `T`. An empty string or `null` means "no parameters" (`{}`), so a
/// config that omits `params` gets the defaults rather than a parse error.
pub(crate) fn parse<T: DeserializeOwned>(tokenizer: &str, params: &str) -> Result<T, Error> {
    codex_plugin_api::strict::parse_params(params).map_err(|e| {
        Error::msg(format!(
            "invalid parameters for tokenizer `{tokenizer}`: {}",
            e.message()
        ))
    })
}
