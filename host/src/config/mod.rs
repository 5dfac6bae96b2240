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
//!
//! The on-disk types, their strict parsing and `--set` live in `codex_formats::config`, a crate
//! small enough to fuzz; here, `resolve.rs` fills defaults and validates, `resume.rs` compares
//! a config with a checkpoint's, and `reference.rs` renders the field reference. This file
//! holds the resolved types and the entry points.

use std::path::{Path, PathBuf};

use codex_plugin_api::{ComponentKind, Schedule, TrainSettings};
use serde_json::Value;

use crate::data::DataConfig;
use crate::diagnostics::{at_field, plain_words, ron_options, Diagnostic, Point};
use crate::plugins::registry::Registry;

mod reference;
mod resolve;
mod resume;

pub use codex_formats::config::{ConfigError, Override, RawTargets, ScheduleKind};
pub use reference::reference;

use codex_formats::config::{related, Params, RawConfig};
use resolve::{config_dir, Resolver};

/// Seed used when the config gives none.
pub const DEFAULT_SEED: u64 = 1337;
/// The kernel a CPU run uses unless its config says otherwise.
const DEFAULT_CPU_KERNEL: &str = "cpu";
/// The `kernel` value that runs plain tensor ops.
pub const NO_KERNEL: &str = "none";

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
    /// The Hugging Face model directory (or model id) whose weights a fresh run starts from:
    /// `model.from`.
    pub model_from: Option<String>,
    /// The optimizer.
    pub optimizer: OptimizerSpec,
    /// The trainer.
    pub trainer: ComponentSpec,
    /// Training settings.
    pub train: TrainConfig,
    /// Metric sinks, the run's record ([`ComponentSpec::run_record`]) first.
    pub sinks: Vec<ComponentSpec>,
    /// Run trackers.
    pub trackers: Vec<ComponentSpec>,
    /// Kernel component for fused ops; `None` runs plain ops.
    pub kernel: Option<String>,
    /// Precision of the training step's matrix products.
    pub precision: codex_engine::Precision,
    /// Dynamic loss scaling: set exactly when `precision` is f16.
    pub loss_scale: Option<codex_plugin_api::LossScaling>,
    /// Sample to generate at the end of the run.
    pub generate: Option<GenerateConfig>,
    /// The LoRA adapter trained instead of the whole model, if any.
    pub adapter: Option<AdapterConfig>,
    /// The file as read, with `--set` applied and every default filled in by the resolver
    /// (paths absolute, `kernel` explicit, `ndjson` among the sinks): what [`Config::to_ron`],
    /// [`Config::to_json`] and [`Config::resume_differences`] read, so each setting is defined
    /// once, by its raw type.
    raw: RawConfig,
    /// Where the values came from, for errors found after parsing.
    written: Written,
}

/// Where a config's values came from: not part of what the config means, so two configs that
/// differ only here are equal.
#[derive(Debug, Clone, Default)]
struct Written {
    /// The file's text as read, for pointing at a field found wrong after parsing.
    source: String,
    /// The `--set` overrides applied, for naming the one behind a bad value.
    overrides: Vec<Override>,
    /// For each of the config's sinks, its index among the file's, or `None` for the run's
    /// record when the resolver added it.
    sinks_in_file: Vec<Option<usize>>,
}

impl PartialEq for Written {
    fn eq(&self, _: &Written) -> bool {
        true
    }
}

/// A LoRA adapter (`adapter`), validated.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    /// Rank, at least 1.
    pub r: usize,
    /// Scale numerator.
    pub alpha: f64,
    /// Dropout on the adapters' input while training.
    pub dropout: f64,
    /// Which modules get adapters.
    pub targets: Targets,
    /// Modules trained in full (suffixes of module names).
    pub modules_to_save: Vec<String>,
    /// Which biases train.
    pub bias: LoraBias,
    /// Scale by `alpha / √r` rather than `alpha / r`.
    pub use_rslora: bool,
    /// The PEFT adapter directory a fresh run starts from, absolute.
    pub from: Option<PathBuf>,
}

impl AdapterConfig {
    /// The factor the adapters' output is multiplied by.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
}

/// `adapter.target_modules`, with PEFT's matching rules.
#[derive(Debug, Clone, PartialEq)]
pub enum Targets {
    /// A module matches a name when it is the name or ends with `.` and the name.
    Names(Vec<String>),
    /// A module matches when the whole name matches the regular expression.
    Regex(String),
}

impl Targets {
    /// Whether `module` (a module name: a parameter name without its last part) is targeted.
    pub fn matches(&self, module: &str) -> bool {
        match self {
            Targets::Names(names) => names
                .iter()
                .any(|t| module == t || module.ends_with(&format!(".{t}"))),
            // Checked when the config was resolved.
            Targets::Regex(pattern) => {
                regex::Regex::new(&format!("^(?:{pattern})$")).is_ok_and(|re| re.is_match(module))
            }
        }
    }
}

/// `adapter.bias`: which biases train beside the adapters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraBias {
    /// None.
    None,
    /// Those of the adapted modules.
    LoraOnly,
    /// Every bias.
    All,
}

impl LoraBias {
    /// PEFT's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            LoraBias::None => "none",
            LoraBias::LoraOnly => "lora_only",
            LoraBias::All => "all",
        }
    }
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

    /// The sink that keeps the run's record, `metrics.ndjson`: the one named
    /// [`crate::metrics::RUN_RECORD`] with no parameters. Every config lists it first; listed
    /// with parameters (a `file`), the same sink writes a copy of the record.
    pub fn run_record() -> ComponentSpec {
        ComponentSpec {
            name: crate::metrics::RUN_RECORD.to_owned(),
            params: Value::Object(serde_json::Map::new()),
        }
    }

    /// Whether this is [`ComponentSpec::run_record`]: told by the whole spec, never by
    /// reading one of its parameters.
    pub fn is_run_record(&self) -> bool {
        *self == ComponentSpec::run_record()
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
            kind: schedule_kind_to_api(self.kind),
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

impl Config {
    /// The index in the file of the config's sink `i`; `None` for a run's record the resolver
    /// added.
    fn sink_in_file(&self, i: usize) -> Option<usize> {
        self.written.sinks_in_file.get(i).copied().flatten()
    }

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
        let raw = codex_formats::config::parse(path, source, overrides)?;
        let dir = config_dir(path);
        let mut config = Resolver { path, overrides }.resolve(raw, dir)?;
        config.written.source = source.to_owned();
        Ok(config)
    }

    /// Check that every component the config names is registered and accepts its parameters,
    /// so a typo fails before any work starts: before data is read or a run directory made.
    /// A bad parameter is reported at its place in the file (`model.params.n_layr`), or by
    /// the `--set` that gave it.
    pub fn check_components(&self, registry: &Registry) -> Result<(), ConfigError> {
        self.check_names(registry)?;
        let optimizer = ComponentSpec {
            name: self.optimizer.name.clone(),
            params: self.optimizer.params.clone(),
        };
        // In the order of the file, so the first mistake in it is the one reported.
        let mut sections: Vec<(String, ComponentKind, &ComponentSpec)> = vec![
            (
                "tokenizer".into(),
                ComponentKind::Tokenizer,
                &self.tokenizer,
            ),
            ("model".into(), ComponentKind::Model, &self.model),
            ("optimizer".into(), ComponentKind::Optimizer, &optimizer),
            ("trainer".into(), ComponentKind::Trainer, &self.trainer),
        ];
        for (i, sink) in self.sinks.iter().enumerate() {
            if let Some(written) = self.sink_in_file(i) {
                sections.push((format!("sinks[{written}]"), ComponentKind::Sink, sink));
            }
        }
        for (i, tracker) in self.trackers.iter().enumerate() {
            sections.push((format!("trackers[{i}]"), ComponentKind::Tracker, tracker));
        }
        for (section, kind, spec) in sections {
            let Ok(entry) = registry.get(kind, &spec.name) else {
                continue;
            };
            if let Err(message) = crate::plugins::build::check_params(entry, &spec.params) {
                return Err(self.params_error(&section, &message));
            }
        }
        Ok(())
    }

    /// A component's refusal of its parameters, positioned: the message starts with the path
    /// of the bad value inside `params` when the component names one.
    fn params_error(&self, section: &str, message: &str) -> ConfigError {
        let (inner, what) = match message.split_once(": ") {
            Some((path, rest)) if is_field_path(path) => (Some(path), rest),
            _ => (None, message),
        };
        let field = match inner {
            Some(path) => format!("{section}.params.{path}"),
            None => format!("{section}.params"),
        };
        let point = if what.starts_with("unknown field") {
            Point::Key
        } else {
            Point::Value
        };
        // Components word their errors as serde does (`expected f64`); in the user's words.
        let mut what = plain_words(what);
        if let Some(o) = self
            .written
            .overrides
            .iter()
            .rev()
            .find(|o| related(&field, &o.path))
        {
            what.push_str(&format!(" (value from --set {})", o.arg));
        }
        ConfigError::Invalid(Box::new(at_field(
            &self.path,
            &self.written.source,
            &field,
            point,
            what,
        )))
    }

    /// Check that every component the config names is registered.
    fn check_names(&self, registry: &Registry) -> Result<(), ConfigError> {
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
            let Some(written) = self.sink_in_file(i) else {
                continue;
            };
            wanted.push((
                format!("sinks[{written}].name"),
                ComponentKind::Sink,
                &sink.name,
            ));
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
}

/// The plugin-API form of a schedule kind, handed to trainers.
fn schedule_kind_to_api(kind: ScheduleKind) -> codex_plugin_api::ScheduleKind {
    match kind {
        ScheduleKind::Constant => codex_plugin_api::ScheduleKind::Constant,
        ScheduleKind::Linear => codex_plugin_api::ScheduleKind::Linear,
        ScheduleKind::Cosine => codex_plugin_api::ScheduleKind::Cosine,
    }
}

/// Whether `text` reads as the path of a value inside parameters, as the plugin API's strict
/// parser writes it: `n_layer`, `betas[1]`, `schedule.kind`.
fn is_field_path(text: &str) -> bool {
    text.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '[' | ']'))
}
