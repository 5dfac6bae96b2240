//! Using a trained model: load a checkpoint ([`load`]), evaluate it ([`evaluate`]), generate
//! text with it ([`generate`], sampling in [`sampling`]).
//!
//! `eval`, `generate` and the sample at the end of a run share these functions, and `eval` and
//! `generate` run in the run's kernel and precision ([`kernel`]), so the numbers `eval` prints
//! are computed exactly as the trainer's validation records are (Σ nll / Σ tokens over counted
//! targets, with the same products), and a sample from the command line equals the one printed
//! at the end of training for the same seed.

mod eval;
mod generate;
pub mod sampling;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use codex_engine::{self as engine, Device, ParamStore};
use codex_plugin_api::model::ModelBox;
use codex_plugin_api::tokenizer::TokenizerBox;

pub use codex_plugin_api::EvalTotals;
pub use eval::evaluate;
pub(crate) use eval::sums as evaluation_sums;
pub(crate) use eval::{check_packing, forward, upload_inputs};
pub use generate::{generate, generate_ids, GenerateOptions, Generated};

use crate::config::Config;
use crate::plugins::build;
use crate::plugins::registry::Registry;

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

/// The run's kernel and precision (its config's `kernel` and `precision`), active for the
/// calling thread's tensor work while the returned scope lives: `eval` and `generate` then
/// compute as the run's validation and its sample did, bf16 or f16 products included.
pub fn kernel(loaded: &Loaded, registry: &Registry) -> Result<engine::KernelScope> {
    crate::run::steps_kernel(&loaded.config, registry, &loaded.device)
}

/// Load the newest valid checkpoint of a run directory, or a checkpoint directory.
pub fn load(target: &Path, registry: &Registry) -> Result<Loaded> {
    engine::install();
    let checkpoint = crate::checkpoint::resolve(target)?;
    let config = Config::load(&checkpoint.join("config.ron"), &[])
        .with_context(|| format!("reading the config saved in {}", checkpoint.display()))?;
    let device = engine::parse_device(&config.device)?;
    // The tokenizer is built the way the run built it, restored from the form the run saved
    // (a tokenizer that learnt its vocabulary needs it; one without a saved form is rebuilt).
    let tokenizer_file = checkpoint.join("tokenizer.json");
    let saved = match std::fs::read_to_string(&tokenizer_file) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", tokenizer_file.display())),
    };
    let dir = config.dir.to_string_lossy().into_owned();
    let tokenizer = build::tokenizer(
        registry,
        &config.tokenizer.name,
        &config.tokenizer.params,
        &dir,
        &[],
        saved.as_deref(),
    )?;
    let mut store = ParamStore::new(device.clone(), config.seed);
    let model = build::model(
        registry,
        &config.model.name,
        &config.model.params,
        tokenizer.vocab_size(),
        store.as_tensor_store(),
    )?;
    // A LoRA run's checkpoint holds its adapters; the base comes from `model.from`.
    let state = crate::checkpoint::read_state(&checkpoint)?;
    if config.adapter.is_some() {
        crate::run::steps_pretrained(&config, &mut store)?;
    }
    let base = crate::run::steps_adapter(&config, &mut store, &model, &device, false)?;
    crate::run::check_base(&checkpoint, state.base_sha256.as_deref(), base.as_deref())?;
    store
        .load_safetensors(
            &checkpoint.join("model.safetensors"),
            crate::run::params_group(base.as_deref()),
        )
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
