//! Reading documents out of the configured sources.
//!
//! A document is a text plus where it came from. The origin (`path`, or `path:line` for
//! record formats) exists for error messages only: nothing downstream hashes or orders by
//! it, so renaming a file changes neither the split nor the token cache.
//!
//! Files are read whole and checked for UTF-8 here, once, so the tokenizer never sees
//! bytes it would have to guess about. A `Text` source's file that is not text — binary by
//! git's test (a NUL byte in its first 8000 bytes), or not UTF-8 — is skipped and counted, or
//! refused, as `data.undecodable` says; which files a `Text` source names is [`super::select`]'s
//! business.

use std::fs::{self, File};
use std::io::Read as _;
use std::path::Path;

use serde::Serialize;

use super::error::DataError;
use super::select;
use codex_formats::config::{ReadSettings, Source, Undecodable};

/// How many skipped files a report names (it counts them all).
const EXAMPLES: usize = 5;
/// Bytes looked at for a NUL byte, as git does (`FIRST_FEW_BYTES`).
const BINARY_PROBE: u64 = 8000;

/// One document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    /// `path` or `path:line`, for messages; never part of any hash.
    pub origin: String,
    /// The text.
    pub text: String,
}

/// What reading the sources found besides documents; recorded in the run's `metadata.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DataReport {
    /// Files of `Text` sources read, one document each.
    pub text_files: usize,
    /// Files of `Text` sources skipped because they are not UTF-8 text.
    pub undecodable: Skipped,
    /// Globs that matched no file (each was warned about).
    pub unmatched_globs: Vec<String>,
    /// Supervised fine-tuning: training examples cut to fit a row, or left out because no
    /// token of theirs carries the loss.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sft: Option<super::sft::SftReport>,
}

/// Files left out, counted, with the first few named.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Skipped {
    /// How many.
    pub count: usize,
    /// The first few, in reading order.
    pub examples: Vec<SkippedFile>,
}

/// A file left out, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SkippedFile {
    /// The file.
    pub path: String,
    /// Why (`binary: a NUL byte at byte 12`, `not valid UTF-8: first bad byte at byte 3`).
    pub reason: String,
}

impl Skipped {
    fn add(&mut self, file: SkippedFile) {
        self.count += 1;
        if self.examples.len() < EXAMPLES {
            self.examples.push(file);
        }
    }
}

impl DataReport {
    /// Add `other`'s counts and names to this report's.
    pub fn merge(&mut self, other: DataReport) {
        self.text_files += other.text_files;
        self.undecodable.count += other.undecodable.count;
        let room = EXAMPLES.saturating_sub(self.undecodable.examples.len());
        self.undecodable
            .examples
            .extend(other.undecodable.examples.into_iter().take(room));
        self.unmatched_globs.extend(other.unmatched_globs);
    }
}

/// The documents of some sources, and what reading them found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Read {
    /// The documents, in source order.
    pub documents: Vec<Document>,
    /// Files read and skipped, globs that matched nothing.
    pub report: DataReport,
}

/// Read every document of `sources`, in order; relative paths start at `base_dir`.
///
/// A glob that matches no file is a warning, unless the sources find no file at all: then
/// it is an error naming every such glob.
pub fn read_sources(
    sources: &[Source],
    base_dir: &Path,
    settings: &ReadSettings,
) -> Result<Read, DataError> {
    let mut read = Read::default();
    let mut found_files = false;
    for source in sources {
        match source {
            Source::Text { paths, exclude } => {
                let selected = select::text_files(paths, exclude, base_dir, settings.gitignore)?;
                found_files |= !selected.files.is_empty();
                read.report.unmatched_globs.extend(selected.unmatched);
                for path in selected.files {
                    read_text(&path, settings.undecodable, &mut read)?;
                }
            }
            Source::Jsonl { path, field } => {
                found_files = true;
                read_jsonl(&base_dir.join(path), field, &mut read.documents)?
            }
            Source::Chat { path, field } => {
                found_files = true;
                read_chat(&base_dir.join(path), field, &mut read.documents)?
            }
            Source::PromptCompletion {
                path,
                prompt,
                completion,
            } => {
                found_files = true;
                read_prompt_completion(
                    &base_dir.join(path),
                    prompt,
                    completion,
                    &mut read.documents,
                )?
            }
            Source::Csv { path, column } => {
                found_files = true;
                read_csv(&base_dir.join(path), column, &mut read.documents)?
            }
        }
    }
    let unmatched = &read.report.unmatched_globs;
    if !found_files && !unmatched.is_empty() {
        return Err(DataError::NoMatch {
            patterns: unmatched.clone(),
        });
    }
    for pattern in unmatched {
        tracing::warn!("{pattern}: the glob matches no file");
    }
    let skipped = &read.report.undecodable;
    if skipped.count > 0 {
        tracing::warn!(
            "skipped {} {} not UTF-8 text (`data.undecodable: error` refuses them)",
            skipped.count,
            if skipped.count == 1 {
                "file that is"
            } else {
                "files that are"
            },
        );
        for file in &skipped.examples {
            tracing::warn!("  {}: {}", file.path, file.reason);
        }
    }
    Ok(read)
}

/// Read one file of a `Text` source into `read`, or skip it (or refuse it) when it is not
/// UTF-8 text.
fn read_text(path: &Path, policy: Undecodable, read: &mut Read) -> Result<(), DataError> {
    let io_error = |e: std::io::Error| DataError::io(path, e);
    let mut file = File::open(path).map_err(io_error)?;
    let mut bytes = Vec::new();
    // Looking at the start first leaves a large binary file unread.
    (&mut file)
        .take(BINARY_PROBE)
        .read_to_end(&mut bytes)
        .map_err(io_error)?;
    let reason = if let Some(at) = bytes.iter().position(|&b| b == 0) {
        format!("binary: a NUL byte at byte {at}")
    } else {
        file.read_to_end(&mut bytes).map_err(io_error)?;
        match String::from_utf8(bytes) {
            Ok(text) => {
                read.report.text_files += 1;
                read.documents.push(Document {
                    origin: path.display().to_string(),
                    text,
                });
                return Ok(());
            }
            Err(e) => format!(
                "not valid UTF-8: first bad byte at byte {}",
                e.utf8_error().valid_up_to()
            ),
        }
    };
    match policy {
        Undecodable::Skip => {
            read.report.undecodable.add(SkippedFile {
                path: path.display().to_string(),
                reason,
            });
            Ok(())
        }
        Undecodable::Error => Err(DataError::Undecodable {
            path: path.to_path_buf(),
            reason,
        }),
    }
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

/// Each JSON object of a JSON Lines file with its 1-based line number; blank lines are
/// skipped, anything else that is not an object is an error naming the line.
fn jsonl_records(
    path: &Path,
    mut each: impl FnMut(u64, &serde_json::Map<String, serde_json::Value>) -> Result<(), DataError>,
) -> Result<(), DataError> {
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
        each(line, map)?;
    }
    Ok(())
}

/// The value of `field` in a record, or an error listing the record's fields.
fn required<'a>(
    map: &'a serde_json::Map<String, serde_json::Value>,
    field: &str,
    path: &Path,
    line: u64,
) -> Result<&'a serde_json::Value, DataError> {
    map.get(field).ok_or_else(|| {
        let mut keys: Vec<&str> = map.keys().map(String::as_str).collect();
        keys.sort_unstable();
        record_error(
            path,
            line,
            format!(
                "no field `{field}`; the record's fields are: {}",
                keys.join(", ")
            ),
        )
    })
}

fn read_jsonl(path: &Path, field: &str, docs: &mut Vec<Document>) -> Result<(), DataError> {
    jsonl_records(path, |line, map| match required(map, field, path, line)? {
        serde_json::Value::String(s) => {
            docs.push(Document {
                origin: format!("{}:{line}", path.display()),
                text: s.clone(),
            });
            Ok(())
        }
        other => Err(record_error(
            path,
            line,
            format!("field `{field}` is {}, expected a string", json_kind(other)),
        )),
    })
}

/// A list of chat messages, checked: objects with a string `role` and a `content`.
fn messages(
    value: &serde_json::Value,
    field: &str,
    path: &Path,
    line: u64,
) -> Result<serde_json::Value, DataError> {
    let serde_json::Value::Array(items) = value else {
        return Err(record_error(
            path,
            line,
            format!(
                "field `{field}` is {}, expected a list of messages like \
                 [{{\"role\": \"user\", \"content\": \"...\"}}]",
                json_kind(value)
            ),
        ));
    };
    for (i, item) in items.iter().enumerate() {
        let serde_json::Value::Object(message) = item else {
            return Err(record_error(
                path,
                line,
                format!(
                    "`{field}[{i}]` is {}, expected an object with `role` and `content`",
                    json_kind(item)
                ),
            ));
        };
        match message.get("role") {
            Some(serde_json::Value::String(_)) => {}
            Some(other) => {
                return Err(record_error(
                    path,
                    line,
                    format!(
                        "`{field}[{i}].role` is {}, expected a string",
                        json_kind(other)
                    ),
                ))
            }
            None => {
                return Err(record_error(
                    path,
                    line,
                    format!("`{field}[{i}]` has no `role`"),
                ))
            }
        }
        if !message.contains_key("content") {
            return Err(record_error(
                path,
                line,
                format!("`{field}[{i}]` has no `content`"),
            ));
        }
    }
    Ok(value.clone())
}

/// A supervised fine-tuning example as a document: its fields under their canonical names
/// (`messages`, or `prompt` and `completion`), as one line of JSON. The text is what the
/// validation split and the token cache hash, so an example is held out by its content.
fn example(origin: String, fields: serde_json::Map<String, serde_json::Value>) -> Document {
    Document {
        origin,
        text: serde_json::Value::Object(fields).to_string(),
    }
}

fn read_chat(path: &Path, field: &str, docs: &mut Vec<Document>) -> Result<(), DataError> {
    jsonl_records(path, |line, map| {
        let list = messages(required(map, field, path, line)?, field, path, line)?;
        if list.as_array().is_some_and(Vec::is_empty) {
            return Err(record_error(
                path,
                line,
                format!("`{field}` is an empty list: a conversation needs a message"),
            ));
        }
        let mut fields = serde_json::Map::new();
        fields.insert(super::sft::MESSAGES.to_string(), list);
        docs.push(example(format!("{}:{line}", path.display()), fields));
        Ok(())
    })
}

fn read_prompt_completion(
    path: &Path,
    prompt: &str,
    completion: &str,
    docs: &mut Vec<Document>,
) -> Result<(), DataError> {
    jsonl_records(path, |line, map| {
        let p = required(map, prompt, path, line)?;
        let c = required(map, completion, path, line)?;
        let (p, c) = match (p, c) {
            (serde_json::Value::String(_), serde_json::Value::String(_)) => (p.clone(), c.clone()),
            (serde_json::Value::Array(_), serde_json::Value::Array(_)) => (
                messages(p, prompt, path, line)?,
                messages(c, completion, path, line)?,
            ),
            _ => {
                return Err(record_error(
                    path,
                    line,
                    format!(
                        "`{prompt}` is {} and `{completion}` is {}: both must be strings, or \
                         both lists of messages",
                        json_kind(p),
                        json_kind(c)
                    ),
                ))
            }
        };
        let mut fields = serde_json::Map::new();
        fields.insert(super::sft::PROMPT.to_string(), p);
        fields.insert(super::sft::COMPLETION.to_string(), c);
        docs.push(example(format!("{}:{line}", path.display()), fields));
        Ok(())
    })
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
