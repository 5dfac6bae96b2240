//! Strict parsing of a component's JSON parameters, with errors that name the field.
//!
//! The host hands each component its `params` section as JSON; the component owns its schema.
//! `codex_plugin_api::strict` gives the path of a bad value (`n_embd: invalid type ...`), and
//! cross-field checks after parsing report the field they blame the same way.

use serde::de::DeserializeOwned;

/// A bad `params` section.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum ConfigError {
    /// The JSON does not fit the schema (unknown field, wrong type, malformed).
    #[error("{0}")]
    Parse(String),
    /// A value that parses but is not allowed.
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

impl ConfigError {
    pub(crate) fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            field,
            message: message.into(),
        }
    }
}

/// Parse `params` into `T` (`codex_plugin_api::strict`); an empty string means `{}`.
pub(crate) fn parse_strict<T: DeserializeOwned>(params: &str) -> Result<T, ConfigError> {
    codex_plugin_api::strict::parse_params(params).map_err(|e| ConfigError::Parse(e.to_string()))
}
