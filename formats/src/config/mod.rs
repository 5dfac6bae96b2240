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

use crate::diagnostics::{parse_ron, Diagnostic};

pub mod data;
mod overrides;
mod raw;
mod write;

pub use data::{DataConfig, Preprocess, ReadSettings, Source, Undecodable};
pub use overrides::{apply_overrides, related, Override};
pub use raw::{RawComponent, RawConfig, RawGenerate, RawOptimizer, RawSchedule, RawTrain};
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
    #[error("--set {arg}: {message}")]
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
    #[error("{field}: {message} (from --set {arg})")]
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
