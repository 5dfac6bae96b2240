//! The progress display of a run: a bar on a terminal (validation results printed above it),
//! plain log lines every `log_every` steps otherwise, so a redirected stderr reads well too;
//! `log.txt` gets the lines either way.

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

/// The progress display: a bar on a terminal, plain log lines otherwise.
pub(crate) struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    every: u64,
    started: Instant,
    first_step: Option<u64>,
}

impl Progress {
    pub(crate) fn new(total: u64, enabled: bool, every: u64) -> Progress {
        let bar = (enabled && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(total);
            if let Ok(style) = ProgressStyle::with_template(
                "{elapsed_precise} [{wide_bar}] {pos}/{len} {msg} eta {eta}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            crate::logging::show_progress_bar(Some(bar.clone()));
            bar
        });
        Progress {
            bar,
            total,
            every: every.max(1),
            started: Instant::now(),
            first_step: None,
        }
    }

    pub(crate) fn update(&mut self, step: u64, loss: f64, lr: f64, tokens_per_s: f64) {
        let first = *self.first_step.get_or_insert(step.saturating_sub(1));
        if let Some(bar) = &self.bar {
            bar.set_position(step);
            // The bar takes what the terminal's width leaves: this stays short, so that the
            // line fits 80 columns with room for a bar.
            bar.set_message(format!(
                "loss {loss:.4} lr {lr:.1e} {tokens_per_s:.0} tok/s"
            ));
        }
        // Every `log_every` steps a line: on stderr when no bar stands for it, in `log.txt`
        // always.
        if step.is_multiple_of(self.every) || step == self.total {
            let done = step.saturating_sub(first).max(1) as f64;
            let per_step = self.started.elapsed().as_secs_f64() / done;
            let eta = per_step * self.total.saturating_sub(step) as f64;
            tracing::info!(
                target: crate::logging::PROGRESS,
                "step {step}/{} loss {loss:.4} lr {lr:.2e} {tokens_per_s:.0} tok/s eta {}",
                self.total,
                format_duration(eta)
            );
        }
    }

    /// Report an evaluation: above the bar on a terminal, and as a log line.
    pub(crate) fn evaluated(&self, step: u64, loss: f64) {
        let line = format!(
            "step {step}/{} validation loss {loss:.4} (perplexity {:.2})",
            self.total,
            loss.exp()
        );
        if let Some(bar) = &self.bar {
            bar.println(&line);
        }
        tracing::info!(target: crate::logging::PROGRESS, "{line}");
    }

    pub(crate) fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            crate::logging::show_progress_bar(None);
            bar.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    /// A run that fails mid-way leaves no bar behind for later lines to be written around.
    fn drop(&mut self) {
        self.finish();
    }
}

fn format_duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}
