//! Untrusted metric sinks, sandboxed in WebAssembly, seen by the host as ordinary sinks.
//!
//! A sink plugin is a WebAssembly component of the world `codex:sink/metric-sink@0.1.0`
//! (`plugin-api/wit/sink.wit`). This crate is the only one that knows wasmtime: the host hands
//! it a [`SinkPlugin`] (file, [`Limits`], [`Grants`], all from the plugin manifest) and gets back
//! a plain [`SinkBox`], so the metrics hub isolates it like any other sink.
//!
//! Why it is shaped this way:
//! - **No ambient authority.** The guest is linked against a deny-all WASI context: no
//!   preopened directory, no sockets, no name lookup, no environment variable and a frozen clock
//!   unless the manifest grants `env` names or `clock`. Its only way out is the `host`
//!   interface, and each of its functions checks a grant and a quota.
//! - **Every call is bounded.** Before each call the epoch deadline is re-armed (a ticker thread
//!   advances the engine's epoch every [`TICK`]), and fuel is refilled when the manifest meters
//!   fuel; memory, instances and tables are capped by store limits that trap on growth failure;
//!   the wasm stack is capped well below the stack of the thread that runs the guest; every
//!   value the guest hands back is checked against `max_return_bytes`.
//! - **One failure ends the sink.** After a trap an instance is unusable, so the sink is not
//!   re-instantiated: the first trap, limit, quota violation or `err` disables it for the rest
//!   of the run, and the message names the sink, the call and the limit to change.
//! - **A guest never holds up the caller.** The guest runs on a thread of its own behind a
//!   queue of `queue_size` records; records that do not fit are dropped and counted, so a slow
//!   guest costs the hub's sink thread nothing but a copy.

#![warn(missing_docs, unreachable_pub)]
// `#[sabi_trait]` objects are built with `from_value`, which expands to impl blocks here.
#![allow(non_local_definitions)]

mod runtime;
mod sink;

use std::path::PathBuf;
use std::time::Duration;

pub use codex_plugin_api::sink::SinkBox;
pub use runtime::Described;
pub use sink::{failed_sink, PreparedSink};

/// The world every sink component implements, as it appears in errors and listings.
pub const WORLD: &str = "codex:sink/metric-sink@0.1.0";

/// How often the engine's epoch advances; call time limits are counted in these ticks.
pub const TICK: Duration = Duration::from_millis(10);

/// A wasm sink plugin as the manifest declares it.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkPlugin {
    /// The plugin's name in the manifest; the sink's registry name.
    pub name: String,
    /// The component file.
    pub path: PathBuf,
    /// What the guest may consume.
    pub limits: Limits,
    /// What the guest may do beyond computing.
    pub grants: Grants,
}

/// Resource limits of one sink (manifest `limits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Linear memory, bytes, over all of the component's memories.
    pub memory_bytes: u64,
    /// Wall-clock limit of one call into the guest.
    pub call_timeout: Duration,
    /// Fuel per call; `None` meters time only.
    pub fuel: Option<u64>,
    /// Core wasm instances (and memories) the component may create.
    pub max_instances: u32,
    /// Tables the component may create.
    pub max_tables: u32,
    /// Largest value the guest may hand back in one call (a string, a list), bytes.
    pub max_return_bytes: u64,
    /// Records queued for the guest before new ones are dropped.
    pub queue_size: usize,
}

impl Default for Limits {
    /// The manifest's defaults: 64 MiB, 1 s per call, no fuel, 16 instances and tables,
    /// 1 MiB returned, 1024 records queued.
    fn default() -> Self {
        Limits {
            memory_bytes: 64 << 20,
            call_timeout: Duration::from_millis(1000),
            fuel: None,
            max_instances: 16,
            max_tables: 16,
            max_return_bytes: 1 << 20,
            queue_size: 1024,
        }
    }
}

/// Capabilities granted to one sink (manifest `capabilities`); the default grants nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    /// The one file the guest may write, relative to the run directory, and its byte quota.
    pub output_file: Option<OutputGrant>,
    /// Log lines the guest may emit over the run; `None`: it may not log.
    pub log_lines: Option<u64>,
    /// Environment variables the guest may read, by name; unset ones stay absent.
    pub env: Vec<String>,
    /// Whether the guest reads the real clock (otherwise it reads the unix epoch).
    pub clock: bool,
}

/// The output-file grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputGrant {
    /// Relative to the run directory; the manifest has checked it stays inside.
    pub path: String,
    /// Most bytes the guest may write over the run.
    pub quota_bytes: u64,
}

/// Why a wasm sink could not be loaded or started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WasmError {
    /// The runtime itself could not be set up.
    #[error("cannot start the wasm runtime: {0}")]
    Engine(String),
    /// The plugin file could not be read.
    #[error("cannot read wasm plugin {}: {source}; check the manifest's `path`", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A core module where a component was expected.
    #[error(
        "{} is a core wasm module, not a component; build the sink with `cargo build --target \
         wasm32-wasip2` against plugin-api/wit (world `{WORLD}`)",
        path.display()
    )]
    CoreModule {
        /// The file.
        path: PathBuf,
    },
    /// Not valid wasm, or rejected by the compiler.
    #[error("{} is not a valid wasm component: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The compiler's reason.
        message: String,
    },
    /// A component, but not of the sink world (another world, or another interface version).
    #[error(
        "{} is not a metric sink of world `{WORLD}`: {message}; rebuild it against \
         plugin-api/wit",
        path.display()
    )]
    Interface {
        /// The file.
        path: PathBuf,
        /// What does not match.
        message: String,
    },
    /// The guest failed while starting (`name`, `version` or `init`).
    #[error("wasm sink `{name}` ({}) failed to start: {message}", path.display())]
    Start {
        /// The sink's registry name.
        name: String,
        /// The file.
        path: PathBuf,
        /// The trap, limit or the guest's own error.
        message: String,
    },
    /// The operating system refused the guest's thread.
    #[error("cannot start the thread of wasm sink `{name}`: {source}")]
    Spawn {
        /// The sink's registry name.
        name: String,
        /// Why.
        source: std::io::Error,
    },
}
