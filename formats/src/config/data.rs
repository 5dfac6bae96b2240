//! The `data` section of an experiment config, as written on disk.
//!
//! The doc comment of each field is also its entry in `docs/config.md` (rendered by the
//! host's config reference): it says what the field means and ends with its default, or
//! with "Required.".

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Where the documents come from and how validation data is chosen.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Training sources; at least one. Relative paths are relative to the config file.
    /// Required.
    pub train: Vec<Source>,
    /// Validation sources. When empty, `val_fraction` of the training documents is held out
    /// instead (chosen by content, deterministically). Default: `[]`.
    #[serde(default)]
    pub val: Vec<Source>,
    /// Fraction of the training documents held out for validation when `val` is empty; in
    /// [0, 1). Default: `0.1`.
    #[serde(default = "default_val_fraction")]
    pub val_fraction: f64,
    /// Directory of the token cache, relative to the config file. Its files are named by
    /// content, so one directory serves every experiment. Default: `$CODEX_ML_CACHE` if set,
    /// else `$XDG_CACHE_HOME/codex-ml`, else `~/.cache/codex-ml`.
    #[serde(default)]
    pub cache_dir: Option<String>,
    /// Whether globs in `Text` sources skip the files git would ignore, as ripgrep does:
    /// those matched by `.gitignore` files (inside a git repository), `.ignore` files,
    /// `.git/info/exclude` and git's global excludes file (`core.excludesFile`). `false` reads
    /// them too. Files named by a plain path (no glob) are read either way. Hidden files and
    /// directories (`.git/` among them) are skipped either way, unless the glob names them
    /// with a leading dot (`.github/**/*.yml`). Default: `true`.
    #[serde(default = "default_true")]
    pub gitignore: bool,
    /// What to do with a file of a `Text` source that is not text: not valid UTF-8, or binary
    /// (a NUL byte in its first 8000 bytes, the test git uses). `skip` leaves it out and
    /// counts it (the count and a few of the paths go to the log and to the run's
    /// `metadata.json`); `error` stops the run naming the file. JSON Lines and CSV records
    /// must always be UTF-8. Default: `skip`.
    #[serde(default)]
    pub undecodable: Undecodable,
    /// How documents are cleaned before the tokenizer sees them. Part of the token cache
    /// key: changing a setting re-tokenizes. Default: `(normalize_newlines: true, min_chars: 1)`.
    #[serde(default)]
    pub preprocess: Preprocess,
    /// Supervised fine-tuning: how `Chat` and `PromptCompletion` examples become batches
    /// (which tokens carry the loss, the chat template, padding, what happens to an example
    /// longer than the window). Read only when the sources are `Chat` or `PromptCompletion`.
    /// Default: `(packing: false, assistant_only_loss: true, completion_only_loss: true,
    /// overlong: truncate)`.
    #[serde(default)]
    pub sft: Sft,
}

/// How supervised fine-tuning examples are tokenized, masked and batched.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Sft {
    /// Pack several examples into each row of `train.seq_len` positions (best-fit
    /// decreasing, as TRL's `packing=True` with its `bfd` strategy), each example from
    /// position 0 and attending only to itself, so that it is computed as it would be alone
    /// while rows waste little on padding; `train.batch_size` then counts rows. Needs a model
    /// that reads packed positions (the built-in ones do). `false` puts one example in each
    /// row and pads every batch to its longest example, as TRL's `SFTTrainer` does by
    /// default. Default: `false`.
    #[serde(default)]
    pub packing: bool,
    /// `Chat` sources: the loss counts only the assistant's tokens: those the chat template
    /// marks with `{% generation %}` ... `{% endgeneration %}`, as TRL's
    /// `assistant_only_loss` does; with a template that has no such marks (LLaMA 3's,
    /// Qwen2's), each assistant message and the end-of-turn text after it, found by rendering
    /// the conversation up to it. `false` counts every token of the conversation (TRL's
    /// default). Default: `true`.
    #[serde(default = "default_true")]
    pub assistant_only_loss: bool,
    /// `PromptCompletion` sources: the loss counts only the completion's tokens, as TRL's
    /// `completion_only_loss` does for prompt-completion data; `false` counts the prompt's
    /// too. Default: `true`.
    #[serde(default = "default_true")]
    pub completion_only_loss: bool,
    /// The chat template, a file relative to the config: a Jinja template, or a
    /// `tokenizer_config.json` whose `chat_template` holds one. Default: the `hf`
    /// tokenizer's own, from `chat_template.jinja` or `tokenizer_config.json` beside its
    /// `tokenizer.json`.
    #[serde(default)]
    pub chat_template: Option<String>,
    /// An example with more tokens than a row holds (`train.seq_len + 1`): `truncate` keeps
    /// its start, as TRL does, and the run counts the examples and tokens cut (log and
    /// `metadata.json`); `error` stops the run naming the example's file and line.
    /// Default: `truncate`.
    #[serde(default)]
    pub overlong: Overlong,
}

impl Default for Sft {
    fn default() -> Self {
        Sft {
            packing: false,
            assistant_only_loss: true,
            completion_only_loss: true,
            chat_template: None,
            overlong: Overlong::default(),
        }
    }
}

/// What happens to a supervised fine-tuning example longer than a row.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Overlong {
    /// Keep the start, cut the rest, and count what was cut.
    #[default]
    Truncate,
    /// Stop with an error naming the example.
    Error,
}

/// What happens to a file that is not UTF-8 text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Undecodable {
    /// Leave the file out, and count it.
    #[default]
    Skip,
    /// Stop with an error naming the file.
    Error,
}

/// Document clean-up applied before splitting, tokenizer training and tokenization.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Preprocess {
    /// Turn `\r\n` and lone `\r` into `\n`, so the same code checked out on Windows and on
    /// Unix gives the same tokens. Default: `true`.
    #[serde(default = "default_true")]
    pub normalize_newlines: bool,
    /// Drop documents shorter than this many characters (after newline normalisation); `1`
    /// drops empty documents only. Default: `1`.
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

fn default_messages() -> String {
    "messages".to_string()
}

fn default_prompt() -> String {
    "prompt".to_string()
}

fn default_completion() -> String {
    "completion".to_string()
}

fn default_val_fraction() -> f64 {
    0.1
}

/// One source of documents.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub enum Source {
    /// Text files, one document per file; each entry of `paths` is a path or a glob
    /// (`src/**/*.rs`, `*.{rs,py}`; `*` stays within a directory, `**` crosses them), and
    /// `exclude` (default `[]`) lists paths or globs to leave out (`**/tests/**`, `vendor`; a
    /// directory excludes everything in it), both relative to the config file. Files come in
    /// the order of `paths`, each glob's files sorted by path; a file named twice is read
    /// once. Globs skip hidden and git-ignored files (see `data.gitignore`); symbolic links
    /// to files are read, symbolic links to directories are not followed. A glob that
    /// matches no file is a warning, or an error when all of `data.train` (or of `data.val`)
    /// finds no file. At least one entry in `paths`.
    Text {
        /// Paths or globs.
        paths: Vec<String>,
        /// Paths or globs of files to leave out.
        #[serde(default)]
        exclude: Vec<String>,
    },
    /// JSON Lines, one document per line, the text in `field`.
    Jsonl {
        /// The file.
        path: String,
        /// The field holding the text.
        field: String,
    },
    /// Supervised fine-tuning: JSON Lines of conversations, one per line, `field` (default
    /// `messages`) holding a list of `{"role": ..., "content": ...}` objects, rendered by the
    /// chat template (`data.sft.chat_template`). Which tokens carry the loss:
    /// `data.sft.assistant_only_loss`.
    Chat {
        /// The file.
        path: String,
        /// The field holding the messages.
        #[serde(default = "default_messages")]
        field: String,
    },
    /// Supervised fine-tuning: JSON Lines of prompt/completion pairs, one per line, in the
    /// fields `prompt` and `completion` (defaults `prompt` and `completion`). Both are
    /// strings, or both lists of messages rendered by the chat template (the prompt with the
    /// generation prompt, as TRL does). Which tokens carry the loss:
    /// `data.sft.completion_only_loss`.
    PromptCompletion {
        /// The file.
        path: String,
        /// The field holding the prompt.
        #[serde(default = "default_prompt")]
        prompt: String,
        /// The field holding the completion.
        #[serde(default = "default_completion")]
        completion: String,
    },
    /// CSV with a header row, one document per row, the text in `column`.
    Csv {
        /// The file.
        path: String,
        /// The column holding the text.
        column: String,
    },
}

/// How `Text` sources choose and read their files: `data.gitignore` and `data.undecodable`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadSettings {
    /// Skip what `.gitignore`, `.ignore` and git's exclude files ignore.
    pub gitignore: bool,
    /// Skip, or refuse, files that are not UTF-8 text.
    pub undecodable: Undecodable,
}

impl Default for ReadSettings {
    fn default() -> Self {
        ReadSettings {
            gitignore: true,
            undecodable: Undecodable::Skip,
        }
    }
}

impl Source {
    /// Whether the source holds supervised fine-tuning examples (`Chat`, `PromptCompletion`)
    /// rather than documents.
    pub fn is_sft(&self) -> bool {
        matches!(self, Source::Chat { .. } | Source::PromptCompletion { .. })
    }
}

impl DataConfig {
    /// Whether the data is supervised fine-tuning examples: every training source is `Chat`
    /// or `PromptCompletion` (the resolver refuses a mixture).
    pub fn is_sft(&self) -> bool {
        self.train.first().is_some_and(Source::is_sft)
    }

    /// The settings the host's source reader takes from this config.
    pub fn read_settings(&self) -> ReadSettings {
        ReadSettings {
            gitignore: self.gitignore,
            undecodable: self.undecodable,
        }
    }
}
