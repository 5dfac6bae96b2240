//! The one error type of the data pipeline.
//!
//! Every variant carries what a user needs to find the problem without a debugger: the
//! file (and line, for record-based formats), the setting involved, and the numbers that
//! did not fit. Messages say what to do next.

use std::io;
use std::path::PathBuf;

/// What can go wrong between the data files and a batch.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// An IO error on a named path.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A plain path (no glob characters) names no file.
    #[error(
        "{path}: no such file: check the path (relative paths start at the config's directory)"
    )]
    MissingFile {
        /// The path, resolved against the base directory.
        path: PathBuf,
    },
    /// A glob is malformed.
    #[error("{pattern}: invalid glob: {message}")]
    BadGlob {
        /// The pattern, resolved against the base directory.
        pattern: String,
        /// What the glob parser said.
        message: String,
    },
    /// The sources found no file at all, and these globs matched none.
    #[error(
        "{}: {}: check the {} (hidden, git-ignored and excluded files do not count; `data.gitignore: false` reads git-ignored ones)",
        patterns.join(", "),
        if patterns.len() == 1 { "the glob matches no file" } else { "no glob matches a file" },
        if patterns.len() == 1 { "pattern" } else { "patterns" },
    )]
    NoMatch {
        /// The patterns, resolved against the base directory.
        patterns: Vec<String>,
    },
    /// A file of a `Text` source is not UTF-8 text, and `data.undecodable` is `error`.
    #[error("{}: {reason}: convert it to UTF-8, leave it out with the source's `exclude`, or set `data.undecodable: skip` to skip such files", path.display())]
    Undecodable {
        /// The file.
        path: PathBuf,
        /// `binary: ...` or `not valid UTF-8: ...`.
        reason: String,
    },
    /// A line of a JSON Lines or CSV file is not UTF-8.
    #[error("{location}: not valid UTF-8 (first bad byte at byte {offset}): convert the file to UTF-8, or remove it from the sources")]
    NotUtf8 {
        /// `path` or `path:line`.
        location: String,
        /// Offset of the first invalid byte, within the file or the line.
        offset: usize,
    },
    /// A bad record in a JSON Lines or CSV file.
    #[error("{path}:{line}: {message}")]
    Record {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// What is wrong with it.
        message: String,
    },
    /// The CSV header has no such column.
    #[error("{path}: no column `{column}`; the columns are: {}", columns.join(", "))]
    UnknownColumn {
        /// The file.
        path: PathBuf,
        /// The column asked for.
        column: String,
        /// The header row.
        columns: Vec<String>,
    },
    /// A setting is out of range.
    #[error("{field}: {message}")]
    Setting {
        /// The config path of the setting (`data.val_fraction`).
        field: &'static str,
        /// What is wrong and what is allowed.
        message: String,
    },
    /// No documents, or documents that give no tokens.
    #[error("the {split} data is empty ({what}): add documents to `data.{split}`")]
    Empty {
        /// `train` or `val`.
        split: &'static str,
        /// What was found.
        what: String,
    },
    /// Fewer tokens than one training window needs.
    #[error("the {split} data has {tokens} tokens, but one window of seq_len {seq_len} needs {needed}: lower `train.seq_len` or add data")]
    TooFewTokens {
        /// `train` or `val`.
        split: &'static str,
        /// Tokens available.
        tokens: usize,
        /// The configured sequence length.
        seq_len: usize,
        /// `seq_len + 1`.
        needed: usize,
    },
    /// The tokenizer failed on a document.
    #[error("{origin}: the tokenizer failed: {message}")]
    Tokenize {
        /// The document (`path` or `path:line`).
        origin: String,
        /// The tokenizer's message.
        message: String,
    },
    /// The chat template cannot render a conversation.
    #[error("{origin}: the chat template cannot render this example: {message}")]
    Render {
        /// The example (`path:line`).
        origin: String,
        /// What the template engine said.
        message: String,
    },
    /// A supervised fine-tuning example is longer than a row, and `data.sft.overlong` is
    /// `error`.
    #[error("{origin}: the example has {tokens} tokens and a row holds {max} (train.seq_len + 1): raise `train.seq_len`, shorten the example, or set `data.sft.overlong: truncate` to cut it (the run counts what it cuts)")]
    Overlong {
        /// The example (`path:line`).
        origin: String,
        /// Its tokens.
        tokens: usize,
        /// Tokens a row holds.
        max: usize,
    },
    /// The tokenizer failed outside any document.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

impl DataError {
    /// Whether the error is in the user's input — the config's data settings or the data
    /// files — rather than a failure of the machine (IO) or of the tokenizer. The command line
    /// exits with code 2 for these, as for any config error.
    pub fn is_input(&self) -> bool {
        match self {
            DataError::Io { .. } | DataError::Tokenize { .. } | DataError::Tokenizer(_) => false,
            DataError::MissingFile { .. }
            | DataError::BadGlob { .. }
            | DataError::NoMatch { .. }
            | DataError::Undecodable { .. }
            | DataError::NotUtf8 { .. }
            | DataError::Record { .. }
            | DataError::UnknownColumn { .. }
            | DataError::Setting { .. }
            | DataError::Empty { .. }
            | DataError::TooFewTokens { .. }
            | DataError::Render { .. }
            | DataError::Overlong { .. } => true,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> DataError {
        DataError::Io {
            path: path.into(),
            source,
        }
    }
}
