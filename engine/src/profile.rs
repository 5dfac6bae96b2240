//! Per-op timing for `codex-ml bench --profile`: where a training step's time goes.
//!
//! Two kinds of entries are timed: every op-table entry a component calls (`op`), and every
//! call into the active kernel (`kernel`), forward and backward. Kernel calls made during
//! `backward` are therefore counted both under `op backward` and under their own name, which
//! is what shows how much of backward the fused ops take and how much candle's primitives.
//!
//! Off by default. When off, the cost is one relaxed atomic load per op; when on, one clock
//! read pair and a short mutex-protected map update, negligible next to the ops themselves.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{LazyLock, Mutex, PoisonError};
use std::time::{Duration, Instant};

static ON: AtomicBool = AtomicBool::new(false);
static STATS: LazyLock<Mutex<HashMap<(Kind, &'static str), Stat>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// What was timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// An op-table entry, as a component called it.
    Op,
    /// A call into the active kernel.
    Kernel,
}

impl Kind {
    /// `op` or `kernel`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Op => "op",
            Kind::Kernel => "kernel",
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Stat {
    calls: u64,
    time: Duration,
}

/// Accumulated time of one op since the last [`take`].
#[derive(Debug, Clone, PartialEq)]
pub struct OpTime {
    /// Op-table entry or kernel call.
    pub kind: Kind,
    /// Its name (`matmul`, `layer_norm.bwd`, ...).
    pub name: &'static str,
    /// How many calls.
    pub calls: u64,
    /// Their total wall time.
    pub time: Duration,
}

/// Turn timing on or off for the whole process.
pub fn set_enabled(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

/// Whether timing is on.
pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Everything timed since the last call, slowest first; the counters restart at zero.
pub fn take() -> Vec<OpTime> {
    let map = std::mem::take(&mut *STATS.lock().unwrap_or_else(PoisonError::into_inner));
    let mut out: Vec<OpTime> = map
        .into_iter()
        .map(|((kind, name), s)| OpTime {
            kind,
            name,
            calls: s.calls,
            time: s.time,
        })
        .collect();
    out.sort_by(|a, b| b.time.cmp(&a.time).then(a.name.cmp(b.name)));
    out
}

/// Run `f`, adding its wall time under `(kind, name)` when timing is on.
#[inline]
pub(crate) fn timed<T>(kind: Kind, name: &'static str, f: impl FnOnce() -> T) -> T {
    if !enabled() {
        return f();
    }
    let start = Instant::now();
    let out = f();
    let elapsed = start.elapsed();
    let mut map = STATS.lock().unwrap_or_else(PoisonError::into_inner);
    let s = map.entry((kind, name)).or_default();
    s.calls += 1;
    s.time += elapsed;
    out
}
