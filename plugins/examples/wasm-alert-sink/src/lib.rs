//! A metric sink, sandboxed in WebAssembly, that logs an alert when the training loss becomes
//! NaN (or infinite) or spikes far above its recent average.
//!
//! It needs only the `log_lines` capability. Because going past that quota disables the sink,
//! it rations itself: the non-finite alert fires once, spike alerts at most `max_alerts` times.
//!
//! Parameters (JSON, from the experiment config), all optional:
//! - `metric`: the metric to watch (default `loss`), in split `split` (default `train`);
//! - `spike_factor`: a value above this many times the mean of the previous `window` values is
//!   a spike (default 3.0, window 20, and at least 5 values are needed first);
//! - `max_alerts`: most spike alerts over the run (default 5).

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::Deserialize;

wit_bindgen::generate!({
    path: "../../../plugin-api/wit",
    world: "metric-sink",
});

use codex::sink::host;
use exports::codex::sink::sink::{Guest, Metric};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    #[serde(default = "default_metric")]
    metric: String,
    #[serde(default = "default_split")]
    split: String,
    #[serde(default = "default_factor")]
    spike_factor: f64,
    #[serde(default = "default_window")]
    window: usize,
    #[serde(default = "default_max_alerts")]
    max_alerts: u32,
}

fn default_metric() -> String {
    "loss".to_owned()
}
fn default_split() -> String {
    "train".to_owned()
}
fn default_factor() -> f64 {
    3.0
}
fn default_window() -> usize {
    20
}
fn default_max_alerts() -> u32 {
    5
}

/// Values needed before a spike can be judged.
const MIN_HISTORY: usize = 5;

struct Watch {
    params: Params,
    recent: VecDeque<f64>,
    non_finite_reported: bool,
    spikes_reported: u32,
}

static STATE: Mutex<Option<Watch>> = Mutex::new(None);

impl Watch {
    /// The alert to log for `m`, if any.
    fn check(&mut self, m: &Metric) -> Option<String> {
        if m.name != self.params.metric || m.split != self.params.split {
            return None;
        }
        if !m.value.is_finite() {
            if self.non_finite_reported {
                return None;
            }
            self.non_finite_reported = true;
            return Some(format!(
                "ALERT {}/{} became {} at step {}; training has diverged",
                m.split, m.name, m.value, m.step
            ));
        }
        let mut alert = None;
        if self.recent.len() >= MIN_HISTORY && self.spikes_reported < self.params.max_alerts {
            let mean = self.recent.iter().sum::<f64>() / self.recent.len() as f64;
            if mean > 0.0 && m.value > self.params.spike_factor * mean {
                self.spikes_reported += 1;
                alert = Some(format!(
                    "ALERT {}/{} spiked to {:.4} at step {} ({:.1}x the mean {:.4} of the last {} values)",
                    m.split,
                    m.name,
                    m.value,
                    m.step,
                    m.value / mean,
                    mean,
                    self.recent.len()
                ));
            }
        }
        self.recent.push_back(m.value);
        while self.recent.len() > self.params.window.max(1) {
            self.recent.pop_front();
        }
        alert
    }
}

struct Component;

impl Guest for Component {
    fn name() -> String {
        "alert".to_owned()
    }

    fn version() -> String {
        env!("CARGO_PKG_VERSION").to_owned()
    }

    fn init(params: String, _resume_step: Option<u64>) -> Result<(), String> {
        let params: Params = serde_json::from_str(&params).map_err(|e| {
            format!(
                "invalid params: {e}; known fields: metric, split, spike_factor, window, max_alerts"
            )
        })?;
        if !(params.spike_factor > 1.0) {
            return Err(format!(
                "spike_factor must be above 1, found {}",
                params.spike_factor
            ));
        }
        let mut guard = STATE.lock().map_err(|_| "state poisoned".to_owned())?;
        *guard = Some(Watch {
            params,
            recent: VecDeque::new(),
            non_finite_reported: false,
            spikes_reported: 0,
        });
        Ok(())
    }

    fn write(records: Vec<Metric>) -> Result<(), String> {
        let mut guard = STATE.lock().map_err(|_| "state poisoned".to_owned())?;
        let watch = guard.as_mut().ok_or("called before init")?;
        for m in &records {
            if let Some(line) = watch.check(m) {
                host::log(&line);
            }
        }
        Ok(())
    }

    fn flush() -> Result<(), String> {
        Ok(())
    }

    fn finish() -> Result<(), String> {
        Ok(())
    }
}

export!(Component);
