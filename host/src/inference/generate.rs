//! Generating text: the sampling loop shared by `codex-ml generate` and the sample at the end of
//! a run, seeded so that both give the same text for the same seed.

use anyhow::{anyhow, Result};
use codex_engine::{self as engine, Device};
use codex_plugin_api::model::ModelBox;
use codex_plugin_api::tokenizer::TokenizerBox;
use codex_plugin_api::{ForwardCtx, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::sampling::{sample, Sampling};
use crate::plugins::build::ApiResultExt;

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
        let input = Tensor::from_id(engine::upload_ids(window.to_vec(), &[1, t], device)?);
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

pub(super) fn model_err(e: codex_plugin_api::PluginError) -> anyhow::Error {
    anyhow!("model: {e}")
}
