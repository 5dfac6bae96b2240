//! Strict parsing of a sink's parameters, shared by every built-in sink.
//!
//! The host hands parameters over as JSON; a sink configured without any arrives as an empty
//! string, `null` or `{}`, all of which mean "the defaults".

use codex_plugin_api::{Error, Result};
use serde::de::DeserializeOwned;

/// Parse `params` into `T` (which denies unknown fields) with the plugin API's strict parser,
/// naming the sink on failure.
pub fn parse<T: DeserializeOwned>(sink: &str, params: &str) -> Result<T> {
    codex_plugin_api::strict::parse_params(params).map_err(|e| {
        Error::msg(format!(
            "invalid parameters for sink `{sink}`: {}; see the sink reference for the accepted fields",
            e.message()
        ))
    })
}

/// Check that a file name stays inside the run directory.
pub fn check_file_name(sink: &str, file: &str) -> Result<()> {
    check_plain_name(sink, "file", file, "file")
}

/// Check that a folder name (the `dir` parameter) stays inside the run directory.
pub fn check_dir_name(sink: &str, dir: &str) -> Result<()> {
    check_plain_name(sink, "dir", dir, "folder")
}

fn check_plain_name(sink: &str, field: &str, file: &str, what: &str) -> Result<()> {
    let path = std::path::Path::new(file);
    let plain = path.components().count() == 1
        && matches!(
            path.components().next(),
            Some(std::path::Component::Normal(_))
        );
    if plain {
        Ok(())
    } else {
        Err(Error::msg(format!(
            "invalid `{field}` for sink `{sink}`: `{file}` must be a plain {what} name inside the run directory"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Default, Debug, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct P {
        file: Option<String>,
    }

    #[test]
    fn empty_forms_mean_defaults() {
        for s in ["", "  ", "null", "{}"] {
            assert_eq!(
                parse::<P>("x", s).map_err(|e| e.to_string()),
                Ok(P::default()),
                "{s:?}"
            );
        }
    }

    #[test]
    fn unknown_field_is_rejected_with_the_sink_name() {
        let e = parse::<P>("ndjson", r#"{"fiel": "a"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("sink `ndjson`") && e.contains("fiel"), "{e}");
    }

    #[test]
    fn file_names_must_stay_inside() {
        assert!(check_file_name("x", "metrics.ndjson").is_ok());
        for bad in ["", "../m.ndjson", "/tmp/m", "a/b", "."] {
            assert!(check_file_name("x", bad).is_err(), "{bad:?}");
            assert!(check_dir_name("x", bad).is_err(), "{bad:?}");
        }
        let e = check_dir_name("tensorboard", "..").unwrap_err().to_string();
        assert!(
            e.contains("invalid `dir`") && e.contains("folder name"),
            "{e}"
        );
    }
}
