//! The experiment config: a RON file naming the components of a run, their parameters, the
//! data and the training settings.
//!
//! Raw → resolved, as cargo and uv do it. The `Raw*` types mirror the file exactly: plain serde
//! types with `deny_unknown_fields`, every field documented with its default. [`Config::load`]
//! parses them strictly (errors carry file, line, column and field path, rendered by
//! [`crate::diagnostics`]), applies `--set` overrides, fills defaults, validates across fields
//! and returns [`Config`] — the only type the rest of the host sees.
//!
//! Each setting is defined once: by its field in a raw type (its doc comment states its
//! meaning and default) and by the resolver, which fills the default into the raw value as it
//! resolves it. The resolved config keeps that filled raw value, so the `config.ron` written
//! into a run directory ([`Config::to_ron`]), the parameters trackers record
//! ([`Config::to_json`]) and the resume check ([`Config::resume_differences`]) are all derived
//! from it, and the field reference of `docs/config.md` is rendered from the raw types'
//! schema ([`reference()`]).
//!
//! Overrides follow the lossless route in FACTS.md: typed parse → `serde_json::Value` (enums
//! stay externally tagged, which `ron::Value` would lose) → set each path (the value read as a
//! RON literal, else taken as a string; unknown paths refused with a suggestion) →
//! `serde_path_to_error` back into the raw types, so a bad value is reported by its path.
//!
//! Component `params` are free-form here: each component deserialises its own strictly. They
//! are carried as a JSON object; in the file they are written as a RON struct
//! (`(n_layer: 2)`) or map (`{"n_layer": 2}`).

use std::borrow::Cow;
use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use codex_plugin_api::{ComponentKind, Schedule, TrainSettings};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::data::{DataConfig, Source};
use crate::diagnostics::{
    backticked, did_you_mean, field_path, join_field, parse_ron, ron_options, Diagnostic,
};
use crate::plugins::registry::Registry;

/// Seed used when the config gives none.
pub const DEFAULT_SEED: u64 = 1337;
/// The kernel a CPU run uses unless its config says otherwise.
const DEFAULT_CPU_KERNEL: &str = "cpu";
/// The `kernel` value that runs plain tensor ops.
pub const NO_KERNEL: &str = "none";

/// An experiment config as written on disk.
///
/// Its doc comments, and those of the types it holds, are the field reference of
/// `docs/config.md` ([`reference()`]): each says what the field means and ends with its default
/// ("Default: ...") or with "Required.". The resolver fills each default into this value as it
/// resolves it, so the resolved [`Config`] keeps the file with every default written out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    /// Name of the experiment; runs go to `runs/<experiment>/<run-id>/`. Letters, digits, `-`,
    /// `_` and `.` (not first). Required.
    experiment: String,
    /// Seed of every random stream: initialisation, data order, dropout, sampling.
    /// Default: `1337`.
    #[serde(default)]
    seed: Option<u64>,
    /// `cpu`, `cuda`, `cuda:N`, `metal` or `metal:N`. Default: `"cpu"`.
    #[serde(default)]
    device: Option<String>,
    /// Training and validation data. Required.
    data: DataConfig,
    /// The tokenizer, e.g. `(name: "bpe", params: (vocab_size: 1024))`. Required.
    tokenizer: RawComponent,
    /// The model. Required.
    model: RawComponent,
    /// The optimizer and the peak learning rate. Required.
    optimizer: RawOptimizer,
    /// The training loop. Default: `(name: "default")`.
    #[serde(default)]
    trainer: Option<RawComponent>,
    /// Training settings. Required.
    train: RawTrain,
    /// Metric sinks, e.g. `[(name: "csv"), (name: "console")]`. `ndjson` is always written;
    /// listing it changes nothing (and lets you give it params). A sink may appear once.
    /// Default: `[]`.
    #[serde(default)]
    sinks: Vec<RawComponent>,
    /// Run trackers, e.g. `[(name: "mlflow", params: (root: "/data/mlruns"))]`: each is told
    /// the run started (or resumed) with the config flattened to dotted keys, gets every metric
    /// record, each checkpoint and the run's files, and how the run ended (finished, failed,
    /// killed). A tracker that fails is disabled with one warning; training goes on. See
    /// [components.md](components.md). Default: `[]`.
    #[serde(default)]
    trackers: Vec<RawComponent>,
    /// Kernel component providing fused ops ([performance.md](performance.md)); `"none"` runs
    /// plain tensor ops. The run's stored `config.ron` always says which, so a resumed run
    /// keeps it. Default: `"cpu"` on the CPU, `"none"` elsewhere.
    // A string, not an option, so that `None` cannot be read as either "off" or "the default".
    #[serde(default)]
    kernel: String,
    /// A sample generated at the end of the run. Default: none.
    #[serde(default)]
    generate: Option<RawGenerate>,
}

/// A component chosen by registry name (see `codex-ml list`), with its parameters:
/// `(name: "NAME", params: (...))`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawComponent {
    /// Registry name. Required.
    name: String,
    /// The component's own parameters, read and checked by the component. Default: none.
    #[serde(default, skip_serializing_if = "Params::omitted")]
    params: Params,
}

impl RawComponent {
    fn named(name: &str) -> Self {
        RawComponent {
            name: name.to_owned(),
            params: Params::default(),
        }
    }
}

/// The optimizer: a component plus the peak learning rate the schedule scales.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOptimizer {
    /// Registry name (`adamw`, `sgd`, ...). Required.
    name: String,
    /// Peak learning rate, positive; the schedule scales it. Required.
    lr: f64,
    /// The optimizer's own parameters (`weight_decay`, `betas`, ...). Default: none.
    #[serde(default, skip_serializing_if = "Params::omitted")]
    params: Params,
}

/// Training settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTrain {
    /// Optimizer steps to run, at least 1. At least one of `max_steps` and `epochs` is
    /// required. Default: none.
    #[serde(default)]
    max_steps: Option<u64>,
    /// Passes over the training data, at least 1; with `max_steps` too, whichever ends first.
    /// Default: none.
    #[serde(default)]
    epochs: Option<u64>,
    /// Tokens per sequence, at least 1. Default: `128`.
    #[serde(default)]
    seq_len: Option<usize>,
    /// Sequences per micro-batch, at least 1. Default: `8`.
    #[serde(default)]
    batch_size: Option<usize>,
    /// Micro-batches per optimizer step, at least 1 (gradients are token-weighted).
    /// Default: `1`.
    #[serde(default)]
    grad_accum: Option<usize>,
    /// Evaluate every N optimizer steps; `0` evaluates only at the end. Default: `0`.
    #[serde(default)]
    eval_every: Option<u64>,
    /// Validation batches per evaluation; `0` uses the whole validation split. Default: `16`.
    #[serde(default)]
    eval_batches: Option<usize>,
    /// Checkpoint every N optimizer steps; `0` checkpoints only at the end. Default: `0`.
    #[serde(default)]
    checkpoint_every: Option<u64>,
    /// Checkpoints to keep: the newest N valid ones, plus the one with the lowest validation
    /// loss; `0` keeps every checkpoint. The newest valid checkpoint is never deleted, nor is
    /// one that fails verification ([checkpoints.md](checkpoints.md)). Default: `3`.
    #[serde(default)]
    keep_checkpoints: Option<usize>,
    /// Emit training metrics every N optimizer steps, at least 1. Default: `10`.
    #[serde(default)]
    log_every: Option<u64>,
    /// Clip gradients to this global L2 norm; `0` disables clipping (the norm is logged
    /// anyway). Default: `1.0`.
    #[serde(default)]
    clip_norm: Option<f64>,
    /// The learning-rate schedule, stepped once per optimizer step.
    /// Default: `(kind: constant, warmup_steps: 0, min_lr: 0.0)`.
    #[serde(default)]
    schedule: Option<RawSchedule>,
}

/// The learning-rate schedule: linear warmup, then constant or decaying.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSchedule {
    /// Shape after warmup: constant at `optimizer.lr`, or linear / cosine decay to `min_lr` at
    /// the last step. Default: `constant`.
    #[serde(default)]
    kind: Option<ScheduleKind>,
    /// Steps of linear warmup from 0 to `optimizer.lr`; at most `train.max_steps` when that is
    /// set. Default: `0`.
    #[serde(default)]
    warmup_steps: Option<u64>,
    /// The floor of the decay; between 0 and `optimizer.lr`. Default: `0.0`.
    #[serde(default)]
    min_lr: Option<f64>,
}

/// A sample generated at the end of the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawGenerate {
    /// Text the sample continues. Required.
    prompt: String,
    /// Tokens to generate, at least 1. Default: `128`.
    #[serde(default)]
    max_tokens: Option<usize>,
    /// Softmax temperature; `0` always picks the most likely token. Default: `1.0`.
    #[serde(default)]
    temperature: Option<f64>,
    /// Sample only among the K most likely tokens; K is at least 1. Default: none, every token.
    #[serde(default)]
    top_k: Option<usize>,
    /// Sample only among the most likely tokens whose probabilities add up to P, in (0, 1].
    /// Default: none.
    #[serde(default)]
    top_p: Option<f64>,
}

/// A component's own parameters: free-form here, read and checked by the component. Carried
/// as JSON — an object, or null for none (`params: ()`, or left out) — and written by
/// [`Config::to_ron`] as a one-line RON struct (`(n_layer: 2)`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(transparent)]
struct Params(Value);

thread_local! {
    /// Set while [`Config::to_ron`] serialises: params are then written as RON structs, and
    /// left out when there are none. Every other serialisation (the JSON tree overrides
    /// and trackers work on) carries them as they are.
    static WRITING_RON: Cell<bool> = const { Cell::new(false) };
}

impl Params {
    /// Serialise with `f` as RON: params as RON literals, empty ones left out.
    fn writing_ron<T>(f: impl FnOnce() -> T) -> T {
        struct Restore(bool);
        impl Drop for Restore {
            fn drop(&mut self) {
                WRITING_RON.set(self.0);
            }
        }
        let _restore = Restore(WRITING_RON.replace(true));
        f()
    }

    fn is_empty(&self) -> bool {
        self.0.as_object().is_none_or(|m| m.is_empty())
    }

    /// Left out of the RON form when there are none, as the file may do.
    fn omitted(&self) -> bool {
        WRITING_RON.get() && self.is_empty()
    }
}

impl Serialize for Params {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if !WRITING_RON.get() {
            return self.0.serialize(serializer);
        }
        let text = ron_literal(&self.0);
        let raw = ron::value::RawValue::from_boxed_ron(text.into_boxed_str())
            .map_err(|e| serde::ser::Error::custom(format!("params as RON: {e}")))?;
        raw.serialize(serializer)
    }
}

impl JsonSchema for Params {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        "Params".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "type": ["object", "null"] })
    }
}

/// A JSON value as a one-line RON literal that parses back into the same JSON value.
fn ron_literal(value: &Value) -> String {
    match value {
        Value::Null => "None".to_owned(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => ron::to_string(s).unwrap_or_else(|_| format!("{s:?}")),
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(ron_literal).collect();
            format!("[{}]", items.join(", "))
        }
        Value::Object(map) if map.is_empty() => "{}".to_owned(),
        Value::Object(map) if map.keys().all(|k| is_identifier(k)) => {
            let fields: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{k}: {}", ron_literal(v)))
                .collect();
            format!("({})", fields.join(", "))
        }
        Value::Object(map) => {
            let entries: Vec<String> = map
                .iter()
                .map(|(k, v)| {
                    format!(
                        "{}: {}",
                        ron_literal(&Value::String(k.clone())),
                        ron_literal(v)
                    )
                })
                .collect();
            format!("{{{}}}", entries.join(", "))
        }
    }
}

fn is_identifier(key: &str) -> bool {
    key.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !matches!(key, "true" | "false" | "None" | "Some" | "inf" | "NaN")
}

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

impl ScheduleKind {
    /// The plugin-API form handed to trainers.
    pub fn to_api(self) -> codex_plugin_api::ScheduleKind {
        match self {
            ScheduleKind::Constant => codex_plugin_api::ScheduleKind::Constant,
            ScheduleKind::Linear => codex_plugin_api::ScheduleKind::Linear,
            ScheduleKind::Cosine => codex_plugin_api::ScheduleKind::Cosine,
        }
    }
}

/// A resolved experiment config: defaults filled, validated. Relative data paths have been
/// made absolute against [`Config::dir`], so the config means the same wherever it is stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The config file, as given.
    pub path: PathBuf,
    /// The absolute directory of the config file; relative paths in it are resolved here.
    pub dir: PathBuf,
    /// Experiment name, safe as a directory name.
    pub experiment: String,
    /// Seed of every random stream of the run.
    pub seed: u64,
    /// Device: `cpu`, `cuda`, `cuda:N`, `metal` or `metal:N`.
    pub device: String,
    /// Data sources, with absolute paths.
    pub data: DataConfig,
    /// The tokenizer.
    pub tokenizer: ComponentSpec,
    /// The model.
    pub model: ComponentSpec,
    /// The optimizer.
    pub optimizer: OptimizerSpec,
    /// The trainer.
    pub trainer: ComponentSpec,
    /// Training settings.
    pub train: TrainConfig,
    /// Metric sinks, `ndjson` always first.
    pub sinks: Vec<ComponentSpec>,
    /// Run trackers.
    pub trackers: Vec<ComponentSpec>,
    /// Kernel component for fused ops; `None` runs plain ops.
    pub kernel: Option<String>,
    /// Sample to generate at the end of the run.
    pub generate: Option<GenerateConfig>,
    /// The file as read, with `--set` applied and every default filled in by the resolver
    /// (paths absolute, `kernel` explicit, `ndjson` among the sinks): what [`Config::to_ron`],
    /// [`Config::to_json`] and [`Config::resume_differences`] read, so each setting is defined
    /// once, by its raw type.
    raw: RawConfig,
}

/// A component by registry name with its parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct ComponentSpec {
    /// Registry name.
    pub name: String,
    /// Parameters, always a JSON object (empty when none were given).
    pub params: Value,
}

impl ComponentSpec {
    /// The parameters as the JSON text handed to the component's factory.
    pub fn params_json(&self) -> String {
        self.params.to_string()
    }
}

/// The optimizer: a component plus the peak learning rate.
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerSpec {
    /// Registry name.
    pub name: String,
    /// Peak learning rate, positive.
    pub lr: f64,
    /// Parameters, always a JSON object.
    pub params: Value,
}

impl OptimizerSpec {
    /// The parameters as the JSON text handed to the optimizer's factory.
    pub fn params_json(&self) -> String {
        self.params.to_string()
    }
}

/// The resolved `train` section.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Optimizer steps to run, if bounded by steps.
    pub max_steps: Option<u64>,
    /// Passes over the training data, if bounded by epochs.
    pub epochs: Option<u64>,
    /// Tokens per sequence, at least 1.
    pub seq_len: usize,
    /// Sequences per micro-batch, at least 1.
    pub batch_size: usize,
    /// Micro-batches per optimizer step, at least 1.
    pub grad_accum: usize,
    /// Evaluate every N optimizer steps (0: only at the end).
    pub eval_every: u64,
    /// Validation batches per evaluation (0: the whole split).
    pub eval_batches: usize,
    /// Checkpoint every N optimizer steps (0: only at the end).
    pub checkpoint_every: u64,
    /// Newest valid checkpoints to keep besides the best one (0: keep all).
    pub keep_checkpoints: usize,
    /// Emit training metrics every N optimizer steps, at least 1.
    pub log_every: u64,
    /// Global L2 norm to clip gradients to (0: no clipping).
    pub clip_norm: f64,
    /// The learning-rate schedule.
    pub schedule: ScheduleConfig,
}

impl TrainConfig {
    /// The settings handed to the trainer, once the run knows how many optimizer steps the
    /// data allows (`total_steps`, from `max_steps` and/or `epochs`).
    pub fn settings(
        &self,
        seed: u64,
        lr: f64,
        total_steps: u64,
        ignore_index: u32,
    ) -> TrainSettings {
        TrainSettings {
            seed,
            total_steps,
            batch_size: self.batch_size as u64,
            seq_len: self.seq_len as u64,
            grad_accum: self.grad_accum as u64,
            eval_every: self.eval_every,
            eval_batches: self.eval_batches as u64,
            checkpoint_every: self.checkpoint_every,
            log_every: self.log_every,
            lr,
            schedule: self.schedule.to_api(),
            clip_norm: self.clip_norm,
            ignore_index,
        }
    }
}

/// The resolved schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScheduleConfig {
    /// Shape after warmup.
    pub kind: ScheduleKind,
    /// Steps of linear warmup.
    pub warmup_steps: u64,
    /// Floor of the decay, at most `optimizer.lr`.
    pub min_lr: f64,
}

impl ScheduleConfig {
    /// The plugin-API form.
    pub fn to_api(self) -> Schedule {
        Schedule {
            kind: self.kind.to_api(),
            warmup_steps: self.warmup_steps,
            min_lr: self.min_lr,
        }
    }
}

/// The resolved `generate` section.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateConfig {
    /// Text the sample starts from.
    pub prompt: String,
    /// Tokens to generate, at least 1.
    pub max_tokens: usize,
    /// Softmax temperature, finite and non-negative (0: greedy).
    pub temperature: f64,
    /// Keep the K most likely tokens, K ≥ 1.
    pub top_k: Option<usize>,
    /// Nucleus sampling threshold in (0, 1].
    pub top_p: Option<f64>,
}

/// One `--set PATH=VALUE` override.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    /// The argument as given, for messages.
    pub arg: String,
    /// The dotted path as given (`train.max_steps`, `sinks[0].name`).
    pub path: String,
    segments: Vec<Segment>,
    /// The value text as given.
    pub value: String,
}

#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Key(String),
    Index(usize),
}

impl FromStr for Override {
    type Err = String;

    fn from_str(arg: &str) -> Result<Self, Self::Err> {
        let Some((path, value)) = arg.split_once('=') else {
            return Err(format!(
                "`{arg}` is not PATH=VALUE; write it like `train.max_steps=500`"
            ));
        };
        let path = path.trim();
        let segments = parse_path(path).map_err(|why| format!("bad path `{path}`: {why}"))?;
        Ok(Override {
            arg: arg.to_owned(),
            path: canonical(&segments),
            segments,
            value: value.to_owned(),
        })
    }
}

impl fmt::Display for Override {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.arg)
    }
}

/// The path in the form errors use: `sinks[0].name` (never `sinks.0.name`).
fn canonical(segments: &[Segment]) -> String {
    let mut out = String::new();
    for segment in segments {
        match segment {
            Segment::Key(key) => {
                out = join_field(&out, key);
            }
            Segment::Index(index) => out.push_str(&format!("[{index}]")),
        }
    }
    out
}

/// Whether `field` is `path`, inside it, or contains it (`train` and `train.seq_len`).
fn related(field: &str, path: &str) -> bool {
    let inside = |outer: &str, inner: &str| {
        inner == outer
            || outer.is_empty()
            || inner
                .strip_prefix(outer)
                .is_some_and(|rest| rest.starts_with(['.', '[']))
    };
    inside(path, field) || inside(field, path)
}

/// `a.b[2].c` or `a.b.2.c` → keys and indices.
fn parse_path(path: &str) -> Result<Vec<Segment>, String> {
    if path.is_empty() {
        return Err("the path is empty; name a field like `train.max_steps`".to_owned());
    }
    let mut segments = Vec::new();
    for part in path.split('.') {
        let (key, mut rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if key.is_empty() && rest.is_empty() {
            return Err("empty segment; separate fields with single dots".to_owned());
        }
        if !key.is_empty() {
            match key.parse::<usize>() {
                Ok(index) => segments.push(Segment::Index(index)),
                Err(_) => segments.push(Segment::Key(key.to_owned())),
            }
        }
        while !rest.is_empty() {
            let close = rest
                .find(']')
                .ok_or_else(|| "unclosed `[`; write indices like `sinks[0]`".to_owned())?;
            let index = rest[1..close]
                .parse::<usize>()
                .map_err(|_| format!("`{}` is not a list index", &rest[..=close]))?;
            segments.push(Segment::Index(index));
            rest = &rest[close + 1..];
            if !rest.is_empty() && !rest.starts_with('[') {
                return Err(format!("unexpected `{rest}` after an index"));
            }
        }
    }
    Ok(segments)
}

/// Read an override value: a RON literal (`500`, `3e-4`, `true`, `"text"`, `[1, 2]`,
/// `(a: 1)`, `None`), else the text itself as a string (`cosine`, `my run`, `cuda:0`).
fn parse_value(text: &str) -> Value {
    let trimmed = text.trim();
    // ron reads a bare identifier as a unit value, which JSON would turn into null; here it is
    // the name of something (an enum variant, a component), so keep it as a string.
    let bare_identifier = trimmed.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && trimmed
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_');
    if bare_identifier && !matches!(trimmed, "true" | "false" | "None") {
        return Value::String(trimmed.to_owned());
    }
    ron_options()
        .from_str::<Value>(trimmed)
        .unwrap_or_else(|_| Value::String(text.to_owned()))
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

impl Config {
    /// Read, override, resolve and validate the config at `path`.
    pub fn load(path: &Path, overrides: &[Override]) -> Result<Config, ConfigError> {
        let source = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_source(path, &source, overrides)
    }

    /// Like [`Config::load`], with the file's text already read (`path` names it in errors and
    /// anchors relative paths).
    pub fn from_source(
        path: &Path,
        source: &str,
        overrides: &[Override],
    ) -> Result<Config, ConfigError> {
        let mut raw: RawConfig = parse_ron(path, source).map_err(ConfigError::Invalid)?;
        if !overrides.is_empty() {
            raw = apply_overrides(raw, overrides)?;
        }
        let dir = config_dir(path);
        Resolver { path, overrides }.resolve(raw, dir)
    }

    /// Check that every component the config names is registered, so a typo fails before any
    /// work starts.
    pub fn check_components(&self, registry: &Registry) -> Result<(), ConfigError> {
        let mut wanted: Vec<(String, ComponentKind, &str)> = vec![
            (
                "tokenizer.name".into(),
                ComponentKind::Tokenizer,
                &self.tokenizer.name,
            ),
            ("model.name".into(), ComponentKind::Model, &self.model.name),
            (
                "optimizer.name".into(),
                ComponentKind::Optimizer,
                &self.optimizer.name,
            ),
            (
                "trainer.name".into(),
                ComponentKind::Trainer,
                &self.trainer.name,
            ),
        ];
        for (i, sink) in self.sinks.iter().enumerate() {
            wanted.push((format!("sinks[{i}].name"), ComponentKind::Sink, &sink.name));
        }
        for (i, tracker) in self.trackers.iter().enumerate() {
            wanted.push((
                format!("trackers[{i}].name"),
                ComponentKind::Tracker,
                &tracker.name,
            ));
        }
        if let Some(kernel) = &self.kernel {
            wanted.push(("kernel".into(), ComponentKind::Kernel, kernel));
        }
        for (field, kind, name) in wanted {
            if let Err(e) = registry.get(kind, name) {
                return Err(ConfigError::Invalid(Box::new(Diagnostic::new(
                    &self.path,
                    Some(field),
                    e.to_string(),
                ))));
            }
        }
        Ok(())
    }

    /// The config as RON, every default written out; loading it gives this config back
    /// (data paths are absolute, so it can be stored anywhere, e.g. in the run directory).
    pub fn to_ron(&self) -> String {
        let pretty = ron::ser::PrettyConfig::default();
        match Params::writing_ron(|| ron_options().to_string_pretty(&self.raw, pretty)) {
            Ok(text) => format!("{text}\n"),
            // Only plain data is serialised (no maps with non-string keys, no NaN in JSON
            // params), which ron always accepts; fall back to the debug form rather than panic.
            Err(e) => format!("// cannot write this config as RON: {e}\n// {self:?}\n"),
        }
    }

    /// The config as a JSON tree, every default written out, enums externally tagged (the
    /// lossless form overrides work on): what run trackers record as the run's parameters.
    pub fn to_json(&self) -> Result<Value, ConfigError> {
        serde_json::to_value(&self.raw).map_err(|e| ConfigError::Json(e.to_string()))
    }

    /// Check that this config may continue a run whose checkpoint was written under `saved`,
    /// and list the settings that differ (`train.max_steps: 12 -> 20`, ...).
    ///
    /// Only the settings in `RESUMABLE` may differ: they do not change the computation of
    /// the steps already taken. Any other difference (experiment, seed, data, tokenizer,
    /// model, optimizer, trainer, sequence and batch shape, clipping, schedule, and any
    /// setting added since) is refused, naming the first differing field in the order the
    /// file is written. The device may change, but bitwise-exact continuation holds only on
    /// the device that wrote it.
    pub fn resume_differences(&self, saved: &Config) -> Result<Vec<String>, ConfigError> {
        let (old, new) = (saved.to_json()?, self.to_json()?);
        let mut differing = Vec::new();
        differences(&shape::of::<RawConfig>(), "", &old, &new, &mut differing);
        let mut changed = Vec::new();
        for (field, old, new) in differing {
            if !RESUMABLE.contains(&field.as_str()) {
                return Err(ConfigError::Invalid(Box::new(Diagnostic::new(
                    &self.path,
                    Some(field.clone()),
                    format!(
                        "differs from the config of the checkpoint being resumed; {field} cannot \
                         change on resume because the steps already taken depend on it: resume \
                         with the run's own config (codex-ml resume RUN_DIR) or start a new run"
                    ),
                ))));
            }
            // A new length is allowed, but the schedule decays towards the last step, so it
            // changes the learning rate of the steps still to come: the caller reports it.
            match (shown(old), shown(new)) {
                (Some(old), Some(new)) if old == new => {}
                (Some(old), Some(new)) => changed.push(format!("{field}: {old} -> {new}")),
                _ => changed.push(format!("{field}: changed")),
            }
        }
        Ok(changed)
    }
}

/// Settings a resumed run may change: how long to train, how often to evaluate, checkpoint
/// and log, retention, sinks, trackers, the kernel, the final sample and the device. None of
/// them alters the steps already taken; any other setting, including one added later, must
/// stay as the checkpoint's config has it.
const RESUMABLE: [&str; 12] = [
    "device",
    "train.max_steps",
    "train.epochs",
    "train.eval_every",
    "train.eval_batches",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.log_every",
    "sinks",
    "trackers",
    "kernel",
    "generate",
];

/// The fields of the struct at `path` whose values differ between `old` and `new` (JSON
/// forms of the raw config), in declaration order. A section is compared whole unless a
/// setting inside it is [`RESUMABLE`].
fn differences<'v>(
    shape: &shape::Shape,
    path: &str,
    old: &'v Value,
    new: &'v Value,
    out: &mut Vec<(String, &'v Value, &'v Value)>,
) {
    let Some(shape::Node::Struct { fields, .. }) = shape.get(path) else {
        return;
    };
    for field in *fields {
        let (a, b) = (&old[field], &new[field]);
        if a == b {
            continue;
        }
        let field = join_field(path, field);
        let inside = |r: &&str| {
            r.strip_prefix(field.as_str())
                .is_some_and(|rest| rest.starts_with('.'))
        };
        if RESUMABLE.iter().any(inside) {
            differences(shape, &field, a, b, out);
        } else {
            out.push((field, a, b));
        }
    }
}

/// A setting's value in a resume note: `none`, the text, the number, or the names of a list
/// of components; `None` for a section (reported as changed).
fn shown(value: &Value) -> Option<String> {
    match value {
        Value::Null => Some("none".to_owned()),
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => items
            .iter()
            .map(|item| item["name"].as_str())
            .collect::<Option<Vec<_>>>()
            .map(|names| names.join(", ")),
        Value::Object(_) => None,
        other => Some(other.to_string()),
    }
}

/// The directory of the config file, absolute (canonical when it exists).
fn config_dir(path: &Path) -> PathBuf {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::canonicalize(&parent)
        .or_else(|_| std::path::absolute(&parent))
        .unwrap_or(parent)
}

/// `path` against `dir`, with `.` and `..` folded lexically (globs stay globs).
fn absolute(dir: &Path, path: &str) -> String {
    let given = Path::new(path);
    if given.is_absolute() {
        return path.to_owned();
    }
    let mut out = dir.to_path_buf();
    for component in given.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out.to_string_lossy().into_owned()
}

fn apply_overrides(raw: RawConfig, overrides: &[Override]) -> Result<RawConfig, ConfigError> {
    let mut tree = serde_json::to_value(&raw).map_err(|e| ConfigError::Override {
        arg: overrides.first().map(|o| o.arg.clone()).unwrap_or_default(),
        message: format!("the config cannot take overrides: {e}"),
    })?;
    // Sections created by earlier overrides (absent from the file) take any key here; the
    // typed pass below checks them.
    let mut created = BTreeSet::new();
    for o in overrides {
        set(&mut tree, o, &mut created).map_err(|message| ConfigError::Override {
            arg: o.arg.clone(),
            message,
        })?;
    }
    serde_path_to_error::deserialize::<_, RawConfig>(tree).map_err(|e| {
        let field = field_path(e.path());
        let message = e.into_inner().to_string();
        // The last override touching this field (or a parent of it) is the one to blame.
        let culprit = overrides.iter().rev().find(|o| related(&field, &o.path));
        match culprit {
            Some(o) => ConfigError::OverrideValue {
                arg: o.arg.clone(),
                field: if field.is_empty() {
                    o.path.clone()
                } else {
                    field
                },
                message,
            },
            None => ConfigError::OverrideValue {
                arg: overrides
                    .iter()
                    .map(|o| o.arg.as_str())
                    .collect::<Vec<_>>()
                    .join(" --set "),
                field,
                message,
            },
        }
    })
}

/// Set one override in the JSON form of the raw config.
fn set(tree: &mut Value, o: &Override, created: &mut BTreeSet<String>) -> Result<(), String> {
    let mut node = tree;
    let mut walked = String::new();
    // Below `params` (and inside sections the file left out) keys are not known here; the
    // typed pass that follows, or the component itself, checks them.
    let mut free_form = false;
    for segment in &o.segments {
        if node.is_null() {
            *node = match segment {
                Segment::Key(_) => Value::Object(Map::new()),
                Segment::Index(_) => Value::Array(Vec::new()),
            };
            created.insert(walked.clone());
        }
        free_form |= created.contains(&walked);
        node = match (node, segment) {
            (Value::Object(map), Segment::Key(key)) => {
                if !free_form && !map.contains_key(key) {
                    return Err(unknown_key(&walked, key, map));
                }
                walked = join_field(&walked, key);
                free_form |= key == "params";
                map.entry(key.clone()).or_insert(Value::Null)
            }
            (Value::Array(items), Segment::Index(index)) => {
                walked.push_str(&format!("[{index}]"));
                if *index == items.len() {
                    // One past the end appends, so a list can grow: `sinks[2]=(name: "csv")`.
                    items.push(Value::Null);
                }
                let len = items.len();
                items.get_mut(*index).ok_or_else(|| {
                    format!("`{walked}` is out of range: the list has {len} entries (index from 0)")
                })?
            }
            (Value::Object(_), Segment::Index(index)) => {
                return Err(format!(
                    "`{}` is a section, not a list; `[{index}]` cannot index it",
                    display_root(&walked)
                ));
            }
            (Value::Array(items), Segment::Key(key)) => {
                return Err(format!(
                    "`{walked}` is a list of {} entries; index it like `{walked}[0]`, not `.{key}`",
                    items.len()
                ));
            }
            (_, _) => {
                return Err(format!(
                    "`{walked}` is a single value, not a section; set it with `--set {walked}=VALUE`"
                ));
            }
        };
    }
    *node = parse_value(&o.value);
    Ok(())
}

fn display_root(walked: &str) -> &str {
    if walked.is_empty() {
        "the config"
    } else {
        walked
    }
}

fn unknown_key(walked: &str, key: &str, map: &Map<String, Value>) -> String {
    let mut message = format!("unknown field `{}`", join_field(walked, key));
    if let Some(s) = did_you_mean(key, map.keys().map(String::as_str)) {
        message.push_str(&format!(", did you mean `{}`?", join_field(walked, s)));
    }
    message.push_str(&format!(
        "; fields of {}: {}",
        display_root(walked),
        backticked(map.keys().map(String::as_str))
    ));
    message
}

/// Fills defaults and validates; errors name the file and the field.
struct Resolver<'a> {
    path: &'a Path,
    overrides: &'a [Override],
}

impl Resolver<'_> {
    fn invalid(&self, field: &str, message: impl Into<String>) -> ConfigError {
        let mut message = message.into();
        if let Some(o) = self
            .overrides
            .iter()
            .rev()
            .find(|o| related(field, &o.path))
        {
            message.push_str(&format!(" (value from --set {})", o.arg));
        }
        ConfigError::Invalid(Box::new(Diagnostic::new(
            self.path,
            Some(field.to_owned()),
            message,
        )))
    }

    /// Resolve `raw`, writing each default into it as it goes: the result keeps it whole.
    fn resolve(&self, mut raw: RawConfig, dir: PathBuf) -> Result<Config, ConfigError> {
        let experiment = self.experiment(&raw.experiment)?;
        let seed = *raw.seed.get_or_insert(DEFAULT_SEED);
        let device = self.device(raw.device.get_or_insert_with(|| "cpu".to_owned()))?;
        self.data(&mut raw.data, &dir)?;
        let tokenizer = self.component("tokenizer", &mut raw.tokenizer)?;
        let model = self.component("model", &mut raw.model)?;
        let optimizer = self.optimizer(&mut raw.optimizer)?;
        let trainer = raw
            .trainer
            .get_or_insert_with(|| RawComponent::named("default"));
        let trainer = self.component("trainer", trainer)?;
        let train = self.train(&mut raw.train, optimizer.lr)?;
        let mut sinks = Vec::with_capacity(raw.sinks.len() + 1);
        for (i, sink) in raw.sinks.iter_mut().enumerate() {
            let field = format!("sinks[{i}]");
            let sink = self.component(&field, sink)?;
            if sinks.iter().any(|s: &ComponentSpec| s.name == sink.name) {
                return Err(self.invalid(
                    &join_field(&field, "name"),
                    format!("sink `{}` is listed twice; keep one", sink.name),
                ));
            }
            sinks.push(sink);
        }
        if !sinks.iter().any(|s| s.name == "ndjson") {
            raw.sinks.insert(0, RawComponent::named("ndjson"));
            sinks.insert(
                0,
                ComponentSpec {
                    name: "ndjson".to_owned(),
                    params: Value::Object(Map::new()),
                },
            );
        }
        let mut trackers = Vec::with_capacity(raw.trackers.len());
        for (i, tracker) in raw.trackers.iter_mut().enumerate() {
            trackers.push(self.component(&format!("trackers[{i}]"), tracker)?);
        }
        let kernel = match raw.kernel.as_str() {
            "" if device == "cpu" => Some(DEFAULT_CPU_KERNEL.to_owned()),
            "" | NO_KERNEL => None,
            k => {
                self.name("kernel", k)?;
                Some(k.to_owned())
            }
        };
        // Explicit either way, so that a stored config means the same under a later default.
        raw.kernel = kernel.clone().unwrap_or_else(|| NO_KERNEL.to_owned());
        let generate = raw
            .generate
            .as_mut()
            .map(|g| self.generate(g))
            .transpose()?;
        Ok(Config {
            path: self.path.to_owned(),
            dir,
            experiment,
            seed,
            device,
            data: raw.data.clone(),
            tokenizer,
            model,
            optimizer,
            trainer,
            train,
            sinks,
            trackers,
            kernel,
            generate,
            raw,
        })
    }

    fn experiment(&self, name: &str) -> Result<String, ConfigError> {
        let valid = !name.is_empty()
            && !name.starts_with('.')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if valid {
            Ok(name.to_owned())
        } else {
            Err(self.invalid(
                "experiment",
                format!(
                    "`{name}` cannot name a run directory; use letters, digits, `-`, `_` and `.` \
                     (not first)"
                ),
            ))
        }
    }

    fn device(&self, device: &str) -> Result<String, ConfigError> {
        let (base, index) = match device.split_once(':') {
            Some((base, index)) => (base, Some(index)),
            None => (device, None),
        };
        let known = matches!(base, "cpu" | "cuda" | "metal");
        let index_ok = match index {
            None => true,
            Some(i) => base != "cpu" && i.parse::<usize>().is_ok(),
        };
        if known && index_ok {
            Ok(device.to_owned())
        } else {
            Err(self.invalid(
                "device",
                format!(
                    "unknown device `{device}`; use `cpu`, `cuda`, `cuda:N`, `metal` or `metal:N`"
                ),
            ))
        }
    }

    fn data(&self, data: &mut DataConfig, dir: &Path) -> Result<(), ConfigError> {
        if data.train.is_empty() {
            return Err(self.invalid(
                "data.train",
                "no training sources; add one like `Text(paths: [\"src/**/*.rs\"])`",
            ));
        }
        if !(0.0..1.0).contains(&data.val_fraction) {
            return Err(self.invalid(
                "data.val_fraction",
                format!("{} is outside [0, 1); use e.g. 0.1", data.val_fraction),
            ));
        }
        for (section, sources) in [("train", &mut data.train), ("val", &mut data.val)] {
            for (i, source) in sources.iter_mut().enumerate() {
                match source {
                    Source::Text { paths } => {
                        if paths.is_empty() {
                            return Err(self.invalid(
                                &format!("data.{section}[{i}].paths"),
                                "no paths; list files or globs like `src/**/*.rs`",
                            ));
                        }
                        for p in paths.iter_mut() {
                            *p = absolute(dir, p);
                        }
                    }
                    Source::Jsonl { path, .. } | Source::Csv { path, .. } => {
                        *path = absolute(dir, path)
                    }
                }
            }
        }
        if let Some(cache) = &mut data.cache_dir {
            *cache = absolute(dir, cache);
        }
        Ok(())
    }

    fn name(&self, field: &str, name: &str) -> Result<(), ConfigError> {
        if name.trim().is_empty() {
            Err(self.invalid(
                field,
                "empty component name; see `codex-ml list` for the names",
            ))
        } else {
            Ok(())
        }
    }

    /// The parameters as a JSON object; none are kept as null in `params`, as a file that
    /// leaves them out reads.
    fn params(&self, field: &str, params: &mut Params) -> Result<Value, ConfigError> {
        match &params.0 {
            Value::Null => Ok(Value::Object(Map::new())),
            Value::Object(map) => {
                let map = map.clone();
                if map.is_empty() {
                    params.0 = Value::Null;
                }
                Ok(Value::Object(map))
            }
            other => Err(self.invalid(
                field,
                format!("expected a struct of parameters like `(n_layer: 2)`, found `{other}`"),
            )),
        }
    }

    fn component(
        &self,
        section: &str,
        raw: &mut RawComponent,
    ) -> Result<ComponentSpec, ConfigError> {
        self.name(&join_field(section, "name"), &raw.name)?;
        Ok(ComponentSpec {
            name: raw.name.clone(),
            params: self.params(&join_field(section, "params"), &mut raw.params)?,
        })
    }

    fn optimizer(&self, raw: &mut RawOptimizer) -> Result<OptimizerSpec, ConfigError> {
        self.name("optimizer.name", &raw.name)?;
        if !(raw.lr.is_finite() && raw.lr > 0.0) {
            return Err(self.invalid(
                "optimizer.lr",
                format!(
                    "learning rate {} must be positive and finite, e.g. 3e-4",
                    raw.lr
                ),
            ));
        }
        Ok(OptimizerSpec {
            name: raw.name.clone(),
            lr: raw.lr,
            params: self.params("optimizer.params", &mut raw.params)?,
        })
    }

    fn at_least_one(&self, field: &str, value: usize) -> Result<usize, ConfigError> {
        match value {
            0 => Err(self.invalid(field, "must be at least 1")),
            n => Ok(n),
        }
    }

    fn train(&self, raw: &mut RawTrain, lr: f64) -> Result<TrainConfig, ConfigError> {
        if raw.max_steps.is_none() && raw.epochs.is_none() {
            return Err(self.invalid(
                "train",
                "neither `max_steps` nor `epochs` is set; set at least one, e.g. `max_steps: 1000`",
            ));
        }
        if raw.max_steps == Some(0) {
            return Err(self.invalid("train.max_steps", "must be at least 1"));
        }
        if raw.epochs == Some(0) {
            return Err(self.invalid("train.epochs", "must be at least 1"));
        }
        let seq_len = self.at_least_one("train.seq_len", *raw.seq_len.get_or_insert(128))?;
        let batch_size = self.at_least_one("train.batch_size", *raw.batch_size.get_or_insert(8))?;
        let grad_accum = self.at_least_one("train.grad_accum", *raw.grad_accum.get_or_insert(1))?;
        let log_every = *raw.log_every.get_or_insert(10);
        if log_every == 0 {
            return Err(self.invalid("train.log_every", "must be at least 1"));
        }
        let clip_norm = *raw.clip_norm.get_or_insert(1.0);
        if !(clip_norm.is_finite() && clip_norm >= 0.0) {
            return Err(self.invalid(
                "train.clip_norm",
                format!("{clip_norm} must be finite and non-negative (0 disables clipping)"),
            ));
        }
        let schedule = raw.schedule.get_or_insert_with(RawSchedule::default);
        let schedule = ScheduleConfig {
            kind: *schedule.kind.get_or_insert(ScheduleKind::Constant),
            warmup_steps: *schedule.warmup_steps.get_or_insert(0),
            min_lr: *schedule.min_lr.get_or_insert(0.0),
        };
        if !(schedule.min_lr.is_finite() && schedule.min_lr >= 0.0 && schedule.min_lr <= lr) {
            return Err(self.invalid(
                "train.schedule.min_lr",
                format!(
                    "{} must be between 0 and optimizer.lr ({lr})",
                    schedule.min_lr
                ),
            ));
        }
        if let Some(max_steps) = raw.max_steps {
            if schedule.warmup_steps > max_steps {
                return Err(self.invalid(
                    "train.schedule.warmup_steps",
                    format!(
                        "{} warmup steps exceed train.max_steps ({max_steps}); shorten the warmup",
                        schedule.warmup_steps
                    ),
                ));
            }
        }
        Ok(TrainConfig {
            max_steps: raw.max_steps,
            epochs: raw.epochs,
            seq_len,
            batch_size,
            grad_accum,
            eval_every: *raw.eval_every.get_or_insert(0),
            eval_batches: *raw.eval_batches.get_or_insert(16),
            checkpoint_every: *raw.checkpoint_every.get_or_insert(0),
            keep_checkpoints: *raw.keep_checkpoints.get_or_insert(3),
            log_every,
            clip_norm,
            schedule,
        })
    }

    fn generate(&self, raw: &mut RawGenerate) -> Result<GenerateConfig, ConfigError> {
        let max_tokens =
            self.at_least_one("generate.max_tokens", *raw.max_tokens.get_or_insert(128))?;
        let temperature = *raw.temperature.get_or_insert(1.0);
        if !(temperature.is_finite() && temperature >= 0.0) {
            return Err(self.invalid(
                "generate.temperature",
                format!("{temperature} must be finite and non-negative (0 is greedy)"),
            ));
        }
        if raw.top_k == Some(0) {
            return Err(self.invalid(
                "generate.top_k",
                "must be at least 1; leave it out to keep every token",
            ));
        }
        if let Some(p) = raw.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(self.invalid("generate.top_p", format!("{p} is outside (0, 1]")));
            }
        }
        Ok(GenerateConfig {
            prompt: raw.prompt.clone(),
            max_tokens,
            temperature,
            top_k: raw.top_k,
            top_p: raw.top_p,
        })
    }
}

/// The field reference of `docs/config.md`, rendered from the raw types: a table per section
/// in the order the file is written, each row from a field's doc comment (its meaning, and
/// its default or "Required.") and its JSON Schema type. Shared shapes (components, data
/// sources) get one section each.
pub fn reference() -> String {
    let schema = schemars::schema_for!(RawConfig).to_value();
    Reference::new(&schema, shape::of::<RawConfig>()).render()
}

/// What [`reference()`] renders from: the JSON Schema (doc comments and types, but no field
/// order) and the serde shape (field order).
struct Reference<'a> {
    root: &'a Value,
    shape: shape::Shape,
    /// The paths each struct or enum appears at, by type name.
    paths: BTreeMap<&'static str, Vec<String>>,
}

impl<'a> Reference<'a> {
    fn new(root: &'a Value, shape: shape::Shape) -> Self {
        let mut paths: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
        for (path, node) in shape.iter() {
            paths.entry(node.name()).or_default().push(path.to_owned());
        }
        Reference { root, shape, paths }
    }

    fn render(&self) -> String {
        let mut out = String::new();
        let mut done = BTreeSet::new();
        self.section("", &mut done, &mut out);
        out
    }

    /// The schema of the type named `name` (the root's title, or an entry of `$defs`).
    fn definition(&self, name: &str) -> &'a Value {
        if self.root["title"] == name {
            self.root
        } else {
            &self.root["$defs"][name]
        }
    }

    /// Whether the type named `name` appears at several paths: its section is then named by
    /// its label (`component`), which is also the type shown for those fields.
    fn shared(&self, name: &str) -> bool {
        self.paths.get(name).is_some_and(|p| p.len() > 1)
    }

    /// The section of the type at `path` (once per type), then those of the types inside it.
    fn section(&self, path: &str, done: &mut BTreeSet<&'static str>, out: &mut String) {
        let Some(node) = self.shape.get(path) else {
            return;
        };
        if !done.insert(node.name()) {
            return;
        }
        let definition = self.definition(node.name());
        if !enum_values(definition).is_empty() {
            // An enum of plain names: its values are its type, shown inline.
            return;
        }
        let shared = self.shared(node.name());
        let shown_at = |p: &str| format!("`{}`", p.replace("[]", "[i]"));
        let heading = if path.is_empty() {
            "Top level".to_owned()
        } else if shared {
            let at: Vec<String> = self.paths[node.name()]
                .iter()
                .map(|p| shown_at(p))
                .collect();
            let label = label(node.name());
            let (first, rest) = label.split_at(label.len().min(1));
            format!("{}{rest}: {}", first.to_uppercase(), at.join(", "))
        } else {
            shown_at(path)
        };
        out.push_str(&format!("### {heading}\n\n"));
        if !path.is_empty() {
            out.push_str(&format!("{}\n\n", text(definition)));
        }
        let mut inner = Vec::new();
        match node {
            shape::Node::Struct { fields, .. } => {
                out.push_str("| field | type | default | meaning |\n|---|---|---|---|\n");
                for field in *fields {
                    let schema = &definition["properties"][field];
                    let (meaning, default) = split_default(&text(schema));
                    let shown = if shared || path.is_empty() {
                        (*field).to_owned()
                    } else {
                        format!("{path}.{field}")
                    };
                    out.push_str(&format!(
                        "| `{shown}` | {} | {} | {} |\n",
                        self.type_of(schema),
                        cell(&default),
                        cell(&meaning)
                    ));
                    inner.push(join_field(path, field));
                }
            }
            shape::Node::Enum { variants, .. } => {
                out.push_str("| written as | meaning |\n|---|---|\n");
                let choices = definition["oneOf"]
                    .as_array()
                    .map_or(&[][..], Vec::as_slice);
                for variant in *variants {
                    let Some(schema) = choices.iter().find(|c| !c["properties"][variant].is_null())
                    else {
                        continue;
                    };
                    let body = &schema["properties"][variant];
                    let fields = match self.shape.get(&format!("{path}.{variant}")) {
                        Some(shape::Node::Struct { fields, .. }) => *fields,
                        _ => &[],
                    };
                    let fields: Vec<String> = fields
                        .iter()
                        .map(|f| format!("{f}: {}", self.type_of(&body["properties"][f])))
                        .collect();
                    out.push_str(&format!(
                        "| `{variant}({})` | {} |\n",
                        fields.join(", "),
                        cell(&text(schema))
                    ));
                }
            }
        }
        out.push('\n');
        for path in inner {
            for nested in [path.clone(), format!("{path}[]")] {
                self.section(&nested, done, out);
            }
        }
    }

    /// A field's type in plain words: `integer`, `string`, `[source]`, `struct`, the names of
    /// an enum's values. Optional values show the type they hold.
    fn type_of(&self, schema: &Value) -> String {
        let schema = match schema["anyOf"].as_array() {
            Some(choices) => choices
                .iter()
                .find(|c| c["type"] != "null")
                .unwrap_or(schema),
            None => schema,
        };
        if let Some(reference) = schema["$ref"].as_str() {
            let name = reference.rsplit('/').next().unwrap_or(reference);
            let definition = self.definition(name);
            let values = enum_values(definition);
            return if !values.is_empty() {
                let values: Vec<String> = values.iter().map(|v| format!("`{v}`")).collect();
                match values.split_last() {
                    Some((last, [])) => last.clone(),
                    Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
                    None => String::new(),
                }
            } else if self.shared(name) {
                label(name)
            } else {
                "struct".to_owned()
            };
        }
        let kinds: Vec<&str> = match &schema["type"] {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        match kinds.iter().find(|k| **k != "null") {
            Some(&"array") => format!("[{}]", self.type_of(&schema["items"])),
            Some(&"object") => "struct".to_owned(),
            Some(kind) => (*kind).to_owned(),
            None => "any".to_owned(),
        }
    }
}

/// A doc comment as schemars keeps it (title and description), on one line.
fn text(schema: &Value) -> String {
    let parts = [&schema["title"], &schema["description"]];
    let parts: Vec<&str> = parts.iter().filter_map(|p| p.as_str()).collect();
    parts
        .join(" ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// A field's doc comment split into its meaning and its default: the text after the last
/// "Default:", or "required" for one that ends with "Required.".
fn split_default(doc: &str) -> (String, String) {
    if let Some(meaning) = doc.strip_suffix("Required.") {
        return (meaning.trim().to_owned(), "required".to_owned());
    }
    match doc.rsplit_once("Default:") {
        Some((meaning, default)) => (
            meaning.trim().to_owned(),
            default.trim().trim_end_matches('.').to_owned(),
        ),
        None => (doc.to_owned(), String::new()),
    }
}

/// The values of an enum of plain names (`constant`, `linear`, `cosine`); empty otherwise.
fn enum_values(schema: &Value) -> Vec<String> {
    if let Some(values) = schema["enum"].as_array() {
        return values
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect();
    }
    let Some(choices) = schema["oneOf"].as_array() else {
        return Vec::new();
    };
    let values: Vec<String> = choices
        .iter()
        .filter_map(|c| c["const"].as_str().map(str::to_owned))
        .collect();
    if values.len() == choices.len() {
        values
    } else {
        Vec::new()
    }
}

/// A type's name for readers: `RawComponent` → `component`, `Source` → `source`.
fn label(name: &str) -> String {
    name.strip_prefix("Raw").unwrap_or(name).to_lowercase()
}

/// Text safe inside a table cell.
fn cell(text: &str) -> String {
    text.replace('|', "\\|")
}

/// The shape of a serde type as its `Deserialize` declares it: every struct's fields and every
/// enum's variants, in declaration order, by path (`train`, `train.schedule`, `sinks[]` for
/// the entries of a list, `data.train[].Text` for a struct variant). JSON Schema objects are
/// unordered; this is the order the file is written in. Found by deserialising the type from a
/// probe that offers every field.
mod shape {
    use std::collections::BTreeMap;
    use std::fmt;

    use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, Visitor};

    /// A struct or an enum, by its serde name.
    #[derive(Debug)]
    pub(super) enum Node {
        Struct {
            name: &'static str,
            fields: &'static [&'static str],
        },
        Enum {
            name: &'static str,
            variants: &'static [&'static str],
        },
    }

    impl Node {
        pub(super) fn name(&self) -> &'static str {
            match self {
                Node::Struct { name, .. } | Node::Enum { name, .. } => name,
            }
        }
    }

    /// The structs and enums of a type by path, and the paths in the order they were found
    /// (declaration order, depth first).
    #[derive(Debug, Default)]
    pub(super) struct Shape {
        nodes: BTreeMap<String, Node>,
        order: Vec<String>,
    }

    impl Shape {
        pub(super) fn get(&self, path: &str) -> Option<&Node> {
            self.nodes.get(path)
        }

        /// Every path with its node, in the order found.
        pub(super) fn iter(&self) -> impl Iterator<Item = (&str, &Node)> {
            self.order.iter().map(|p| (p.as_str(), &self.nodes[p]))
        }

        fn record(&mut self, path: &str, node: Node) {
            if !self.nodes.contains_key(path) {
                self.nodes.insert(path.to_owned(), node);
                self.order.push(path.to_owned());
            }
        }
    }

    /// The shape of `T`, every variant of every enum visited.
    pub(super) fn of<T: DeserializeOwned>() -> Shape {
        let mut found = Shape::default();
        let mut pass = 0;
        loop {
            // The probe gives each field a value; what `T` makes of them does not matter.
            let _ = T::deserialize(Probe {
                found: &mut found,
                path: String::new(),
                pass,
            });
            pass += 1;
            let most = found
                .nodes
                .values()
                .map(|n| match n {
                    Node::Enum { variants, .. } => variants.len(),
                    Node::Struct { .. } => 1,
                })
                .max()
                .unwrap_or(1);
            if pass >= most {
                return found;
            }
        }
    }

    #[derive(Debug)]
    struct Stop(String);

    impl fmt::Display for Stop {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(&self.0)
        }
    }

    impl std::error::Error for Stop {}

    impl de::Error for Stop {
        fn custom<T: fmt::Display>(msg: T) -> Self {
            Stop(msg.to_string())
        }
    }

    /// Deserializer methods that offer a fixed plain value.
    macro_rules! plain {
        ($de:lifetime; $($method:ident => $visit:ident($value:expr),)*) => {$(
            fn $method<V: Visitor<$de>>(self, visitor: V) -> Result<V::Value, Stop> {
                visitor.$visit($value)
            }
        )*};
    }

    /// Offers a plain value of whatever type is asked for; in pass N, variant N of an enum.
    struct Probe<'a> {
        found: &'a mut Shape,
        path: String,
        pass: usize,
    }

    impl Probe<'_> {
        fn at(&mut self, path: String) -> Probe<'_> {
            Probe {
                found: self.found,
                path,
                pass: self.pass,
            }
        }
    }

    impl<'de> de::Deserializer<'de> for Probe<'_> {
        type Error = Stop;

        fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Stop> {
            visitor.visit_unit()
        }

        plain! {
            'de;
            deserialize_bool => visit_bool(false),
            deserialize_i8 => visit_i64(0),
            deserialize_i16 => visit_i64(0),
            deserialize_i32 => visit_i64(0),
            deserialize_i64 => visit_i64(0),
            deserialize_u8 => visit_u64(0),
            deserialize_u16 => visit_u64(0),
            deserialize_u32 => visit_u64(0),
            deserialize_u64 => visit_u64(0),
            deserialize_f32 => visit_f64(0.0),
            deserialize_f64 => visit_f64(0.0),
            deserialize_char => visit_char(' '),
            deserialize_str => visit_str(""),
            deserialize_string => visit_str(""),
            deserialize_bytes => visit_bytes(&[]),
            deserialize_byte_buf => visit_bytes(&[]),
        }

        fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Stop> {
            visitor.visit_map(Fields {
                probe: self,
                fields: &[],
                next: 0,
            })
        }

        fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Stop> {
            visitor.visit_some(self)
        }

        fn deserialize_newtype_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            visitor: V,
        ) -> Result<V::Value, Stop> {
            visitor.visit_newtype_struct(self)
        }

        fn deserialize_seq<V: Visitor<'de>>(mut self, visitor: V) -> Result<V::Value, Stop> {
            let path = format!("{}[]", self.path);
            visitor.visit_seq(One(Some(self.at(path))))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            name: &'static str,
            fields: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, Stop> {
            self.found.record(&self.path, Node::Struct { name, fields });
            visitor.visit_map(Fields {
                probe: self,
                fields,
                next: 0,
            })
        }

        fn deserialize_enum<V: Visitor<'de>>(
            self,
            name: &'static str,
            variants: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, Stop> {
            self.found.record(&self.path, Node::Enum { name, variants });
            let Some(variant) = variants.get(self.pass % variants.len().max(1)) else {
                return Err(de::Error::custom("an enum without variants"));
            };
            visitor.visit_enum(Variant {
                probe: self,
                variant,
            })
        }

        serde::forward_to_deserialize_any! {
            i128 u128 unit unit_struct tuple tuple_struct identifier ignored_any
        }
    }

    /// A list of one entry.
    struct One<'a>(Option<Probe<'a>>);

    impl<'de> de::SeqAccess<'de> for One<'_> {
        type Error = Stop;

        fn next_element_seed<T: DeserializeSeed<'de>>(
            &mut self,
            seed: T,
        ) -> Result<Option<T::Value>, Stop> {
            self.0
                .take()
                .map(|probe| seed.deserialize(probe))
                .transpose()
        }
    }

    /// Every field of a struct, in order.
    struct Fields<'a> {
        probe: Probe<'a>,
        fields: &'static [&'static str],
        next: usize,
    }

    impl<'de> de::MapAccess<'de> for Fields<'_> {
        type Error = Stop;

        fn next_key_seed<K: DeserializeSeed<'de>>(
            &mut self,
            seed: K,
        ) -> Result<Option<K::Value>, Stop> {
            match self.fields.get(self.next) {
                Some(field) => seed.deserialize(field.into_deserializer()).map(Some),
                None => Ok(None),
            }
        }

        fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Stop> {
            let field = self.fields[self.next];
            self.next += 1;
            let path = super::join_field(&self.probe.path, field);
            seed.deserialize(self.probe.at(path))
        }
    }

    /// The variant an enum's probe picked.
    struct Variant<'a> {
        probe: Probe<'a>,
        variant: &'static str,
    }

    impl<'de, 'a> de::EnumAccess<'de> for Variant<'a> {
        type Error = Stop;
        type Variant = Self;

        fn variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<(S::Value, Self), Stop> {
            let value = seed.deserialize(self.variant.into_deserializer())?;
            Ok((value, self))
        }
    }

    impl<'de> de::VariantAccess<'de> for Variant<'_> {
        type Error = Stop;

        fn unit_variant(self) -> Result<(), Stop> {
            Ok(())
        }

        fn newtype_variant_seed<T: DeserializeSeed<'de>>(
            mut self,
            seed: T,
        ) -> Result<T::Value, Stop> {
            let path = format!("{}.{}", self.probe.path, self.variant);
            seed.deserialize(self.probe.at(path))
        }

        fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, Stop> {
            visitor.visit_seq(One(None))
        }

        fn struct_variant<V: Visitor<'de>>(
            mut self,
            fields: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, Stop> {
            let path = format!("{}.{}", self.probe.path, self.variant);
            let name = self.variant;
            self.probe
                .found
                .record(&path, Node::Struct { name, fields });
            visitor.visit_map(Fields {
                probe: self.probe.at(path),
                fields,
                next: 0,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn override_paths_parse_into_keys_and_indices() {
        let check = |arg: &str, expect: Vec<Segment>, value: &str| {
            let o: Override = arg.parse().unwrap_or_else(|e| panic!("{arg}: {e}"));
            assert_eq!(o.segments, expect, "{arg}");
            assert_eq!(o.value, value, "{arg}");
        };
        let key = |k: &str| Segment::Key(k.to_owned());
        check("seed=1", vec![key("seed")], "1");
        check(
            "train.max_steps=5",
            vec![key("train"), key("max_steps")],
            "5",
        );
        check(
            "sinks[1].name=csv",
            vec![key("sinks"), Segment::Index(1), key("name")],
            "csv",
        );
        check(
            "sinks.1.name=csv",
            vec![key("sinks"), Segment::Index(1), key("name")],
            "csv",
        );
        check(
            "a[0][2]=x=y",
            vec![key("a"), Segment::Index(0), Segment::Index(2)],
            "x=y",
        );
    }

    #[test]
    fn malformed_overrides_are_refused() {
        for (arg, expect) in [
            ("seed", "is not PATH=VALUE"),
            ("=3", "the path is empty"),
            ("train..seq_len=3", "empty segment"),
            ("sinks[x]=3", "is not a list index"),
            ("sinks[0=3", "unclosed"),
            ("sinks[0]x=3", "after an index"),
        ] {
            let error = arg.parse::<Override>().expect_err(arg);
            assert!(error.contains(expect), "{arg}: {error}");
        }
    }

    #[test]
    fn override_values_are_ron_literals_or_strings() {
        for (text, expect) in [
            ("500", serde_json::json!(500)),
            ("3e-4", serde_json::json!(3e-4)),
            ("-2", serde_json::json!(-2)),
            ("true", serde_json::json!(true)),
            ("None", Value::Null),
            ("\"quoted\"", serde_json::json!("quoted")),
            ("[1, 2]", serde_json::json!([1, 2])),
            ("(a: 1)", serde_json::json!({"a": 1})),
            ("cosine", serde_json::json!("cosine")),
            ("cuda:0", serde_json::json!("cuda:0")),
            ("my run", serde_json::json!("my run")),
            ("", serde_json::json!("")),
        ] {
            assert_eq!(parse_value(text), expect, "{text:?}");
        }
    }

    #[test]
    fn params_literals_parse_back_to_the_same_json() {
        let cases = [
            serde_json::json!({"n_layer": 2, "dropout": 0.1, "name": "x \"q\"", "tied": true}),
            serde_json::json!({"nested": {"a": [1, 2.5, null]}, "empty": {}}),
            serde_json::json!({"with space": 1, "true": 2}),
            serde_json::json!({"list": [], "neg": -3, "big": 1e300}),
        ];
        for value in cases {
            let text = ron_literal(&value);
            let back: Value = crate::diagnostics::ron_options()
                .from_str(&text)
                .unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(back, value, "through {text}");
        }
    }

    #[test]
    fn the_shape_lists_fields_in_declaration_order() {
        let shape = shape::of::<RawConfig>();
        let fields = |path: &str| match shape.get(path) {
            Some(shape::Node::Struct { fields, .. }) => fields.to_vec(),
            other => panic!("{path}: {other:?}"),
        };
        assert_eq!(fields("")[..3], ["experiment", "seed", "device"]);
        assert_eq!(fields("train.schedule"), ["kind", "warmup_steps", "min_lr"]);
        assert_eq!(fields("sinks[]"), ["name", "params"]);
        assert_eq!(fields("data.train[].Jsonl"), ["path", "field"]);
        assert!(matches!(
            shape.get("data.val[]"),
            Some(shape::Node::Enum { name: "Source", .. })
        ));
    }

    /// The reference renders each field's default from its doc comment, so every field of the
    /// raw types must state one, or say it is required.
    #[test]
    fn every_field_states_its_default_or_that_it_is_required() {
        let schema = schemars::schema_for!(RawConfig).to_value();
        let reference = Reference::new(&schema, shape::of::<RawConfig>());
        let mut checked = 0;
        for (path, node) in reference.shape.iter() {
            let shape::Node::Struct { name, fields } = node else {
                continue;
            };
            if reference.definition(name).is_null() {
                continue; // a struct variant: its fields are all required
            }
            for field in *fields {
                let doc = text(&reference.definition(name)["properties"][field]);
                let (meaning, default) = split_default(&doc);
                assert!(
                    !meaning.is_empty() && !default.is_empty(),
                    "{}: say what it means and end with \"Default: ...\" or \"Required.\": {doc:?}",
                    join_field(path, field)
                );
                checked += 1;
            }
        }
        assert!(checked > 40, "only {checked} fields found");
    }

    #[test]
    fn relative_paths_are_folded_against_the_directory() {
        let dir = Path::new("/work/configs");
        assert_eq!(absolute(dir, "../src/**/*.rs"), "/work/src/**/*.rs");
        assert_eq!(absolute(dir, "./data.jsonl"), "/work/configs/data.jsonl");
        assert_eq!(absolute(dir, "/abs/x.csv"), "/abs/x.csv");
    }
}
