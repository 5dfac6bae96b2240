//! One training run: build the components a resolved config names, hand the trainer a
//! [`TrainSession`], and keep everything the trainer must not do itself — data, devices,
//! checkpoints, metric plumbing, the progress display and Ctrl-C — on the host side.
//!
//! The order of construction matters and is deliberate: the tokenizer first (a `bpe`
//! tokenizer learns from the training documents), then the model (so `seq_len` can be checked
//! against its context before any expensive tokenization), then the data, the optimizer, the
//! sinks and trackers, and finally the trainer.
//!
//! Trackers follow the run's lifecycle from the metrics hub's threads: they are told the run
//! started (or resumed) with its parameters (the resolved config flattened to dotted keys,
//! [`run_params`]), get every metric record as sinks do, each checkpoint directory once it is
//! committed and the run's own files at the end, and finally how the run ended: finished,
//! failed (an error ended it) or killed (stopped by Ctrl-C, resumable).
//!
//! A resumed run ([`resume`]) builds the same components the same way, then overwrites what
//! the checkpoint holds — parameters, optimizer state, the data cursor, the trainer's state —
//! before the trainer starts, and opens the metric sinks at the checkpoint's step so the
//! records after it are superseded. Every random stream is a pure function of the run seed
//! and a position (see [`RngStreams`]), so nothing else needs saving for the continuation
//! to equal the uninterrupted run bit for bit.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{ROption, RResult, RSlice, RStr, RString, RVec};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor as CTensor};
use codex_plugin_api::model::ModelBox;
use codex_plugin_api::optimizer::{OptimizerBox, ParamGrad};
use codex_plugin_api::params::ParamInfoAbi;
use codex_plugin_api::trainer::{BatchIds, TrainSession, TrainSession_TO};
use codex_plugin_api::{
    ForwardCtx, OptimStep, PluginError, RunInfo, RunStatus, TensorId, TrainSettings,
};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::checkpoint;
use crate::components;
use crate::config::Config;
use crate::data::{self, BatchShape, DataCursor, TokenBatch, TrainBatches, ValBatches};
use crate::inference;
use crate::metrics::{HubOptions, MetricsHub, Recorder, Tracking};
use crate::registry::Registry;
use crate::rundir::{Metadata, MetadataInput, PluginLock, RunDir};
use crate::tensor::{self, ParamStore, TensorGroup};

/// Files every checkpoint holds; `verify` insists they are covered by `SHA256SUMS`.
pub const CHECKPOINT_FILES: [&str; 4] = [
    "model.safetensors",
    "optimizer.safetensors",
    "trainer_state.json",
    "config.ron",
];

/// The version of `trainer_state.json` this build writes and reads.
const HOST_STATE_VERSION: u32 = 2;

/// `trainer_state.json`: the host's part of a checkpoint (what the trainer cannot know) around
/// the trainer's own state.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostState {
    /// Format version of this file.
    pub version: u32,
    /// Optimizer steps completed.
    pub step: u64,
    /// Micro-batches of the next optimizer step already consumed. Always 0: checkpoints are
    /// taken between optimizer steps, never inside gradient accumulation.
    pub micro_step: u64,
    /// Where the training data stands.
    pub data: DataCursor,
    /// The run seed.
    pub seed: u64,
    /// Every random stream and where it stands.
    pub rng: RngStreams,
    /// The learning-rate schedule the steps so far followed.
    pub schedule: ScheduleState,
    /// The validation loss recorded at this step, if the run evaluated here; retention keeps
    /// the checkpoint with the lowest one.
    pub val_loss: Option<f64>,
    /// The directory of the config file the run was started from: relative paths in
    /// component parameters resolve against it when the run is resumed from its own config.
    pub config_dir: PathBuf,
    /// The trainer's own state (opaque JSON; the built-in trainer keeps its step, tokens seen,
    /// best validation loss and last evaluation step there).
    pub trainer: serde_json::Value,
}

/// The random streams of a run. None is a running generator: each value is a pure function
/// of the run seed and a position that the checkpoint already holds, which is why resuming
/// needs no generator state and replays nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RngStreams {
    /// Parameter initialisation: drawn from this seed when the model declares its
    /// parameters. Used once; a resumed run overwrites the drawn values with the saved ones.
    pub init_seed: u64,
    /// Order of the training windows: `window_order(data_order_seed, epoch)`, a fresh
    /// permutation per epoch; the position inside the epoch is `data.position`.
    pub data_order_seed: u64,
    /// The epoch whose permutation is being served.
    pub data_order_epoch: u64,
    /// Dropout masks: the trainer derives the seed of micro-step `m` of step `s` as a
    /// function of (`dropout_seed`, `s`, `m`).
    pub dropout_seed: u64,
    /// The step whose dropout seeds come next.
    pub dropout_next_step: u64,
}

/// The schedule as resolved for the run that wrote the checkpoint. The learning rate is a
/// pure function of these and the step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleState {
    /// `constant`, `linear` or `cosine`.
    pub kind: crate::config::ScheduleKind,
    /// Peak learning rate.
    pub peak_lr: f64,
    /// Warmup steps.
    pub warmup_steps: u64,
    /// The floor.
    pub min_lr: f64,
    /// The step the decay ends at.
    pub total_steps: u64,
    /// The learning rate of the last step taken, if any.
    pub last_lr: Option<f64>,
}

/// Set by Ctrl-C: the trainer stops at the next step boundary.
static STOP: AtomicBool = AtomicBool::new(false);

/// Install the Ctrl-C handler once per process.
pub fn install_interrupt_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let r = ctrlc::set_handler(|| {
            if STOP.swap(true, Ordering::SeqCst) {
                // A second Ctrl-C while stopping: leave at once; the last checkpoint stands.
                eprintln!("\ninterrupted again: exiting without waiting for the step to end");
                std::process::exit(130);
            }
            eprintln!("\nstopping at the end of this step (Ctrl-C again to abort)…");
        });
        if let Err(e) = r {
            tracing::warn!("Ctrl-C will not stop training gracefully: {e}");
        }
    });
}

/// What a run needs besides its config.
pub struct RunOptions {
    /// Explicit run directory (`--run-dir`).
    pub run_dir: Option<PathBuf>,
    /// Where `runs/<experiment>/<run-id>` directories go.
    pub runs_root: PathBuf,
    /// Stop flag for tests; `None` uses the process-wide Ctrl-C flag.
    pub stop: Option<Arc<AtomicBool>>,
    /// Show a progress bar when stderr is a terminal.
    pub progress: bool,
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// The run directory.
    pub run_dir: PathBuf,
    /// Optimizer steps completed.
    pub steps: u64,
    /// True when stopped by the user.
    pub interrupted: bool,
    /// The newest checkpoint written.
    pub last_checkpoint: Option<PathBuf>,
    /// The last validation loss, if evaluated.
    pub val_loss: Option<f64>,
    /// The generated sample, if the config asked for one.
    pub sample: Option<String>,
}

/// Run the experiment `config` to its end (or until stopped).
pub fn run(config: &Config, registry: &Registry, options: &RunOptions) -> Result<RunSummary> {
    tensor::install();
    let device = tensor::parse_device(&config.device).context("in the config's `device`")?;
    let started = SystemTime::now();

    let run = match &options.run_dir {
        Some(path) => RunDir::create_at(path, &config.experiment)?,
        None => RunDir::create_new(&options.runs_root, &config.experiment, started)?,
    };
    crate::logging::attach_run_log(&run.log_path())
        .with_context(|| format!("opening {}", run.log_path().display()))?;
    tracing::info!("run directory: {}", run.path().display());
    let result = run_in(config, registry, options, &run, device, started, None);
    if let Err(e) = crate::logging::detach_run_log() {
        tracing::warn!("closing the run log: {e}");
    }
    result
}

/// A verified checkpoint to continue from, and what it holds.
#[derive(Debug, Clone)]
pub struct ResumePoint {
    /// The checkpoint directory (`<run>/checkpoints/step-…`).
    pub checkpoint: PathBuf,
    /// The run directory it belongs to.
    pub run_dir: PathBuf,
    /// Its `trainer_state.json`.
    pub state: HostState,
    /// Its `config.ron`.
    pub config_text: String,
}

impl ResumePoint {
    /// Verify every hash of the checkpoint at `dir`, then read its state and config. Nothing
    /// is read before the whole checkpoint has verified.
    pub fn open(dir: &Path) -> Result<ResumePoint> {
        checkpoint::verify(dir, &CHECKPOINT_FILES)
            .with_context(|| format!("checkpoint {} is not usable", dir.display()))?;
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
        };
        let state: HostState = serde_json::from_str(&read("trainer_state.json")?)
            .with_context(|| {
                format!(
                    "{}: not a trainer state this build reads (format version {HOST_STATE_VERSION}); resume with the codex-ml version that wrote it",
                    dir.join("trainer_state.json").display()
                )
            })?;
        if state.version != HOST_STATE_VERSION {
            bail!(
                "{}: trainer state format {} but this build reads format {HOST_STATE_VERSION}; resume with the codex-ml version that wrote it",
                dir.join("trainer_state.json").display(),
                state.version
            );
        }
        let run_dir = dir
            .parent()
            .and_then(Path::parent)
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Ok(ResumePoint {
            checkpoint: dir.to_path_buf(),
            run_dir,
            state,
            config_text: read("config.ron")?,
        })
    }

    /// The config the checkpoint was written under, with `overrides` applied; relative
    /// paths resolve against the directory of the config the run was started from.
    pub fn saved_config(&self, overrides: &[crate::config::Override]) -> Result<Config> {
        let path = self.checkpoint.join("config.ron");
        let mut config = Config::from_source(&path, &self.config_text, overrides)?;
        config.dir = self.state.config_dir.clone();
        Ok(config)
    }

    /// The step it was written at.
    pub fn step(&self) -> u64 {
        self.state.step
    }
}

/// Continue the run of `point` in its own directory, with `config` (already checked against
/// the checkpoint's with [`Config::resume_differences`]).
pub fn resume(
    config: &Config,
    registry: &Registry,
    options: &RunOptions,
    point: &ResumePoint,
) -> Result<RunSummary> {
    tensor::install();
    let device = tensor::parse_device(&config.device).context("in the config's `device`")?;
    let started = SystemTime::now();
    let run = RunDir::open_existing(&point.run_dir, &config.experiment)?;
    crate::logging::attach_run_log(&run.log_path())
        .with_context(|| format!("opening {}", run.log_path().display()))?;
    tracing::info!(
        "resuming {} from {} (step {})",
        run.path().display(),
        point.checkpoint.display(),
        point.step()
    );
    let result = prepare_checkpoints(&run.checkpoints_dir(), point.step()).and_then(|()| {
        run_in(
            config,
            registry,
            options,
            &run,
            device,
            started,
            Some(point),
        )
    });
    if let Err(e) = crate::logging::detach_run_log() {
        tracing::warn!("closing the run log: {e}");
    }
    result
}

/// Clear the way for a resumed run's checkpoints: remove what interrupted writes left, and set
/// aside checkpoints newer than the one resumed from (corrupt ones skipped by `latest`, or
/// valid ones when an older checkpoint was named on purpose) so they can be written again.
fn prepare_checkpoints(root: &Path, step: u64) -> Result<()> {
    for dir in checkpoint::remove_stale_writes(root)? {
        tracing::warn!("removed an interrupted checkpoint write: {}", dir.display());
    }
    for (from, to) in checkpoint::set_aside_after(root, step)? {
        tracing::warn!(
            "checkpoint {} is newer than the one resumed from: moved to {}",
            from.display(),
            to.display()
        );
    }
    Ok(())
}

/// Overwrite the freshly built state with the checkpoint's: parameters, optimizer state and
/// the data cursor. The trainer's own state travels through [`TrainSession::resume_state`].
fn restore(
    point: &ResumePoint,
    store: &mut ParamStore,
    train: &mut TrainBatches,
    tokenizer_json: Option<&str>,
) -> Result<()> {
    let saved_tokenizer = point.checkpoint.join("tokenizer.json");
    if let (Some(now), Ok(then)) = (tokenizer_json, std::fs::read_to_string(&saved_tokenizer)) {
        if now != then {
            bail!(
                "the tokenizer built now differs from {}: the training data or the tokenizer changed since the checkpoint; resume with the same data",
                saved_tokenizer.display()
            );
        }
    }
    store.load_safetensors(
        &point.checkpoint.join("model.safetensors"),
        TensorGroup::Params,
    )?;
    store.load_safetensors(
        &point.checkpoint.join("optimizer.safetensors"),
        TensorGroup::State,
    )?;
    train.seek(point.state.data)?;
    Ok(())
}

/// What retention needs to know of the checkpoints already on disk: each one is verified once
/// here, then trusted for the rest of the session.
fn scan_checkpoints(root: &Path) -> Result<Vec<checkpoint::Summary>> {
    let mut out = Vec::new();
    for (step, dir) in checkpoint::list(root)? {
        let valid = checkpoint::verify(&dir, &CHECKPOINT_FILES).is_ok();
        let val_loss = valid
            .then(|| std::fs::read_to_string(dir.join("trainer_state.json")).ok())
            .flatten()
            .and_then(|text| serde_json::from_str::<HostState>(&text).ok())
            .and_then(|state| state.val_loss);
        out.push(checkpoint::Summary {
            step,
            valid,
            val_loss,
        });
    }
    Ok(out)
}

fn run_in(
    config: &Config,
    registry: &Registry,
    options: &RunOptions,
    run: &RunDir,
    device: Device,
    started: SystemTime,
    resume_from: Option<&ResumePoint>,
) -> Result<RunSummary> {
    let config_text = config.to_ron();
    run.write_config(&config_text)?;

    // Trackers are built (their parameters checked) before any expensive work, and told about
    // the run only when the metrics hub starts.
    let mut trackers = Vec::new();
    for spec in &config.trackers {
        let tracker = components::tracker(registry, &spec.name, &spec.params)?;
        trackers.push((spec.name.clone(), tracker));
    }

    // Tokenizer, trained on the training documents when it learns a vocabulary.
    let docs = data::load_documents(&config.data, &config.dir)?;
    tracing::info!(
        "data: {} training and {} validation documents",
        docs.train.len(),
        docs.val.len()
    );
    let dir_text = config.dir.to_string_lossy().into_owned();
    let tokenizer = components::tokenizer(
        registry,
        &config.tokenizer.name,
        &config.tokenizer.params,
        &dir_text,
        &docs.corpus(),
    )?;
    let tokenizer_json = tokenizer
        .to_json()
        .into_result()
        .map_err(|e| anyhow!("tokenizer `{}`: {e}", config.tokenizer.name))?
        .into_option()
        .map(RString::into_string);
    if let Some(json) = &tokenizer_json {
        crate::rundir::write_atomic(&run.tokenizer_path(), json.as_bytes())
            .with_context(|| format!("writing {}", run.tokenizer_path().display()))?;
    }
    let vocab_size = tokenizer.vocab_size();

    // Fused ops for this thread's tensor work while the run lasts; `None` keeps plain ops.
    let kernel = match &config.kernel {
        Some(name) => Some(components::kernel(
            registry,
            name,
            &serde_json::Value::Null,
        )?),
        None => None,
    };
    let _kernel_scope =
        tensor::scoped_kernel(&device, kernel).context("in the config's `kernel`")?;

    // Model: declared into the store; its context length bounds seq_len.
    let mut store = ParamStore::new(device.clone(), config.seed);
    let model = components::model(
        registry,
        &config.model.name,
        &config.model.params,
        vocab_size,
        store.as_tensor_store(),
    )?;
    let max_positions = model.max_positions();
    if config.train.seq_len > max_positions {
        bail!(
            "train.seq_len is {} but model `{}` accepts at most {} positions: lower train.seq_len or raise the model's position limit in model.params (n_positions for gpt2, max_position_embeddings for LLaMA-style models)",
            config.train.seq_len,
            config.model.name,
            max_positions
        );
    }

    // Data: token streams through the content-addressed cache, then batches.
    let fingerprint = data::TokenizerFingerprint::of(
        &tokenizer,
        &config.tokenizer.name,
        &config.tokenizer.params_json(),
    )?;
    let cache = data::TokenCache::new(
        config
            .data
            .resolve_cache_dir(&config.dir, &options.runs_root),
    );
    let streams = data::token_streams(
        &docs,
        &tokenizer,
        &fingerprint,
        &cache,
        &config.data.preprocess,
    )?;
    drop(docs);
    let shape = BatchShape {
        batch_size: config.train.batch_size,
        seq_len: config.train.seq_len,
    };
    let mut train_batches = TrainBatches::new(streams.train.tokens, shape, config.seed)?;
    let val_batches = match streams.val {
        Some(v) => Some(ValBatches::new(v.tokens, shape, data::pad_id(&tokenizer))?),
        None => {
            tracing::warn!("no validation documents: evaluation is skipped (set data.val_fraction or data.val)");
            None
        }
    };
    let total_steps = total_steps(config, &train_batches)?;
    if let Some(point) = resume_from {
        if point.step() >= total_steps {
            return Err(crate::cli::UsageError(format!(
                "the checkpoint {} is at step {} and this run has {total_steps} steps: nothing left to train; raise train.max_steps (e.g. --set train.max_steps={})",
                point.checkpoint.display(),
                point.step(),
                point.step() + total_steps.max(1)
            ))
            .into());
        }
    }
    tracing::info!(
        "training: {} steps of {} x {} tokens x {} micro-batches; {} batches per epoch",
        total_steps,
        config.train.batch_size,
        config.train.seq_len,
        config.train.grad_accum,
        train_batches.batches_per_epoch()
    );

    let optimizer = components::optimizer(
        registry,
        &config.optimizer.name,
        &config.optimizer.params,
        store.as_tensor_store(),
    )?;
    if let Some(point) = resume_from {
        restore(
            point,
            &mut store,
            &mut train_batches,
            tokenizer_json.as_deref(),
        )?;
    }

    // Metric sinks on their own thread; a resumed run's supersede the records after its step.
    let resume_step = resume_from.map(ResumePoint::step);
    let mut sinks = Vec::new();
    for spec in &config.sinks {
        let sink = components::sink(registry, &spec.name, &spec.params, run.path(), resume_step)?;
        // `metrics.ndjson` is always written: an `ndjson` sink sent to another file is an
        // extra copy under a name of its own, and the hub still opens the built-in one.
        let lane = match spec.params.get("file").and_then(|f| f.as_str()) {
            Some(file) if spec.name == crate::metrics::NDJSON && file != "metrics.ndjson" => {
                format!("{}:{file}", spec.name)
            }
            _ => spec.name.clone(),
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
    // Dropped on an error before `finish_as`, the hub tells the trackers the run failed.
    let hub = MetricsHub::start_tracked(HubOptions::new(run.path(), resume_step), sinks, tracking)?;

    let metadata = Metadata::collect(
        run,
        MetadataInput {
            started,
            threads: rayon::current_num_threads(),
            device: config.device.clone(),
            seeds: [("run".to_string(), config.seed)].into_iter().collect(),
            plugins: plugin_lock(registry, config),
        },
    );
    match resume_from {
        None => run.write_metadata(&metadata)?,
        Some(point) => run.record_resume(&metadata, point.step(), &point.checkpoint)?,
    };

    let mut trainer = components::trainer(registry, &config.trainer.name, &config.trainer.params)?;
    let settings = config.train.settings(
        config.seed,
        config.optimizer.lr,
        total_steps,
        data::IGNORE_INDEX,
    );
    let stop = options.stop.clone();
    let progress = Progress::new(total_steps, options.progress, config.train.log_every);
    let mut session = HostSession {
        settings,
        store: &mut store,
        model: &model,
        optimizer,
        train: train_batches,
        val: val_batches,
        device: device.clone(),
        recorder: hub.recorder(),
        progress,
        stop,
        known_checkpoints: scan_checkpoints(&run.checkpoints_dir())?,
        keep_checkpoints: config.train.keep_checkpoints,
        checkpoints: run.checkpoints_dir(),
        config_text,
        config_dir: config.dir.clone(),
        tokenizer_json: tokenizer_json.clone(),
        resume_state: resume_from.map(|p| p.state.trainer.to_string()),
        last_checkpoint: None,
        val_loss: None,
        val_loss_at: None,
        last_lr: None,
    };
    // The whole loop runs on a worker of the pool its parallel sections use (see `on_pool`).
    let outcome = crate::tensor::on_pool(|| {
        let session_ref = TrainSession_TO::from_ptr(&mut session, TD_Opaque);
        trainer.train(session_ref).into_result()
    });
    session.progress.finish();
    let last_checkpoint = session.last_checkpoint.clone();
    let val_loss = session.val_loss;
    drop(session);
    let result = outcome
        .map_err(|e| {
            let where_ = match &last_checkpoint {
                Some(p) => format!("the last checkpoint is {}", p.display()),
                None => "no checkpoint was written".to_string(),
            };
            anyhow!("training failed: {e}; {where_}")
        })
        .and_then(|outcome| {
            let sample = match (&config.generate, outcome.interrupted) {
                (Some(g), false) => Some(inference::generate(
                    &model,
                    &tokenizer,
                    &device,
                    &g.prompt,
                    &inference::GenerateOptions {
                        max_tokens: g.max_tokens,
                        sampling: crate::sampling::Sampling {
                            temperature: g.temperature,
                            top_k: g.top_k.unwrap_or(0),
                            top_p: g.top_p.unwrap_or(1.0),
                        },
                        seed: config.seed,
                    },
                )?),
                _ => None,
            };
            Ok(RunSummary {
                run_dir: run.path().to_path_buf(),
                steps: outcome.steps,
                interrupted: outcome.interrupted,
                last_checkpoint,
                val_loss,
                sample,
            })
        });

    let status = match &result {
        Err(_) => RunStatus::Failed,
        Ok(summary) if summary.interrupted => RunStatus::Killed,
        Ok(_) => RunStatus::Finished,
    };
    let recorder = hub.recorder();
    for path in [run.config_path(), run.metadata_path(), run.tokenizer_path()] {
        if path.is_file() {
            recorder.artifact(&path);
        }
    }
    let report = hub.finish_as(status);
    for s in &report.sinks {
        if let Some(reason) = &s.disabled {
            tracing::warn!("sink `{}` was disabled during the run: {reason}", s.name);
        }
    }
    // A tracker is named in one warning when it is disabled or abandoned; none is repeated.
    result
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
fn total_steps(config: &Config, batches: &TrainBatches) -> Result<u64> {
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

fn plugin_lock(registry: &Registry, config: &Config) -> Vec<PluginLock> {
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
            use crate::registry::Origin;
            let (origin, sha256) = match &e.origin {
                Origin::Builtin { .. } => ("builtin".to_string(), None),
                // The file was checked against its manifest pin when it loaded; hashing it
                // again records exactly which build this run used.
                Origin::Native { path } | Origin::Wasm { path } => (
                    e.origin.to_string(),
                    crate::checkpoint::sha256_file(path).ok(),
                ),
            };
            PluginLock {
                name: format!("{}/{}", e.kind.as_str(), e.name),
                origin,
                sha256,
            }
        })
        .collect()
}

/// The progress display: a bar on a terminal, plain log lines otherwise.
struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    every: u64,
    started: Instant,
    first_step: Option<u64>,
}

impl Progress {
    fn new(total: u64, enabled: bool, every: u64) -> Progress {
        let bar = (enabled && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(total);
            if let Ok(style) = ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] step {pos}/{len} {msg} eta {eta}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar
        });
        Progress {
            bar,
            total,
            every: every.max(1),
            started: Instant::now(),
            first_step: None,
        }
    }

    fn update(&mut self, step: u64, loss: f64, lr: f64, tokens_per_s: f64) {
        let first = *self.first_step.get_or_insert(step.saturating_sub(1));
        match &self.bar {
            Some(bar) => {
                bar.set_position(step);
                bar.set_message(format!(
                    "loss {loss:.4} lr {lr:.2e} {tokens_per_s:.0} tok/s"
                ));
            }
            None if step.is_multiple_of(self.every) || step == self.total => {
                let done = step.saturating_sub(first).max(1) as f64;
                let per_step = self.started.elapsed().as_secs_f64() / done;
                let eta = per_step * self.total.saturating_sub(step) as f64;
                tracing::info!(
                    "step {step}/{} loss {loss:.4} lr {lr:.2e} {tokens_per_s:.0} tok/s eta {}",
                    self.total,
                    format_duration(eta)
                );
            }
            None => {}
        }
    }

    /// Report an evaluation: above the bar on a terminal, a log line otherwise.
    fn evaluated(&self, step: u64, loss: f64) {
        let line = format!(
            "step {step}/{} validation loss {loss:.4} (perplexity {:.2})",
            self.total,
            loss.exp()
        );
        match &self.bar {
            Some(bar) => bar.println(line),
            None => tracing::info!("{line}"),
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

fn format_duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// The host side of the trainer's session.
struct HostSession<'r> {
    settings: TrainSettings,
    store: &'r mut ParamStore,
    model: &'r ModelBox,
    optimizer: OptimizerBox,
    train: TrainBatches,
    val: Option<ValBatches>,
    device: Device,
    recorder: Recorder,
    progress: Progress,
    stop: Option<Arc<AtomicBool>>,
    checkpoints: PathBuf,
    /// What retention knows of the checkpoints on disk, kept up to date as they are written.
    known_checkpoints: Vec<checkpoint::Summary>,
    keep_checkpoints: usize,
    config_text: String,
    config_dir: PathBuf,
    tokenizer_json: Option<String>,
    resume_state: Option<String>,
    last_checkpoint: Option<PathBuf>,
    val_loss: Option<f64>,
    /// The step `val_loss` was recorded at.
    val_loss_at: Option<u64>,
    last_lr: Option<f64>,
}

fn err(e: impl std::fmt::Display) -> PluginError {
    PluginError::new(e.to_string())
}

fn batch_ids(batch: TokenBatch, device: &Device) -> Result<BatchIds> {
    let (rows, t) = (batch.rows, batch.seq_len);
    let inputs = CTensor::from_vec(batch.inputs, (rows, t), device)?;
    let targets = CTensor::from_vec(batch.targets, (rows, t), device)?;
    Ok(BatchIds {
        inputs: tensor::insert(inputs),
        targets: tensor::insert(targets),
        tokens: batch.tokens,
        epoch: batch.epoch,
    })
}

impl HostSession<'_> {
    fn write_checkpoint(&mut self, step: u64, trainer_state: &str) -> Result<PathBuf> {
        // Records up to this step reach the files before the checkpoint exists, so a resume
        // from it never loses metrics that a kill would otherwise have left in the queue.
        if !self.recorder.sync(Duration::from_secs(10)) {
            tracing::warn!("metric sinks are behind; checkpointing step {step} anyway");
        }
        let data = self.train.cursor();
        let seed = self.settings.seed;
        let schedule = self.settings.schedule;
        let state = HostState {
            version: HOST_STATE_VERSION,
            step,
            micro_step: 0,
            data,
            seed,
            rng: RngStreams {
                init_seed: seed,
                data_order_seed: seed,
                data_order_epoch: data.epoch,
                dropout_seed: seed,
                dropout_next_step: step + 1,
            },
            schedule: ScheduleState {
                kind: match schedule.kind {
                    codex_plugin_api::ScheduleKind::Constant => {
                        crate::config::ScheduleKind::Constant
                    }
                    codex_plugin_api::ScheduleKind::Linear => crate::config::ScheduleKind::Linear,
                    codex_plugin_api::ScheduleKind::Cosine => crate::config::ScheduleKind::Cosine,
                },
                peak_lr: self.settings.lr,
                warmup_steps: schedule.warmup_steps,
                min_lr: schedule.min_lr,
                total_steps: self.settings.total_steps,
                last_lr: self.last_lr,
            },
            val_loss: self.val_loss.filter(|_| self.val_loss_at == Some(step)),
            config_dir: self.config_dir.clone(),
            trainer: serde_json::from_str(trainer_state)
                .with_context(|| format!("the trainer's state at step {step} is not JSON"))?,
        };
        let mut w = checkpoint::Writer::begin(&self.checkpoints, step)?;
        self.store
            .save_safetensors(&w.path_for("model.safetensors"), TensorGroup::Params)?;
        w.add_written("model.safetensors")?;
        self.store
            .save_safetensors(&w.path_for("optimizer.safetensors"), TensorGroup::State)?;
        w.add_written("optimizer.safetensors")?;
        w.write(
            "trainer_state.json",
            serde_json::to_string_pretty(&state)?.as_bytes(),
        )?;
        w.write("config.ron", self.config_text.as_bytes())?;
        if let Some(json) = &self.tokenizer_json {
            w.write("tokenizer.json", json.as_bytes())?;
        }
        let path = w.commit()?;
        tracing::info!("checkpoint: {}", path.display());
        self.recorder.artifact(&path);
        self.known_checkpoints.retain(|c| c.step != step);
        self.known_checkpoints.push(checkpoint::Summary {
            step,
            valid: true,
            val_loss: state.val_loss,
        });
        self.apply_retention();
        Ok(path)
    }

    /// Delete what the retention policy says to. A failure to delete costs disk space, not
    /// the run, so it is a warning.
    fn apply_retention(&mut self) {
        for step in checkpoint::retention(&self.known_checkpoints, self.keep_checkpoints) {
            let dir = self.checkpoints.join(checkpoint::dir_name(step));
            match checkpoint::remove(&dir) {
                Ok(()) => {
                    tracing::debug!("retention: removed {}", dir.display());
                    self.known_checkpoints.retain(|c| c.step != step);
                }
                Err(e) => tracing::warn!("retention: cannot remove {}: {e}", dir.display()),
            }
        }
    }
}

impl TrainSession for HostSession<'_> {
    fn settings(&self) -> TrainSettings {
        self.settings
    }

    fn params(&self) -> RVec<ParamInfoAbi> {
        self.store
            .param_infos()
            .into_iter()
            .map(Into::into)
            .collect()
    }

    fn next_batch(&mut self) -> RResult<ROption<BatchIds>, PluginError> {
        let batch = self.train.next_batch();
        batch_ids(batch, &self.device)
            .map(ROption::RSome)
            .map_err(err)
            .into()
    }

    fn val_batch(&mut self, index: u64) -> RResult<ROption<BatchIds>, PluginError> {
        let Some(val) = &self.val else {
            return RResult::ROk(ROption::RNone);
        };
        match val.batch(index as usize) {
            Some(b) => batch_ids(b, &self.device)
                .map(ROption::RSome)
                .map_err(err)
                .into(),
            None => RResult::ROk(ROption::RNone),
        }
    }

    fn forward(&mut self, inputs: TensorId, ctx: ForwardCtx) -> RResult<TensorId, PluginError> {
        self.model.forward(inputs, ctx)
    }

    fn optimizer_step(
        &mut self,
        grads: RSlice<'_, ParamGrad>,
        step: OptimStep,
    ) -> RResult<(), PluginError> {
        self.optimizer.step(grads, step)
    }

    fn record(&mut self, step: u64, split: RStr<'_>, name: RStr<'_>, value: f64) {
        if split.as_str() == "val" && name.as_str() == "loss" {
            self.val_loss = Some(value);
            self.val_loss_at = Some(step);
            self.progress.evaluated(step, value);
        }
        self.recorder
            .record(step, split.as_str(), name.as_str(), value);
    }

    fn progress(&mut self, step: u64, loss: f64, lr: f64, tokens_per_s: f64) {
        self.last_lr = Some(lr);
        self.progress.update(step, loss, lr, tokens_per_s);
    }

    fn checkpoint(&mut self, step: u64, trainer_state: RStr<'_>) -> RResult<(), PluginError> {
        match self.write_checkpoint(step, trainer_state.as_str()) {
            Ok(path) => {
                self.last_checkpoint = Some(path);
                RResult::ROk(())
            }
            Err(e) => RResult::RErr(err(format!("writing the checkpoint at step {step}: {e:#}"))),
        }
    }

    fn resume_state(&self) -> ROption<RString> {
        self.resume_state.clone().map(RString::from).into()
    }

    fn should_stop(&self) -> bool {
        match &self.stop {
            Some(flag) => flag.load(Ordering::SeqCst),
            None => STOP.load(Ordering::SeqCst),
        }
    }
}

/// The newest valid checkpoint of a run directory, or the checkpoint itself.
pub fn resolve_checkpoint(target: &Path) -> Result<PathBuf> {
    if target.join(checkpoint::SUMS).exists()
        || checkpoint::parse_step(&target.file_name().unwrap_or_default().to_string_lossy())
            .is_some()
    {
        checkpoint::verify(target, &CHECKPOINT_FILES)
            .with_context(|| format!("checkpoint {} is not usable", target.display()))?;
        return Ok(target.to_path_buf());
    }
    let root = target.join("checkpoints");
    if !target.is_dir() {
        bail!("{}: no such run or checkpoint directory", target.display());
    }
    let (found, skipped) = checkpoint::latest_valid(&root, &CHECKPOINT_FILES)?;
    for (dir, why) in &skipped {
        tracing::warn!("skipping checkpoint {}: {why}", dir.display());
    }
    match found {
        Some((_, dir)) => Ok(dir),
        None => bail!(
            "{}: no valid checkpoint under {} (a run writes one at train.checkpoint_every and at its end)",
            target.display(),
            root.display()
        ),
    }
}
