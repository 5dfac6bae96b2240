//! The metrics hub: metric records leave the training thread through a queue and reach every
//! sink and every tracker from a thread of its own.
//!
//! Why it is shaped this way:
//! - **The training step never waits.** [`Recorder::record`] stamps the time, builds the
//!   record and hands it to each sink's bounded queue with `try_send`; it never blocks and
//!   never does IO.
//! - **One thread per sink.** A sink that is slow, stuck or looping holds up only its own
//!   queue, so the built-in records (`metrics.ndjson`) stay complete whatever a plugin does.
//! - **Overflow policy: drop and count.** When a sink's queue is full (it has fallen
//!   [`DEFAULT_CAPACITY`] records behind, thousands of steps at the usual cadence), the record
//!   is dropped for that sink only and counted; [`MetricsHub::finish`] reports the counts and
//!   warns about them. Blocking instead would let one slow sink stall training.
//! - **The run's record is not disabled quietly.** When `metrics.ndjson` cannot be written
//!   (a full disk), [`Recorder::record_failed`] says so and the run stops at its next step
//!   boundary, as gracefully as the disk allows; other sinks follow the rule below.
//! - **A failing sink is disabled, once.** The first error (a panic arrives as an error: the
//!   plugin-side guard catches it) disables the sink for the rest of the run with one warning
//!   that names it and the reason; its thread ends and later records skip it.
//! - **`metrics.ndjson` is always written**: it is the run's record ([`RunRecord`]), the host's
//!   own sink; [`MetricsHub::start`] opens it first unless the caller passes a lane named
//!   [`RUN_RECORD`] already (a run does: its config lists the record first).
//! - **Records are batched**: a sink thread takes whatever has queued up (up to
//!   [`MAX_BATCH`]) and hands it over in one `write`, then flushes when its queue runs dry.
//!
//! Sinks are built from their registry declaration by `plugins::build` (also reachable as
//! [`open_sink`]); the hub takes them as `(name, SinkBox)` pairs, whatever their origin.
//!
//! **Trackers ride the same lanes.** A tracker is one more consumer of the record stream with
//! a longer lifecycle: its thread first tells it the run started (or resumed) and hands it the
//! run's parameters, then forwards records and the artifacts the run reports
//! ([`Recorder::artifact`]), and at the end tells it how the run ended
//! ([`MetricsHub::finish_as`]). Queueing, batching, overflow counting and disabling are the
//! sinks' code, shared through one private `Endpoint` trait, so the two cannot drift apart.
//! Two differences, both deliberate: [`Recorder::sync`] waits for sinks only (a checkpoint must
//! not wait on a remote tracker; trackers supersede records after a resume step themselves),
//! and artifacts go to trackers only.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use codex_plugin_api::abi_stable::std_types::{RResult, RSlice, RStr, RString, Tuple2};
use codex_plugin_api::sink::{RecordAbi, SinkBox};
use codex_plugin_api::tracker::{RunInfoAbi, TrackerBox};
use codex_plugin_api::{ComponentDecl, PluginError, Record, RunInfo, RunStatus};

use crate::plugins::build;

/// Records each sink may fall behind before its records are dropped.
pub const DEFAULT_CAPACITY: usize = 16_384;

/// The most records handed to a sink in one `write`.
pub const MAX_BATCH: usize = 1_024;

/// How long [`MetricsHub::finish`] waits for all sinks together before abandoning the stuck ones.
pub const DEFAULT_FINISH_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a finishing sink or tracker may take before the run says it is waiting for it.
const SAY_WAITING_AFTER: Duration = Duration::from_secs(3);

/// How long [`MetricsHub::finish`] waits for the trackers: longer, as one may still be sending
/// what it kept while its server was away.
pub const DEFAULT_TRACKER_FINISH_TIMEOUT: Duration = Duration::from_secs(30);

mod record;
mod system;

pub use record::{
    finals, read_series, Finals, RecordError, RunRecord, Series, RUN_RECORD, RUN_RECORD_FILE,
};
pub use system::{peak_rss_mib, SystemMetrics, SYS_SPLIT};

/// Errors of starting the hub or opening a sink.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetricsError {
    /// The declaration is for another kind of component.
    #[error("component `{name}` is a {found}, not a sink; list sinks with `codex-ml list`")]
    NotASink {
        /// Registry name.
        name: String,
        /// The kind it is.
        found: &'static str,
    },
    /// The sink's constructor failed.
    #[error("cannot open sink `{name}`: {message}")]
    Open {
        /// Registry name.
        name: String,
        /// The sink's own message.
        message: String,
    },
    /// The operating system refused a thread.
    #[error("cannot start the metrics thread for sink `{name}`: {source}")]
    Spawn {
        /// Registry name.
        name: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// Build a sink from its registry declaration: `params_json` is the sink's parameters as JSON
/// (empty for none), `run_dir` the directory file sinks write into, `resume_step` the step
/// being resumed from (records after it are superseded).
pub fn open_sink(
    name: &str,
    decl: &ComponentDecl,
    params_json: &str,
    run_dir: &Path,
    resume_step: Option<u64>,
) -> Result<SinkBox, MetricsError> {
    build::open_sink(decl, params_json, run_dir, resume_step).map_err(|e| match e {
        build::SinkOpenError::NotASink { found } => MetricsError::NotASink {
            name: name.to_string(),
            found,
        },
        build::SinkOpenError::Failed(message) => MetricsError::Open {
            name: name.to_string(),
            message,
        },
    })
}

/// Settings of a hub.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// The run directory (where the run's record is written).
    pub run_dir: PathBuf,
    /// The step being resumed from, if any.
    pub resume_step: Option<u64>,
    /// Records each sink may fall behind before records are dropped for it.
    pub capacity: usize,
    /// How long [`MetricsHub::finish`] waits for the sinks to finish.
    pub finish_timeout: Duration,
    /// How long [`MetricsHub::finish`] waits for the trackers to finish (at least
    /// `finish_timeout`).
    pub tracker_finish_timeout: Duration,
}

impl HubOptions {
    /// Defaults for a run writing into `run_dir`.
    pub fn new(run_dir: impl Into<PathBuf>, resume_step: Option<u64>) -> Self {
        HubOptions {
            run_dir: run_dir.into(),
            resume_step,
            capacity: DEFAULT_CAPACITY,
            finish_timeout: DEFAULT_FINISH_TIMEOUT,
            tracker_finish_timeout: DEFAULT_TRACKER_FINISH_TIMEOUT,
        }
    }
}

/// The trackers of a run and what to tell them when they start.
pub struct Tracking {
    /// The run being tracked.
    pub run: RunInfo,
    /// The run's parameters (the resolved config flattened to dotted keys).
    pub params: Vec<(String, String)>,
    /// The trackers, by registry name.
    pub trackers: Vec<(String, TrackerBox)>,
}

/// What happened to one sink (or tracker) over the run.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkReport {
    /// Registry name.
    pub name: String,
    /// Records the sink accepted.
    pub written: u64,
    /// Records (and, for trackers, artifacts) dropped because its queue was full.
    pub dropped: u64,
    /// Why it was disabled, if it was.
    pub disabled: Option<String>,
    /// False when it did not finish in time and was abandoned.
    pub finished: bool,
}

/// The end-of-run summary of a hub, one entry per sink and per tracker in the order they were
/// started.
#[derive(Debug, Clone, PartialEq)]
pub struct HubReport {
    /// Every sink, the run's record included.
    pub sinks: Vec<SinkReport>,
    /// Every tracker.
    pub trackers: Vec<SinkReport>,
}

impl HubReport {
    /// The report of sink `name`.
    pub fn sink(&self, name: &str) -> Option<&SinkReport> {
        self.sinks.iter().find(|s| s.name == name)
    }

    /// The report of tracker `name`.
    pub fn tracker(&self, name: &str) -> Option<&SinkReport> {
        self.trackers.iter().find(|s| s.name == name)
    }
}

enum Msg {
    Record(Record),
    /// Write and flush everything queued before this message, then acknowledge.
    Sync(SyncSender<()>),
    /// A file or directory the run produced (trackers only).
    Artifact(String),
    /// The run ended so.
    Finish(RunStatus),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Sink,
    Tracker,
}

struct Lane {
    tx: SyncSender<Msg>,
    dropped: AtomicU64,
    role: Role,
}

/// The cheap, cloneable handle the training side records through.
#[derive(Clone)]
pub struct Recorder {
    lanes: Arc<[Lane]>,
    /// Why the run's record could not be written, once it could not.
    record_failure: Arc<OnceLock<String>>,
}

impl Recorder {
    /// Record `value` of metric `name` in `split` at `step`, stamped with the current time.
    /// Never blocks.
    pub fn record(&self, step: u64, split: &str, name: &str, value: f64) {
        let time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.send(Record {
            step,
            split: split.into(),
            name: name.into(),
            value,
            time,
        });
    }

    /// Hand a complete record to every sink. Never blocks.
    pub fn send(&self, record: Record) {
        let Some((last, rest)) = self.lanes.split_last() else {
            return;
        };
        for lane in rest {
            lane.offer(Msg::Record(record.clone()));
        }
        last.offer(Msg::Record(record));
    }

    /// Tell the trackers about `path`, a file or directory the run wrote (a checkpoint, the
    /// run's config). Never blocks; sinks do not see it.
    pub fn artifact(&self, path: &Path) {
        // Trackers may place it relative to the (absolute) run directory they were given.
        let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let path = path.to_string_lossy();
        for lane in self.lanes.iter().filter(|l| l.role == Role::Tracker) {
            lane.offer(Msg::Artifact(path.to_string()));
        }
    }

    /// Wait until every sink has written and flushed the records recorded so far, or until
    /// `timeout`; true when all did. Call it before committing a checkpoint, so that the
    /// records up to the checkpoint's step are on disk when it becomes resumable. A disabled
    /// sink counts as done. Trackers are not waited for: one may be a remote service, and
    /// each supersedes what it holds after a resume step itself.
    pub fn sync(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut acks = Vec::with_capacity(self.lanes.len());
        for lane in self.lanes.iter().filter(|l| l.role == Role::Sink) {
            let (ack_tx, ack_rx) = mpsc::sync_channel(1);
            match send_until(&lane.tx, Msg::Sync(ack_tx), deadline) {
                Delivery::Sent => acks.push(ack_rx),
                Delivery::Gone => {}
                Delivery::TimedOut => return false,
            }
        }
        acks.into_iter().all(|ack| {
            let left = deadline.saturating_duration_since(Instant::now());
            // A sink disabled meanwhile drops the acknowledgement: that is "done" too.
            !matches!(ack.recv_timeout(left), Err(RecvTimeoutError::Timeout))
        })
    }

    /// Why the run's record, `metrics.ndjson`, could not be written (a full disk, say), once
    /// that happened. Unlike other sinks, whose failure only disables them, this ends the run:
    /// the training side stops at its next step boundary, so that no step goes unrecorded
    /// for longer than one.
    pub fn record_failed(&self) -> Option<String> {
        self.record_failure.get().cloned()
    }

    /// Records dropped so far, over all sinks.
    pub fn dropped(&self) -> u64 {
        self.lanes
            .iter()
            .map(|l| l.dropped.load(Ordering::Relaxed))
            .sum()
    }
}

impl Lane {
    fn offer(&self, msg: Msg) {
        match self.tx.try_send(msg) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            // The sink or tracker was disabled and its thread has ended: nothing to deliver to.
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

enum Delivery {
    Sent,
    Gone,
    TimedOut,
}

/// Send a control message, waiting for room until `deadline` (a stuck sink must not hang
/// the caller).
fn send_until(tx: &SyncSender<Msg>, mut msg: Msg, deadline: Instant) -> Delivery {
    loop {
        match tx.try_send(msg) {
            Ok(()) => return Delivery::Sent,
            Err(TrySendError::Disconnected(_)) => return Delivery::Gone,
            Err(TrySendError::Full(m)) => {
                if Instant::now() >= deadline {
                    return Delivery::TimedOut;
                }
                msg = m;
                thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

struct Worker {
    name: String,
    role: Role,
    done: Receiver<SinkReport>,
    handle: JoinHandle<()>,
}

/// Owns the sink threads; the training side records through a [`Recorder`].
pub struct MetricsHub {
    recorder: Recorder,
    workers: Vec<Worker>,
    finish_timeout: Duration,
    tracker_finish_timeout: Duration,
    capacity: usize,
}

impl MetricsHub {
    /// Start one thread per sink. Unless `sinks` holds a lane named [`RUN_RECORD`], the run's
    /// record is opened in `options.run_dir` and runs first; failing to open it is an error,
    /// because the run would have no complete record of its metrics.
    pub fn start(
        options: HubOptions,
        sinks: Vec<(String, SinkBox)>,
    ) -> Result<MetricsHub, MetricsError> {
        Self::start_tracked(options, sinks, None)
    }

    /// Like [`MetricsHub::start`], with trackers besides the sinks: each gets a thread of its
    /// own that first starts it (or resumes it, when `options.resume_step` is set) and logs
    /// the run's parameters, so that even a slow tracker start never holds up training.
    pub fn start_tracked(
        options: HubOptions,
        sinks: Vec<(String, SinkBox)>,
        tracking: Option<Tracking>,
    ) -> Result<MetricsHub, MetricsError> {
        let mut all = Vec::with_capacity(sinks.len() + 1);
        if !sinks.iter().any(|(name, _)| name == RUN_RECORD) {
            let decl = codex_plugin_api::sink::declare::<RunRecord>();
            let sink = open_sink(RUN_RECORD, &decl, "", &options.run_dir, options.resume_step)?;
            all.push((RUN_RECORD.to_string(), sink));
        }
        all.extend(sinks);

        let capacity = options.capacity.max(1);
        let record_failure = Arc::new(OnceLock::new());
        let mut lanes = Vec::with_capacity(all.len());
        let mut workers = Vec::with_capacity(all.len());
        for (name, sink) in all {
            let failure = (name == RUN_RECORD).then(|| record_failure.clone());
            let (lane, worker) = spawn_lane(name, Role::Sink, sink, capacity, failure)?;
            lanes.push(lane);
            workers.push(worker);
        }
        if let Some(tracking) = tracking {
            let params: Arc<[Tuple2<RString, RString>]> = tracking
                .params
                .into_iter()
                .map(|(k, v)| Tuple2(RString::from(k), RString::from(v)))
                .collect();
            for (name, tracker) in tracking.trackers {
                let endpoint = TrackerEndpoint {
                    tracker,
                    opening: Some(Opening {
                        run: tracking.run.clone(),
                        resume_step: options.resume_step,
                        params: params.clone(),
                    }),
                };
                let (lane, worker) = spawn_lane(name, Role::Tracker, endpoint, capacity, None)?;
                lanes.push(lane);
                workers.push(worker);
            }
        }
        Ok(MetricsHub {
            recorder: Recorder {
                lanes: lanes.into(),
                record_failure,
            },
            workers,
            finish_timeout: options.finish_timeout,
            tracker_finish_timeout: options.tracker_finish_timeout.max(options.finish_timeout),
            capacity,
        })
    }

    /// A handle for the training side.
    pub fn recorder(&self) -> Recorder {
        self.recorder.clone()
    }

    /// Shorthand for `self.recorder().record(..)`.
    pub fn record(&self, step: u64, split: &str, name: &str, value: f64) {
        self.recorder.record(step, split, name, value)
    }

    /// See [`Recorder::sync`].
    pub fn sync(&self, timeout: Duration) -> bool {
        self.recorder.sync(timeout)
    }

    /// Names of the running sinks, in order.
    pub fn sink_names(&self) -> Vec<&str> {
        self.workers
            .iter()
            .filter(|w| w.role == Role::Sink)
            .map(|w| w.name.as_str())
            .collect()
    }

    /// [`MetricsHub::finish_as`] for a run that reached its end.
    pub fn finish(self) -> HubReport {
        self.finish_as(RunStatus::Finished)
    }

    /// Deliver everything recorded so far, finish every sink and tracker (telling trackers
    /// the run ended with `status`) and end their threads. Those still busy after the finish
    /// timeout are abandoned with a warning. Records sent through a [`Recorder`] after this
    /// call reach nobody. A hub dropped without this call tells its trackers the run failed.
    pub fn finish_as(self, status: RunStatus) -> HubReport {
        let start = Instant::now();
        let timeout = |role| match role {
            Role::Sink => self.finish_timeout,
            Role::Tracker => self.tracker_finish_timeout,
        };
        for lane in self.recorder.lanes.iter() {
            // A lane that is gone has a disabled sink; one that times out is reported below.
            let _ = send_until(&lane.tx, Msg::Finish(status), start + timeout(lane.role));
        }
        let mut sinks = Vec::with_capacity(self.workers.len());
        let mut trackers = Vec::new();
        for (worker, lane) in self.workers.into_iter().zip(self.recorder.lanes.iter()) {
            let deadline = start + timeout(worker.role);
            let mut outcome = worker.done.recv_timeout(
                deadline
                    .saturating_duration_since(Instant::now())
                    .min(SAY_WAITING_AFTER),
            );
            if matches!(outcome, Err(RecvTimeoutError::Timeout)) && Instant::now() < deadline {
                // A tracker may still be sending to a slow server: say why the run waits.
                tracing::info!(
                    sink = %worker.name,
                    "waiting up to {:.0} s for {} `{}` to finish",
                    deadline.saturating_duration_since(Instant::now()).as_secs_f64(),
                    noun(worker.role),
                    worker.name
                );
                outcome = worker
                    .done
                    .recv_timeout(deadline.saturating_duration_since(Instant::now()));
            }
            let mut report = match outcome {
                Ok(report) => {
                    // The thread has handed over its report and is returning.
                    let _ = worker.handle.join();
                    report
                }
                Err(RecvTimeoutError::Timeout) => {
                    tracing::warn!(
                        sink = %worker.name,
                        "{} `{}` did not finish within {:?} and was abandoned; its output may be incomplete",
                        noun(worker.role),
                        worker.name,
                        timeout(worker.role)
                    );
                    SinkReport {
                        name: worker.name,
                        written: 0,
                        dropped: 0,
                        disabled: Some("did not finish in time".to_string()),
                        finished: false,
                    }
                }
                Err(RecvTimeoutError::Disconnected) => SinkReport {
                    name: worker.name,
                    written: 0,
                    dropped: 0,
                    disabled: Some("its metrics thread ended abnormally".to_string()),
                    finished: false,
                },
            };
            report.dropped = lane.dropped.load(Ordering::Relaxed);
            if report.dropped > 0 {
                tracing::warn!(
                    sink = %report.name,
                    dropped = report.dropped,
                    "{} `{}` fell more than {} records behind and missed {} of them",
                    noun(worker.role),
                    report.name,
                    self.capacity,
                    report.dropped
                );
            }
            match worker.role {
                Role::Sink => sinks.push(report),
                Role::Tracker => trackers.push(report),
            }
        }
        HubReport { sinks, trackers }
    }
}

fn noun(role: Role) -> &'static str {
    match role {
        Role::Sink => "metric sink",
        Role::Tracker => "tracker",
    }
}

/// Start the thread of one sink or tracker; `failure` receives why it was disabled (the run's
/// record passes one).
fn spawn_lane<E: Endpoint>(
    name: String,
    role: Role,
    endpoint: E,
    capacity: usize,
    failure: Option<Arc<OnceLock<String>>>,
) -> Result<(Lane, Worker), MetricsError> {
    let (tx, rx) = mpsc::sync_channel(capacity);
    let (done_tx, done) = mpsc::sync_channel(1);
    let thread_name = match role {
        Role::Sink => format!("metrics-{name}"),
        Role::Tracker => format!("tracker-{name}"),
    };
    let worker_name = name.clone();
    // The run's record is the host's own cheap code and checkpoints wait for it; every other
    // endpoint may be someone else's slow code.
    let background = failure.is_none();
    let handle = thread::Builder::new()
        .name(thread_name)
        .spawn(move || {
            if background {
                lower_priority();
            }
            let report = run_lane(worker_name, endpoint, rx, failure);
            // The hub may have stopped waiting; nobody to tell then.
            let _ = done_tx.send(report);
        })
        .map_err(|source| MetricsError::Spawn {
            name: name.clone(),
            source,
        })?;
    let lane = Lane {
        tx,
        dropped: AtomicU64::new(0),
        role,
    };
    Ok((
        lane,
        Worker {
            name,
            role,
            done,
            handle,
        },
    ))
}

/// Lower the calling thread's scheduling priority to the lowest (nice 19), so that a busy sink
/// or tracker takes only the CPU that training leaves idle. Linux only (there a thread's nice
/// value is its own); elsewhere the thread competes as an equal. `codex-wasm` does the same
/// for the threads that run guests.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: `gettid` has no preconditions; `setpriority` on the calling thread's own id
        // only lowers its priority, which any process may do, and failure leaves it as it was.
        unsafe {
            let tid = libc::gettid();
            libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19);
        }
    }
}

/// One consumer of the record stream, as its thread drives it.
trait Endpoint: Send + 'static {
    /// How warnings call it.
    const NOUN: &'static str;
    /// The name of the call that takes records, for warnings.
    const WRITE: &'static str;
    /// What goes on once it is disabled, for warnings.
    const OTHERS: &'static str;
    /// Whether its errors already name the call that failed, so the hub adds none. A sink's
    /// do: the plugin-side guard names the call, and a sandboxed sink, which runs behind a
    /// queue and reports a guest's failure on a later call, names the guest's call (saying
    /// `flush` for a guest that failed in `write` would send its author the wrong way).
    const NAMES_ITS_CALL: bool;
    /// What happens before the first record; on failure, the call that failed and why.
    fn open(&mut self) -> Result<(), (&'static str, PluginError)>;
    fn write(&mut self, records: &[Record]) -> RResult<(), PluginError>;
    fn flush(&mut self) -> RResult<(), PluginError>;
    fn artifact(&mut self, path: &str) -> RResult<(), PluginError>;
    fn finish(&mut self, status: RunStatus) -> RResult<(), PluginError>;
    /// What it has to tell the person running the run since it was last asked.
    fn notices(&mut self) -> Vec<String> {
        Vec::new()
    }
}

impl Endpoint for SinkBox {
    const NOUN: &'static str = "metric sink";
    const WRITE: &'static str = "write";
    const OTHERS: &'static str = "the other sinks continue";
    const NAMES_ITS_CALL: bool = true;
    fn open(&mut self) -> Result<(), (&'static str, PluginError)> {
        Ok(())
    }
    fn write(&mut self, records: &[Record]) -> RResult<(), PluginError> {
        SinkBox::write(self, RSlice::from_slice(&abi_records(records)))
    }
    fn flush(&mut self) -> RResult<(), PluginError> {
        SinkBox::flush(self)
    }
    fn artifact(&mut self, _: &str) -> RResult<(), PluginError> {
        RResult::ROk(())
    }
    fn finish(&mut self, _: RunStatus) -> RResult<(), PluginError> {
        SinkBox::finish(self)
    }
}

/// Views of `records` as they cross the ABI (borrowed, nothing copied but the numbers).
fn abi_records(records: &[Record]) -> Vec<RecordAbi<'_>> {
    records.iter().map(RecordAbi::from).collect()
}

/// What a tracker's thread tells it before the first record.
struct Opening {
    run: RunInfo,
    resume_step: Option<u64>,
    params: Arc<[Tuple2<RString, RString>]>,
}

struct TrackerEndpoint {
    tracker: TrackerBox,
    opening: Option<Opening>,
}

impl Endpoint for TrackerEndpoint {
    const NOUN: &'static str = "tracker";
    const WRITE: &'static str = "log_metrics";
    const OTHERS: &'static str = "training goes on";
    const NAMES_ITS_CALL: bool = false;
    fn open(&mut self) -> Result<(), (&'static str, PluginError)> {
        let Some(o) = self.opening.take() else {
            return Ok(());
        };
        match o.resume_step {
            None => self
                .tracker
                .start(RunInfoAbi::from(&o.run))
                .into_result()
                .map_err(|e| ("start", e))?,
            Some(step) => self
                .tracker
                .resume(RunInfoAbi::from(&o.run), step)
                .into_result()
                .map_err(|e| ("resume", e))?,
        }
        self.tracker
            .log_params(RSlice::from_slice(&o.params))
            .into_result()
            .map_err(|e| ("log_params", e))
    }
    fn write(&mut self, records: &[Record]) -> RResult<(), PluginError> {
        self.tracker
            .log_metrics(RSlice::from_slice(&abi_records(records)))
    }
    fn flush(&mut self) -> RResult<(), PluginError> {
        // Trackers have no flush: each `log_metrics` call is theirs to make visible.
        RResult::ROk(())
    }
    fn artifact(&mut self, path: &str) -> RResult<(), PluginError> {
        self.tracker.log_artifact(RStr::from(path))
    }
    fn finish(&mut self, status: RunStatus) -> RResult<(), PluginError> {
        self.tracker.finish(status)
    }
    fn notices(&mut self) -> Vec<String> {
        self.tracker
            .take_notices()
            .into_iter()
            .map(RString::into_string)
            .collect()
    }
}

/// The body of one sink's or tracker's thread.
fn run_lane<E: Endpoint>(
    name: String,
    mut endpoint: E,
    rx: Receiver<Msg>,
    failure: Option<Arc<OnceLock<String>>>,
) -> SinkReport {
    let mut state = LaneState {
        name,
        written: 0,
        disabled: None,
        failure,
    };
    let opened = endpoint.open();
    state.tell(&mut endpoint);
    if let Err((what, e)) = opened {
        state.fail::<E>(what, e);
        return state.report();
    }
    let mut batch: Vec<Record> = Vec::with_capacity(MAX_BATCH);
    // A hub dropped without `finish_as` means the run ended by an error.
    let mut status = RunStatus::Failed;
    // Ends when the hub asks it to finish, when every sender is gone, or when it fails.
    'run: while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Record(r) => {
                    batch.push(r);
                    if batch.len() >= MAX_BATCH {
                        state.deliver(&mut endpoint, &mut batch);
                    }
                }
                Msg::Sync(ack) => {
                    state.deliver(&mut endpoint, &mut batch);
                    state.call("flush", E::flush, &mut endpoint);
                    // The caller may have given up waiting.
                    let _ = ack.try_send(());
                }
                Msg::Artifact(path) => {
                    // Records before the artifact reach the tracker before it.
                    state.deliver(&mut endpoint, &mut batch);
                    state.call("log_artifact", |e| e.artifact(&path), &mut endpoint);
                }
                Msg::Finish(s) => {
                    status = s;
                    break 'run;
                }
            }
            if state.disabled.is_some() {
                return state.report();
            }
            next = match rx.try_recv() {
                Ok(m) => Some(m),
                Err(TryRecvError::Empty) => None,
                Err(TryRecvError::Disconnected) => break 'run,
            };
        }
        // The queue ran dry: make what was written visible.
        if !batch.is_empty() {
            state.deliver(&mut endpoint, &mut batch);
            state.call("flush", E::flush, &mut endpoint);
            if state.disabled.is_some() {
                return state.report();
            }
        }
    }
    state.deliver(&mut endpoint, &mut batch);
    state.call("finish", |e| e.finish(status), &mut endpoint);
    state.report()
}

struct LaneState {
    name: String,
    written: u64,
    disabled: Option<String>,
    /// Told why the endpoint was disabled (the run's record only).
    failure: Option<Arc<OnceLock<String>>>,
}

impl LaneState {
    fn deliver<E: Endpoint>(&mut self, endpoint: &mut E, batch: &mut Vec<Record>) {
        if batch.is_empty() {
            return;
        }
        let n = batch.len() as u64;
        if self.call(E::WRITE, |e| e.write(batch), endpoint) {
            self.written += n;
        }
        batch.clear();
    }

    /// Run one call unless the endpoint is disabled; disable it on failure. True on success.
    fn call<E: Endpoint>(
        &mut self,
        what: &'static str,
        f: impl FnOnce(&mut E) -> RResult<(), PluginError>,
        endpoint: &mut E,
    ) -> bool {
        if self.disabled.is_some() {
            return false;
        }
        let outcome = f(endpoint);
        self.tell(endpoint);
        match outcome {
            RResult::ROk(()) => true,
            RResult::RErr(e) => {
                self.fail::<E>(what, e);
                false
            }
        }
    }

    /// Show what the endpoint has to tell, one warning each, naming it.
    fn tell<E: Endpoint>(&self, endpoint: &mut E) {
        for notice in endpoint.notices() {
            // The plugin's own text: cleaned before it reaches a terminal or a log.
            let notice = crate::plugins::plugin_text(&notice);
            tracing::warn!(sink = %self.name, "{} `{}`: {notice}", E::NOUN, self.name);
        }
    }

    /// Disable the endpoint for the rest of the run, with one warning naming it and the call.
    fn fail<E: Endpoint>(&mut self, what: &str, e: PluginError) {
        // The message is the plugin's own text: cleaned before it reaches a terminal or a log.
        let message = crate::plugins::plugin_message(&e);
        let reason = if e.panicked {
            format!("panicked in {what}: {message}")
        } else if E::NAMES_ITS_CALL {
            message
        } else {
            format!("{what} failed: {message}")
        };
        match &self.failure {
            Some(failure) => {
                tracing::error!(
                    "{RUN_RECORD_FILE}, the run's record, cannot be written ({reason}); \
                     the run stops at the end of this step"
                );
                let _ = failure.set(reason.clone());
            }
            None => tracing::warn!(
                sink = %self.name,
                "{} `{}` disabled for the rest of the run ({reason}); {}",
                E::NOUN,
                self.name,
                E::OTHERS
            ),
        }
        self.disabled = Some(reason);
    }

    fn report(self) -> SinkReport {
        SinkReport {
            name: self.name,
            written: self.written,
            dropped: 0,
            disabled: self.disabled,
            finished: true,
        }
    }
}
