//! The experiment config: a RON file naming the components of a run, their parameters, the
//! data and the training settings.
//!
//! Raw → resolved, as cargo and uv do it. The `Raw*` types mirror the file exactly: plain serde
//! types with `deny_unknown_fields`, every field documented with its default. [`Config::load`]
//! parses them strictly (errors carry file, line, column and field path, rendered by
//! [`crate::diagnostics`]), applies `--set` overrides, fills defaults, validates across fields
//! and returns [`Config`] — the only type the rest of the host sees.
//!
//! Overrides follow the lossless route in FACTS.md: typed parse → `serde_json::Value` (enums
//! stay externally tagged, which `ron::Value` would lose) → set each path (the value read as a
//! RON literal, else taken as a string; unknown paths refused with a suggestion) →
//! `serde_path_to_error` back into the raw types, so a bad value is reported by its path.
//!
//! Component `params` are free-form here: each component deserialises its own strictly. They
//! are carried as a JSON object; in the file they are written as a RON struct
//! (`(n_layer: 2)`) or map (`{"n_layer": 2}`).

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use codex_plugin_api::{ComponentKind, Schedule, TrainSettings};
use serde::{Deserialize, Serialize};
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
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    /// Name of the experiment; runs are stored under `runs/<experiment>/`. Required.
    experiment: String,
    /// Seed of every random stream of the run (init, data order, dropout, sampling).
    /// Default: 1337.
    #[serde(default)]
    seed: Option<u64>,
    /// Device: `cpu`, `cuda`, `cuda:N`, `metal` or `metal:N`. Default: `cpu`.
    #[serde(default)]
    device: Option<String>,
    /// Training and validation data. Required.
    data: DataConfig,
    /// The tokenizer. Required.
    tokenizer: RawComponent,
    /// The model. Required.
    model: RawComponent,
    /// The optimizer. Required.
    optimizer: RawOptimizer,
    /// The training loop. Default: `(name: "default")`.
    #[serde(default)]
    trainer: Option<RawComponent>,
    /// Training settings. Required.
    train: RawTrain,
    /// Metric sinks besides `ndjson`, which is always written. Default: none.
    #[serde(default)]
    sinks: Vec<RawComponent>,
    /// Run trackers. Default: none.
    #[serde(default)]
    trackers: Vec<RawComponent>,
    /// Kernel component providing fused ops. Default: `"cpu"` on the CPU, none elsewhere;
    /// `"none"` runs plain ops. A string, not an option, so that `None` cannot be read as
    /// either "off" or "the default".
    #[serde(default)]
    kernel: String,
    /// A sample generated at the end of the run. Default: none.
    #[serde(default)]
    generate: Option<RawGenerate>,
}

/// A component chosen by registry name, with its parameters.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawComponent {
    /// Registry name. Required.
    name: String,
    /// The component's own parameters, checked by the component. Default: `()`, none.
    #[serde(default)]
    params: Value,
}

/// The optimizer section: a component plus the peak learning rate the schedule scales.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOptimizer {
    /// Registry name. Required.
    name: String,
    /// Peak learning rate. Required.
    lr: f64,
    /// The optimizer's own parameters. Default: `()`, none.
    #[serde(default)]
    params: Value,
}

/// The `train` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTrain {
    /// Optimizer steps to run. Default: none; at least one of `max_steps`, `epochs` is required.
    #[serde(default)]
    max_steps: Option<u64>,
    /// Passes over the training data. Default: none; with `max_steps` too, whichever ends first.
    #[serde(default)]
    epochs: Option<u64>,
    /// Tokens per sequence. Default: 128.
    #[serde(default)]
    seq_len: Option<usize>,
    /// Sequences per micro-batch. Default: 8.
    #[serde(default)]
    batch_size: Option<usize>,
    /// Micro-batches per optimizer step. Default: 1.
    #[serde(default)]
    grad_accum: Option<usize>,
    /// Evaluate every N optimizer steps; 0 evaluates only at the end. Default: 0.
    #[serde(default)]
    eval_every: Option<u64>,
    /// Validation batches per evaluation; 0 uses the whole validation split. Default: 16.
    #[serde(default)]
    eval_batches: Option<usize>,
    /// Checkpoint every N optimizer steps; 0 checkpoints only at the end. Default: 0.
    #[serde(default)]
    checkpoint_every: Option<u64>,
    /// Checkpoints to keep: the newest N valid ones, plus the one with the lowest validation
    /// loss; 0 keeps every checkpoint. The newest valid checkpoint is never deleted. Default: 3.
    #[serde(default)]
    keep_checkpoints: Option<usize>,
    /// Emit training metrics every N optimizer steps. Default: 10.
    #[serde(default)]
    log_every: Option<u64>,
    /// Clip gradients to this global L2 norm; 0 disables clipping. Default: 1.0.
    #[serde(default)]
    clip_norm: Option<f64>,
    /// Learning-rate schedule. Default: `(kind: constant, warmup_steps: 0, min_lr: 0.0)`.
    #[serde(default)]
    schedule: Option<RawSchedule>,
}

/// The learning-rate schedule.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSchedule {
    /// `constant`, `linear` or `cosine`. Default: `constant`.
    #[serde(default)]
    kind: Option<ScheduleKind>,
    /// Steps of linear warmup from 0 to `optimizer.lr`. Default: 0.
    #[serde(default)]
    warmup_steps: Option<u64>,
    /// Learning rate at the last step for `linear` and `cosine`. Default: 0.0.
    #[serde(default)]
    min_lr: Option<f64>,
}

/// The `generate` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawGenerate {
    /// Text the sample starts from. Required.
    prompt: String,
    /// Tokens to generate. Default: 128.
    #[serde(default)]
    max_tokens: Option<usize>,
    /// Softmax temperature; 0 is greedy. Default: 1.0.
    #[serde(default)]
    temperature: Option<f64>,
    /// Keep only the K most likely tokens. Default: none, all tokens.
    #[serde(default)]
    top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches P. Default: none.
    #[serde(default)]
    top_p: Option<f64>,
}

/// Shape of the learning-rate schedule after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
    fn named(name: &str) -> Self {
        ComponentSpec {
            name: name.to_owned(),
            params: Value::Object(Map::new()),
        }
    }

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
        let out = out::Config::from(self);
        let pretty = ron::ser::PrettyConfig::default();
        match ron_options().to_string_pretty(&out, pretty) {
            Ok(text) => format!("{text}\n"),
            // Only plain data is serialised (no maps with non-string keys, no NaN in JSON
            // params), which ron always accepts; fall back to the debug form rather than panic.
            Err(e) => format!("// cannot write this config as RON: {e}\n// {self:?}\n"),
        }
    }

    /// The config as a JSON tree, every default written out, enums externally tagged (the
    /// lossless form overrides work on): what run trackers record as the run's parameters.
    pub fn to_json(&self) -> Result<Value, ConfigError> {
        let raw: RawConfig = parse_ron(&self.path, &self.to_ron()).map_err(ConfigError::Invalid)?;
        serde_json::to_value(&raw).map_err(|e| ConfigError::Json(e.to_string()))
    }

    /// Check that this config may continue a run whose checkpoint was written under `saved`,
    /// and list the settings that differ (`train.max_steps: 12 -> 20`, ...).
    ///
    /// Only settings that do not change the computation of the steps already taken may
    /// differ: how long to train (`train.max_steps`, `train.epochs`), how often to evaluate,
    /// checkpoint and log, retention, sinks, trackers, the kernel and the final sample.
    /// Anything that shapes the model, the tokens, the data order or the update rule
    /// (experiment, seed, data, tokenizer, model, optimizer, trainer, sequence and batch
    /// shape, clipping, schedule) is refused, naming the first differing field. The device
    /// may change, but bitwise-exact continuation holds only on the device that wrote it.
    pub fn resume_differences(&self, saved: &Config) -> Result<Vec<String>, ConfigError> {
        let (a, b) = (saved, self);
        let (ta, tb) = (&a.train, &b.train);
        let fixed: [(&str, bool); 12] = [
            ("experiment", a.experiment == b.experiment),
            ("seed", a.seed == b.seed),
            ("data", a.data == b.data),
            ("tokenizer", a.tokenizer == b.tokenizer),
            ("model", a.model == b.model),
            ("optimizer", a.optimizer == b.optimizer),
            ("trainer", a.trainer == b.trainer),
            ("train.seq_len", ta.seq_len == tb.seq_len),
            ("train.batch_size", ta.batch_size == tb.batch_size),
            ("train.grad_accum", ta.grad_accum == tb.grad_accum),
            ("train.clip_norm", ta.clip_norm == tb.clip_norm),
            ("train.schedule", ta.schedule == tb.schedule),
        ];
        if let Some((field, _)) = fixed.iter().find(|(_, same)| !same) {
            return Err(ConfigError::Invalid(Box::new(Diagnostic::new(
                &self.path,
                Some(field.to_string()),
                format!(
                    "differs from the config of the checkpoint being resumed; {field} cannot change \
                     on resume because the steps already taken depend on it: resume with the run's \
                     own config (codex-ml resume RUN_DIR) or start a new run"
                ),
            ))));
        }
        // A new length is allowed, but the schedule decays towards the last step, so it changes
        // the learning rate of the steps still to come: the caller reports it.
        let mut changed = Vec::new();
        let mut note = |field: &str, old: String, new: String| {
            if old != new {
                changed.push(format!("{field}: {old} -> {new}"));
            }
        };
        let opt = |v: Option<u64>| v.map_or("none".to_string(), |n| n.to_string());
        note("train.max_steps", opt(ta.max_steps), opt(tb.max_steps));
        note("train.epochs", opt(ta.epochs), opt(tb.epochs));
        note(
            "train.eval_every",
            ta.eval_every.to_string(),
            tb.eval_every.to_string(),
        );
        note(
            "train.eval_batches",
            ta.eval_batches.to_string(),
            tb.eval_batches.to_string(),
        );
        note(
            "train.checkpoint_every",
            ta.checkpoint_every.to_string(),
            tb.checkpoint_every.to_string(),
        );
        note(
            "train.keep_checkpoints",
            ta.keep_checkpoints.to_string(),
            tb.keep_checkpoints.to_string(),
        );
        note(
            "train.log_every",
            ta.log_every.to_string(),
            tb.log_every.to_string(),
        );
        note("device", a.device.clone(), b.device.clone());
        let names = |specs: &[ComponentSpec]| {
            specs
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        if a.sinks != b.sinks {
            note("sinks", names(&a.sinks), names(&b.sinks));
        }
        if a.trackers != b.trackers {
            note("trackers", names(&a.trackers), names(&b.trackers));
        }
        note(
            "kernel",
            format!("{:?}", a.kernel),
            format!("{:?}", b.kernel),
        );
        if a.generate != b.generate {
            changed.push("generate: changed".to_string());
        }
        Ok(changed)
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

    fn resolve(&self, raw: RawConfig, dir: PathBuf) -> Result<Config, ConfigError> {
        let experiment = self.experiment(raw.experiment)?;
        let device = self.device(raw.device.unwrap_or_else(|| "cpu".to_owned()))?;
        let data = self.data(raw.data, &dir)?;
        let tokenizer = self.component("tokenizer", raw.tokenizer)?;
        let model = self.component("model", raw.model)?;
        let optimizer = self.optimizer(raw.optimizer)?;
        let trainer = match raw.trainer {
            Some(t) => self.component("trainer", t)?,
            None => ComponentSpec::named("default"),
        };
        let train = self.train(raw.train, optimizer.lr)?;
        let mut sinks = Vec::with_capacity(raw.sinks.len() + 1);
        for (i, sink) in raw.sinks.into_iter().enumerate() {
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
            sinks.insert(0, ComponentSpec::named("ndjson"));
        }
        let mut trackers = Vec::with_capacity(raw.trackers.len());
        for (i, tracker) in raw.trackers.into_iter().enumerate() {
            trackers.push(self.component(&format!("trackers[{i}]"), tracker)?);
        }
        let kernel = match raw.kernel.as_str() {
            "" if device == "cpu" => Some(DEFAULT_CPU_KERNEL.to_owned()),
            "" | NO_KERNEL => None,
            k => {
                self.name("kernel", k)?;
                Some(raw.kernel)
            }
        };
        let generate = raw.generate.map(|g| self.generate(g)).transpose()?;
        Ok(Config {
            path: self.path.to_owned(),
            dir,
            experiment,
            seed: raw.seed.unwrap_or(DEFAULT_SEED),
            device,
            data,
            tokenizer,
            model,
            optimizer,
            trainer,
            train,
            sinks,
            trackers,
            kernel,
            generate,
        })
    }

    fn experiment(&self, name: String) -> Result<String, ConfigError> {
        let valid = !name.is_empty()
            && !name.starts_with('.')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if valid {
            Ok(name)
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

    fn device(&self, device: String) -> Result<String, ConfigError> {
        let (base, index) = match device.split_once(':') {
            Some((base, index)) => (base, Some(index)),
            None => (device.as_str(), None),
        };
        let known = matches!(base, "cpu" | "cuda" | "metal");
        let index_ok = match index {
            None => true,
            Some(i) => base != "cpu" && i.parse::<usize>().is_ok(),
        };
        if known && index_ok {
            Ok(device)
        } else {
            Err(self.invalid(
                "device",
                format!(
                    "unknown device `{device}`; use `cpu`, `cuda`, `cuda:N`, `metal` or `metal:N`"
                ),
            ))
        }
    }

    fn data(&self, mut data: DataConfig, dir: &Path) -> Result<DataConfig, ConfigError> {
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
        Ok(data)
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

    fn params(&self, field: &str, params: Value) -> Result<Value, ConfigError> {
        match params {
            Value::Null => Ok(Value::Object(Map::new())),
            Value::Object(map) => Ok(Value::Object(map)),
            other => Err(self.invalid(
                field,
                format!("expected a struct of parameters like `(n_layer: 2)`, found `{other}`"),
            )),
        }
    }

    fn component(&self, section: &str, raw: RawComponent) -> Result<ComponentSpec, ConfigError> {
        self.name(&join_field(section, "name"), &raw.name)?;
        Ok(ComponentSpec {
            name: raw.name,
            params: self.params(&join_field(section, "params"), raw.params)?,
        })
    }

    fn optimizer(&self, raw: RawOptimizer) -> Result<OptimizerSpec, ConfigError> {
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
            name: raw.name,
            lr: raw.lr,
            params: self.params("optimizer.params", raw.params)?,
        })
    }

    fn at_least_one(
        &self,
        field: &str,
        value: Option<usize>,
        default: usize,
    ) -> Result<usize, ConfigError> {
        match value.unwrap_or(default) {
            0 => Err(self.invalid(field, "must be at least 1")),
            n => Ok(n),
        }
    }

    fn train(&self, raw: RawTrain, lr: f64) -> Result<TrainConfig, ConfigError> {
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
        let seq_len = self.at_least_one("train.seq_len", raw.seq_len, 128)?;
        let batch_size = self.at_least_one("train.batch_size", raw.batch_size, 8)?;
        let grad_accum = self.at_least_one("train.grad_accum", raw.grad_accum, 1)?;
        let log_every = raw.log_every.unwrap_or(10);
        if log_every == 0 {
            return Err(self.invalid("train.log_every", "must be at least 1"));
        }
        let clip_norm = raw.clip_norm.unwrap_or(1.0);
        if !(clip_norm.is_finite() && clip_norm >= 0.0) {
            return Err(self.invalid(
                "train.clip_norm",
                format!("{clip_norm} must be finite and non-negative (0 disables clipping)"),
            ));
        }
        let schedule = raw.schedule.unwrap_or(RawSchedule {
            kind: None,
            warmup_steps: None,
            min_lr: None,
        });
        let schedule = ScheduleConfig {
            kind: schedule.kind.unwrap_or(ScheduleKind::Constant),
            warmup_steps: schedule.warmup_steps.unwrap_or(0),
            min_lr: schedule.min_lr.unwrap_or(0.0),
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
            eval_every: raw.eval_every.unwrap_or(0),
            eval_batches: raw.eval_batches.unwrap_or(16),
            checkpoint_every: raw.checkpoint_every.unwrap_or(0),
            keep_checkpoints: raw.keep_checkpoints.unwrap_or(3),
            log_every,
            clip_norm,
            schedule,
        })
    }

    fn generate(&self, raw: RawGenerate) -> Result<GenerateConfig, ConfigError> {
        let max_tokens = self.at_least_one("generate.max_tokens", raw.max_tokens, 128)?;
        let temperature = raw.temperature.unwrap_or(1.0);
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
            prompt: raw.prompt,
            max_tokens,
            temperature,
            top_k: raw.top_k,
            top_p: raw.top_p,
        })
    }
}

/// The shape `to_ron` writes: the raw layout with every default filled in, and params written
/// as RON structs (`(n_layer: 2)`) rather than the JSON maps they are carried as.
mod out {
    use serde::{Serialize, Serializer};
    use serde_json::Value;

    use crate::data::DataConfig;

    #[derive(Serialize)]
    pub(super) struct Config<'a> {
        experiment: &'a str,
        seed: u64,
        device: &'a str,
        data: &'a DataConfig,
        tokenizer: Component<'a>,
        model: Component<'a>,
        optimizer: Optimizer<'a>,
        trainer: Component<'a>,
        train: Train,
        sinks: Vec<Component<'a>>,
        trackers: Vec<Component<'a>>,
        kernel: &'a str,
        generate: Option<Generate<'a>>,
    }

    #[derive(Serialize)]
    struct Component<'a> {
        name: &'a str,
        #[serde(skip_serializing_if = "Params::is_empty")]
        params: Params<'a>,
    }

    #[derive(Serialize)]
    struct Optimizer<'a> {
        name: &'a str,
        lr: f64,
        #[serde(skip_serializing_if = "Params::is_empty")]
        params: Params<'a>,
    }

    #[derive(Serialize)]
    struct Train {
        max_steps: Option<u64>,
        epochs: Option<u64>,
        seq_len: usize,
        batch_size: usize,
        grad_accum: usize,
        eval_every: u64,
        eval_batches: usize,
        checkpoint_every: u64,
        keep_checkpoints: usize,
        log_every: u64,
        clip_norm: f64,
        schedule: Schedule,
    }

    #[derive(Serialize)]
    struct Schedule {
        kind: super::ScheduleKind,
        warmup_steps: u64,
        min_lr: f64,
    }

    #[derive(Serialize)]
    struct Generate<'a> {
        prompt: &'a str,
        max_tokens: usize,
        temperature: f64,
        top_k: Option<usize>,
        top_p: Option<f64>,
    }

    struct Params<'a>(&'a Value);

    impl Params<'_> {
        fn is_empty(&self) -> bool {
            self.0.as_object().is_none_or(|m| m.is_empty())
        }
    }

    impl Serialize for Params<'_> {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let text = ron_literal(self.0);
            let raw = ron::value::RawValue::from_boxed_ron(text.into_boxed_str())
                .map_err(|e| serde::ser::Error::custom(format!("params as RON: {e}")))?;
            raw.serialize(serializer)
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

    impl<'a> From<&'a super::Config> for Config<'a> {
        fn from(c: &'a super::Config) -> Self {
            let component = |spec: &'a super::ComponentSpec| Component {
                name: &spec.name,
                params: Params(&spec.params),
            };
            let t = &c.train;
            Config {
                experiment: &c.experiment,
                seed: c.seed,
                device: &c.device,
                data: &c.data,
                tokenizer: component(&c.tokenizer),
                model: component(&c.model),
                optimizer: Optimizer {
                    name: &c.optimizer.name,
                    lr: c.optimizer.lr,
                    params: Params(&c.optimizer.params),
                },
                trainer: component(&c.trainer),
                train: Train {
                    max_steps: t.max_steps,
                    epochs: t.epochs,
                    seq_len: t.seq_len,
                    batch_size: t.batch_size,
                    grad_accum: t.grad_accum,
                    eval_every: t.eval_every,
                    eval_batches: t.eval_batches,
                    checkpoint_every: t.checkpoint_every,
                    keep_checkpoints: t.keep_checkpoints,
                    log_every: t.log_every,
                    clip_norm: t.clip_norm,
                    schedule: Schedule {
                        kind: t.schedule.kind,
                        warmup_steps: t.schedule.warmup_steps,
                        min_lr: t.schedule.min_lr,
                    },
                },
                sinks: c.sinks.iter().map(component).collect(),
                trackers: c.trackers.iter().map(component).collect(),
                // Explicit either way, so that a stored config means the same under a later
                // default.
                kernel: c.kernel.as_deref().unwrap_or(super::NO_KERNEL),
                generate: c.generate.as_ref().map(|g| Generate {
                    prompt: &g.prompt,
                    max_tokens: g.max_tokens,
                    temperature: g.temperature,
                    top_k: g.top_k,
                    top_p: g.top_p,
                }),
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

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
    fn relative_paths_are_folded_against_the_directory() {
        let dir = Path::new("/work/configs");
        assert_eq!(absolute(dir, "../src/**/*.rs"), "/work/src/**/*.rs");
        assert_eq!(absolute(dir, "./data.jsonl"), "/work/configs/data.jsonl");
        assert_eq!(absolute(dir, "/abs/x.csv"), "/abs/x.csv");
    }
}
