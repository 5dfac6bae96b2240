//! Strict parsing of a component's JSON parameters, with errors that name the field.
//!
//! The host hands each component its `params` section as JSON and the component owns its schema.
//! Every component should refuse the same things the same way (unknown keys with
//! `#[serde(deny_unknown_fields)]`, wrong types, trailing text) and name the path of the bad
//! value (`betas[1]: invalid type ...`), so this lives here, behind the `strict` feature, rather
//! than in each plugin.

use serde::de::DeserializeOwned;

use crate::Error;

/// Parse `params` into `T`. An empty string or `null` means "no parameters" (`{}`), so a
/// config that omits `params` gets `T`'s defaults rather than a parse error.
pub fn parse_params<T: DeserializeOwned>(params: &str) -> Result<T, Error> {
    let trimmed = params.trim();
    let text = if trimmed.is_empty() || trimmed == "null" {
        "{}"
    } else {
        trimmed
    };
    let mut de = serde_json::Deserializer::from_str(text);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.inner().to_string();
        let message = without_position(&inner);
        if path == "." {
            Error::msg(message)
        } else {
            Error::msg(format!("{path}: {message}"))
        }
    })?;
    de.end()
        .map_err(|e| Error::msg(format!("trailing characters after the parameters: {e}")))?;
    Ok(value)
}

/// A value that parses but is not allowed, blamed on `field` the way [`parse_params`] names a
/// bad value (`n_head: must divide n_embd (768)`), so the host can show it at that field.
pub fn invalid(field: &str, message: impl std::fmt::Display) -> Error {
    Error::msg(format!("{field}: {message}"))
}

/// serde_json ends its messages with a position in the JSON text (` at line 1 column 8`),
/// which is the host's rendering of the user's parameters, not anything the user wrote.
fn without_position(message: &str) -> &str {
    match message.rfind(" at line ") {
        Some(i)
            if message[i + 9..]
                .split_once(" column ")
                .is_some_and(|(l, c)| {
                    [l, c]
                        .iter()
                        .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                }) =>
        {
            &message[..i]
        }
        _ => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct P {
        #[serde(default)]
        lr: f64,
        #[serde(default)]
        betas: Vec<f64>,
    }

    #[test]
    fn empty_and_null_mean_defaults() {
        let defaults = P {
            lr: 0.0,
            betas: vec![],
        };
        assert_eq!(parse_params::<P>("").ok(), Some(defaults));
        assert_eq!(parse_params::<P>(" null ").map(|p| p.lr).ok(), Some(0.0));
    }

    #[test]
    fn errors_name_the_field_and_refuse_unknown_keys_and_trailing_text() {
        let e = parse_params::<P>(r#"{"betas": [0.9, "x"]}"#).unwrap_err();
        assert!(e.message().starts_with("betas[1]: invalid type"), "{e:?}");
        let e = parse_params::<P>(r#"{"lr": 1, "lrr": 2}"#).unwrap_err();
        assert!(e.message().contains("unknown field `lrr`"), "{e:?}");
        assert!(
            e.message().starts_with("lrr: ") && !e.message().contains(" at line "),
            "the path first, no position in the host's JSON: {e:?}"
        );
        let e = parse_params::<P>(r#"{"lr": 1} x"#).unwrap_err();
        assert!(e.message().starts_with("trailing characters"), "{e:?}");
    }
}
