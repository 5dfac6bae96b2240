//! Generating text: the sampling loop shared by `codex-ml generate` and the sample at the end of
//! a run, seeded so that both give the same text for the same seed.
//!
//! Each new token is picked from the logits of the last position of the context window: the
//! last `max_positions` tokens so far. The model computes them incrementally through
//! `forward_cached`: the prompt is processed once, then each step feeds only the token picked
//! last, whose keys and values join the model's [`KvCache`]. A step therefore costs the new
//! position's work rather than the whole window's, and generation is linear in the number of
//! new tokens instead of quadratic. Once the text outgrows the window, the window slides: its
//! first position is a later token at every step, so positions (learned or rotary) and every
//! layer's keys and values change, and nothing cached can be reused. The cache then starts
//! afresh from the window at every step, which recomputes the window as a whole exactly as
//! before caching existed: for a given seed the text is the same at every length, and only the
//! steps past `max_positions` tokens cost as much as they did.

use std::time::Instant;

use anyhow::{anyhow, Result};
use codex_engine::{self as engine, Device};
use codex_plugin_api::model::ModelBox;
use codex_plugin_api::tokenizer::TokenizerBox;
use codex_plugin_api::{KvCache, Tensor};
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

/// What [`generate`] made of a prompt.
#[derive(Debug, Clone)]
pub struct Generated {
    /// The prompt followed by the generated text.
    pub text: String,
    /// The generated text alone.
    pub completion: String,
    /// Tokens generated.
    pub tokens: usize,
    /// Whether generation stopped at end-of-text rather than after `max_tokens`.
    pub end_of_text: bool,
}

/// Continue `prompt`.
pub fn generate(
    model: &ModelBox,
    tokenizer: &TokenizerBox,
    device: &Device,
    prompt: &str,
    options: &GenerateOptions,
) -> Result<Generated> {
    options.sampling.validate().map_err(|e| anyhow!(e))?;
    let eot = tokenizer.eot_id();
    let ids: Vec<u32> = tokenizer
        .encode(prompt.into())
        .into_result()
        .map_err(|e| anyhow!("tokenizer: {e}"))?
        .into_vec();
    let new = generate_ids(model, device, &ids, eot, options)?;
    let completion = tokenizer
        .decode(new.as_slice().into())
        .into_result()
        .map_err(|e| anyhow!("tokenizer: {e}"))?
        .to_string();
    Ok(Generated {
        text: format!("{prompt}{completion}"),
        tokens: new.len(),
        end_of_text: new.len() < options.max_tokens,
        completion,
    })
}

/// Continue the token ids `prompt` (`[eot]` when empty) until `options.max_tokens` tokens or
/// `eot`; returns the new ids, without `eot`.
pub fn generate_ids(
    model: &ModelBox,
    device: &Device,
    prompt: &[u32],
    eot: u32,
    options: &GenerateOptions,
) -> Result<Vec<u32>> {
    options.sampling.validate().map_err(|e| anyhow!(e))?;
    let mut ids = prompt.to_vec();
    if ids.is_empty() {
        ids.push(eot);
    }
    let prompt_len = ids.len();
    let context = model.max_positions().max(1);
    let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
    let mut cache = KvCache::new();
    // Where in `ids` the cache's position 0 is.
    let mut cache_start = 0;
    let started = Instant::now();
    for _ in 0..options.max_tokens {
        let window_start = ids.len().saturating_sub(context);
        if window_start != cache_start {
            // The window slid: its positions are not those the cache holds.
            cache.clear();
            cache_start = window_start;
        }
        let fresh = &ids[cache_start + cache.len()..];
        let t = fresh.len();
        let input = Tensor::from_id(engine::upload_ids(fresh.to_vec(), &[1, t], device)?);
        let logits = Tensor::from_id(
            model
                .forward_cached(input.id(), &mut cache)
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
    let new = ids.split_off(prompt_len);
    let seconds = started.elapsed().as_secs_f64();
    tracing::debug!(
        "generated {} tokens in {seconds:.3} s ({:.1} tokens/s)",
        new.len(),
        new.len() as f64 / seconds.max(1e-9)
    );
    Ok(new)
}

pub(super) fn model_err(e: codex_plugin_api::PluginError) -> anyhow::Error {
    anyhow!("model: {e}")
}
