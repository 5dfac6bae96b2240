//! The `data` section of an experiment config, as written on disk.

use serde::{Deserialize, Serialize};

/// Where the documents come from and how validation data is chosen.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Training sources; at least one. Paths are relative to the config file.
    pub train: Vec<Source>,
    /// Validation sources. Default: none, and `val_fraction` of the training documents
    /// (chosen by content, deterministically) is held out instead.
    #[serde(default)]
    pub val: Vec<Source>,
    /// Fraction of training documents held out for validation when `val` is empty.
    /// Default: 0.1.
    #[serde(default = "default_val_fraction")]
    pub val_fraction: f64,
    /// Directory of the token cache, relative to the config file. Default: `.cache/tokens`
    /// under the runs directory.
    #[serde(default)]
    pub cache_dir: Option<String>,
    /// How documents are cleaned before the tokenizer sees them. Part of the token cache
    /// key: changing a setting re-tokenizes. Default: see [`Preprocess`].
    #[serde(default)]
    pub preprocess: Preprocess,
}

/// Document clean-up applied before splitting, tokenizer training and tokenization.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Preprocess {
    /// Turn `\r\n` and lone `\r` into `\n`, so the same code checked out on Windows and on
    /// Unix gives the same tokens. Default: true.
    #[serde(default = "default_true")]
    pub normalize_newlines: bool,
    /// Drop documents shorter than this many characters (after newline normalisation).
    /// Default: 1, which drops empty documents only.
    #[serde(default = "default_min_chars")]
    pub min_chars: usize,
}

impl Default for Preprocess {
    fn default() -> Self {
        Preprocess {
            normalize_newlines: true,
            min_chars: default_min_chars(),
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_min_chars() -> usize {
    1
}

fn default_val_fraction() -> f64 {
    0.1
}

/// One source of documents.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub enum Source {
    /// Text files, one document per file. Each entry is a path or a glob (`src/**/*.rs`).
    Text {
        /// Paths or globs.
        paths: Vec<String>,
    },
    /// JSON Lines: one document per line, the text in `field`.
    Jsonl {
        /// The file.
        path: String,
        /// The field holding the text.
        field: String,
    },
    /// CSV with a header row: one document per row, the text in `column`.
    Csv {
        /// The file.
        path: String,
        /// The column holding the text.
        column: String,
    },
}
