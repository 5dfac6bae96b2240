//! Logging: human lines on stderr, and the same events in the run's `log.txt` once a run has
//! a directory.
//!
//! The subscriber is installed once, at start-up, before anything knows where a run will be
//! written; so the file layer writes into a slot that [`attach_run_log`] fills later (and
//! [`detach_run_log`] empties). Until then the file layer is disabled and costs nothing.
//! stdout is never written here: it is reserved for machine output (`--json`). While a run
//! shows a progress bar ([`show_progress_bar`]), lines for stderr are written with the bar
//! hidden, so they scroll above it instead of leaving frozen copies of it behind; the step
//! and validation lines the bar stands for ([`PROGRESS`]) still go to `log.txt`, which gets
//! `info` lines even under `-q`, and the run's outcome ([`RUN_LOG_ONLY`]).
//!
//! Level: `info` by default, `-v` debug, `-vv` trace, `-q` warnings only; `RUST_LOG`, when set,
//! takes precedence (`RUST_LOG=codex_host=debug`).

use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use indicatif::ProgressBar;
use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::{filter_fn, EnvFilter};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

static RUN_LOG: Mutex<Option<File>> = Mutex::new(None);
static ATTACHED: AtomicBool = AtomicBool::new(false);
static BAR: Mutex<Option<ProgressBar>> = Mutex::new(None);
static BAR_SHOWN: AtomicBool = AtomicBool::new(false);

/// The level the command-line flags ask for.
pub fn level(verbose: u8, quiet: bool) -> LevelFilter {
    match (quiet, verbose) {
        (true, _) => LevelFilter::WARN,
        (false, 0) => LevelFilter::INFO,
        (false, 1) => LevelFilter::DEBUG,
        (false, _) => LevelFilter::TRACE,
    }
}

/// Colour on stderr only for a terminal, and never with `NO_COLOR` set to anything but the
/// empty string (no-color.org).
fn colour() -> bool {
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    io::stderr().is_terminal() && !no_color
}

/// Log lines with this target go to the run's `log.txt` only: the outcome of a run, which
/// the command line prints on stderr in its own words.
pub const RUN_LOG_ONLY: &str = "codex_host::run_log";

/// Log lines with this target report progress (steps, validation): on stderr only while no
/// progress bar shows them, always in `log.txt`.
pub const PROGRESS: &str = "codex_host::progress";

/// Install the global subscriber. Calling it again (tests, embedding) changes nothing.
///
/// stderr shows what the flags (or `RUST_LOG`) ask for; `log.txt` holds at least every
/// `info` line whatever they say (`-q` quiets the terminal, not the run's record), and the
/// `-v` levels when asked.
pub fn init(verbose: u8, quiet: bool) {
    let on_stderr = EnvFilter::builder()
        .with_default_directive(level(verbose, quiet).into())
        .from_env_lossy();
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(|| StderrWriter)
        .with_ansi(colour())
        .with_target(verbose > 0)
        .without_time()
        .with_filter(on_stderr)
        .with_filter(filter_fn(|meta| match meta.target() {
            RUN_LOG_ONLY => false,
            PROGRESS => !BAR_SHOWN.load(Ordering::Relaxed),
            _ => true,
        }));
    let in_file = level(verbose, false);
    let file = tracing_subscriber::fmt::layer()
        .with_writer(RunLogWriter)
        .with_ansi(false)
        .with_filter(filter_fn(move |meta| {
            ATTACHED.load(Ordering::Relaxed) && *meta.level() <= in_file
        }));
    // Fails only when a subscriber is already installed, which is fine.
    let _ = tracing_subscriber::registry()
        .with(stderr)
        .with(file)
        .try_init();
}

/// Send every log line from now on to `path` as well (appending; created if needed).
/// Replaces a previously attached file.
pub fn attach_run_log(path: &Path) -> io::Result<()> {
    let file = OpenOptions::new().create(true).append(true).open(path)?;
    let mut slot = RUN_LOG
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    *slot = Some(file);
    ATTACHED.store(true, Ordering::Relaxed);
    Ok(())
}

/// Stop writing to the attached file, flushing it to disk first.
pub fn detach_run_log() -> io::Result<()> {
    ATTACHED.store(false, Ordering::Relaxed);
    let mut slot = RUN_LOG
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    match slot.take() {
        Some(file) => file.sync_all(),
        None => Ok(()),
    }
}

/// Write log lines for stderr around `bar` from now on (`None`: no bar any more).
pub fn show_progress_bar(bar: Option<ProgressBar>) {
    BAR_SHOWN.store(bar.is_some(), Ordering::Relaxed);
    *BAR.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = bar;
}

/// Writes to stderr, with the progress bar (if one is shown) hidden meanwhile.
struct StderrWriter;

impl Write for StderrWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let bar = BAR
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        match bar {
            // The fmt layer writes a whole line per call, so the bar is hidden once per line.
            Some(bar) => bar.suspend(|| io::stderr().write_all(buf).map(|()| buf.len())),
            None => io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

/// Writes into the attached run log, if any. The fmt layer formats a whole line first and
/// writes it in one call, so lines from different threads do not interleave.
struct RunLogWriter;

impl Write for RunLogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut slot = RUN_LOG
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match slot.as_mut() {
            Some(file) => file.write(buf),
            None => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut slot = RUN_LOG
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match slot.as_mut() {
            Some(file) => file.flush(),
            None => Ok(()),
        }
    }
}

impl<'a> MakeWriter<'a> for RunLogWriter {
    type Writer = RunLogWriter;

    fn make_writer(&'a self) -> Self::Writer {
        RunLogWriter
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_map_to_levels() {
        assert_eq!(level(0, false), LevelFilter::INFO);
        assert_eq!(level(1, false), LevelFilter::DEBUG);
        assert_eq!(level(2, false), LevelFilter::TRACE);
        assert_eq!(level(5, false), LevelFilter::TRACE);
        assert_eq!(level(0, true), LevelFilter::WARN);
    }

    #[test]
    fn attached_file_receives_the_log_lines() {
        init(0, false);
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("log.txt");
        tracing::info!("before attaching");
        attach_run_log(&path).expect("attach");
        tracing::info!(step = 3, "while attached");
        tracing::debug!("below the level");
        detach_run_log().expect("detach");
        tracing::info!("after detaching");
        let text = std::fs::read_to_string(&path).expect("log written");
        assert!(
            text.contains("while attached") && text.contains("step=3"),
            "{text}"
        );
        assert!(!text.contains("before attaching"), "{text}");
        assert!(!text.contains("after detaching"), "{text}");
        assert!(!text.contains("below the level"), "{text}");
        assert!(text.contains("INFO"), "{text}");
    }
}
