//! `console`: readable metric lines on stderr, for runs watched in a terminal or a job log.
//!
//! Records of one step and split arrive one metric at a time; the sink gathers them into one
//! line (`step 120 val: loss=2.3100 perplexity=10.0744 accuracy=0.4123`) and prints it when
//! the next step or split begins, or when the run finishes. A flush does not end a line: the
//! host flushes whenever its queue runs dry, which may fall between two records of one step.
//! Validation lines are always printed; training
//! lines at most once every `train_every` steps, because the progress bar already shows them.

use std::io::Write;

use codex_plugin_api::{Describe, Error, Record, Result, Sink};
use serde::Deserialize;

use crate::params;

/// Parameters of the `console` sink.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, default)]
struct ConsoleParams {
    /// Print training metrics at most once every this many steps (0: never). Default: 1, i.e.
    /// every step the trainer logs.
    train_every: u64,
}

impl Default for ConsoleParams {
    fn default() -> Self {
        ConsoleParams { train_every: 1 }
    }
}

/// Prints metric records to stderr.
pub struct ConsoleSink {
    train_every: u64,
    last_train: Option<u64>,
    pending: Option<Group>,
}

struct Group {
    step: u64,
    split: String,
    /// False for a training group skipped by the cadence: its records are swallowed.
    shown: bool,
    values: Vec<(String, f64)>,
}

impl Describe for ConsoleSink {
    const NAME: &'static str = "console";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "validation (and, optionally, training) metrics as readable lines on stderr";

    fn check_params(params: &str) -> codex_plugin_api::Result<()> {
        codex_plugin_api::strict::parse_params::<ConsoleParams>(params).map(drop)
    }
}

/// Four decimals where that reads well, scientific notation for tiny learning rates, whole
/// numbers for throughputs.
fn number(x: f64) -> String {
    let a = x.abs();
    if !x.is_finite() {
        format!("{x}")
    } else if a >= 1e4 {
        format!("{x:.0}")
    } else if a != 0.0 && a < 1e-3 {
        format!("{x:.3e}")
    } else {
        format!("{x:.4}")
    }
}

fn render(g: &Group) -> Option<String> {
    if !g.shown {
        return None;
    }
    let mut line = format!("step {} {}:", g.step, g.split);
    for (name, value) in &g.values {
        line.push(' ');
        line.push_str(name);
        line.push('=');
        line.push_str(&number(*value));
    }
    Some(line)
}

impl ConsoleSink {
    fn wanted(&mut self, step: u64, split: &str) -> bool {
        if split != "train" {
            return true;
        }
        if self.train_every == 0 {
            return false;
        }
        let due = match self.last_train {
            None => true,
            Some(last) => step < last || step >= last + self.train_every,
        };
        if due {
            self.last_train = Some(step);
        }
        due
    }

    /// Lines completed by `records`, in order.
    fn lines(&mut self, records: &[Record]) -> Vec<String> {
        let mut out = Vec::new();
        for r in records {
            let same = self
                .pending
                .as_ref()
                .is_some_and(|g| g.step == r.step && g.split == r.split.as_str());
            if same {
                if let Some(g) = self.pending.as_mut() {
                    g.values.push((r.name.to_string(), r.value));
                }
                continue;
            }
            out.extend(self.pending.take().as_ref().and_then(render));
            let shown = self.wanted(r.step, r.split.as_str());
            self.pending = Some(Group {
                step: r.step,
                split: r.split.to_string(),
                shown,
                values: vec![(r.name.to_string(), r.value)],
            });
        }
        out
    }

    fn print(lines: &[String]) -> Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let stderr = std::io::stderr();
        let mut err = stderr.lock();
        for l in lines {
            writeln!(err, "{l}").map_err(|e| Error::msg(format!("cannot write to stderr: {e}")))?;
        }
        Ok(())
    }
}

impl Sink for ConsoleSink {
    fn create(params: &str, _run_dir: &str, _resume_step: Option<u64>) -> Result<Self> {
        let p: ConsoleParams = params::parse(Self::NAME, params)?;
        Ok(ConsoleSink {
            train_every: p.train_every,
            last_train: None,
            pending: None,
        })
    }

    fn write(&mut self, records: &[Record]) -> Result<()> {
        let lines = self.lines(records);
        Self::print(&lines)
    }

    fn finish(&mut self) -> Result<()> {
        let line: Vec<String> = self
            .pending
            .take()
            .as_ref()
            .and_then(render)
            .into_iter()
            .collect();
        Self::print(&line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(step: u64, split: &str, name: &str, value: f64) -> Record {
        Record {
            step,
            split: split.into(),
            name: name.into(),
            value,
            time: 0.0,
        }
    }

    fn check(train_every: u64, records: &[Record], expect: &[&str]) {
        let mut s = ConsoleSink {
            train_every,
            last_train: None,
            pending: None,
        };
        let mut got: Vec<String> = s.lines(records);
        got.extend(s.pending.take().as_ref().and_then(render));
        assert_eq!(got, expect);
    }

    #[test]
    fn groups_one_line_per_step_and_split() {
        check(
            1,
            &[
                rec(10, "train", "loss", 2.5),
                rec(10, "train", "lr", 3e-4),
                rec(10, "val", "loss", 2.25),
                rec(10, "val", "perplexity", 9.4877),
            ],
            &[
                "step 10 train: loss=2.5000 lr=3.000e-4",
                "step 10 val: loss=2.2500 perplexity=9.4877",
            ],
        );
    }

    #[test]
    fn train_lines_follow_the_cadence_and_val_lines_always_print() {
        let records: Vec<Record> = (1..=6)
            .flat_map(|s| [rec(s, "train", "loss", 1.0), rec(s, "val", "loss", 2.0)])
            .collect();
        check(
            3,
            &records,
            &[
                "step 1 train: loss=1.0000",
                "step 1 val: loss=2.0000",
                "step 2 val: loss=2.0000",
                "step 3 val: loss=2.0000",
                "step 4 train: loss=1.0000",
                "step 4 val: loss=2.0000",
                "step 5 val: loss=2.0000",
                "step 6 val: loss=2.0000",
            ],
        );
        check(0, &records[..2], &["step 1 val: loss=2.0000"]);
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(number(123456.7), "123457");
        assert_eq!(number(0.5), "0.5000");
        assert_eq!(number(0.0), "0.0000");
        assert_eq!(number(f64::NAN), "NaN");
    }
}
