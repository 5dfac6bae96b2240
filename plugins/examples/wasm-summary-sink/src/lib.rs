//! A metric sink, sandboxed in WebAssembly, that writes a markdown summary of the best value of
//! every metric into the one output file the manifest grants it.
//!
//! It keeps one small entry per `(split, name)` and writes the table once, in `finish`: the
//! output file is append-only and quota-limited, so writing a summary once is the honest use
//! of it. Lower is better for losses and perplexity, higher for everything whose name says
//! accuracy; other metrics show their last value only.
//!
//! Parameters (JSON, from the experiment config): `title` (default "Run summary").

use std::collections::BTreeMap;
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
    /// Heading of the summary. Default: "Run summary".
    #[serde(default = "default_title")]
    title: String,
}

fn default_title() -> String {
    "Run summary".to_owned()
}

#[derive(Clone, Copy, PartialEq)]
enum Better {
    Lower,
    Higher,
    Neither,
}

fn better(name: &str) -> Better {
    if name.contains("loss") || name.contains("perplexity") {
        Better::Lower
    } else if name.contains("accuracy") {
        Better::Higher
    } else {
        Better::Neither
    }
}

struct Entry {
    best: Option<(f64, u64)>,
    last: (f64, u64),
    count: u64,
    non_finite: u64,
}

struct Summary {
    title: String,
    entries: BTreeMap<(String, String), Entry>,
}

static STATE: Mutex<Option<Summary>> = Mutex::new(None);

fn with_state<T>(f: impl FnOnce(&mut Summary) -> Result<T, String>) -> Result<T, String> {
    let mut guard = STATE.lock().map_err(|_| "state poisoned".to_owned())?;
    match guard.as_mut() {
        Some(state) => f(state),
        None => Err("called before init".to_owned()),
    }
}

fn fmt_value(v: f64) -> String {
    if v.is_finite() && v.abs() >= 1e-3 && v.abs() < 1e6 {
        format!("{v:.4}")
    } else {
        format!("{v:e}")
    }
}

impl Summary {
    fn take(&mut self, m: Metric) {
        let rule = better(&m.name);
        let entry = self
            .entries
            .entry((m.split, m.name))
            .or_insert(Entry {
                best: None,
                last: (m.value, m.step),
                count: 0,
                non_finite: 0,
            });
        entry.count += 1;
        entry.last = (m.value, m.step);
        if !m.value.is_finite() {
            entry.non_finite += 1;
            return;
        }
        let improves = match (entry.best, rule) {
            (_, Better::Neither) => false,
            (None, _) => true,
            (Some((b, _)), Better::Lower) => m.value < b,
            (Some((b, _)), Better::Higher) => m.value > b,
        };
        if improves {
            entry.best = Some((m.value, m.step));
        }
    }

    fn markdown(&self) -> String {
        let mut out = format!("# {}\n\n", self.title);
        out.push_str("| split | metric | best | at step | last | at step | records |\n");
        out.push_str("|---|---|---|---|---|---|---|\n");
        for ((split, name), e) in &self.entries {
            let (best, best_step) = match e.best {
                Some((v, s)) => (fmt_value(v), s.to_string()),
                None => ("–".to_owned(), "–".to_owned()),
            };
            out.push_str(&format!(
                "| {split} | {name} | {best} | {best_step} | {} | {} | {} |\n",
                fmt_value(e.last.0),
                e.last.1,
                e.count
            ));
        }
        let bad: u64 = self.entries.values().map(|e| e.non_finite).sum();
        if bad > 0 {
            out.push_str(&format!("\n{bad} values were NaN or infinite.\n"));
        }
        out
    }
}

struct Component;

impl Guest for Component {
    fn name() -> String {
        "summary".to_owned()
    }

    fn version() -> String {
        env!("CARGO_PKG_VERSION").to_owned()
    }

    fn init(params: String, _resume_step: Option<u64>) -> Result<(), String> {
        let params: Params = serde_json::from_str(&params)
            .map_err(|e| format!("invalid params: {e}; expected {{\"title\": \"...\"}}"))?;
        let mut guard = STATE.lock().map_err(|_| "state poisoned".to_owned())?;
        *guard = Some(Summary {
            title: params.title,
            entries: BTreeMap::new(),
        });
        Ok(())
    }

    fn write(records: Vec<Metric>) -> Result<(), String> {
        with_state(|s| {
            for m in records {
                s.take(m);
            }
            Ok(())
        })
    }

    fn flush() -> Result<(), String> {
        Ok(())
    }

    fn finish() -> Result<(), String> {
        let text = with_state(|s| Ok(s.markdown()))?;
        host::write_output(text.as_bytes());
        Ok(())
    }
}

export!(Component);
