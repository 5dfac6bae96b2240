//! Stopping a run on request: Ctrl-C sets a process-wide flag that the trainer reads at each
//! step boundary (through the session's `should_stop`), so the run ends after a whole step,
//! writes its final checkpoint and reports that it can be resumed. A second Ctrl-C leaves at
//! once; the last checkpoint stands.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

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

/// Whether a stop was asked for: through `flag` when a caller (a test) passes its own, else
/// through Ctrl-C.
pub(crate) fn stop_requested(flag: Option<&Arc<AtomicBool>>) -> bool {
    match flag {
        Some(flag) => flag.load(Ordering::SeqCst),
        None => STOP.load(Ordering::SeqCst),
    }
}
