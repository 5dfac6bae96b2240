//! One training run: build the components a resolved config names, hand the trainer a
//! `TrainSession`, and keep everything the trainer must not do itself — data, devices,
//! checkpoints, metric plumbing, the progress display and Ctrl-C — on the host side.
//!
//! The order of construction matters and is deliberate: the tokenizer first (a `bpe`
//! tokenizer learns from the training documents), then the model (so `seq_len` can be checked
//! against its context before any expensive tokenization), then the data, the optimizer, the
//! sinks and trackers, and finally the trainer.
//!
//! Trackers follow the run's lifecycle from the metrics hub's threads: they are told the run
//! started (or resumed) with its parameters (the resolved config flattened to dotted keys,
//! [`steps::run_params`]), get every metric record as sinks do, each checkpoint directory once it is
//! committed and the run's own files at the end, and finally how the run ended: finished,
//! failed (an error ended it) or killed (stopped by Ctrl-C, resumable).
//!
//! A resumed run ([`resume()`]) builds the same components the same way, then overwrites what
//! the checkpoint holds — parameters, optimizer state, the data cursor, the trainer's state —
//! before the trainer starts, and opens the metric sinks at the checkpoint's step so the
//! records after it are superseded. Every random stream is a pure function of the run seed
//! and a position (see [`crate::checkpoint::RngStreams`]), so nothing else needs saving for the continuation
//! to equal the uninterrupted run bit for bit.

//!
//! The pieces: `steps` builds each part of a run, `session` is the host side of the
//! trainer's session (including checkpoint writing), [`mod@resume`] finds and restores a
//! checkpoint, `progress` and `interrupt` are the terminal side.

mod interrupt;
mod progress;
pub mod resume;
mod session;
mod status;
pub use status::{read_outcome, Outcome};
mod steps;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::SystemTime;

use abi_stable::sabi_trait::TD_Opaque;
use anyhow::{anyhow, Context, Result};
use codex_engine::{self as engine, Device, ParamStore};
use codex_plugin_api::trainer::TrainSession_TO;
use codex_plugin_api::RunStatus;

use crate::config::Config;
use crate::data;
use crate::inference;
use crate::plugins::build;
use crate::plugins::registry::Registry;
use crate::rundir::{Metadata, MetadataInput, RunDir};

pub use interrupt::{install_interrupt_handler, signal_name, stop_signal};
pub use resume::{
    continue_config, continue_from, is_restartable, latest_run, locate, Latest, ResumePoint,
};
pub use steps::run_params;

/// A run refused because of what it was asked to do: nothing was trained, nothing changed on
/// disk, and the message says what to change. The command line exits with code 2 for these.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The checkpoint to resume from is already at or past the run's last step.
    #[error("the checkpoint {} is at step {step} and this run has {total} steps: nothing left to train; raise train.max_steps (e.g. --set train.max_steps={})", checkpoint.display(), step + (*total).max(1))]
    NothingLeftToTrain {
        /// The checkpoint.
        checkpoint: PathBuf,
        /// Its step.
        step: u64,
        /// The run's total steps.
        total: u64,
    },
    /// A plugin file differs from the build the run last used.
    #[error("{component} changed since the run's last session: {origin} has sha256 {now}, the run used {then}; exact resume may no longer hold. Put the plugin back as it was, or pass --allow-plugin-change to go on with this build (its hash is recorded)")]
    PluginChanged {
        /// The component, with its kind (`optimizer `lion/lion``).
        component: String,
        /// The plugin file.
        origin: String,
        /// The sha256 the run recorded.
        then: String,
        /// The sha256 of the file now.
        now: String,
    },
    /// `train.seq_len` is longer than the model's context.
    #[error("train.seq_len is {seq_len} but model `{model}` accepts at most {max_positions} positions: lower train.seq_len or raise {raise}")]
    SeqLenTooLong {
        /// The config's sequence length.
        seq_len: usize,
        /// The model's registry name.
        model: String,
        /// The longest sequence the model accepts.
        max_positions: usize,
        /// What to raise instead (`model.params.n_positions`).
        raise: String,
    },
    /// A path that is neither a run directory nor a checkpoint.
    #[error("{}: no such run or checkpoint directory; pass a run directory (runs/<experiment>/<run-id>) or one of its checkpoints", .0.display())]
    NoSuchRun(PathBuf),
    /// `latest` with no run to stand for.
    #[error("latest: no runs{of} under {}{reason}; start one with `codex-ml run CONFIG`, or pass a run directory", dir.display())]
    NoRuns {
        /// ` of experiment `name``, or empty for runs of any experiment.
        of: String,
        /// Where the runs would be.
        dir: PathBuf,
        /// Why the directory could not be read, if it could not (` (…)`), else empty.
        reason: String,
    },
    /// `latest` where a checkpoint is needed, and no run has one.
    #[error("latest: no run{of} under {} has a checkpoint yet (a run writes one every train.checkpoint_every steps and at its end); pass a run or checkpoint directory", dir.display())]
    NoCheckpoints {
        /// ` of experiment `name``, or empty for runs of any experiment.
        of: String,
        /// Where the runs are.
        dir: PathBuf,
    },
    /// The `adapter` section does not fit the model.
    #[error("{0}")]
    Adapter(String),
    /// `data.sft.packing` with a model that does not read the positions of packed rows.
    #[error("data.sft.packing: model `{0}` does not read the positions of packed rows (plugin API 2.2, `Tensor::packed_positions`), so every example after the first in a row would take the positions that follow the one before it; set data.sft.packing: false (one example per row), or use a model that reads them (the built-in gpt2 and llama do)")]
    PackingUnread(String),
    /// A LoRA checkpoint was written for other base weights than the run's model has now.
    #[error("{checkpoint}: the adapter was trained on base weights with sha256 {then}, but the model's weights now have {now}; resume with the base model the run started from (model.from)", checkpoint = .checkpoint.display())]
    BaseChanged {
        /// The checkpoint.
        checkpoint: PathBuf,
        /// The base hash the checkpoint records.
        then: String,
        /// The base hash now.
        now: String,
    },
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
    /// Resume even when a plugin file differs from the one the run last used
    /// (`--allow-plugin-change`); the change is logged and the new hashes recorded.
    pub allow_plugin_change: bool,
    /// Let a resume change the learning rate and schedule of the steps to come (`--retune`).
    pub retune: bool,
    /// Optimizer steps' worth of training batches a resume skips (`--skip-batches`), past the
    /// data that made a run diverge, say.
    pub skip_batches: u64,
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
    /// The kept checkpoint with the lowest validation loss, if any was evaluated.
    pub best_checkpoint: Option<PathBuf>,
    /// The generated sample, if the config asked for one.
    pub sample: Option<String>,
}

/// Run the experiment `config` to its end (or until stopped).
pub fn run(config: &Config, registry: &Registry, options: &RunOptions) -> Result<RunSummary> {
    engine::install();
    let device = engine::parse_device(&config.device).context("in the config's `device`")?;
    let started = SystemTime::now();

    let run = match &options.run_dir {
        Some(path) => match RunDir::create_at(path, &config.experiment) {
            Err(crate::rundir::RunDirError::ExistingRun { .. })
                if !resume::has_checkpoint(path) =>
            {
                return restart(config, registry, options, path);
            }
            made => made?,
        },
        None => RunDir::create_new(&options.runs_root, &config.experiment, started)?,
    };
    crate::logging::attach_run_log(&run.log_path())
        .with_context(|| format!("opening {}", run.log_path().display()))?;
    tracing::info!("run directory: {}", run.path().display());
    session(
        config,
        registry,
        options,
        &run,
        device,
        started,
        Start::Fresh,
    )
}

/// [`run_in`], then let go of the run log whatever happened.
fn session(
    config: &Config,
    registry: &Registry,
    options: &RunOptions,
    run: &RunDir,
    device: Device,
    started: SystemTime,
    start: Start<'_>,
) -> Result<RunSummary> {
    // A new run's directory is its own from the start; a resumed or restarted one only once
    // `run_in` has decided to go on (a refused resume changes nothing).
    let mut status = status::Session::new(run, started);
    if let Start::Fresh = start {
        status.running()?;
    }
    let result = run_in(config, registry, options, run, device, &mut status, start);
    if status.is_running() {
        // The log file gets the outcome the command line prints.
        match &result {
            Ok(summary) if summary.interrupted => tracing::info!(
                target: crate::logging::RUN_LOG_ONLY,
                "stopped by {} after step {}",
                stop_signal().map_or("request", signal_name),
                summary.steps
            ),
            Ok(summary) => tracing::info!(
                target: crate::logging::RUN_LOG_ONLY,
                "finished {} steps",
                summary.steps
            ),
            Err(e) => {
                tracing::error!(target: crate::logging::RUN_LOG_ONLY, "the run failed: {e:#}")
            }
        }
    }
    status.end(&result);
    if status.is_running() {
        // The picture of the run so far, however the session ended; never the run's failure.
        if let Err(e) = crate::report::write_loss_svg(run.path()) {
            tracing::warn!("could not draw {}: {e:#}", crate::report::LOSS_SVG);
        }
    }
    if let Err(e) = crate::logging::detach_run_log() {
        tracing::warn!("closing the run log: {e}");
    }
    result
}

/// Start again, in its own directory, a run that stopped before its first checkpoint (killed,
/// or failed early): nothing in it can be resumed, so it trains from step 0 with `config`,
/// as a resumed run would from a checkpoint at step 0. Its metric records are superseded,
/// checkpoint writes it left are cleared away, its earlier `config.ron` and `metadata.json`
/// stay (the session's config goes beside them and `metadata.json` gains a `resumes` entry
/// with no checkpoint), and `log.txt` is appended to.
pub fn restart(
    config: &Config,
    registry: &Registry,
    options: &RunOptions,
    run_dir: &std::path::Path,
) -> Result<RunSummary> {
    engine::install();
    let device = engine::parse_device(&config.device).context("in the config's `device`")?;
    let started = SystemTime::now();
    let run = RunDir::open_existing(run_dir, &config.experiment)?;
    tracing::warn!(
        "{} holds a run that stopped before its first checkpoint: starting it again in place",
        run.path().display()
    );
    session(
        config,
        registry,
        options,
        &run,
        device,
        started,
        Start::Restart,
    )
}

/// A resumed run's plugins must be the builds it last used (their sha256 in its metadata),
/// unless `allow` says otherwise; then each change is logged (and the new hashes go into the
/// session's `resumes` entry as its plugin lock).
fn check_plugins(config: &Config, registry: &Registry, run: &RunDir, allow: bool) -> Result<()> {
    let then = run.plugin_lock_in_use()?;
    for now in steps::plugin_lock(registry, config) {
        let Some(now_sha) = &now.sha256 else {
            continue;
        };
        let recorded = then.iter().find(|t| t.name == now.name);
        let Some(then_sha) = recorded.and_then(|t| t.sha256.as_ref()) else {
            continue;
        };
        if then_sha == now_sha {
            continue;
        }
        // Lock entries are named `kind/name`.
        let component = match now.name.split_once('/') {
            Some((kind, name)) => format!("{kind} `{name}`"),
            None => format!("`{}`", now.name),
        };
        let changed = RunError::PluginChanged {
            component,
            origin: now.origin.clone(),
            then: then_sha.clone(),
            now: now_sha.clone(),
        };
        if !allow {
            return Err(changed.into());
        }
        tracing::warn!("resuming with a changed plugin (--allow-plugin-change): {changed}");
    }
    Ok(())
}

/// Where [`run_in`] starts.
#[derive(Clone, Copy)]
enum Start<'a> {
    /// A new run in a new directory.
    Fresh,
    /// From step 0 again, in the directory of a run that has no checkpoint.
    Restart,
    /// From a checkpoint.
    Resume(&'a ResumePoint),
}

impl<'a> Start<'a> {
    /// The checkpoint resumed from.
    fn point(self) -> Option<&'a ResumePoint> {
        match self {
            Start::Resume(point) => Some(point),
            Start::Fresh | Start::Restart => None,
        }
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
    engine::install();
    let device = engine::parse_device(&config.device).context("in the config's `device`")?;
    let started = SystemTime::now();
    let run = RunDir::open_existing(&point.run_dir, &config.experiment)?;
    tracing::info!(
        "resuming {} from {} (step {})",
        run.path().display(),
        point.checkpoint.display(),
        point.step()
    );
    // The run log is attached once the resume is decided (see `run_in`), so that a refused
    // resume leaves the directory as it found it.
    session(
        config,
        registry,
        options,
        &run,
        device,
        started,
        Start::Resume(point),
    )
}

/// The run itself, fresh or resumed, in `run`: build every part in order, hand the trainer
/// its session, then generate the sample, tell sinks and trackers how the run ended and
/// report.
fn run_in(
    config: &Config,
    registry: &Registry,
    options: &RunOptions,
    run: &RunDir,
    device: Device,
    status: &mut status::Session,
    start: Start<'_>,
) -> Result<RunSummary> {
    let started = status.started();
    let resume_from = start.point();
    if let Start::Resume(_) = start {
        check_plugins(config, registry, run, options.allow_plugin_change)?;
    }
    let config_text = config.to_ron();
    // What a run writes before it trains. A fresh run writes it at once; a resumed one only
    // once everything is built and the checkpoint restored: a resume refused before that
    // point (nothing left to train, a state that no longer fits) changes nothing on disk.
    // (A fresh run's `config.ron` comes first of all: it names the run's experiment even if
    // the run is stopped before anything else, so that it can be started again in place.)
    let write_tokenizer = |tokenizer_json: Option<&str>| -> Result<()> {
        if let Some(json) = tokenizer_json {
            crate::fsio::write_atomic(&run.tokenizer_path(), json.as_bytes())
                .with_context(|| format!("writing {}", run.tokenizer_path().display()))?;
        }
        Ok(())
    };
    let commit = |tokenizer_json: Option<&str>| -> Result<()> {
        run.write_config(&config_text)?;
        write_tokenizer(tokenizer_json)
    };
    if let Start::Fresh = start {
        run.write_config(&config_text)?;
    }

    let trackers = steps::trackers(config, registry)?;
    let docs = steps::documents(config)?;
    let mut data_report = docs.report.clone();
    let (tokenizer, tokenizer_json) = steps::tokenizer(config, registry, &docs.corpus())?;
    if let Start::Fresh = start {
        write_tokenizer(tokenizer_json.as_deref())?;
    }
    let _kernel_scope = steps::kernel(config, registry, &device)?;
    let mut store = ParamStore::new(device.clone(), config.seed);
    let model = steps::model(config, registry, tokenizer.vocab_size(), &mut store)?;
    // A LoRA checkpoint holds the adapters alone: the base comes from where it always does.
    if resume_from.is_none() || config.adapter.is_some() {
        steps::pretrained(config, &mut store)?;
    }
    let base_sha256 = steps::adapter(config, &mut store, &model, &device, resume_from.is_none())?;
    let resumed = resume_from.map(|p| p.checkpoint.as_path());
    let (mut train_batches, val_batches, sft) = steps::batches(config, docs, &tokenizer, resumed)?;
    let chat_template = sft.as_ref().and_then(|s| s.chat_template.clone());
    data_report.sft = sft.map(|s| s.report);

    let total_steps = steps::total_steps(config, &train_batches)?;
    if let Some(point) = resume_from {
        if point.step() >= total_steps {
            return Err(RunError::NothingLeftToTrain {
                checkpoint: point.checkpoint.clone(),
                step: point.step(),
                total: total_steps,
            }
            .into());
        }
    }
    // A batch cannot hold more windows than the data has: say what a step really trains on.
    let rows = config.train.batch_size.min(train_batches.windows());
    let unit = match (config.data.is_sft(), train_batches.packing().is_some()) {
        (true, true) => "rows of packed examples",
        (true, false) => "examples",
        (false, _) => "windows",
    };
    if rows < config.train.batch_size {
        tracing::warn!(
            "train.batch_size is {} but the training data holds only {rows} {} of {} tokens, so every batch is those {rows}; add data, or lower train.batch_size or train.seq_len",
            config.train.batch_size,
            unit,
            config.train.seq_len
        );
    }
    // Two short lines rather than one that wraps at 80 columns.
    let plural = if config.train.grad_accum == 1 {
        ""
    } else {
        "es"
    };
    if config.data.is_sft() {
        tracing::info!(
            "training: {total_steps} steps, each of {} micro-batch{plural} of {rows} {unit}",
            config.train.grad_accum,
        );
    } else {
        tracing::info!(
            "training: {total_steps} steps, each of {} micro-batch{plural} of {rows} x {} tokens",
            config.train.grad_accum,
            config.train.seq_len,
        );
    }
    if config.data.is_sft() {
        tracing::info!(
            "an epoch is {} batches; rows padded to the batch's longest, at most {}",
            train_batches.batches_per_epoch(),
            config.train.seq_len
        );
    } else {
        tracing::info!("an epoch is {} batches", train_batches.batches_per_epoch());
    }

    let optimizer = build::optimizer(
        registry,
        &config.optimizer.name,
        &config.optimizer.params,
        store.as_tensor_store(),
    )?;
    if let Some(point) = resume_from {
        resume::restore(
            point,
            &mut store,
            &mut train_batches,
            tokenizer_json.as_deref(),
            base_sha256.as_deref(),
            options.skip_batches * config.train.grad_accum.max(1) as u64,
        )?;
        // Decided: from here on the resume changes the run directory.
        crate::logging::attach_run_log(&run.log_path())
            .with_context(|| format!("opening {}", run.log_path().display()))?;
        tracing::info!(
            "resuming from {} (step {}): restored",
            point.checkpoint.display(),
            point.step()
        );
        resume::prepare_checkpoints(&run.checkpoints_dir(), point.step())?;
        commit(tokenizer_json.as_deref())?;
        status.running()?;
    }
    if let Start::Restart = start {
        crate::logging::attach_run_log(&run.log_path())
            .with_context(|| format!("opening {}", run.log_path().display()))?;
        tracing::info!(
            "starting {} again from step 0: it stopped before its first checkpoint",
            run.path().display()
        );
        resume::prepare_checkpoints(&run.checkpoints_dir(), 0)?;
        commit(tokenizer_json.as_deref())?;
        status.running()?;
    }

    // A restart supersedes every record its first session made, as a resume at step 0 would.
    let resume_step = match start {
        Start::Fresh => None,
        Start::Restart => Some(0),
        Start::Resume(point) => Some(point.step()),
    };
    let hub = steps::metrics(config, registry, run, resume_step, trackers)?;

    let metadata = Metadata::collect(
        run,
        MetadataInput {
            started,
            threads: rayon::current_num_threads(),
            device: config.device.clone(),
            seeds: [("run".to_string(), config.seed)].into_iter().collect(),
            plugins: steps::plugin_lock(registry, config),
            data: Some(data_report),
        },
    );
    match start {
        Start::Fresh => run.write_metadata(&metadata)?,
        // A run stopped before its metadata was written gets it now, as a new run would.
        Start::Restart if !run.metadata_path().is_file() => run.write_metadata(&metadata)?,
        Start::Restart => run.record_resume(&metadata, 0, None)?,
        Start::Resume(point) => {
            run.record_resume(&metadata, point.step(), Some(&point.checkpoint))?
        }
    };

    let mut trainer = build::trainer(registry, &config.trainer.name, &config.trainer.params)?;
    let settings = config.train.settings(
        config.seed,
        config.optimizer.lr,
        total_steps,
        data::IGNORE_INDEX,
    );
    let mut session = session::HostSession {
        settings,
        loss_scaling: config.loss_scale,
        store: &mut store,
        model: &model,
        optimizer,
        train: train_batches,
        val: val_batches,
        device: device.clone(),
        recorder: hub.recorder(),
        progress: progress::Progress::new(total_steps, options.progress, config.train.log_every),
        stop: options.stop.clone(),
        known_checkpoints: steps::scan_checkpoints(&run.checkpoints_dir())?,
        keep_checkpoints: config.train.keep_checkpoints,
        checkpoints: run.checkpoints_dir(),
        config_text,
        config_dir: config.dir.clone(),
        tokenizer_json: tokenizer_json.clone(),
        chat_template,
        base_sha256,
        resume_state: resume_from.map(|p| p.state.trainer.to_string()),
        last_checkpoint: None,
        val_loss: None,
        val_loss_at: None,
        last_lr: None,
        system: crate::metrics::SystemMetrics::new(),
    };
    // The whole loop runs on a worker of the pool its parallel sections use (see `on_pool`).
    let outcome = engine::on_pool(|| {
        let session_ref = TrainSession_TO::from_ptr(&mut session, TD_Opaque);
        trainer.train(session_ref).into_result()
    });
    session.progress.finish();
    let last_checkpoint = session.last_checkpoint.clone();
    let val_loss = session.val_loss;
    let best_checkpoint = session
        .known_checkpoints
        .iter()
        .filter(|c| c.valid)
        .filter_map(|c| Some((c.val_loss.filter(|l| l.is_finite())?, c.step)))
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, step)| {
            run.checkpoints_dir()
                .join(crate::checkpoint::dir_name(step))
        });
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
                (Some(g), false) => Some(
                    inference::generate(
                        &model,
                        &tokenizer,
                        &device,
                        &g.prompt,
                        &inference::GenerateOptions {
                            max_tokens: g.max_tokens,
                            sampling: crate::inference::sampling::Sampling {
                                temperature: g.temperature,
                                top_k: g.top_k.unwrap_or(0),
                                top_p: g.top_p.unwrap_or(1.0),
                            },
                            seed: config.seed,
                        },
                    )?
                    .text,
                ),
                _ => None,
            };
            Ok(RunSummary {
                run_dir: run.path().to_path_buf(),
                steps: outcome.steps,
                interrupted: outcome.interrupted,
                last_checkpoint,
                val_loss,
                best_checkpoint,
                sample,
            })
        });

    // A run whose record could not be written stopped for that reason: it failed, whatever
    // the trainer made of the stop (and a checkpoint may not have fitted on the disk either).
    let result = match (hub.recorder().record_failed(), result) {
        (None, result) => result,
        (Some(reason), result) => {
            let outcome = match &result {
                Ok(summary) => match &summary.last_checkpoint {
                    Some(c) => format!(
                        "training stopped after step {}; the last checkpoint is {}",
                        summary.steps,
                        c.display()
                    ),
                    None => format!("training stopped after step {}", summary.steps),
                },
                Err(e) => format!("then {e:#}"),
            };
            Err(anyhow!(
                "{}, the run's record, could not be written ({reason}); {outcome}; make room \
                 (or fix the file system), then continue with `codex-ml resume {}`",
                crate::metrics::RUN_RECORD_FILE,
                run.path().display()
            ))
        }
    };
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
    // The run's record said why it failed when it did, and the run's error says it again.
    for s in report
        .sinks
        .iter()
        .filter(|s| s.name != crate::metrics::RUN_RECORD)
    {
        if let Some(reason) = &s.disabled {
            tracing::warn!("sink `{}` was disabled during the run: {reason}", s.name);
        }
    }
    // A tracker is named in one warning when it is disabled or abandoned; none is repeated.
    result
}

pub(crate) use resume::{check_base, params_group};
pub(crate) use steps::{
    adapter as steps_adapter, kernel as steps_kernel, pretrained as steps_pretrained,
};
