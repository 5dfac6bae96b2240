//! Resolution: fills each default into the raw config, validates across fields and builds the
//! resolved [`Config`]; errors name the file and the field, and the override that set it.

use std::path::{Component, Path, PathBuf};

use serde_json::{Map, Value};

use codex_formats::config::{
    related, Params, RawAdapter, RawComponent, RawConfig, RawGenerate, RawLossScale, RawOptimizer,
    RawSchedule, RawSource, RawTargets, RawTrain,
};

use super::Override;
use super::{AdapterConfig, LoraBias, Targets};
use super::{
    ComponentSpec, Config, ConfigError, GenerateConfig, OptimizerSpec, ScheduleConfig,
    ScheduleKind, TrainConfig, Written, DEFAULT_CPU_KERNEL, DEFAULT_SEED, NO_KERNEL,
};
use crate::data::{DataConfig, Source};
use crate::diagnostics::{join_field, Diagnostic};
use crate::metrics::RUN_RECORD;

/// The directory of the config file, absolute (canonical when it exists).
pub(super) fn config_dir(path: &Path) -> PathBuf {
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

/// Fills defaults and validates; errors name the file and the field.
pub(super) struct Resolver<'a> {
    pub(super) path: &'a Path,
    pub(super) overrides: &'a [Override],
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
    pub(super) fn resolve(&self, mut raw: RawConfig, dir: PathBuf) -> Result<Config, ConfigError> {
        let experiment = self.experiment(&raw.experiment)?;
        let seed = *raw.seed.get_or_insert(DEFAULT_SEED);
        let device = self.device(raw.device.get_or_insert_with(|| "cpu".to_owned()))?;
        self.data(&mut raw.data, &dir)?;
        let (model, model_from) = self.model(&mut raw.model, &dir)?;
        let tokenizer = self.tokenizer(&mut raw.tokenizer, &raw.model, &dir)?;
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
            // The run's record may stand beside a copy of itself (see below).
            let listed = |s: &ComponentSpec| {
                s.name == sink.name && s.is_run_record() == sink.is_run_record()
            };
            if sinks.iter().any(listed) {
                return Err(self.invalid(
                    &join_field(&field, "name"),
                    format!("sink `{}` is listed twice; keep one", sink.name),
                ));
            }
            sinks.push(sink);
        }
        // Where each resolved sink stands in the file: the run's record comes first, listed
        // or not (see `ComponentSpec::run_record`).
        let mut sinks_in_file: Vec<Option<usize>> = (0..sinks.len()).map(Some).collect();
        let record = match sinks.iter().position(ComponentSpec::is_run_record) {
            Some(i) => (
                raw.sinks.remove(i),
                sinks.remove(i),
                sinks_in_file.remove(i),
            ),
            None => (
                RawComponent::named(RUN_RECORD),
                ComponentSpec::run_record(),
                None,
            ),
        };
        raw.sinks.insert(0, record.0);
        sinks.insert(0, record.1);
        sinks_in_file.insert(0, record.2);
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
        let precision = match raw.precision.as_str() {
            "" | "f32" => codex_engine::Precision::F32,
            half @ ("bf16" | "f16") if kernel.is_none() => {
                return Err(self.invalid(
                    "precision",
                    format!(
                        "\"{half}\" multiplies through a kernel, and `kernel` is \"none\"; set \
                         `kernel: \"cpu\"` or use `precision: \"f32\"`"
                    ),
                ))
            }
            "bf16" => codex_engine::Precision::Bf16,
            "f16" => codex_engine::Precision::F16,
            other => {
                return Err(self.invalid(
                    "precision",
                    format!("\"{other}\" is not a precision; use \"f32\", \"bf16\" or \"f16\""),
                ))
            }
        };
        raw.precision = precision.name().to_owned();
        let loss_scale = self.loss_scale(precision, &mut raw.loss_scale)?;
        let generate = raw
            .generate
            .as_mut()
            .map(|g| self.generate(g))
            .transpose()?;
        let adapter = raw
            .adapter
            .as_mut()
            .map(|a| self.adapter(a, &dir))
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
            model_from,
            optimizer,
            trainer,
            train,
            sinks,
            trackers,
            kernel,
            precision,
            loss_scale,
            generate,
            adapter,
            raw,
            written: Written {
                source: String::new(),
                overrides: self.overrides.to_vec(),
                sinks_in_file,
            },
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
                    Source::Text { paths, exclude } => {
                        if paths.is_empty() {
                            return Err(self.invalid(
                                &format!("data.{section}[{i}].paths"),
                                "no paths; list files or globs like `src/**/*.rs`",
                            ));
                        }
                        for (list, entries) in [("paths", paths), ("exclude", exclude)] {
                            for (j, entry) in entries.iter_mut().enumerate() {
                                if let Err(message) = crate::data::check_glob(entry) {
                                    return Err(self.invalid(
                                        &format!("data.{section}[{i}].{list}[{j}]"),
                                        format!("invalid glob `{entry}`: {message}"),
                                    ));
                                }
                                *entry = absolute(dir, entry);
                            }
                        }
                    }
                    Source::Jsonl { path, .. }
                    | Source::Csv { path, .. }
                    | Source::Chat { path, .. }
                    | Source::PromptCompletion { path, .. } => *path = absolute(dir, path),
                }
            }
        }
        let sft = data.is_sft();
        for (section, sources) in [("train", &data.train), ("val", &data.val)] {
            if let Some(i) = sources.iter().position(|s| s.is_sft() != sft) {
                return Err(self.invalid(
                    &format!("data.{section}[{i}]"),
                    if sft {
                        "a document source among supervised fine-tuning sources: list only \
                         `Chat` and `PromptCompletion` sources, or only `Text`, `Jsonl` and `Csv`"
                    } else {
                        "a supervised fine-tuning source among document sources: list only \
                         `Chat` and `PromptCompletion` sources, or only `Text`, `Jsonl` and `Csv`"
                    },
                ));
            }
        }
        if let Some(template) = &mut data.sft.chat_template {
            *template = absolute(dir, template);
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

    /// The model: by name, or from a Hugging Face directory. The directory's `config.json` is
    /// read only while `name` is not set, and its name and parameters are then written into
    /// the raw config: the resolved config that a run saves names them, so evaluating or
    /// resuming the run never reads the directory again.
    fn model(
        &self,
        raw: &mut RawSource,
        dir: &Path,
    ) -> Result<(ComponentSpec, Option<String>), ConfigError> {
        let Some(from) = raw.from.clone() else {
            let Some(name) = raw.name.clone() else {
                return Err(self.invalid(
                    "model",
                    "give `name` (see `codex-ml list`) or `from` (a Hugging Face model \
                     directory)",
                ));
            };
            self.name("model.name", &name)?;
            let params = self.params("model.params", &mut raw.params)?;
            return Ok((ComponentSpec { name, params }, None));
        };
        if raw.name.is_none() {
            let found = crate::hf::locate(&from, dir)
                .and_then(|d| crate::hf::ModelDir::open(&d))
                .and_then(|m| {
                    // Checked now so that a missing shard is refused before a run starts.
                    m.checked_weights()?;
                    Ok(m)
                })
                .map_err(|e| self.invalid("model.from", e.to_string()))?;
            let (name, mut params) = found
                .model(None)
                .map_err(|e| self.invalid("model.from", e.to_string()))?;
            // Parameters written in the config override config.json's.
            if let Value::Object(given) = &raw.params.0 {
                params.extend(given.clone());
            }
            raw.name = Some(name);
            raw.params = Params(Value::Object(params));
            // A path is kept absolute (a model id stays an id).
            if Path::new(&from).is_relative() && dir.join(&from).is_dir() {
                raw.from = Some(absolute(dir, &from));
            }
        }
        let name = raw.name.clone().unwrap_or_default();
        self.name("model.name", &name)?;
        let params = self.params("model.params", &mut raw.params)?;
        Ok((ComponentSpec { name, params }, raw.from.clone()))
    }

    /// The tokenizer: by name, from a Hugging Face directory, or (when left out) the one of
    /// the directory the model comes from. Directories are read only while `name` is not set,
    /// as for the model.
    fn tokenizer(
        &self,
        raw: &mut Option<RawSource>,
        model: &RawSource,
        dir: &Path,
    ) -> Result<ComponentSpec, ConfigError> {
        let raw =
            match raw {
                Some(raw) => raw,
                None => match &model.from {
                    Some(from) => raw.insert(RawSource {
                        name: None,
                        params: Params(Value::Null),
                        from: Some(from.clone()),
                    }),
                    None => return Err(self.invalid(
                        "tokenizer",
                        "missing; give a tokenizer, e.g. `(name: \"bpe\")`, or start the model \
                         `from` a Hugging Face directory, which brings its own",
                    )),
                },
            };
        if let (None, Some(from)) = (&raw.name, raw.from.clone()) {
            let params = crate::hf::locate(&from, dir)
                .and_then(|d| crate::hf::ModelDir::open(&d))
                .and_then(|m| m.tokenizer_params())
                .map_err(|e| self.invalid("tokenizer.from", e.to_string()))?;
            let mut params = params;
            if let Value::Object(given) = &raw.params.0 {
                params.extend(given.clone());
            }
            raw.name = Some("hf".to_owned());
            raw.params = Params(Value::Object(params));
            if Path::new(&from).is_relative() && dir.join(&from).is_dir() {
                raw.from = Some(absolute(dir, &from));
            }
        }
        let Some(name) = raw.name.clone() else {
            return Err(self.invalid(
                "tokenizer",
                "give `name` (see `codex-ml list`) or `from` (a Hugging Face model directory)",
            ));
        };
        self.name("tokenizer.name", &name)?;
        Ok(ComponentSpec {
            name,
            params: self.params("tokenizer.params", &mut raw.params)?,
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

    fn adapter(&self, raw: &mut RawAdapter, dir: &Path) -> Result<AdapterConfig, ConfigError> {
        let kind = raw.kind.get_or_insert_with(|| "lora".to_owned());
        if kind != "lora" {
            return Err(self.invalid(
                "adapter.kind",
                format!("\"{kind}\" is not an adapter kind; the one there is is \"lora\""),
            ));
        }
        let from = match raw.from.clone() {
            Some(from) => {
                let path = dir.join(&from);
                // A config that already names everything (a run's own, saved) needs no second
                // reading of the directory, which may be gone by then.
                if raw.r.is_none() || raw.alpha.is_none() || raw.target_modules.is_none() {
                    self.adapter_from(raw, &path)?;
                }
                raw.from = Some(path.to_string_lossy().into_owned());
                Some(path)
            }
            None => None,
        };
        let r = *raw.r.get_or_insert(8);
        if r <= 0 {
            return Err(self.invalid(
                "adapter.r",
                format!("the rank must be at least 1, found {r}"),
            ));
        }
        let alpha = *raw.alpha.get_or_insert(8.0);
        if !alpha.is_finite() {
            return Err(self.invalid("adapter.alpha", format!("{alpha} must be finite")));
        }
        let dropout = *raw.dropout.get_or_insert(0.0);
        if !(0.0..1.0).contains(&dropout) {
            return Err(self.invalid("adapter.dropout", format!("{dropout} is outside [0, 1)")));
        }
        let targets = match &raw.target_modules {
            None => {
                return Err(self.invalid(
                    "adapter.target_modules",
                    "required: name the modules to adapt, e.g. [\"q_proj\", \"v_proj\"]",
                ))
            }
            Some(RawTargets::Names(names)) if names.is_empty() => {
                return Err(self.invalid(
                    "adapter.target_modules",
                    "is empty: name at least one module to adapt",
                ))
            }
            Some(RawTargets::Names(names)) => Targets::Names(names.clone()),
            Some(RawTargets::Regex(pattern)) => {
                regex::Regex::new(&format!("^(?:{pattern})$")).map_err(|e| {
                    self.invalid(
                        "adapter.target_modules",
                        format!("is not a valid regular expression: {e}"),
                    )
                })?;
                Targets::Regex(pattern.clone())
            }
        };
        let bias = match raw.bias.get_or_insert_with(|| "none".to_owned()).as_str() {
            "none" => LoraBias::None,
            "lora_only" => LoraBias::LoraOnly,
            "all" => LoraBias::All,
            other => {
                return Err(self.invalid(
                    "adapter.bias",
                    format!("\"{other}\" is not one of \"none\", \"lora_only\", \"all\""),
                ))
            }
        };
        Ok(AdapterConfig {
            r: r as usize,
            alpha,
            dropout,
            targets,
            modules_to_save: raw.modules_to_save.clone(),
            bias,
            use_rslora: *raw.use_rslora.get_or_insert(false),
            from,
        })
    }

    /// Fill `raw` from the PEFT adapter directory `path`; a value the config gives too must
    /// be the directory's.
    fn adapter_from(&self, raw: &mut RawAdapter, path: &Path) -> Result<(), ConfigError> {
        let peft = crate::adapter::peft::read_config(path)
            .map_err(|e| self.invalid("adapter.from", format!("{e:#}")))?;
        fn same<T: PartialEq + std::fmt::Debug + Clone>(
            this: &Resolver<'_>,
            field: &str,
            slot: &mut Option<T>,
            theirs: T,
            path: &Path,
        ) -> Result<(), ConfigError> {
            match slot {
                Some(ours) if *ours != theirs => Err(this.invalid(
                    field,
                    format!(
                        "{ours:?} here, but {} says {theirs:?}; leave it out to continue the \
                         adapter as it is",
                        path.join("adapter_config.json").display()
                    ),
                )),
                _ => {
                    *slot = Some(theirs);
                    Ok(())
                }
            }
        }
        same(self, "adapter.r", &mut raw.r, peft.r, path)?;
        same(self, "adapter.alpha", &mut raw.alpha, peft.alpha, path)?;
        same(
            self,
            "adapter.target_modules",
            &mut raw.target_modules,
            peft.targets,
            path,
        )?;
        same(self, "adapter.bias", &mut raw.bias, peft.bias, path)?;
        same(
            self,
            "adapter.use_rslora",
            &mut raw.use_rslora,
            peft.use_rslora,
            path,
        )?;
        if raw.dropout.is_none() {
            raw.dropout = Some(peft.dropout);
        }
        if raw.modules_to_save.is_empty() {
            raw.modules_to_save = peft.modules_to_save;
        } else if raw.modules_to_save != peft.modules_to_save {
            return Err(self.invalid(
                "adapter.modules_to_save",
                format!(
                    "differs from {}; leave it out to continue the adapter as it is",
                    path.join("adapter_config.json").display()
                ),
            ));
        }
        Ok(())
    }

    /// `loss_scale`, which only f16 has, with its defaults filled in.
    fn loss_scale(
        &self,
        precision: codex_engine::Precision,
        raw: &mut Option<RawLossScale>,
    ) -> Result<Option<codex_plugin_api::LossScaling>, ConfigError> {
        if precision != codex_engine::Precision::F16 {
            if raw.is_some() {
                return Err(self.invalid(
                    "loss_scale",
                    format!(
                        "loss scaling is for `precision: \"f16\"`, and precision is \"{}\"; \
                         remove `loss_scale` or set `precision: \"f16\"`",
                        precision.name()
                    ),
                ));
            }
            return Ok(None);
        }
        let defaults = codex_plugin_api::LossScaling::default();
        let raw = raw.get_or_insert(RawLossScale {
            init_scale: None,
            growth_interval: None,
        });
        let init_scale = *raw.init_scale.get_or_insert(defaults.init_scale);
        if !(init_scale.is_finite() && init_scale > 0.0 && (init_scale as f32).is_finite()) {
            return Err(self.invalid(
                "loss_scale.init_scale",
                format!("{init_scale} must be a positive number within f32's range, e.g. 65536.0"),
            ));
        }
        let growth_interval = *raw.growth_interval.get_or_insert(defaults.growth_interval);
        if growth_interval == 0 {
            return Err(self.invalid(
                "loss_scale.growth_interval",
                "must be at least 1 (steps in a row with finite gradients before the scale doubles)",
            ));
        }
        Ok(Some(codex_plugin_api::LossScaling {
            init_scale,
            growth_interval,
            ..defaults
        }))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_are_folded_against_the_directory() {
        let dir = Path::new("/work/configs");
        assert_eq!(absolute(dir, "../src/**/*.rs"), "/work/src/**/*.rs");
        assert_eq!(absolute(dir, "./data.jsonl"), "/work/configs/data.jsonl");
        assert_eq!(absolute(dir, "/abs/x.csv"), "/abs/x.csv");
    }
}
