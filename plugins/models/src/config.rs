//! Strict parsing of a component's JSON parameters, with errors that name the field.
//!
//! The host hands each component its `params` section as JSON; the component owns its schema.
//! `serde_path_to_error` gives the path of a bad value (`n_embd: invalid type ...`), and
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

/// Parse `params` into `T`; an empty string means `{}` (every field defaulted).
pub(crate) fn parse_strict<T: DeserializeOwned>(params: &str) -> Result<T, ConfigError> {
    let text = if params.trim().is_empty() {
        "{}"
    } else {
        params
    };
    let mut de = serde_json::Deserializer::from_str(text);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            ConfigError::Parse(e.inner().to_string())
        } else {
            ConfigError::Parse(format!("{path}: {}", e.inner()))
        }
    })?;
    de.end().map_err(|e| {
        ConfigError::Parse(format!("trailing characters after the parameters: {e}"))
    })?;
    Ok(value)
}
