//! Using a trained model: load a checkpoint, evaluate it, generate text with it.
//!
//! `eval`, `generate` and the sample at the end of a run share these functions, so the numbers
//! `eval` prints are computed exactly as the trainer's validation records are (Σ nll / Σ tokens
//! over counted targets), and a sample from the command line equals the one printed at the end
//! of training for the same seed.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor as CTensor};
use codex_plugin_api::model::ModelBox;
use codex_plugin_api::tokenizer::TokenizerBox;
use codex_plugin_api::{ForwardCtx, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::components::{self, ApiResultExt};
use crate::config::Config;
use crate::data::{ValBatches, IGNORE_INDEX};
use crate::registry::Registry;
use crate::sampling::{sample, Sampling};
use crate::session::resolve_checkpoint;
use crate::tensor::{self, ParamStore, TensorGroup};

/// A model restored from a checkpoint, with everything needed to use it.
pub struct Loaded {
    /// The checkpoint directory.
    pub checkpoint: PathBuf,
    /// The run's resolved config, as saved in the checkpoint.
    pub config: Config,
    /// The tokenizer the run used.
    pub tokenizer: TokenizerBox,
    /// The parameters.
    pub store: ParamStore,
    /// The model.
    pub model: ModelBox,
    /// Where its tensors live.
    pub device: Device,
}

/// Load the newest valid checkpoint of a run directory, or a checkpoint directory.
pub fn load(target: &Path, registry: &Registry) -> Result<Loaded> {
    tensor::install();
    let checkpoint = resolve_checkpoint(target)?;
    let config = Config::load(&checkpoint.join("config.ron"), &[])
        .with_context(|| format!("reading the config saved in {}", checkpoint.display()))?;
    let device = tensor::parse_device(&config.device)?;
    let tokenizer_file = checkpoint.join("tokenizer.json");
    let tokenizer = if tokenizer_file.exists() {
        let params = serde_json::json!({ "path": tokenizer_file.to_string_lossy() });
        components::tokenizer(registry, "hf", &params, "", &[])?
    } else {
        // Tokenizers without a serialised form (e.g. `bytes`) are rebuilt from the config.
        let dir = config.dir.to_string_lossy().into_owned();
        components::tokenizer(
            registry,
            &config.tokenizer.name,
            &config.tokenizer.params,
            &dir,
            &[],
        )?
    };
    let mut store = ParamStore::new(device.clone(), config.seed);
    let model = components::model(
        registry,
        &config.model.name,
        &config.model.params,
        tokenizer.vocab_size(),
        store.as_tensor_store(),
    )?;
    store
        .load_safetensors(&checkpoint.join("model.safetensors"), TensorGroup::Params)
        .with_context(|| format!("loading the weights of {}", checkpoint.display()))?;
    Ok(Loaded {
        checkpoint,
        config,
        tokenizer,
        store,
        model,
        device,
    })
}

/// Settings of [`generate`].
#[derive(Debug, Clone, Copy)]
pub struct GenerateOptions {
    /// Tokens to add at most (generation also stops at end-of-text).
    pub max_tokens: usize,
    /// How each token is picked.
    pub sampling: Sampling,
    /// Seed of the sampler.
    pub seed: u64,
}

fn model_err(e: codex_plugin_api::PluginError) -> anyhow::Error {
    anyhow!("model: {e}")
}

/// Continue `prompt`; returns the prompt followed by the generated text.
pub fn generate(
    model: &ModelBox,
    tokenizer: &TokenizerBox,
    device: &Device,
    prompt: &str,
    options: &GenerateOptions,
) -> Result<String> {
    options.sampling.validate().map_err(|e| anyhow!(e))?;
    let eot = tokenizer.eot_id();
    let mut ids: Vec<u32> = tokenizer
        .encode(prompt.into())
        .into_result()
        .map_err(|e| anyhow!("tokenizer: {e}"))?
        .into_vec();
    if ids.is_empty() {
        ids.push(eot);
    }
    let prompt_len = ids.len();
    let context = model.max_positions().max(1);
    let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
    for _ in 0..options.max_tokens {
        let window = &ids[ids.len().saturating_sub(context)..];
        let t = window.len();
        let input = Tensor::from_id(tensor::insert(CTensor::from_vec(
            window.to_vec(),
            (1, t),
            device,
        )?));
        let ctx = ForwardCtx {
            train: false,
            seed: 0,
        };
        let logits = Tensor::from_id(
            model
                .forward(input.id(), ctx)
                .into_result()
                .map_err(model_err)?,
        );
        let last = logits.narrow(1, t - 1, 1).anyhow()?.to_vec_f32().anyhow()?;
        let next = sample(&last, &options.sampling, &mut rng);
        if next == eot {
            break;
        }
        ids.push(next);
    }
    let continuation = tokenizer
        .decode(ids[prompt_len..].into())
        .into_result()
        .map_err(|e| anyhow!("tokenizer: {e}"))?;
    Ok(format!("{prompt}{continuation}"))
}

/// Σ over counted targets, and what they give.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EvalTotals {
    /// Σ negative log-likelihood.
    pub nll: f64,
    /// Counted targets.
    pub tokens: f64,
    /// Targets predicted correctly (arg-max).
    pub correct: f64,
    /// Batches evaluated.
    pub batches: usize,
}

impl EvalTotals {
    /// Mean loss per token.
    pub fn loss(&self) -> f64 {
        self.nll / self.tokens
    }
    /// exp(loss).
    pub fn perplexity(&self) -> f64 {
        self.loss().exp()
    }
    /// Fraction of targets predicted correctly.
    pub fn accuracy(&self) -> f64 {
        self.correct / self.tokens
    }
}

/// Evaluate `model` on up to `max_batches` batches of `val` (all when `None`).
pub fn evaluate(
    model: &ModelBox,
    val: &ValBatches,
    device: &Device,
    max_batches: Option<usize>,
) -> Result<EvalTotals> {
    let mut totals = EvalTotals::default();
    let limit = max_batches.unwrap_or(usize::MAX);
    let mut index = 0;
    while index < limit {
        let Some(batch) = val.batch(index) else { break };
        index += 1;
        let (rows, t) = (batch.rows, batch.seq_len);
        let inputs = Tensor::from_id(tensor::insert(CTensor::from_vec(
            batch.inputs,
            (rows, t),
            device,
        )?));
        let targets = Tensor::from_id(tensor::insert(CTensor::from_vec(
            batch.targets,
            rows * t,
            device,
        )?));
        let ctx = ForwardCtx {
            train: false,
            seed: 0,
        };
        let logits = Tensor::from_id(
            model
                .forward(inputs.id(), ctx)
                .into_result()
                .map_err(model_err)?,
        );
        let shape = logits.shape().anyhow()?;
        let vocab = *shape
            .last()
            .ok_or_else(|| anyhow!("model returned a scalar"))?;
        let ce = logits
            .reshape(&[rows * t, vocab])
            .anyhow()?
            .cross_entropy(&targets, IGNORE_INDEX)
            .anyhow()?;
        totals.nll += ce.loss_sum.to_scalar().anyhow()?;
        totals.tokens += ce.tokens.to_scalar().anyhow()?;
        totals.correct += ce.correct.to_scalar().anyhow()?;
        totals.batches += 1;
    }
    if totals.tokens == 0.0 {
        bail!("nothing to evaluate: the evaluation data has no tokens");
    }
    Ok(totals)
}
