//! The experiment config as written on disk, and the part of loading it that needs nothing but
//! the text: strict parsing into the raw types and `--set` overrides.
//!
//! Raw → resolved, as cargo and uv do it. The `Raw*` types mirror the file exactly: plain serde
//! types with `deny_unknown_fields`, every field documented with its default. [`parse`] reads
//! them strictly (errors carry file, line, column and field path, rendered by
//! [`crate::diagnostics`]) and applies overrides; the host's resolver then fills defaults and
//! validates across fields.
//!
//! Overrides follow the lossless route in FACTS.md: typed parse → `serde_json::Value` (enums
//! stay externally tagged, which `ron::Value` would lose) → set each path (the value read as a
//! RON literal, else taken as a string; unknown paths refused with a suggestion) →
//! `serde_path_to_error` back into the raw types, so a bad value is reported by its path.
//!
//! One file per concern: `raw.rs` holds the on-disk types, `data.rs` the `data` section,
//! `overrides.rs` parses and applies `--set`, `write.rs` carries component params and writes
//! them back as RON.

use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::diagnostics::{parse_ron, shorten, Diagnostic};

pub mod data;
mod overrides;
mod raw;
mod write;

pub use data::{DataConfig, Overlong, Preprocess, ReadSettings, Sft, Source, Undecodable};
pub use overrides::{apply_overrides, related, Override};
pub use raw::{
    RawAdapter, RawComponent, RawConfig, RawGenerate, RawLossScale, RawOptimizer, RawSchedule,
    RawSource, RawTargets, RawTrain,
};
pub use write::Params;

/// Shape of the learning-rate schedule after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// Constant at `optimizer.lr`.
    Constant,
    /// Linear decay to `min_lr` at the last step.
    Linear,
    /// Cosine decay to `min_lr` at the last step.
    Cosine,
}

/// Longest `--set` argument or field path an error quotes, in chars.
const MAX_ARG: usize = 120;
/// Longest message an error quotes, in chars.
const MAX_MESSAGE: usize = 400;

/// Errors loading an experiment config.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {}: {source}; check the path", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A parse or validation error in the file.
    #[error("{0}")]
    Invalid(Box<Diagnostic>),
    /// An override that cannot be applied.
    #[error("--set {}: {}", shorten(arg, MAX_ARG), shorten(message, MAX_MESSAGE))]
    Override {
        /// The override as given.
        arg: String,
        /// What is wrong.
        message: String,
    },
    /// The resolved config has no JSON form (a bug: it is plain data).
    #[error("the resolved config cannot be written as JSON: {0}")]
    Json(String),
    /// A value given by overrides has the wrong type or shape.
    #[error(
        "{}: {} (from --set {})",
        shorten(field, MAX_ARG),
        shorten(message, MAX_MESSAGE),
        shorten(arg, MAX_ARG)
    )]
    OverrideValue {
        /// The override that set it.
        arg: String,
        /// Path of the field.
        field: String,
        /// What is wrong.
        message: String,
    },
}

/// Parse `source`, the text of the config file `path`, strictly into the raw types and apply
/// `overrides` in order. Nothing is resolved or checked across fields yet.
pub fn parse(path: &Path, source: &str, overrides: &[Override]) -> Result<RawConfig, ConfigError> {
    let raw: RawConfig = parse_ron(path, source).map_err(ConfigError::Invalid)?;
    if overrides.is_empty() {
        Ok(raw)
    } else {
        apply_overrides(raw, overrides)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"(
    experiment: "x",
    data: (train: [Text(paths: ["*.txt"])]),
    tokenizer: (name: "bytes"),
    model: (name: "gpt2"),
    optimizer: (name: "adamw", lr: 1e-3),
    train: (max_steps: 1),
)"#;

    /// What a user sees for a broken config: a few short lines, in the user's words.
    fn check_plain(source: &str, overrides: &[&str], expect: &str) {
        let overrides: Vec<Override> = overrides
            .iter()
            .map(|a| a.parse().unwrap_or_else(|e| panic!("{a}: {e}")))
            .collect();
        let error = parse(Path::new("c.ron"), source, &overrides).expect_err("invalid");
        let text = error.to_string();
        assert!(text.contains(expect), "`{expect}` missing from: {text}");
        assert!(
            text.lines().count() <= 4,
            "{} lines: {text}",
            text.lines().count()
        );
        assert!(text.len() <= 1000, "{} bytes: {text}", text.len());
        for internal in [
            "Raw", "ron::", "serde", "struct ", "enum ", "usize", "u64", "f64",
        ] {
            assert!(!text.contains(internal), "`{internal}` in: {text}");
        }
    }

    #[test]
    fn a_wrong_top_level_value_is_named_in_plain_words() {
        let structure = "expected a structure `(field: value, ...)`";
        check_plain("5", &[], structure);
        check_plain("[1, 2]", &[], structure);
        check_plain("\"config\"", &[], structure);
        check_plain("{\"experiment\": \"x\"}", &[], structure);
        check_plain(
            "Config(experiment: \"x\")",
            &[],
            "unexpected name `Config` before `(`",
        );
        check_plain("", &[], structure);
    }

    #[test]
    fn wrong_values_inside_are_named_in_plain_words() {
        let train = MINIMAL.replace("train: (max_steps: 1)", "train: 5");
        check_plain(&train, &[], "train: expected a structure");
        let data = MINIMAL.replace("[Text(paths: [\"*.txt\"])]", "[5]");
        check_plain(&data, &[], "data.train[0]: expected a name, found `5`");
        check_plain(MINIMAL, &["train=5"], "expected a structure");
        check_plain(
            MINIMAL,
            &["train.batch_size=abc"],
            "expected a non-negative integer",
        );
        check_plain(MINIMAL, &["optimizer.lr=fast"], "expected a number");
        check_plain(MINIMAL, &["seed=-1"], "expected a non-negative integer");
    }

    #[test]
    fn deeply_nested_input_gives_a_short_error() {
        for depth in [200, 20_000] {
            let deep = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
            let one_line = MINIMAL.replace(
                "(name: \"gpt2\")",
                &format!("(name: \"gpt2\", params: (a: {deep}))"),
            );
            check_plain(&one_line, &[], "nested too deeply");
            let deep = format!("{}{}", "[\n".repeat(depth), "]\n".repeat(depth));
            let lines = MINIMAL.replace(
                "(name: \"gpt2\")",
                &format!("(name: \"gpt2\", params: (a: {deep}))"),
            );
            check_plain(&lines, &[], "nested too deeply");
        }
        let deep_path = format!("model.params{}=1", ".a".repeat(1000));
        let refused = deep_path.parse::<Override>().expect_err("too deep");
        assert!(refused.contains("levels deep"), "{refused}");
        assert!(refused.len() < 300, "{refused}");
    }

    #[test]
    fn long_lines_are_cut_around_the_caret() {
        let long = MINIMAL.replace(
            "experiment: \"x\",",
            &format!("experiment: \"x\", {}: 1,", "k".repeat(50_000)),
        );
        check_plain(&long, &[], "unknown field `kkkk");
        let value = format!("experiment: \"{}\", seed: \"x\",", "v".repeat(50_000));
        let long_value = MINIMAL.replace("experiment: \"x\",", &value);
        check_plain(&long_value, &[], "seed: expected");
        let text = parse(Path::new("c.ron"), &long_value, &[])
            .expect_err("invalid")
            .to_string();
        let caret = text.lines().last().expect("caret line");
        let excerpt = &text.lines().nth(2).expect("excerpt line");
        let at = caret.find('^').expect("caret");
        assert_eq!(
            excerpt.chars().nth(at),
            Some('"'),
            "the caret points at the value:\n{text}"
        );
    }
}
