//! The sandbox: engines, the deny-all store a guest runs in, the `host` interface, and one
//! bounded call into a guest.
//!
//! The engines are process-wide (compiling is the expensive part, and the epoch ticker is
//! engine-wide): one without fuel metering and one with it, because metering slows every guest
//! down and a store in a metered engine must be given fuel before any call. Call limits are
//! therefore per store and re-armed before every call, never engine settings.
//!
//! Everything the guest can observe is decided here: what WASI gives it (nothing, unless
//! granted), what `host` lets it do (grants and quotas), and how its failures read (each trap is
//! turned into a sentence naming the limit to change).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store, StoreLimits, StoreLimitsBuilder, Trap};
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxBuilder, WasiCtxView};

use crate::{Grants, Limits, SinkPlugin, WasmError, TICK};

wasmtime::component::bindgen!({
    path: "../plugin-api/wit",
    world: "metric-sink",
    imports: { default: trappable },
});

pub(crate) use codex::sink::types::Metric;

/// The deepest wasm stack a guest may use. The guest runs on a thread with
/// [`GUEST_THREAD_STACK`] of native stack, so an overflow is a wasm trap, never a crash.
const MAX_WASM_STACK: usize = 1 << 20;

/// Native stack of the thread that runs a guest.
pub(crate) const GUEST_THREAD_STACK: usize = 8 << 20;

/// Longest log line kept; the rest is cut.
const MAX_LOG_LINE: usize = 1024;

/// Longest name or version a guest may declare.
const MAX_LABEL: usize = 64;

fn engine(fuel: bool) -> Result<&'static Engine, WasmError> {
    static PLAIN: OnceLock<Result<Engine, String>> = OnceLock::new();
    static METERED: OnceLock<Result<Engine, String>> = OnceLock::new();
    let cell = if fuel { &METERED } else { &PLAIN };
    cell.get_or_init(|| {
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .consume_fuel(fuel)
            .max_wasm_stack(MAX_WASM_STACK);
        let engine = Engine::new(&config).map_err(|e| e.to_string())?;
        let ticker = engine.clone();
        std::thread::Builder::new()
            .name("wasm-epoch".to_owned())
            .spawn(move || loop {
                std::thread::sleep(TICK);
                ticker.increment_epoch();
            })
            .map_err(|e| format!("cannot start the epoch ticker: {e}"))?;
        Ok(engine)
    })
    .as_ref()
    .map_err(|e| WasmError::Engine(e.clone()))
}

/// A guest broke a rule of the `host` interface; raised as a trap, then reported as is.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Violation(pub(crate) String);

/// The one file a guest may write, opened on its first write.
struct Output {
    path: PathBuf,
    file: Option<File>,
    written: u64,
    quota: u64,
}

/// What a store holds for its guest.
pub(crate) struct State {
    sink: String,
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
    output: Option<Output>,
    log_left: Option<u64>,
    max_return_bytes: u64,
}

impl wasmtime_wasi::WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl codex::sink::host::Host for State {
    fn write_output(&mut self, bytes: Vec<u8>) -> wasmtime::Result<()> {
        let max = self.max_return_bytes;
        let Some(out) = self.output.as_mut() else {
            return Err(violation(
                "wrote output but no output file is granted; grant \
                 `capabilities.output_file` in the manifest",
            ));
        };
        if bytes.len() as u64 > max {
            return Err(violation(format!(
                "handed over {} bytes of output in one call, more than limits.max_return_bytes \
                 ({max})",
                bytes.len()
            )));
        }
        let room = out.quota.saturating_sub(out.written);
        let fits = bytes.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        if out.file.is_none() {
            if let Some(dir) = out.path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| output_error(&out.path, e))?;
            }
            let file = File::create(&out.path).map_err(|e| output_error(&out.path, e))?;
            out.file = Some(file);
        }
        if let Some(file) = out.file.as_mut() {
            file.write_all(&bytes[..fits])
                .map_err(|e| output_error(&out.path, e))?;
        }
        out.written += fits as u64;
        if fits < bytes.len() {
            return Err(violation(format!(
                "went past its output quota of {} bytes ({} kept); raise \
                 `capabilities.output_file.quota_bytes` if that much output is expected",
                out.quota,
                out.path.display()
            )));
        }
        Ok(())
    }

    fn log(&mut self, line: String) -> wasmtime::Result<()> {
        match self.log_left.as_mut() {
            None => Err(violation(
                "tried to log but no log lines are granted; grant `capabilities.log_lines` in \
                 the manifest",
            )),
            Some(0) => Err(violation(
                "went past its quota of log lines; raise `capabilities.log_lines`",
            )),
            Some(left) => {
                *left -= 1;
                let mut end = line.len().min(MAX_LOG_LINE);
                while !line.is_char_boundary(end) {
                    end -= 1;
                }
                // One guest line is one log line: no forged lines through embedded newlines.
                let clean: String = line[..end]
                    .chars()
                    .map(|c| if c.is_control() { ' ' } else { c })
                    .collect();
                tracing::warn!(target: "codex_wasm::guest", sink = %self.sink, "[{}] {clean}", self.sink);
                Ok(())
            }
        }
    }
}

impl codex::sink::types::Host for State {}

fn violation(message: impl Into<String>) -> wasmtime::Error {
    wasmtime::Error::new(Violation(message.into()))
}

fn output_error(path: &Path, e: std::io::Error) -> wasmtime::Error {
    violation(format!(
        "cannot write its output file {}: {e}",
        path.display()
    ))
}

/// The clock a guest reads when `clock` is not granted: always the unix epoch.
struct FrozenClock;

impl HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl HostMonotonicClock for FrozenClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

fn wasi_for(grants: &Grants) -> WasiCtx {
    let mut b = WasiCtxBuilder::new();
    // The builder starts with no preopens, no environment, no arguments and closed stdio; say
    // the network part out loud, since it is the one a reader would worry about.
    b.allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false);
    for name in &grants.env {
        if let Ok(value) = std::env::var(name) {
            b.env(name, value);
        }
    }
    if !grants.clock {
        b.wall_clock(FrozenClock).monotonic_clock(FrozenClock);
    }
    b.build()
}

/// A compiled sink component, checked against the sink world, ready to instantiate.
pub(crate) struct Loaded {
    pub(crate) plugin: SinkPlugin,
    engine: &'static Engine,
    pre: MetricSinkPre<State>,
}

/// What a guest says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Described {
    /// Its own name.
    pub name: String,
    /// Its own version.
    pub version: String,
}

impl Loaded {
    pub(crate) fn load(plugin: &SinkPlugin) -> Result<Loaded, WasmError> {
        let path = &plugin.path;
        let bytes = std::fs::read(path).map_err(|source| WasmError::Read {
            path: path.clone(),
            source,
        })?;
        // Version 1, layer 0: the preamble of a core module (a component's is 0x0d, layer 1).
        if bytes.get(..8) == Some(b"\0asm\x01\0\0\0".as_slice()) {
            return Err(WasmError::CoreModule { path: path.clone() });
        }
        let engine = engine(plugin.limits.fuel.is_some())?;
        let component = Component::from_binary(engine, &bytes).map_err(|e| WasmError::Invalid {
            path: path.clone(),
            message: short(&e),
        })?;
        let mut linker: Linker<State> = Linker::new(engine);
        let interface = |e: wasmtime::Error| WasmError::Interface {
            path: path.clone(),
            message: short(&e),
        };
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(interface)?;
        MetricSink::add_to_linker::<State, HasSelf<State>>(&mut linker, |s| s)
            .map_err(interface)?;
        let pre = linker.instantiate_pre(&component).map_err(interface)?;
        let pre = MetricSinkPre::new(pre).map_err(interface)?;
        Ok(Loaded {
            plugin: plugin.clone(),
            engine,
            pre,
        })
    }

    /// A fresh instance in a fresh store, with the plugin's limits and grants; without a run
    /// directory (a probe) the output file is not granted.
    pub(crate) fn start(&self, run_dir: Option<&Path>) -> Result<Guest, WasmError> {
        let plugin = &self.plugin;
        let limits = &plugin.limits;
        let state = State {
            sink: plugin.name.clone(),
            wasi: wasi_for(&plugin.grants),
            table: ResourceTable::new(),
            limits: StoreLimitsBuilder::new()
                .memory_size(usize::try_from(limits.memory_bytes).unwrap_or(usize::MAX))
                .instances(limits.max_instances as usize)
                .memories(limits.max_instances as usize)
                .tables(limits.max_tables as usize)
                .trap_on_grow_failure(true)
                .build(),
            output: plugin
                .grants
                .output_file
                .as_ref()
                .zip(run_dir)
                .map(|(o, dir)| Output {
                    path: dir.join(&o.path),
                    file: None,
                    written: 0,
                    quota: o.quota_bytes,
                }),
            log_left: plugin.grants.log_lines,
            max_return_bytes: limits.max_return_bytes,
        };
        let mut store = Store::new(self.engine, state);
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_trap();
        let mut guest = Guest {
            store,
            bindings: None,
            limits: *limits,
        };
        guest.arm().map_err(|m| self.start_error(m))?;
        let bindings = self
            .pre
            .instantiate(&mut guest.store)
            .map_err(|e| self.start_error(explain(&e, "instantiate", limits)))?;
        guest.bindings = Some(bindings);
        Ok(guest)
    }

    pub(crate) fn start_error(&self, message: String) -> WasmError {
        WasmError::Start {
            name: self.plugin.name.clone(),
            path: self.plugin.path.clone(),
            message,
        }
    }
}

/// One running instance. After any failed call it must not be called again.
pub(crate) struct Guest {
    store: Store<State>,
    bindings: Option<MetricSink>,
    limits: Limits,
}

impl Guest {
    /// Re-arm the per-call limits: the epoch deadline and, when metered, the fuel.
    fn arm(&mut self) -> Result<(), String> {
        let ticks = self
            .limits
            .call_timeout
            .as_millis()
            .div_ceil(TICK.as_millis())
            + 1;
        self.store
            .set_epoch_deadline(u64::try_from(ticks).unwrap_or(u64::MAX));
        if let Some(fuel) = self.limits.fuel {
            self.store
                .set_fuel(fuel)
                .map_err(|e| format!("cannot set fuel: {e}"))?;
        }
        Ok(())
    }

    /// Run one call with fresh limits; a trap or an oversized return becomes a sentence.
    fn call<T>(
        &mut self,
        what: &str,
        f: impl FnOnce(&MetricSink, &mut Store<State>) -> wasmtime::Result<T>,
    ) -> Result<T, String> {
        self.arm()?;
        let Some(bindings) = self.bindings.as_ref() else {
            return Err("the instance failed to start".to_owned());
        };
        f(bindings, &mut self.store).map_err(|e| explain(&e, what, &self.limits))
    }

    fn checked(&self, what: &str, text: String, max: u64) -> Result<String, String> {
        let max = max.min(self.limits.max_return_bytes);
        if text.len() as u64 > max {
            return Err(format!(
                "returned {} bytes from `{what}`, more than the {max} allowed",
                text.len()
            ));
        }
        Ok(text)
    }

    /// The guest's `err` text, capped.
    fn guest_error(&self, what: &str, message: String) -> String {
        match self.checked(what, message, u64::MAX) {
            Ok(m) => format!("`{what}` returned an error: {m}"),
            Err(too_long) => too_long,
        }
    }

    pub(crate) fn describe(&mut self, plugin: &SinkPlugin) -> Result<Described, WasmError> {
        let start = |message| WasmError::Start {
            name: plugin.name.clone(),
            path: plugin.path.clone(),
            message,
        };
        let name = self
            .call("name", |b, s| b.codex_sink_sink().call_name(s))
            .and_then(|n| self.checked("name", n, MAX_LABEL as u64))
            .map_err(start)?;
        let version = self
            .call("version", |b, s| b.codex_sink_sink().call_version(s))
            .and_then(|v| self.checked("version", v, MAX_LABEL as u64))
            .map_err(start)?;
        Ok(Described { name, version })
    }

    pub(crate) fn init(&mut self, params: &str, resume_step: Option<u64>) -> Result<(), String> {
        let r = self.call("init", |b, s| {
            b.codex_sink_sink().call_init(s, params, resume_step)
        })?;
        r.map_err(|m| self.guest_error("init", m))
    }

    pub(crate) fn write(&mut self, records: &[Metric]) -> Result<(), String> {
        let r = self.call("write", |b, s| b.codex_sink_sink().call_write(s, records))?;
        r.map_err(|m| self.guest_error("write", m))
    }

    pub(crate) fn flush(&mut self) -> Result<(), String> {
        let r = self.call("flush", |b, s| b.codex_sink_sink().call_flush(s))?;
        r.map_err(|m| self.guest_error("flush", m))
    }

    pub(crate) fn finish(&mut self) -> Result<(), String> {
        let r = self.call("finish", |b, s| b.codex_sink_sink().call_finish(s))?;
        r.map_err(|m| self.guest_error("finish", m))
    }
}

/// The first line of an error, without the wasm backtrace wasmtime appends.
fn short(e: &wasmtime::Error) -> String {
    let text = format!("{e:#}");
    text.lines().next().unwrap_or_default().to_owned()
}

/// Why a call failed, in words that name the limit to change.
fn explain(e: &wasmtime::Error, what: &str, limits: &Limits) -> String {
    if let Some(v) = e.downcast_ref::<Violation>() {
        return format!("{} (in `{what}`)", v.0);
    }
    let reason = match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => format!(
            "ran longer than its time limit of {} ms per call; raise `limits.call_timeout_ms` \
             if the sink is slow rather than stuck",
            limits.call_timeout.as_millis()
        ),
        Some(Trap::OutOfFuel) => format!(
            "ran out of fuel ({} per call); raise or remove `limits.fuel`",
            limits.fuel.unwrap_or(0)
        ),
        Some(Trap::StackOverflow) => "overflowed its stack (runaway recursion?)".to_owned(),
        Some(Trap::MemoryOutOfBounds) => {
            "accessed memory out of bounds (a stack overflow in the guest's own stack, or a bug)"
                .to_owned()
        }
        Some(Trap::UnreachableCodeReached) => {
            "trapped: reached `unreachable` (a panic or an abort in the guest)".to_owned()
        }
        Some(trap) => format!("trapped: {trap}"),
        None => {
            let root = e.root_cause().to_string();
            if root.contains("forcing trap when growing memory") {
                format!(
                    "tried to grow its memory past {} MiB; raise `limits.memory_mib` if it \
                     needs more",
                    limits.memory_bytes >> 20
                )
            } else if root.contains("resource limit exceeded") {
                format!(
                    "exceeded an instance, memory or table limit ({}); raise \
                     `limits.max_instances` or `limits.max_tables`",
                    short(e)
                )
            } else {
                short(e)
            }
        }
    };
    format!("{reason} (in `{what}`)")
}
