//! From sources to the two document lists a run trains and evaluates on.
//!
//! Preprocessing comes first, so the split, the tokenizer's corpus and the token cache all
//! see the same text. The held-out validation documents are chosen by a hash of their
//! content: the choice survives renaming files, reordering sources and adding unrelated
//! documents, and identical documents always land on the same side (no leakage).

use std::path::Path;

use abi_stable::std_types::RString;
use sha2::{Digest, Sha256};

use super::config::{DataConfig, Preprocess};
use super::error::DataError;
use super::source::{read_sources, DataReport, Document};

/// Training and validation documents, after preprocessing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitDocuments {
    /// Training documents, in source order.
    pub train: Vec<Document>,
    /// Validation documents, in source order; empty when `val_fraction` is 0 and there are
    /// no `val` sources (or every training document has the same content).
    pub val: Vec<Document>,
    /// What reading the training and validation sources found: files read and skipped.
    pub report: DataReport,
}

impl SplitDocuments {
    /// The training texts, as the `bpe` tokenizer receives them (`TokenizerEnv.corpus`).
    pub fn corpus(&self) -> Vec<RString> {
        self.train
            .iter()
            .map(|d| RString::from(d.text.as_str()))
            .collect()
    }
}

/// Read, preprocess and split the documents of `config`; relative paths start at
/// `base_dir` (the config file's directory).
pub fn load_documents(config: &DataConfig, base_dir: &Path) -> Result<SplitDocuments, DataError> {
    if config.train.is_empty() {
        return Err(DataError::Setting {
            field: "data.train",
            message: "no sources: list at least one Text, Jsonl or Csv source".to_string(),
        });
    }
    let f = config.val_fraction;
    if !(0.0..1.0).contains(&f) {
        return Err(DataError::Setting {
            field: "data.val_fraction",
            message: format!("must be at least 0 and below 1, found {f}"),
        });
    }
    let settings = config.read_settings();
    let read = read_sources(&config.train, base_dir, &settings)?;
    let mut report = read.report;
    let read_count = read.documents.len();
    // Supervised fine-tuning examples are records, not text: preprocessing does not apply.
    let clean = |docs| {
        if config.is_sft() {
            docs
        } else {
            preprocess(docs, &config.preprocess)
        }
    };
    let train = clean(read.documents);
    if train.is_empty() {
        return Err(DataError::Empty {
            split: "train",
            what: nothing_left(read_count, &report, config),
        });
    }
    let (train, val) = if config.val.is_empty() {
        hold_out(train, f)
    } else {
        let read = read_sources(&config.val, base_dir, &settings)?;
        let read_count = read.documents.len();
        let val = clean(read.documents);
        if val.is_empty() {
            return Err(DataError::Empty {
                split: "val",
                what: nothing_left(read_count, &read.report, config),
            });
        }
        report.merge(read.report);
        (train, val)
    };
    Ok(SplitDocuments { train, val, report })
}

/// Why a split has no document: what was read, what was skipped and what preprocessing
/// dropped.
fn nothing_left(read_count: usize, report: &DataReport, config: &DataConfig) -> String {
    let skipped = &report.undecodable;
    match skipped.examples.first() {
        Some(first) if read_count == 0 => format!(
            "every file was skipped as not UTF-8 text ({} files, e.g. {}: {})",
            skipped.count, first.path, first.reason
        ),
        _ => format!(
            "{read_count} documents read, none left after preprocessing (min_chars {})",
            config.preprocess.min_chars
        ),
    }
}

/// Apply the preprocessing settings, dropping documents that end up too short.
pub fn preprocess(docs: Vec<Document>, settings: &Preprocess) -> Vec<Document> {
    docs.into_iter()
        .filter_map(|mut d| {
            if settings.normalize_newlines && d.text.contains('\r') {
                d.text = d.text.replace("\r\n", "\n").replace('\r', "\n");
            }
            (d.text.chars().count() >= settings.min_chars).then_some(d)
        })
        .collect()
}

/// A document's position on the unit interval, from its content alone.
fn content_key(text: &str) -> u64 {
    let digest = Sha256::digest(text.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// Split `docs` into (train, val), holding out about `fraction` of them by content.
///
/// A document goes to validation when its key falls below `fraction` of the key space.
/// Two corrections keep small corpora usable, and are still functions of content only:
/// if `fraction > 0` selects nothing, the documents with the smallest key are held out;
/// if it selects everything, the documents with the largest key are kept for training.
pub fn hold_out(docs: Vec<Document>, fraction: f64) -> (Vec<Document>, Vec<Document>) {
    if fraction <= 0.0 || docs.is_empty() {
        return (docs, Vec::new());
    }
    let keys: Vec<u64> = docs.iter().map(|d| content_key(&d.text)).collect();
    // `as` saturates, and a fraction below 1 stays below the top of the key space.
    let threshold = (fraction * 2f64.powi(64)) as u64;
    let (Some(&min), Some(&max)) = (keys.iter().min(), keys.iter().max()) else {
        return (docs, Vec::new());
    };
    let to_val = |k: u64| {
        if min == max {
            // One distinct text: nothing can be held out without leaking it.
            false
        } else if min >= threshold {
            k == min
        } else if max < threshold {
            k != max
        } else {
            k < threshold
        }
    };
    let mut train = Vec::new();
    let mut val = Vec::new();
    for (doc, key) in docs.into_iter().zip(keys) {
        if to_val(key) {
            val.push(doc);
        } else {
            train.push(doc);
        }
    }
    if val.is_empty() {
        tracing::warn!(
            "every training document has the same content: no validation data can be held out"
        );
    }
    (train, val)
}
