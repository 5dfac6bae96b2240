//! A wasm guest behind the host's sink interface: a thread that owns the guest, and a
//! [`SinkAbi`] face that only queues work for it.
//!
//! The hub already gives every sink a thread; the guest gets one more, of its own, for two
//! reasons. The manifest's `queue_size` is a promise about this plugin alone (the hub's queue
//! is shared policy), and a guest must run on a thread whose native stack is known to be far
//! deeper than the wasm stack limit. The face never waits for the guest except in `finish`:
//! `write` copies the records into the queue (dropping and counting those that do not fit),
//! `flush` queues a flush. A failure inside the guest is kept and returned by the next call
//! on the face, which is how the hub learns of it and disables the sink with one warning.

use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use codex_plugin_api::abi_stable::sabi_trait::TD_Opaque;
use codex_plugin_api::abi_stable::std_types::{RResult, RSlice};
use codex_plugin_api::sink::RecordAbi;
use codex_plugin_api::sink::{SinkAbi, SinkAbi_TO, SinkBox};
use codex_plugin_api::PluginError;

use crate::runtime::{Described, Guest, Loaded, Metric, GUEST_THREAD_STACK};
use crate::{SinkPlugin, WasmError};

enum Job {
    Write(Vec<Metric>),
    Flush,
    Finish(SyncSender<Result<(), String>>),
}

/// What the face and the guest's thread share.
struct Shared {
    /// Why the guest was stopped; set once.
    failed: Mutex<Option<String>>,
    /// Records handed to the guest's thread and not yet written.
    queued: AtomicUsize,
    /// Records dropped because the queue was full.
    dropped: AtomicU64,
}

impl Shared {
    fn failure(&self) -> Option<String> {
        self.failed
            .lock()
            .map(|f| f.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    fn fail(&self, reason: String) {
        let mut slot = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(reason);
    }
}

/// A sink plugin compiled and checked once (world, interface version, name and version), ready
/// to be started for any number of runs. Cheap to clone.
#[derive(Clone)]
pub struct PreparedSink {
    loaded: Arc<Loaded>,
    described: Described,
}

impl std::fmt::Debug for PreparedSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedSink")
            .field("plugin", &self.loaded.plugin)
            .field("described", &self.described)
            .finish()
    }
}

impl PreparedSink {
    /// Compile `plugin`, check that it is a sink of [`crate::WORLD`], and ask a throwaway
    /// instance (under the plugin's limits, with no output file) for its name and version.
    ///
    /// Waits at most `startup_bound` for the three calls (instantiate, `name`, `version`):
    /// each is bounded by the call time limit already, and this bound holds whatever happens
    /// inside the guest's thread.
    pub fn prepare(plugin: &SinkPlugin) -> Result<PreparedSink, WasmError> {
        let loaded = Arc::new(Loaded::load(plugin)?);
        let probe = Arc::clone(&loaded);
        let bound = startup_bound(plugin, 3);
        let described = on_guest_thread(&plugin.name, bound, move || {
            let mut guest = probe.start(None)?;
            guest.describe(&probe.plugin)
        })
        .and_then(|r| r.map_err(Wait::Failed))
        .map_err(|e| match e {
            Wait::Failed(e) => e,
            Wait::Late => loaded.start_error(format!(
                "did not describe itself within {} ms (instantiate, `name` and `version`, each \
                 limited by `limits.call_timeout_ms`)",
                bound.as_millis()
            )),
        })?;
        Ok(PreparedSink { loaded, described })
    }

    /// What the guest says it is.
    pub fn described(&self) -> &Described {
        &self.described
    }

    /// The plugin as the manifest declares it.
    pub fn plugin(&self) -> &SinkPlugin {
        &self.loaded.plugin
    }

    /// Start the sink for a run writing into `run_dir`: a fresh instance under the plugin's
    /// limits, `init` called with `params_json`. Returns once the guest is ready (or failed to
    /// start), or after `startup_bound` for its two calls (instantiate, `init`) at most: a
    /// guest that misses it is left behind and the run goes on without it. It then runs on a
    /// thread of its own behind the returned [`SinkBox`].
    pub fn open(
        &self,
        params_json: &str,
        run_dir: &Path,
        resume_step: Option<u64>,
    ) -> Result<SinkBox, WasmError> {
        let plugin = &self.loaded.plugin;
        let shared = Arc::new(Shared {
            failed: Mutex::new(None),
            queued: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
        });
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let loaded = Arc::clone(&self.loaded);
        let worker_shared = Arc::clone(&shared);
        let params = params_json.to_owned();
        let run_dir = run_dir.to_path_buf();
        std::thread::Builder::new()
            .name(format!("wasm-{}", plugin.name))
            .stack_size(GUEST_THREAD_STACK)
            .spawn(move || {
                lower_priority();
                let started = loaded.start(Some(&run_dir)).and_then(|mut guest| {
                    guest
                        .init(&params, resume_step)
                        .map(|()| guest)
                        .map_err(|m| loaded.start_error(m))
                });
                match started {
                    Ok(guest) => {
                        // `open` is waiting; if it is gone there is nobody to serve.
                        if ready_tx.send(Ok(())).is_ok() {
                            serve(guest, rx, &worker_shared, &loaded.plugin.path);
                        }
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(|source| WasmError::Spawn {
                name: plugin.name.clone(),
                source,
            })?;
        let bound = startup_bound(plugin, 2);
        match ready_rx.recv_timeout(bound) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // Its thread finds nobody waiting when it returns, and ends.
                return Err(self.loaded.start_error(format!(
                    "did not start within {} ms (instantiate and `init`, each limited by \
                     `limits.call_timeout_ms`); the run goes on without it",
                    bound.as_millis()
                )));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(self
                    .loaded
                    .start_error("its thread ended while starting".to_owned()))
            }
        }
        let face = WasmSink {
            name: plugin.name.clone(),
            queue_size: plugin.limits.queue_size.max(1),
            tx: Some(tx),
            shared,
        };
        Ok(SinkAbi_TO::from_value(face, TD_Opaque))
    }
}

/// The longest the host waits for `calls` calls into a guest in a row: each is bounded by the
/// call time limit (the epoch deadline for wasm code, the guarded clock for waits), plus
/// [`STARTUP_GRACE`] for the host's own work around them.
pub(crate) fn startup_bound(plugin: &SinkPlugin, calls: u32) -> Duration {
    plugin
        .limits
        .call_timeout
        .saturating_add(crate::TICK * 2)
        .saturating_mul(calls)
        .saturating_add(STARTUP_GRACE)
}

/// Host-side slack in [`startup_bound`]: creating the store and the thread, lowering params.
const STARTUP_GRACE: Duration = Duration::from_millis(250);

/// Why waiting on a guest thread ended without its result.
enum Wait {
    /// The thread could not be started or panicked.
    Failed(WasmError),
    /// It is still running after the bound; it was left behind.
    Late,
}

/// Run `f` on a thread whose native stack is far deeper than the wasm stack limit, waiting at
/// most `bound` for its result.
fn on_guest_thread<T: Send + 'static>(
    name: &str,
    bound: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Wait> {
    let spawn_error = |source| {
        Wait::Failed(WasmError::Spawn {
            name: name.to_owned(),
            source,
        })
    };
    let (tx, rx) = mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name(format!("wasm-{name}"))
        .stack_size(GUEST_THREAD_STACK)
        .spawn(move || {
            lower_priority();
            // Nobody may be waiting any more.
            let _ = tx.send(f());
        })
        .map_err(spawn_error)?;
    match rx.recv_timeout(bound) {
        Ok(value) => Ok(value),
        Err(mpsc::RecvTimeoutError::Timeout) => Err(Wait::Late),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            Err(spawn_error(std::io::Error::other("the thread panicked")))
        }
    }
}

/// Lower the calling thread's scheduling priority to the lowest (nice 19), so that a busy
/// guest takes only the CPU that training leaves idle. Linux only (there a thread's nice value
/// is its own); elsewhere the guest competes as an equal.
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

/// A sink that failed before it ran: its first call returns `reason`, so the hub disables it
/// with its one warning and the run goes on without it.
pub fn failed_sink(reason: String) -> SinkBox {
    SinkAbi_TO::from_value(Failed(reason), TD_Opaque)
}

struct Failed(String);

impl SinkAbi for Failed {
    fn write(&mut self, _: RSlice<'_, RecordAbi<'_>>) -> RResult<(), PluginError> {
        RResult::RErr(PluginError::new(self.0.clone()))
    }
    fn flush(&mut self) -> RResult<(), PluginError> {
        RResult::RErr(PluginError::new(self.0.clone()))
    }
    fn finish(&mut self) -> RResult<(), PluginError> {
        RResult::RErr(PluginError::new(self.0.clone()))
    }
}

/// The guest's thread: run jobs until `finish`, the face is dropped, or the guest fails.
fn serve(mut guest: Guest, rx: Receiver<Job>, shared: &Shared, path: &Path) {
    let mut failed: Option<String> = None;
    for job in rx {
        match job {
            Job::Write(records) => {
                let n = records.len();
                if failed.is_none() {
                    if let Err(m) = guest.write(&records) {
                        failed = Some(m);
                    }
                }
                shared.queued.fetch_sub(n, Ordering::AcqRel);
            }
            Job::Flush => {
                if failed.is_none() {
                    if let Err(m) = guest.flush() {
                        failed = Some(m);
                    }
                }
            }
            Job::Finish(ack) => {
                let result = match failed.take() {
                    Some(m) => Err(m),
                    None => guest.finish(),
                };
                let result = result.map_err(|m| format!("wasm plugin {}: {m}", path.display()));
                let _ = ack.send(result);
                return;
            }
        }
        if let Some(m) = &failed {
            shared.fail(format!("wasm plugin {}: {m}", path.display()));
        }
    }
}

/// The face the hub calls.
struct WasmSink {
    name: String,
    queue_size: usize,
    tx: Option<Sender<Job>>,
    shared: Arc<Shared>,
}

impl WasmSink {
    fn check(&self) -> RResult<(), PluginError> {
        match self.shared.failure() {
            Some(reason) => RResult::RErr(PluginError::new(reason)),
            None => RResult::ROk(()),
        }
    }

    fn send(&self, job: Job) -> RResult<(), PluginError> {
        match self.tx.as_ref().map(|tx| tx.send(job)) {
            Some(Ok(())) => RResult::ROk(()),
            _ => RResult::RErr(PluginError::new(format!(
                "the thread of wasm sink `{}` has ended",
                self.name
            ))),
        }
    }
}

impl SinkAbi for WasmSink {
    fn write(&mut self, records: RSlice<'_, RecordAbi<'_>>) -> RResult<(), PluginError> {
        if let RResult::RErr(e) = self.check() {
            return RResult::RErr(e);
        }
        let queued = self.shared.queued.load(Ordering::Acquire);
        let room = self.queue_size.saturating_sub(queued);
        let take = records.len().min(room);
        let missed = records.len() - take;
        if missed > 0 {
            self.shared
                .dropped
                .fetch_add(missed as u64, Ordering::Relaxed);
        }
        if take == 0 {
            return RResult::ROk(());
        }
        let batch: Vec<Metric> = records.as_slice()[..take]
            .iter()
            .map(|r| Metric {
                step: r.step,
                split: r.split.to_string(),
                name: r.name.to_string(),
                value: r.value,
                time: r.time,
            })
            .collect();
        self.shared.queued.fetch_add(take, Ordering::AcqRel);
        self.send(Job::Write(batch))
    }

    fn flush(&mut self) -> RResult<(), PluginError> {
        if let RResult::RErr(e) = self.check() {
            return RResult::RErr(e);
        }
        self.send(Job::Flush)
    }

    fn finish(&mut self) -> RResult<(), PluginError> {
        let (ack_tx, ack_rx) = mpsc::sync_channel(1);
        let sent = self.send(Job::Finish(ack_tx));
        self.tx = None;
        let dropped = self.shared.dropped.load(Ordering::Relaxed);
        if dropped > 0 {
            tracing::warn!(
                sink = %self.name,
                dropped,
                "wasm sink `{}` fell {} records behind and missed {dropped} of them; raise \
                 `limits.queue_size` or make the sink faster",
                self.name,
                self.queue_size
            );
        }
        if let RResult::RErr(e) = sent {
            return self.check().and_then(|()| RResult::RErr(e));
        }
        match ack_rx.recv() {
            Ok(Ok(())) => RResult::ROk(()),
            Ok(Err(m)) => RResult::RErr(PluginError::new(m)),
            Err(_) => self.check().and_then(|()| {
                RResult::RErr(PluginError::new(format!(
                    "the thread of wasm sink `{}` ended before finishing",
                    self.name
                )))
            }),
        }
    }
}

impl Drop for WasmSink {
    fn drop(&mut self) {
        // Closing the queue ends the guest's thread once it has run what is queued.
        self.tx = None;
    }
}
