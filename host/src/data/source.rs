//! Reading documents out of the configured sources.
//!
//! A document is a text plus where it came from. The origin (`path`, or `path:line` for
//! record formats) exists for error messages only: nothing downstream hashes or orders by
//! it, so renaming a file changes neither the split nor the token cache.
//!
//! Files are read whole and checked for UTF-8 here, once, so the tokenizer never sees
//! bytes it would have to guess about.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

use super::config::Source;
use super::error::DataError;

/// One document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    /// `path` or `path:line`, for messages; never part of any hash.
    pub origin: String,
    /// The text.
    pub text: String,
}

/// Read every document of `sources`, in order; relative paths start at `base_dir`.
pub fn read_sources(sources: &[Source], base_dir: &Path) -> Result<Vec<Document>, DataError> {
    let mut docs = Vec::new();
    for source in sources {
        match source {
            Source::Text { paths } => read_text(paths, base_dir, &mut docs)?,
            Source::Jsonl { path, field } => read_jsonl(&base_dir.join(path), field, &mut docs)?,
            Source::Csv { path, column } => read_csv(&base_dir.join(path), column, &mut docs)?,
        }
    }
    Ok(docs)
}

fn is_glob(entry: &str) -> bool {
    entry.contains(['*', '?', '['])
}

fn read_text(
    entries: &[String],
    base_dir: &Path,
    docs: &mut Vec<Document>,
) -> Result<(), DataError> {
    // A file named by two entries (a path and a glob that covers it) is still one document.
    let mut seen = HashSet::new();
    for entry in entries {
        let files = if is_glob(entry) {
            expand_glob(entry, base_dir)?
        } else {
            let path = base_dir.join(entry);
            if !path.is_file() {
                return Err(DataError::MissingFile { path });
            }
            vec![path]
        };
        for path in files {
            if seen.insert(path.clone()) {
                let text = read_utf8(&path)?;
                docs.push(Document {
                    origin: path.display().to_string(),
                    text,
                });
            }
        }
    }
    Ok(())
}

fn expand_glob(entry: &str, base_dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    // The base directory is literal text, not a pattern: a `[` in it must not match.
    let pattern = if Path::new(entry).is_absolute() {
        entry.to_string()
    } else {
        let base = glob::Pattern::escape(&base_dir.to_string_lossy());
        if base.is_empty() {
            entry.to_string()
        } else {
            format!("{}/{entry}", base.trim_end_matches('/'))
        }
    };
    let shown = base_dir.join(entry).display().to_string();
    let paths = glob::glob(&pattern).map_err(|e| DataError::BadGlob {
        pattern: shown.clone(),
        message: e.msg.to_string(),
    })?;
    let mut files = Vec::new();
    for p in paths {
        let p = p.map_err(|e| {
            let path = e.path().to_path_buf();
            DataError::io(path, e.into())
        })?;
        if p.is_file() {
            files.push(p);
        }
    }
    if files.is_empty() {
        return Err(DataError::NoMatch { pattern: shown });
    }
    // `glob` yields paths in alphabetical order already; sorting again keeps that promise
    // ours rather than the crate's.
    files.sort();
    Ok(files)
}

fn read_bytes(path: &Path) -> Result<Vec<u8>, DataError> {
    fs::read(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            DataError::MissingFile {
                path: path.to_path_buf(),
            }
        } else {
            DataError::io(path, e)
        }
    })
}

fn read_utf8(path: &Path) -> Result<String, DataError> {
    String::from_utf8(read_bytes(path)?).map_err(|e| DataError::NotUtf8 {
        location: path.display().to_string(),
        offset: e.utf8_error().valid_up_to(),
    })
}

fn record_error(path: &Path, line: u64, message: String) -> DataError {
    DataError::Record {
        path: path.to_path_buf(),
        line,
        message,
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn read_jsonl(path: &Path, field: &str, docs: &mut Vec<Document>) -> Result<(), DataError> {
    let bytes = read_bytes(path)?;
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = i as u64 + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let text = std::str::from_utf8(raw).map_err(|e| DataError::NotUtf8 {
            location: format!("{}:{line}", path.display()),
            offset: e.valid_up_to(),
        })?;
        if text.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| record_error(path, line, format!("invalid JSON: {e}")))?;
        let serde_json::Value::Object(map) = &value else {
            return Err(record_error(
                path,
                line,
                format!("expected a JSON object, found {}", json_kind(&value)),
            ));
        };
        match map.get(field) {
            Some(serde_json::Value::String(s)) => docs.push(Document {
                origin: format!("{}:{line}", path.display()),
                text: s.clone(),
            }),
            Some(other) => {
                return Err(record_error(
                    path,
                    line,
                    format!("field `{field}` is {}, expected a string", json_kind(other)),
                ))
            }
            None => {
                let mut keys: Vec<&str> = map.keys().map(String::as_str).collect();
                keys.sort_unstable();
                return Err(record_error(
                    path,
                    line,
                    format!(
                        "no field `{field}`; the record's fields are: {}",
                        keys.join(", ")
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn csv_error(path: &Path, e: csv::Error) -> DataError {
    let line = e.position().map_or(1, |p| p.line());
    let message = e.to_string();
    match e.into_kind() {
        csv::ErrorKind::Io(io) => DataError::io(path, io),
        csv::ErrorKind::Utf8 { err, .. } => DataError::NotUtf8 {
            location: format!("{}:{line}", path.display()),
            offset: err.valid_up_to(),
        },
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => record_error(
            path,
            line,
            format!("{len} fields, but the header has {expected_len}: quote fields that contain commas or newlines"),
        ),
        _ => record_error(path, line, message),
    }
}

fn read_csv(path: &Path, column: &str, docs: &mut Vec<Document>) -> Result<(), DataError> {
    let bytes = read_bytes(path)?;
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(bytes.as_slice());
    let headers = reader.headers().map_err(|e| csv_error(path, e))?.clone();
    let Some(index) = headers.iter().position(|h| h == column) else {
        return Err(DataError::UnknownColumn {
            path: path.to_path_buf(),
            column: column.to_string(),
            columns: headers.iter().map(str::to_string).collect(),
        });
    };
    for record in reader.records() {
        let record = record.map_err(|e| csv_error(path, e))?;
        let line = record.position().map_or(1, |p| p.line());
        let text = record.get(index).unwrap_or_default();
        docs.push(Document {
            origin: format!("{}:{line}", path.display()),
            text: text.to_string(),
        });
    }
    Ok(())
}
