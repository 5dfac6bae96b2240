//! Stopping a run on request. SIGINT (Ctrl-C), SIGTERM (what Slurm, Kubernetes, systemd and
//! `docker stop` send before SIGKILL) and SIGHUP (a closed terminal) set a process-wide flag
//! that the trainer reads at each step boundary (through the session's `should_stop`), so the
//! run ends after a whole step, writes its final checkpoint, flushes its sinks and trackers,
//! and reports how to continue; the process then exits with 128 + the signal's number (130
//! for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP). A second signal leaves at once with the same
//! code; the last checkpoint stands. The same signal again within [`SAME_REQUEST`] of the first
//! is the same request, not a second one: `timeout` sends its signal to the command and again
//! to the command's process group, and a terminal's Ctrl-C reaches every process of the
//! foreground group, so one request often arrives twice.
//!
//! The signals are turned into messages on a thread of their own (`signal-hook`'s iterator),
//! so nothing but setting a flag happens inside a signal handler.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// Set by the first signal: the trainer stops at the next step boundary.
static STOP: AtomicBool = AtomicBool::new(false);

/// The signal that asked for the stop, 0 before one did.
static SIGNAL: AtomicI32 = AtomicI32::new(0);

/// How soon the same signal again counts as the same request.
const SAME_REQUEST: Duration = Duration::from_secs(1);

/// The signals that stop a run gracefully.
const STOP_SIGNALS: [i32; 3] = [SIGINT, SIGTERM, SIGHUP];

/// The usual name of a stop signal.
pub fn signal_name(signal: i32) -> &'static str {
    match signal {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}

/// Install the handlers once per process.
pub fn install_interrupt_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let mut signals = match Signals::new(STOP_SIGNALS) {
            Ok(signals) => signals,
            Err(e) => {
                tracing::warn!("signals will not stop training gracefully: {e}");
                return;
            }
        };
        let spawned = std::thread::Builder::new()
            .name("codex-signals".into())
            .spawn(move || {
                let mut first: Option<(i32, Instant)> = None;
                for signal in signals.forever() {
                    let name = signal_name(signal);
                    if first.is_some_and(|(s, at)| s == signal && at.elapsed() < SAME_REQUEST) {
                        continue;
                    }
                    first.get_or_insert((signal, Instant::now()));
                    if STOP.swap(true, Ordering::SeqCst) {
                        // Never a panic here: stderr may be a closed pipe.
                        let _ = writeln!(
                            std::io::stderr().lock(),
                            "\n{name} again: exiting without waiting for the step to end; \
                             the last checkpoint stands"
                        );
                        std::process::exit(128 + signal);
                    }
                    SIGNAL.store(signal, Ordering::SeqCst);
                    let _ = writeln!(
                        std::io::stderr().lock(),
                        "\n{name}: stopping at the end of this step and writing a checkpoint \
                         (send it again to stop at once)…"
                    );
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("signals will not stop training gracefully: {e}");
        }
    });
}

/// Whether a stop was asked for: through `flag` when a caller (a test) passes its own, else
/// through a signal.
pub(crate) fn stop_requested(flag: Option<&Arc<AtomicBool>>) -> bool {
    match flag {
        Some(flag) => flag.load(Ordering::SeqCst),
        None => STOP.load(Ordering::SeqCst),
    }
}

/// The signal that stopped the run, if one did.
pub fn stop_signal() -> Option<i32> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        signal => Some(signal),
    }
}
