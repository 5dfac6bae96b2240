//! The metrics hub: metric records leave the training thread through a queue and reach every
//! sink from a thread of its own.
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
//! - **A failing sink is disabled, once.** The first error (a panic arrives as an error: the
//!   plugin-side guard catches it) disables the sink for the rest of the run with one warning
//!   that names it and the reason; its thread ends and later records skip it.
//! - **`metrics.ndjson` is always written**: [`MetricsHub::start`] adds the built-in `ndjson`
//!   sink unless the caller passes a sink named `ndjson` already.
//! - **Records are batched**: a sink thread takes whatever has queued up (up to
//!   [`MAX_BATCH`]) and hands it over in one `write`, then flushes when its queue runs dry.
//!
//! Sinks are built from their registry declaration with [`open_sink`]; the hub takes them as
//! `(name, SinkBox)` pairs, whatever their origin.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use codex_plugin_api::abi_stable::std_types::{RResult, RSlice, RStr};
use codex_plugin_api::sink::{SinkBox, SinkEnv};
use codex_plugin_api::{ComponentDecl, Factory, PluginError, Record};

/// Records each sink may fall behind before its records are dropped.
pub const DEFAULT_CAPACITY: usize = 16_384;

/// The most records handed to a sink in one `write`.
pub const MAX_BATCH: usize = 1_024;

/// How long [`MetricsHub::finish`] waits for all sinks together before abandoning the stuck ones.
pub const DEFAULT_FINISH_TIMEOUT: Duration = Duration::from_secs(10);

/// The registry name of the sink the hub always runs.
pub const NDJSON: &str = "ndjson";

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
    let Factory::Sink(factory) = decl.factory else {
        return Err(MetricsError::NotASink {
            name: name.to_string(),
            found: decl.kind().as_str(),
        });
    };
    let run_dir = run_dir.to_string_lossy();
    let env = SinkEnv {
        run_dir: RStr::from(run_dir.as_ref()),
        resume_step: resume_step.into(),
    };
    match factory(RStr::from(params_json), env) {
        RResult::ROk(sink) => Ok(sink),
        RResult::RErr(e) => Err(MetricsError::Open {
            name: name.to_string(),
            message: e.message.into_string(),
        }),
    }
}

/// Settings of a hub.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// The run directory (where the built-in `ndjson` sink writes).
    pub run_dir: PathBuf,
    /// The step being resumed from, if any.
    pub resume_step: Option<u64>,
    /// Records each sink may fall behind before records are dropped for it.
    pub capacity: usize,
    /// How long [`MetricsHub::finish`] waits for the sinks to finish.
    pub finish_timeout: Duration,
}

impl HubOptions {
    /// Defaults for a run writing into `run_dir`.
    pub fn new(run_dir: impl Into<PathBuf>, resume_step: Option<u64>) -> Self {
        HubOptions {
            run_dir: run_dir.into(),
            resume_step,
            capacity: DEFAULT_CAPACITY,
            finish_timeout: DEFAULT_FINISH_TIMEOUT,
        }
    }
}

/// What happened to one sink over the run.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkReport {
    /// Registry name.
    pub name: String,
    /// Records the sink accepted.
    pub written: u64,
    /// Records dropped because its queue was full.
    pub dropped: u64,
    /// Why it was disabled, if it was.
    pub disabled: Option<String>,
    /// False when it did not finish in time and was abandoned.
    pub finished: bool,
}

/// The end-of-run summary of a hub, one entry per sink in the order they were started.
#[derive(Debug, Clone, PartialEq)]
pub struct HubReport {
    /// Every sink, the built-in `ndjson` one included.
    pub sinks: Vec<SinkReport>,
}

impl HubReport {
    /// The report of sink `name`.
    pub fn sink(&self, name: &str) -> Option<&SinkReport> {
        self.sinks.iter().find(|s| s.name == name)
    }
}

enum Msg {
    Record(Record),
    /// Write and flush everything queued before this message, then acknowledge.
    Sync(SyncSender<()>),
    Finish,
}

struct Lane {
    tx: SyncSender<Msg>,
    dropped: AtomicU64,
}

/// The cheap, cloneable handle the training side records through.
#[derive(Clone)]
pub struct Recorder {
    lanes: Arc<[Lane]>,
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
            lane.offer(record.clone());
        }
        last.offer(record);
    }

    /// Wait until every sink has written and flushed the records recorded so far, or until
    /// `timeout`; true when all did. Call it before committing a checkpoint, so that the
    /// records up to the checkpoint's step are on disk when it becomes resumable. A disabled
    /// sink counts as done.
    pub fn sync(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut acks = Vec::with_capacity(self.lanes.len());
        for lane in self.lanes.iter() {
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

    /// Records dropped so far, over all sinks.
    pub fn dropped(&self) -> u64 {
        self.lanes
            .iter()
            .map(|l| l.dropped.load(Ordering::Relaxed))
            .sum()
    }
}

impl Lane {
    fn offer(&self, record: Record) {
        match self.tx.try_send(Msg::Record(record)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            // The sink was disabled and its thread has ended: nothing to deliver to.
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
    done: Receiver<SinkReport>,
    handle: JoinHandle<()>,
}

/// Owns the sink threads; the training side records through a [`Recorder`].
pub struct MetricsHub {
    recorder: Recorder,
    workers: Vec<Worker>,
    finish_timeout: Duration,
    capacity: usize,
}

impl MetricsHub {
    /// Start one thread per sink. Unless `sinks` holds one named `ndjson`, the built-in
    /// `ndjson` sink is opened in `options.run_dir` and runs first; failing to open it is an
    /// error, because the run would have no complete record of its metrics.
    pub fn start(
        options: HubOptions,
        sinks: Vec<(String, SinkBox)>,
    ) -> Result<MetricsHub, MetricsError> {
        let mut all = Vec::with_capacity(sinks.len() + 1);
        if !sinks.iter().any(|(name, _)| name == NDJSON) {
            let decl = codex_plugin_api::sink::declare::<codex_sinks::NdjsonSink>();
            let sink = open_sink(NDJSON, &decl, "", &options.run_dir, options.resume_step)?;
            all.push((NDJSON.to_string(), sink));
        }
        all.extend(sinks);

        let capacity = options.capacity.max(1);
        let mut lanes = Vec::with_capacity(all.len());
        let mut workers = Vec::with_capacity(all.len());
        for (name, sink) in all {
            let (tx, rx) = mpsc::sync_channel(capacity);
            let (done_tx, done) = mpsc::sync_channel(1);
            let thread_name = format!("metrics-{name}");
            let worker_name = name.clone();
            let handle = thread::Builder::new()
                .name(thread_name)
                .spawn(move || {
                    let report = run_sink(worker_name, sink, rx);
                    // The hub may have stopped waiting; nobody to tell then.
                    let _ = done_tx.send(report);
                })
                .map_err(|source| MetricsError::Spawn {
                    name: name.clone(),
                    source,
                })?;
            lanes.push(Lane {
                tx,
                dropped: AtomicU64::new(0),
            });
            workers.push(Worker { name, done, handle });
        }
        Ok(MetricsHub {
            recorder: Recorder {
                lanes: lanes.into(),
            },
            workers,
            finish_timeout: options.finish_timeout,
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
        self.workers.iter().map(|w| w.name.as_str()).collect()
    }

    /// Deliver everything recorded so far, finish every sink and end its thread. Sinks still
    /// busy after the finish timeout are abandoned with a warning. Records sent through a
    /// [`Recorder`] after this call reach nobody.
    pub fn finish(self) -> HubReport {
        let deadline = Instant::now() + self.finish_timeout;
        for lane in self.recorder.lanes.iter() {
            // A lane that is gone has a disabled sink; one that times out is reported below.
            let _ = send_until(&lane.tx, Msg::Finish, deadline);
        }
        let mut reports = Vec::with_capacity(self.workers.len());
        for (worker, lane) in self.workers.into_iter().zip(self.recorder.lanes.iter()) {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut report = match worker.done.recv_timeout(left) {
                Ok(report) => {
                    // The thread has handed over its report and is returning.
                    let _ = worker.handle.join();
                    report
                }
                Err(RecvTimeoutError::Timeout) => {
                    tracing::warn!(
                        sink = %worker.name,
                        "metric sink `{}` did not finish within {:?} and was abandoned; its output may be incomplete",
                        worker.name,
                        self.finish_timeout
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
                    "metric sink `{}` fell more than {} records behind and missed {} of them",
                    report.name,
                    self.capacity,
                    report.dropped
                );
            }
            reports.push(report);
        }
        HubReport { sinks: reports }
    }
}

/// The body of one sink's thread.
fn run_sink(name: String, mut sink: SinkBox, rx: Receiver<Msg>) -> SinkReport {
    let mut state = SinkState {
        name,
        written: 0,
        disabled: None,
    };
    let mut batch: Vec<Record> = Vec::with_capacity(MAX_BATCH);
    // Ends when the hub asks it to finish, when every sender is gone, or when the sink fails.
    'run: while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Record(r) => {
                    batch.push(r);
                    if batch.len() >= MAX_BATCH {
                        state.deliver(&mut sink, &mut batch);
                    }
                }
                Msg::Sync(ack) => {
                    state.deliver(&mut sink, &mut batch);
                    state.call("flush", |s| s.flush(), &mut sink);
                    // The caller may have given up waiting.
                    let _ = ack.try_send(());
                }
                Msg::Finish => break 'run,
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
            state.deliver(&mut sink, &mut batch);
            state.call("flush", |s| s.flush(), &mut sink);
            if state.disabled.is_some() {
                return state.report();
            }
        }
    }
    state.deliver(&mut sink, &mut batch);
    state.call("finish", |s| s.finish(), &mut sink);
    state.report()
}

struct SinkState {
    name: String,
    written: u64,
    disabled: Option<String>,
}

impl SinkState {
    fn deliver(&mut self, sink: &mut SinkBox, batch: &mut Vec<Record>) {
        if batch.is_empty() {
            return;
        }
        let n = batch.len() as u64;
        if self.call("write", |s| s.write(RSlice::from_slice(batch)), sink) {
            self.written += n;
        }
        batch.clear();
    }

    /// Run one call into the sink unless it is disabled; disable it on failure. True on success.
    fn call(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut SinkBox) -> RResult<(), PluginError>,
        sink: &mut SinkBox,
    ) -> bool {
        if self.disabled.is_some() {
            return false;
        }
        match f(sink) {
            RResult::ROk(()) => true,
            RResult::RErr(e) => {
                let reason = if e.panicked {
                    format!("panicked in {what}: {}", e.message)
                } else {
                    format!("{what} failed: {}", e.message)
                };
                tracing::warn!(
                    sink = %self.name,
                    "metric sink `{}` disabled for the rest of the run ({reason}); the other sinks continue",
                    self.name
                );
                self.disabled = Some(reason);
                false
            }
        }
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
