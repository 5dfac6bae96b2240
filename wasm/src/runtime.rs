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
use std::time::{Duration, Instant};

use wasmtime::component::{Component, HasData, Linker, Resource, ResourceTable, WasmList, WasmStr};
use wasmtime::{Config, Engine, Store, StoreContextMut, StoreLimits, StoreLimitsBuilder, Trap};
use wasmtime_wasi::clocks::WasiClocksCtxView;
use wasmtime_wasi::p2::bindings::clocks::monotonic_clock;
use wasmtime_wasi::p2::DynPollable;
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxBuilder, WasiCtxView};

use codex_plugin_api::untrusted::clean;

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

/// Longest error text of a guest's kept; the rest is cut.
const MAX_ERROR: usize = 4096;

/// The interface of the `host` functions, as the guest imports it.
const HOST_INTERFACE: &str = "codex:sink/host@0.1.0";

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
    /// Whether the guest may wait on the clock (`capabilities.clock`).
    clock: bool,
    /// When the call in progress must be over; re-armed before every call.
    deadline: Instant,
    /// The per-call limit, for messages.
    call_timeout: Duration,
    /// Set when a wait of the call in progress was cut short at its deadline.
    wait_cut: bool,
}

impl wasmtime_wasi::WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl State {
    /// `write-output`: `bytes` is still in the guest's memory; its length is checked before
    /// anything is copied, and what fits the quota goes straight from there into the file.
    fn write_output(
        mut store: StoreContextMut<'_, State>,
        bytes: WasmList<u8>,
    ) -> wasmtime::Result<()> {
        let len = bytes.len() as u64;
        let state = store.data_mut();
        let max = state.max_return_bytes;
        let Some(out) = state.output.as_mut() else {
            return Err(violation(
                "wrote output but no output file is granted; grant \
                 `capabilities.output_file` in the manifest",
            ));
        };
        if len > max {
            return Err(violation(format!(
                "handed over {len} bytes of output in one call, more than limits.max_return_bytes \
                 ({max})"
            )));
        }
        let fits = len.min(out.quota.saturating_sub(out.written));
        if out.file.is_none() {
            if let Some(dir) = out.path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| output_error(&out.path, e))?;
            }
            let file = File::create(&out.path).map_err(|e| output_error(&out.path, e))?;
            out.file = Some(file);
        }
        let (quota, path) = (out.quota, out.path.clone());
        let mut file = out.file.take();
        let written = match file.as_mut() {
            Some(f) => {
                let bytes = bytes.as_le_slice(&store);
                let fits = usize::try_from(fits)
                    .unwrap_or(bytes.len())
                    .min(bytes.len());
                f.write_all(&bytes[..fits]).map(|()| fits as u64)
            }
            None => Ok(0),
        };
        let out = store.data_mut().output.as_mut();
        let Some(out) = out else { return Ok(()) };
        out.file = file;
        out.written += written.map_err(|e| output_error(&path, e))?;
        if fits < len {
            return Err(violation(format!(
                "went past its output quota of {quota} bytes ({} kept); raise \
                 `capabilities.output_file.quota_bytes` if that much output is expected",
                path.display()
            )));
        }
        Ok(())
    }

    /// `log`: one guest line is one log line, cleaned and cut while it is still in the
    /// guest's memory, so a line of many megabytes is never copied whole.
    fn log(mut store: StoreContextMut<'_, State>, line: WasmStr) -> wasmtime::Result<()> {
        let state = store.data_mut();
        match state.log_left.as_mut() {
            None => {
                return Err(violation(
                    "tried to log but no log lines are granted; grant `capabilities.log_lines` \
                     in the manifest",
                ))
            }
            Some(0) => {
                return Err(violation(
                    "went past its quota of log lines; raise `capabilities.log_lines`",
                ))
            }
            Some(left) => *left -= 1,
        }
        let clean = clean(&line.to_str(&store)?, MAX_LOG_LINE);
        let sink = &store.data().sink;
        tracing::warn!(target: "codex_wasm::guest", sink = %sink, "[{sink}] {clean}");
        Ok(())
    }
}

/// The `host` interface, defined by hand rather than through the generated bindings so that
/// its functions see the guest's strings and lists in place (`WasmStr`, `WasmList`) instead of
/// as copies.
fn add_host_to_linker(linker: &mut Linker<State>) -> wasmtime::Result<()> {
    let mut host = linker.instance(HOST_INTERFACE)?;
    host.func_wrap("write-output", |store, (bytes,): (WasmList<u8>,)| {
        State::write_output(store, bytes)
    })?;
    host.func_wrap("log", |store, (line,): (WasmStr,)| State::log(store, line))?;
    Ok(())
}

/// The monotonic clock as a guest sees it: reading it is free (frozen unless granted), but
/// waiting on it is the one way WASI lets a guest block inside a host call, where the epoch
/// deadline cannot reach it. So a guest without `capabilities.clock` may not wait at all, and
/// one with it waits at most until the end of its call's time limit.
struct GuardedClock<'a> {
    clocks: WasiClocksCtxView<'a>,
    granted: bool,
    left: Duration,
    call_timeout: Duration,
    wait_cut: &'a mut bool,
}

struct GuardedClocks;

impl HasData for GuardedClocks {
    type Data<'a> = GuardedClock<'a>;
}

fn guarded_clock(state: &mut State) -> GuardedClock<'_> {
    let left = state.deadline.saturating_duration_since(Instant::now());
    GuardedClock {
        clocks: WasiClocksCtxView {
            ctx: state.wasi.clocks(),
            table: &mut state.table,
        },
        granted: state.clock,
        left,
        call_timeout: state.call_timeout,
        wait_cut: &mut state.wait_cut,
    }
}

impl GuardedClock<'_> {
    fn wait(&mut self, wanted: Duration) -> wasmtime::Result<Resource<DynPollable>> {
        if wanted.is_zero() {
            // Ready at once: what a non-blocking poll asks for.
            return monotonic_clock::Host::subscribe_duration(&mut self.clocks, 0);
        }
        if !self.granted {
            return Err(violation(
                "tried to wait on the clock (a sleep, or a poll with a timeout), which needs \
                 `capabilities.clock`; a sink should return instead of waiting",
            ));
        }
        if self.left.is_zero() {
            return Err(violation(format!(
                "waited past its time limit of {} ms per call; raise `limits.call_timeout_ms` \
                 if the sink is slow rather than stuck",
                self.call_timeout.as_millis()
            )));
        }
        if wanted > self.left {
            // The call fails once it returns, whatever the guest does after the wait.
            *self.wait_cut = true;
        }
        let nanos = u64::try_from(wanted.min(self.left).as_nanos()).unwrap_or(u64::MAX);
        monotonic_clock::Host::subscribe_duration(&mut self.clocks, nanos)
    }
}

impl monotonic_clock::Host for GuardedClock<'_> {
    fn now(&mut self) -> wasmtime::Result<monotonic_clock::Instant> {
        monotonic_clock::Host::now(&mut self.clocks)
    }

    fn resolution(&mut self) -> wasmtime::Result<monotonic_clock::Duration> {
        monotonic_clock::Host::resolution(&mut self.clocks)
    }

    fn subscribe_instant(
        &mut self,
        when: monotonic_clock::Instant,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        let now = monotonic_clock::Host::now(&mut self.clocks)?;
        self.wait(Duration::from_nanos(when.saturating_sub(now)))
    }

    fn subscribe_duration(
        &mut self,
        duration: monotonic_clock::Duration,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        self.wait(Duration::from_nanos(duration))
    }
}

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
        // The clock's waiting functions are replaced by bounded ones (see `GuardedClock`).
        linker.allow_shadowing(true);
        monotonic_clock::add_to_linker::<State, GuardedClocks>(&mut linker, guarded_clock)
            .map_err(interface)?;
        linker.allow_shadowing(false);
        add_host_to_linker(&mut linker).map_err(interface)?;
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
            clock: plugin.grants.clock,
            deadline: Instant::now() + limits.call_timeout,
            call_timeout: limits.call_timeout,
            wait_cut: false,
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
        let state = self.store.data_mut();
        state.deadline = Instant::now() + self.limits.call_timeout;
        state.wait_cut = false;
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
        let result = f(bindings, &mut self.store).map_err(|e| explain(&e, what, &self.limits));
        if result.is_ok() && self.store.data().wait_cut {
            return Err(format!(
                "`{what}` waited past its time limit of {} ms per call (the wait was cut short); \
                 raise `limits.call_timeout_ms` if the sink is slow rather than stuck",
                self.limits.call_timeout.as_millis()
            ));
        }
        result
    }

    /// A string the guest returned, refused when longer than `max` (and `max_return_bytes`),
    /// else cleaned for printing.
    fn checked(&self, what: &str, text: String, max: u64) -> Result<String, String> {
        let max = max.min(self.limits.max_return_bytes);
        if text.len() as u64 > max {
            return Err(format!(
                "`{what}` returned {} bytes, more than the {max} allowed",
                text.len()
            ));
        }
        Ok(clean(&text, usize::try_from(max).unwrap_or(usize::MAX)))
    }

    /// The guest's `err` text, capped and cleaned.
    fn guest_error(&self, what: &str, message: String) -> String {
        match self.checked(what, message, MAX_ERROR as u64) {
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
        return format!("`{what}` {}", v.0);
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
                format!("failed: {}", clean(&short(e), MAX_ERROR))
            }
        }
    };
    format!("`{what}` {reason}")
}
