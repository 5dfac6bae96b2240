//! The named steps of a run, in the order [`super::run`] takes them: each builds one part
//! (trackers, the tokenizer, the kernel, the model, the batches, the sinks and the metrics hub,
//! the metadata) from the resolved config and the registry, and fails with an error that names
//! the part. Keeping them apart keeps the orchestration readable and lets a resumed run build
//! exactly what a fresh one builds.

use std::path::Path;

use abi_stable::std_types::RString;
use anyhow::{anyhow, bail, Context, Result};
use codex_engine::{self as engine, Device, KernelScope, ParamStore};
use codex_plugin_api::model::ModelBox;
use codex_plugin_api::sink::SinkBox;
use codex_plugin_api::tokenizer::TokenizerBox;
use codex_plugin_api::tracker::TrackerBox;
use codex_plugin_api::RunInfo;

use crate::checkpoint;
use crate::config::Config;
use crate::data::{self, BatchShape, SplitDocuments, TrainBatches, ValBatches};
use crate::metrics::{HubOptions, MetricsHub, Tracking};
use crate::plugins::build;
use crate::plugins::registry::Registry;
use crate::rundir::{PluginLock, RunDir};

/// Build every tracker the config names. Trackers are built (their parameters checked)
/// before any expensive work, and told about the run only when the metrics hub starts.
pub(crate) fn trackers(config: &Config, registry: &Registry) -> Result<Vec<(String, TrackerBox)>> {
    let mut trackers = Vec::new();
    for spec in &config.trackers {
        let tracker = build::tracker(registry, &spec.name, &spec.params)?;
        trackers.push((spec.name.clone(), tracker));
    }
    Ok(trackers)
}

/// Read the training and validation documents.
pub(crate) fn documents(config: &Config) -> Result<SplitDocuments> {
    let docs = data::load_documents(&config.data, &config.dir)?;
    tracing::info!(
        "data: {} training and {} validation {}",
        docs.train.len(),
        docs.val.len(),
        if config.data.is_sft() {
            "examples"
        } else {
            "documents"
        }
    );
    Ok(docs)
}

/// The tokenizer, trained on the training documents when it learns a vocabulary, and its
/// serialised form (written to the run directory and every checkpoint) when it has one.
pub(crate) fn tokenizer(
    config: &Config,
    registry: &Registry,
    corpus: &[RString],
) -> Result<(TokenizerBox, Option<String>)> {
    let dir_text = config.dir.to_string_lossy().into_owned();
    let tokenizer = build::tokenizer(
        registry,
        &config.tokenizer.name,
        &config.tokenizer.params,
        &dir_text,
        corpus,
        None,
    )?;
    let json = tokenizer
        .to_json()
        .into_result()
        .map_err(|e| anyhow!("tokenizer `{}`: {e}", config.tokenizer.name))?
        .into_option()
        .map(RString::into_string);
    Ok((tokenizer, json))
}

/// Fused ops for this thread's tensor work while the returned scope lives; a config without
/// a kernel keeps plain ops.
pub(crate) fn kernel(config: &Config, registry: &Registry, device: &Device) -> Result<KernelScope> {
    let kernel = match &config.kernel {
        Some(name) => Some(build::kernel(registry, name, &serde_json::Value::Null)?),
        None => None,
    };
    let scope = engine::scoped_kernel_at(device, kernel, config.precision)
        .context("in the config's `kernel`")?;
    match config.precision {
        engine::Precision::F32 => {}
        half if engine::products_precision(device) == half => {
            let name = half.name();
            tracing::info!("precision {name}: matrix products in {name} with f32 accumulation");
        }
        engine::Precision::Bf16 => tracing::warn!(
            "precision bf16: the kernel offers no bf16 matrix products on this CPU (they \
             need AVX512-BF16), so they run in f32"
        ),
        engine::Precision::F16 => tracing::warn!(
            "precision f16: the kernel offers no f16 matrix products, so they run in f32 \
             (the `cpu` kernel has them on every CPU)"
        ),
    }
    Ok(scope)
}

/// The model, its parameters declared into `store`; its context length bounds `seq_len`.
/// Overwrite the freshly initialised parameters with the weights of the Hugging Face
/// directory the model comes `from`, if any.
pub(crate) fn pretrained(config: &Config, store: &mut ParamStore) -> Result<()> {
    let Some(from) = &config.model_from else {
        return Ok(());
    };
    let dir = crate::hf::ModelDir::open(&crate::hf::locate(from, &config.dir)?)?;
    dir.load_weights(store)?;
    tracing::info!("starting from the weights in {}", dir.dir.display());
    Ok(())
}

/// Freeze the model and attach the config's LoRA adapters, if it has any, once the base
/// weights are in place (on a `fresh` start, with the values of the PEFT adapter the config
/// comes `from`); the sha256 of the frozen base, which its checkpoints record.
pub(crate) fn adapter(
    config: &Config,
    store: &mut ParamStore,
    model: &ModelBox,
    device: &Device,
    fresh: bool,
) -> Result<Option<String>> {
    let Some(adapter) = &config.adapter else {
        return Ok(None);
    };
    let attached = crate::adapter::attach(adapter, store, model, device)?;
    if let (Some(from), true) = (&adapter.from, fresh) {
        crate::adapter::peft::load_weights(from, store)
            .map_err(|e| super::RunError::Adapter(format!("adapter.from: {e:#}")))?;
        tracing::info!("continuing the adapter in {}", from.display());
    }
    tracing::info!(
        "LoRA: {} weights adapted (r {}, scale {}); {} of {} parameters train ({:.2}%)",
        attached.weights.len(),
        adapter.r,
        adapter.scale(),
        attached.trainable,
        attached.total,
        100.0 * attached.trainable as f64 / attached.total.max(1) as f64
    );
    Ok(Some(store.frozen_sha256()?))
}

pub(crate) fn model(
    config: &Config,
    registry: &Registry,
    vocab_size: usize,
    store: &mut ParamStore,
) -> Result<ModelBox> {
    let model = build::model(
        registry,
        &config.model.name,
        &config.model.params,
        vocab_size,
        store.as_tensor_store(),
    )?;
    let max_positions = model.max_positions();
    if config.train.seq_len > max_positions {
        // The model names the parameter that sets its limit; the host knows no model's names.
        let raise = match model.max_positions_param().into_option() {
            Some(param) => format!("model.params.{param}"),
            None => "the model's position limit in model.params".to_string(),
        };
        return Err(super::RunError::SeqLenTooLong {
            seq_len: config.train.seq_len,
            model: config.model.name.clone(),
            max_positions,
            raise,
        }
        .into());
    }
    if config.data.is_sft() && config.data.sft.packing {
        crate::inference::check_packing(&model, &config.model.name, store.device())?;
    }
    Ok(model)
}

/// What supervised fine-tuning data leaves for the run besides its batches.
pub(crate) struct SftSetup {
    /// What fitting the training examples into rows did.
    pub(crate) report: data::SftReport,
    /// The chat template the examples were rendered with, as checkpoints keep it.
    pub(crate) chat_template: Option<String>,
}

/// Token streams through the content-addressed cache, then batches: the training batches in
/// their (seed, epoch) order and the validation batches, if there is validation data; for
/// supervised fine-tuning data, also what fitting the training examples into rows did and the
/// chat template (the one `resumed` from, a checkpoint, keeps, if it keeps one).
pub(crate) fn batches(
    config: &Config,
    docs: SplitDocuments,
    tokenizer: &TokenizerBox,
    resumed: Option<&Path>,
) -> Result<(TrainBatches, Option<ValBatches>, Option<SftSetup>)> {
    let fingerprint = data::TokenizerFingerprint::of(
        tokenizer,
        &config.tokenizer.name,
        &config.tokenizer.params_json(),
    )?;
    let cache = data::TokenCache::new(data::cache_dir(&config.data, &config.dir)?);
    let shape = BatchShape {
        batch_size: config.train.batch_size,
        seq_len: config.train.seq_len,
    };
    if config.data.is_sft() {
        let dir = data::sft::tokenizer_dir(&config.tokenizer.name, &config.tokenizer.params);
        let encoder = match resumed {
            Some(checkpoint) => {
                data::SftEncoder::restored(&config.data, tokenizer, dir.as_deref(), checkpoint)?
            }
            None => data::SftEncoder::new(&config.data, tokenizer, dir.as_deref())?,
        };
        let (seq_len, overlong) = (config.train.seq_len, config.data.sft.overlong);
        let rows = data::sft_rows(
            "train",
            &docs.train,
            &encoder,
            &fingerprint,
            &cache,
            seq_len,
            overlong,
        )?;
        let pad = data::pad_id(tokenizer);
        let report = rows.report;
        let packing = config.data.sft.packing;
        let train =
            TrainBatches::examples(rows.tokens, rows.rows, shape, config.seed, pad, packing)?;
        match train.packing() {
            Some((examples, rows, fill)) => tracing::info!(
                "data: {examples} training examples packed into {rows} rows of {} positions \
                 ({:.1}% filled), {} tokens the loss counts per epoch",
                shape.seq_len,
                fill * 100.0,
                train.tokens_per_epoch()
            ),
            None => tracing::info!(
                "data: {} training examples, {} tokens the loss counts per epoch",
                train.windows(),
                train.tokens_per_epoch()
            ),
        }
        let val = if docs.val.is_empty() {
            tracing::warn!(
                "no validation examples: evaluation is skipped (set data.val_fraction or data.val)"
            );
            None
        } else {
            let rows = data::sft_rows(
                "val",
                &docs.val,
                &encoder,
                &fingerprint,
                &cache,
                seq_len,
                overlong,
            )?;
            Some(ValBatches::examples(
                rows.tokens,
                rows.rows,
                shape,
                pad,
                packing,
            )?)
        };
        let setup = SftSetup {
            report,
            chat_template: encoder.template().map(|t| t.to_saved()),
        };
        return Ok((train, val, Some(setup)));
    }
    let streams = data::token_streams(
        &docs,
        tokenizer,
        &fingerprint,
        &cache,
        &config.data.preprocess,
    )?;
    drop(docs);
    let train = TrainBatches::new(streams.train.tokens, shape, config.seed)?;
    let val = match streams.val {
        Some(v) => Some(ValBatches::new(v.tokens, shape, data::pad_id(tokenizer))?),
        None => {
            tracing::warn!("no validation documents: evaluation is skipped (set data.val_fraction or data.val)");
            None
        }
    };
    Ok((train, val, None))
}

/// Open the config's sinks and start the metrics hub with them and the trackers; a resumed
/// run's sinks supersede the records after its step. Dropped on an error before
/// `finish_as`, the hub tells the trackers the run failed.
pub(crate) fn metrics(
    config: &Config,
    registry: &Registry,
    run: &RunDir,
    resume_step: Option<u64>,
    trackers: Vec<(String, TrackerBox)>,
) -> Result<MetricsHub> {
    let mut sinks: Vec<(String, SinkBox)> = Vec::new();
    for (i, spec) in config.sinks.iter().enumerate() {
        let sink = build::sink(registry, &spec.name, &spec.params, run.path(), resume_step)?;
        // Lanes go by registry name; the one sink a config may list twice (the run's record,
        // once as itself and once as a copy) is told apart by its place in the config.
        let lane = if sinks.iter().any(|(lane, _)| *lane == spec.name) {
            format!("{} (sinks[{i}])", spec.name)
        } else {
            spec.name.clone()
        };
        sinks.push((lane, sink));
    }
    let tracking = if trackers.is_empty() {
        None
    } else {
        let run_dir = std::path::absolute(run.path()).unwrap_or_else(|_| run.path().to_path_buf());
        Some(Tracking {
            run: RunInfo {
                experiment: config.experiment.as_str().into(),
                run_id: run.run_id().into(),
                run_dir: run_dir.to_string_lossy().as_ref().into(),
            },
            params: run_params(config)?,
            trackers,
        })
    };
    Ok(MetricsHub::start_tracked(
        HubOptions::new(run.path(), resume_step),
        sinks,
        tracking,
    )?)
}

/// The run's parameters for trackers: the resolved config flattened to dotted keys
/// (`optimizer.lr` = `0.0006`, `data.train.0.Text.paths.0` = `/data/a.txt`), list items by
/// index, absent optional values left out, empty lists and maps written `[]` and `{}`.
pub fn run_params(config: &Config) -> Result<Vec<(String, String)>> {
    fn flatten(key: String, value: &serde_json::Value, out: &mut Vec<(String, String)>) {
        use serde_json::Value;
        let join = |k: &str| {
            if key.is_empty() {
                k.to_string()
            } else {
                format!("{key}.{k}")
            }
        };
        match value {
            Value::Null => {}
            Value::Object(map) if !map.is_empty() => {
                for (k, v) in map {
                    flatten(join(k), v, out);
                }
            }
            Value::Array(items) if !items.is_empty() => {
                for (i, v) in items.iter().enumerate() {
                    flatten(join(&i.to_string()), v, out);
                }
            }
            Value::String(text) => out.push((key, text.clone())),
            other => out.push((key, other.to_string())),
        }
    }
    let tree = config
        .to_json()
        .context("recording the run's parameters for its trackers")?;
    let mut out = Vec::new();
    flatten(String::new(), &tree, &mut out);
    Ok(out)
}

/// Optimizer steps the run takes: `max_steps`, or `epochs` worth of data, or the smaller.
pub(crate) fn total_steps(config: &Config, batches: &TrainBatches) -> Result<u64> {
    let per_epoch = (batches.batches_per_epoch() as u64).div_ceil(config.train.grad_accum as u64);
    let by_epochs = config.train.epochs.map(|e| e * per_epoch.max(1));
    let steps = match (config.train.max_steps, by_epochs) {
        (Some(m), Some(e)) => m.min(e),
        (Some(m), None) => m,
        (None, Some(e)) => e,
        (None, None) => bail!("train: set max_steps, epochs, or both"),
    };
    if steps == 0 {
        bail!("train: the run would take 0 steps; raise train.max_steps or train.epochs");
    }
    Ok(steps)
}

pub(crate) fn plugin_lock(registry: &Registry, config: &Config) -> Vec<PluginLock> {
    use codex_plugin_api::ComponentKind as K;
    let mut named: Vec<(K, &str)> = vec![
        (K::Tokenizer, config.tokenizer.name.as_str()),
        (K::Model, config.model.name.as_str()),
        (K::Optimizer, config.optimizer.name.as_str()),
        (K::Trainer, config.trainer.name.as_str()),
    ];
    named.extend(config.sinks.iter().map(|s| (K::Sink, s.name.as_str())));
    named.extend(
        config
            .trackers
            .iter()
            .map(|s| (K::Tracker, s.name.as_str())),
    );
    if let Some(k) = &config.kernel {
        named.push((K::Kernel, k.as_str()));
    }
    named
        .into_iter()
        .filter_map(|(kind, name)| registry.get(kind, name).ok())
        .map(|e| {
            use crate::plugins::registry::Origin;
            let (origin, sha256) = match &e.origin {
                Origin::Builtin { .. } => ("builtin".to_string(), None),
                // The file was checked against its manifest pin when it loaded; hashing it
                // again records exactly which build this run used.
                Origin::Native { path } | Origin::Wasm { path } => {
                    (e.origin.to_string(), crate::fsio::sha256_file(path).ok())
                }
            };
            PluginLock {
                name: format!("{}/{}", e.kind.as_str(), e.name),
                origin,
                sha256,
            }
        })
        .collect()
}

/// What retention needs to know of the checkpoints already on disk: each one is verified once
/// here, then trusted for the rest of the session.
pub(crate) fn scan_checkpoints(root: &Path) -> Result<Vec<checkpoint::Summary>> {
    let mut out = Vec::new();
    for (step, dir) in checkpoint::list(root)? {
        let valid = checkpoint::verify(&dir, &checkpoint::CHECKPOINT_FILES).is_ok();
        let val_loss = valid
            .then(|| std::fs::read_to_string(dir.join("trainer_state.json")).ok())
            .flatten()
            .and_then(|text| serde_json::from_str::<checkpoint::HostState>(&text).ok())
            .and_then(|state| state.val_loss);
        out.push(checkpoint::Summary {
            step,
            valid,
            val_loss,
        });
    }
    Ok(out)
}
