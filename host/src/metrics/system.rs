//! System metrics of a training run, recorded under split `sys` every `log_every` steps:
//! the process's CPU use and memory, where a step's time goes, and the GPUs' use.
//!
//! | Name | What |
//! |---|---|
//! | `cpu_percent` | CPU time of the process over the window, as a percentage of one core (200 = two cores busy) |
//! | `rss_mib` | resident memory now |
//! | `peak_rss_mib` | the highest resident memory so far |
//! | `step_ms` | mean wall time of a training step over the window, from its first batch to its update (evaluation and checkpoints come between steps, so they are left out) |
//! | `forward_ms` | of which the model's forward passes (the loss included when a kernel fuses it) |
//! | `backward_ms` | of which backward passes |
//! | `optimizer_ms` | of which the optimizer's updates |
//! | `gpu<i>_util_percent` | GPU `i`'s utilisation over the driver's last sample period |
//! | `gpu<i>_mem_used_mib` | GPU `i`'s memory in use (by every process) |
//!
//! GPU figures come from NVIDIA's NVML, the driver's own library (`libnvidia-ml.so`), loaded at
//! run time: on a machine without it (no NVIDIA driver, or no GPU) there are none, and that is
//! no error. `i` is NVML's index, which follows the PCI bus order, not `CUDA_VISIBLE_DEVICES`.
//! What a step spends elsewhere (data, the loss, clipping) is `step_ms` less the three. The
//! figures are wall-clock measurements: they differ between runs and are left out of every
//! comparison of a resumed run with an uninterrupted one.

use std::borrow::Cow;
use std::time::{Duration, Instant};

use nvml_wrapper::Nvml;
use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};

/// The split system metrics are recorded under.
pub const SYS_SPLIT: &str = "sys";

/// Measures the process and the steps between two samples.
pub struct SystemMetrics {
    system: System,
    pid: Pid,
    /// When the step under way began, if one is.
    step_started: Option<Instant>,
    /// The sums of the current window.
    window: Window,
    backward_at_start: Duration,
    /// NVML, when the NVIDIA driver's library loads and sees a GPU.
    gpus: Option<Nvml>,
    /// The process's CPU time and the wall clock when the window began.
    cpu_at_start: Option<Duration>,
    window_started: Instant,
}

#[derive(Default)]
struct Window {
    steps: u32,
    step: Duration,
    forward: Duration,
    optimizer: Duration,
}

impl Default for SystemMetrics {
    fn default() -> Self {
        SystemMetrics::new()
    }
}

impl SystemMetrics {
    /// Start measuring: the first window begins now.
    pub fn new() -> SystemMetrics {
        let mut metrics = SystemMetrics {
            system: System::new(),
            pid: Pid::from_u32(std::process::id()),
            step_started: None,
            window: Window::default(),
            backward_at_start: codex_engine::backward_time(),
            gpus: open_nvml(),
            cpu_at_start: cpu_time(),
            window_started: Instant::now(),
        };
        metrics.refresh();
        metrics
    }

    fn refresh(&mut self) {
        self.system.refresh_processes_specifics(
            ProcessesToUpdate::Some(&[self.pid]),
            false,
            ProcessRefreshKind::nothing().with_memory(),
        );
    }

    /// A training step begins (its first batch is asked for), unless one is under way.
    pub fn step_begins(&mut self) {
        self.step_started.get_or_insert_with(Instant::now);
    }

    /// A training step ended.
    pub fn step_ends(&mut self) {
        if let Some(started) = self.step_started.take() {
            self.window.step += started.elapsed();
            self.window.steps += 1;
        }
    }

    /// A forward pass of training took `spent`.
    pub fn forward(&mut self, spent: Duration) {
        self.window.forward += spent;
    }

    /// An optimizer update took `spent`.
    pub fn optimizer(&mut self, spent: Duration) {
        self.window.optimizer += spent;
    }

    /// The window's figures as `(name, value)`, and a new window from now.
    pub fn sample(&mut self) -> Vec<(Cow<'static, str>, f64)> {
        self.refresh();
        let mut out: Vec<(Cow<'static, str>, f64)> = Vec::with_capacity(7);
        let mut rss = None;
        // CPU time over wall time since the window began, from the kernel's own accounting
        // (a sampler's instantaneous reading is meaningless over windows of milliseconds).
        let (cpu_now, now) = (cpu_time(), Instant::now());
        if let (Some(before), Some(after)) = (self.cpu_at_start, cpu_now) {
            let wall = now.duration_since(self.window_started).as_secs_f64();
            if wall > 0.0 {
                let busy = after.saturating_sub(before).as_secs_f64();
                out.push(("cpu_percent".into(), busy / wall * 100.0));
            }
        }
        (self.cpu_at_start, self.window_started) = (cpu_now, now);
        if let Some(process) = self.system.process(self.pid) {
            rss = Some(process.memory());
            out.push(("rss_mib".into(), process.memory() as f64 / MIB));
        }
        // The kernel's high-water mark and the current size are read at different moments
        // and rounded differently: a peak is never below the size now.
        if let Some(peak) = peak_rss_bytes().map(|peak| peak.max(rss.unwrap_or(0))) {
            out.push(("peak_rss_mib".into(), peak as f64 / MIB));
        }
        let backward_now = codex_engine::backward_time();
        let backward = backward_now.saturating_sub(self.backward_at_start);
        self.backward_at_start = backward_now;
        let window = std::mem::take(&mut self.window);
        if window.steps > 0 {
            let per_step = |d: Duration| d.as_secs_f64() * 1e3 / f64::from(window.steps);
            out.push(("step_ms".into(), per_step(window.step)));
            out.push(("forward_ms".into(), per_step(window.forward)));
            out.push(("backward_ms".into(), per_step(backward)));
            out.push(("optimizer_ms".into(), per_step(window.optimizer)));
        }
        if let Some(nvml) = &self.gpus {
            gpu_sample(nvml, &mut out);
        }
        out
    }
}

/// NVML, if the driver's library loads and counts at least one GPU.
fn open_nvml() -> Option<Nvml> {
    match Nvml::init() {
        Ok(nvml) if nvml.device_count().is_ok_and(|n| n > 0) => Some(nvml),
        Ok(_) => None,
        Err(e) => {
            tracing::debug!("no GPU metrics: NVML is not available ({e})");
            None
        }
    }
}

/// Each GPU's utilisation and memory in use; a GPU that cannot say is left out.
fn gpu_sample(nvml: &Nvml, out: &mut Vec<(Cow<'static, str>, f64)>) {
    let count = nvml.device_count().unwrap_or(0);
    for i in 0..count {
        let Ok(device) = nvml.device_by_index(i) else {
            continue;
        };
        if let Ok(rates) = device.utilization_rates() {
            out.push((format!("gpu{i}_util_percent").into(), f64::from(rates.gpu)));
        }
        if let Ok(memory) = device.memory_info() {
            out.push((
                format!("gpu{i}_mem_used_mib").into(),
                memory.used as f64 / MIB,
            ));
        }
    }
}

const MIB: f64 = 1024.0 * 1024.0;

/// The process's `getrusage`.
fn rusage() -> Option<libc::rusage> {
    // SAFETY: `getrusage` writes a `rusage` into the zeroed struct it is given and reads
    // nothing else.
    unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        (libc::getrusage(libc::RUSAGE_SELF, &mut usage) == 0).then_some(usage)
    }
}

/// The CPU time the process has used, user and system, on all its threads.
fn cpu_time() -> Option<Duration> {
    let usage = rusage()?;
    let time = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).ok()?)
            .checked_add(Duration::from_micros(u64::try_from(t.tv_usec).ok()?))
    };
    time(usage.ru_utime)?.checked_add(time(usage.ru_stime)?)
}

/// The process's peak resident set size, from `getrusage` (the kernel's high-water mark).
fn peak_rss_bytes() -> Option<u64> {
    let usage = rusage()?;
    // Kilobytes on Linux, bytes on macOS.
    let scale = if cfg!(target_os = "macos") { 1 } else { 1024 };
    u64::try_from(usage.ru_maxrss).ok().map(|kb| kb * scale)
}

/// The peak resident memory of this process so far, in MiB (0 when the system cannot say).
pub fn peak_rss_mib() -> f64 {
    peak_rss_bytes().map_or(0.0, |b| b as f64 / MIB)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_reports_memory_cpu_and_per_step_times() {
        let mut metrics = SystemMetrics::new();
        for _ in 0..2 {
            metrics.step_begins();
            metrics.forward(Duration::from_millis(3));
            metrics.optimizer(Duration::from_millis(1));
            std::thread::sleep(Duration::from_millis(10));
            metrics.step_ends();
        }
        let sample: std::collections::BTreeMap<_, _> = metrics.sample().into_iter().collect();
        // This machine may or may not have an NVIDIA GPU; one without has no GPU figures.
        if open_nvml().is_none() {
            assert!(!sample.keys().any(|k| k.starts_with("gpu")), "{sample:?}");
        }
        assert!(sample["rss_mib"] > 1.0, "{sample:?}");
        assert!(
            sample["peak_rss_mib"] >= sample["rss_mib"] * 0.5,
            "{sample:?}"
        );
        assert!(sample["cpu_percent"] >= 0.0, "{sample:?}");
        // The window busy-waits: it used CPU time, however loaded the machine.
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(50) {
            std::hint::black_box(0u64);
        }
        let busy: std::collections::BTreeMap<_, _> = metrics.sample().into_iter().collect();
        assert!(busy["cpu_percent"] > 0.0, "{busy:?}");
        assert!((sample["forward_ms"] - 3.0).abs() < 1e-9, "{sample:?}");
        assert!((sample["optimizer_ms"] - 1.0).abs() < 1e-9, "{sample:?}");
        assert!(sample["step_ms"] >= 10.0, "{sample:?}");
        // A window without steps has no step times.
        let empty: Vec<_> = metrics.sample().into_iter().map(|(n, _)| n).collect();
        assert!(!empty.iter().any(|n| n == "step_ms"), "{empty:?}");
    }
}
