//! The config as written on disk: plain serde types that mirror the file exactly, each field's
//! doc comment stating its meaning and its default. The resolver fills them in; nothing else
//! reads them field by field.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::data::DataConfig;
use super::write::Params;
use super::ScheduleKind;

/// An experiment config as written on disk.
///
/// Its doc comments, and those of the types it holds, are the field reference of
/// `docs/config.md` (rendered by the host): each says what the field means and ends with its
/// default ("Default: ...") or with "Required.". The host's resolver fills each default into
/// this value as it resolves it, so the resolved config keeps the file with every default
/// written out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Name of the experiment; runs go to `runs/<experiment>/<run-id>/`. Letters, digits, `-`,
    /// `_` and `.` (not first). Required.
    pub experiment: String,
    /// Seed of every random stream: initialisation, data order, dropout, sampling.
    /// Default: `1337`.
    #[serde(default)]
    pub seed: Option<u64>,
    /// `cpu`, `cuda`, `cuda:N`, `metal` or `metal:N`. Default: `"cpu"`.
    #[serde(default)]
    pub device: Option<String>,
    /// Training and validation data. Required.
    pub data: DataConfig,
    /// The tokenizer, e.g. `(name: "bpe", params: (vocab_size: 1024))`, or the one of a
    /// Hugging Face model directory, `(from: "models/smollm")`. Default: the model's own when
    /// the model comes `from` a directory; otherwise required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<RawSource>,
    /// The model, e.g. `(name: "gpt2", params: (n_layer: 4))`, or a pretrained Hugging Face
    /// model to start from, `(from: "models/smollm")`. Required.
    pub model: RawSource,
    /// The optimizer and the peak learning rate. Required.
    pub optimizer: RawOptimizer,
    /// The training loop. Default: `(name: "default")`.
    #[serde(default)]
    pub trainer: Option<RawComponent>,
    /// Training settings. Required.
    pub train: RawTrain,
    /// Metric sinks, e.g. `[(name: "csv"), (name: "console")]`. The run's record,
    /// `metrics.ndjson` (sink `ndjson`), is always written and listed first; `(name: "ndjson",
    /// params: (file: "copy.ndjson"))` adds a copy of it. A sink may appear once.
    /// Default: `[]`.
    #[serde(default)]
    pub sinks: Vec<RawComponent>,
    /// Run trackers, e.g. `[(name: "mlflow", params: (root: "/data/mlruns"))]`: each is told
    /// the run started (or resumed) with the config flattened to dotted keys, gets every metric
    /// record, each checkpoint and the run's files, and how the run ended (finished, failed,
    /// killed). A tracker that fails is disabled with one warning; training goes on. See
    /// [components.md](components.md). Default: `[]`.
    #[serde(default)]
    pub trackers: Vec<RawComponent>,
    /// Kernel component providing fused ops ([performance.md](performance.md)); `"none"` runs
    /// plain tensor ops. The run's stored `config.ron` always says which, so a resumed run
    /// keeps it. Default: `"cpu"` on the CPU, `"none"` elsewhere.
    // A string, not an option, so that `None` cannot be read as either "off" or "the default".
    #[serde(default)]
    pub kernel: String,
    /// Precision of the training step: `"f32"`, or mixed precision — `"bf16"` or `"f16"`:
    /// matrix products with both operands rounded to bf16 or f16 and summed in f32, on f32
    /// weights, gradients and optimizer state (checkpoints keep the f32 weights); norms,
    /// softmax, attention, the loss and reductions stay f32. Both need a kernel
    /// (`kernel: "cpu"`); `"bf16"` runs in bf16 only where the CPU has AVX512-BF16, in f32
    /// elsewhere (the log says which), `"f16"` on every CPU. `"f16"` scales the loss
    /// dynamically (`loss_scale`). A resumed run keeps it
    /// ([performance.md](performance.md)). Default: `"f32"`.
    // A string, as `kernel`, so that `--set precision=bf16` needs no quoting.
    #[serde(default)]
    pub precision: String,
    /// Dynamic loss scaling of `precision: "f16"`, as PyTorch's `GradScaler`, e.g.
    /// `(init_scale: 1024.0, growth_interval: 500)`: the loss is multiplied by the scale
    /// before backward and the gradients divided by it; a step with a gradient that is not
    /// finite is skipped and halves the scale, and `growth_interval` finite steps in a row
    /// double it ([performance.md](performance.md#f16-and-loss-scaling)). Only with
    /// `precision: "f16"`. Default: `(init_scale: 65536.0, growth_interval: 2000)` with f16.
    #[serde(default)]
    pub loss_scale: Option<RawLossScale>,
    /// A sample generated at the end of the run. Default: none.
    #[serde(default)]
    pub generate: Option<RawGenerate>,
    /// Train a LoRA adapter instead of the whole model, e.g. `(kind: "lora", r: 16, alpha: 32,
    /// target_modules: ["q_proj", "v_proj"])`: the model's weights are frozen and only the
    /// adapters (and what `modules_to_save` and `bias` name) train
    /// ([finetune-hf.md](finetune-hf.md#lora)). Default: none, every parameter trains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<RawAdapter>,
}

/// Dynamic loss scaling, with `GradScaler`'s names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawLossScale {
    /// The scale of the first step, a positive number; a power of two keeps the scaling
    /// exact. Default: `65536.0`.
    #[serde(default)]
    pub init_scale: Option<f64>,
    /// Steps in a row with finite gradients before the scale doubles, at least 1. Default:
    /// `2000`.
    #[serde(default)]
    pub growth_interval: Option<u64>,
}

/// A LoRA adapter, with PEFT's `LoraConfig` names and meanings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawAdapter {
    /// The kind of adapter; `"lora"` is the one there is. Default: `"lora"`.
    #[serde(default)]
    pub kind: Option<String>,
    /// A PEFT adapter directory to continue training (`adapter_config.json` and
    /// `adapter_model.safetensors`, as `save_pretrained` writes them), relative to the config
    /// file. Its `adapter_config.json` gives `r`, `alpha`, `target_modules`,
    /// `modules_to_save`, `bias` and `use_rslora`: leave them out, or give the same values.
    /// Default: none, the adapters start as PEFT initialises them (A Kaiming-uniform, B zero).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Rank of the adapters, at least 1. Default: `8`.
    #[serde(default)]
    pub r: Option<i64>,
    /// Scale numerator: the adapter's output is multiplied by `alpha / r` (`alpha / √r` with
    /// `use_rslora`). Default: `8`.
    #[serde(default)]
    pub alpha: Option<f64>,
    /// Dropout probability on the adapters' input while training, in [0, 1). Default: `0.0`.
    #[serde(default)]
    pub dropout: Option<f64>,
    /// Modules to adapt: a list of names, each matching a module whose name is it or ends
    /// with `.` and it (`["q_proj", "v_proj"]`), or one string, a regular expression the whole
    /// module name must match (`".*\\.(q|v)_proj"`). The modules are the model's parameter
    /// names without their last part (`model.layers.0.self_attn.q_proj`). Required.
    #[serde(default)]
    pub target_modules: Option<RawTargets>,
    /// Modules trained in full beside the adapters and saved with them (e.g. `["lm_head"]`):
    /// a module matches when its name ends with the entry. Default: `[]`.
    #[serde(default)]
    pub modules_to_save: Vec<String>,
    /// Which biases train: `"none"`, `"lora_only"` (those of adapted modules) or `"all"`.
    /// Default: `"none"`.
    #[serde(default)]
    pub bias: Option<String>,
    /// Scale by `alpha / √r` instead of `alpha / r` (rank-stabilised LoRA). Default: `false`.
    #[serde(default)]
    pub use_rslora: Option<bool>,
}

/// `target_modules`: names matched as suffixes, or one regular expression.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum RawTargets {
    /// Names: a module matches one when its name is it or ends with `.` and it.
    Names(Vec<String>),
    /// A regular expression the whole module name must match.
    Regex(String),
}

/// A model or tokenizer: chosen by registry name with its parameters, or read from a Hugging
/// Face model directory: `(from: "DIR")`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    /// Registry name (see `codex-ml list`). With `from`, give it only to load the directory's
    /// weights into a plugin's model. Default: with `from`, the built-in that implements the
    /// directory's `config.json` `model_type` (`gpt2`; `llama` for `llama`, `mistral` and
    /// `qwen2`), and `hf` for a tokenizer; without `from`, required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The component's own parameters. With `from`, the model's are read from `config.json`
    /// and those given here override them. Default: none.
    #[serde(default, skip_serializing_if = "Params::omitted")]
    pub params: Params,
    /// A Hugging Face model directory (`config.json`, `model.safetensors` or a sharded index,
    /// `tokenizer.json`, `tokenizer_config.json`), relative to the config's directory, or a
    /// model id `org/name` found in the local Hugging Face cache (`$HF_HOME/hub`, else
    /// `~/.cache/huggingface/hub`; nothing is downloaded). A fresh run starts from its
    /// weights. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
}

/// A component chosen by registry name (see `codex-ml list`), with its parameters:
/// `(name: "NAME", params: (...))`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawComponent {
    /// Registry name. Required.
    pub name: String,
    /// The component's own parameters, read and checked by the component. Default: none.
    #[serde(default, skip_serializing_if = "Params::omitted")]
    pub params: Params,
}

impl RawComponent {
    /// The component `name` with no parameters.
    pub fn named(name: &str) -> Self {
        RawComponent {
            name: name.to_owned(),
            params: Params::default(),
        }
    }
}

/// The optimizer: a component plus the peak learning rate the schedule scales.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawOptimizer {
    /// Registry name (`adamw`, `sgd`, ...). Required.
    pub name: String,
    /// Peak learning rate, positive; the schedule scales it. Required.
    pub lr: f64,
    /// The optimizer's own parameters (`weight_decay`, `betas`, ...). Default: none.
    #[serde(default, skip_serializing_if = "Params::omitted")]
    pub params: Params,
}

/// Training settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawTrain {
    /// Optimizer steps to run, at least 1. At least one of `max_steps` and `epochs` is
    /// required. Default: none.
    #[serde(default)]
    pub max_steps: Option<u64>,
    /// Passes over the training data, at least 1; with `max_steps` too, whichever ends first.
    /// Default: none.
    #[serde(default)]
    pub epochs: Option<u64>,
    /// Tokens per sequence, at least 1. Default: `128`.
    #[serde(default)]
    pub seq_len: Option<usize>,
    /// Sequences per micro-batch, at least 1. Default: `8`.
    #[serde(default)]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step, at least 1 (gradients are token-weighted).
    /// Default: `1`.
    #[serde(default)]
    pub grad_accum: Option<usize>,
    /// Evaluate every N optimizer steps; `0` evaluates only at the end. Default: `0`.
    #[serde(default)]
    pub eval_every: Option<u64>,
    /// Validation batches per evaluation; `0` uses the whole validation split. Default: `16`.
    #[serde(default)]
    pub eval_batches: Option<usize>,
    /// Checkpoint every N optimizer steps; `0` checkpoints only at the end. Default: `0`.
    #[serde(default)]
    pub checkpoint_every: Option<u64>,
    /// Checkpoints to keep: the newest N valid ones, plus the one with the lowest validation
    /// loss; `0` keeps every checkpoint. The newest valid checkpoint is never deleted, nor is
    /// one that fails verification ([checkpoints.md](checkpoints.md)). Default: `3`.
    #[serde(default)]
    pub keep_checkpoints: Option<usize>,
    /// Emit training metrics every N optimizer steps, at least 1. Default: `10`.
    #[serde(default)]
    pub log_every: Option<u64>,
    /// Clip gradients to this global L2 norm; `0` disables clipping (the norm is logged
    /// anyway). Default: `1.0`.
    #[serde(default)]
    pub clip_norm: Option<f64>,
    /// The learning-rate schedule, stepped once per optimizer step.
    /// Default: `(kind: constant, warmup_steps: 0, min_lr: 0.0)`.
    #[serde(default)]
    pub schedule: Option<RawSchedule>,
}

/// The learning-rate schedule: linear warmup, then constant or decaying.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawSchedule {
    /// Shape after warmup: constant at `optimizer.lr`, or linear / cosine decay to `min_lr` at
    /// the last step. Default: `constant`.
    #[serde(default)]
    pub kind: Option<ScheduleKind>,
    /// Steps of linear warmup from 0 to `optimizer.lr`; at most `train.max_steps` when that is
    /// set. Default: `0`.
    #[serde(default)]
    pub warmup_steps: Option<u64>,
    /// The floor of the decay; between 0 and `optimizer.lr`. Default: `0.0`.
    #[serde(default)]
    pub min_lr: Option<f64>,
}

/// A sample generated at the end of the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawGenerate {
    /// Text the sample continues. Required.
    pub prompt: String,
    /// Tokens to generate, at least 1. Default: `128`.
    #[serde(default)]
    pub max_tokens: Option<usize>,
    /// Softmax temperature; `0` always picks the most likely token. Default: `1.0`.
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Sample only among the K most likely tokens; K is at least 1. Default: none, every token.
    #[serde(default)]
    pub top_k: Option<usize>,
    /// Sample only among the most likely tokens whose probabilities add up to P, in (0, 1].
    /// Default: none.
    #[serde(default)]
    pub top_p: Option<f64>,
}
