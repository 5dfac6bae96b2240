//! Metric sinks: receive batches of metric records, off the training thread.
//!
//! A record is one number at one step: `{step, split, name, value, time}`. Sinks get records
//! in batches and must not assume anything about timing; an error disables the sink for the
//! rest of the run (with a warning) and never stops training.

use abi_stable::sabi_trait;
use abi_stable::std_types::{RBox, ROption, RResult, RSlice, RStr};
use abi_stable::StableAbi;

use crate::component::{decl, ComponentDecl, Describe, Factory};
use crate::error::{guard, PluginError, Result};

/// One metric value.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// Optimizer step the value belongs to.
    pub step: u64,
    /// `train` or `val`.
    pub split: String,
    /// Metric name: `loss`, `perplexity`, `accuracy`, `lr`, `grad_norm`, `tokens_per_s`, ...
    pub name: String,
    /// The value.
    pub value: f64,
    /// Wall-clock time, unix seconds.
    pub time: f64,
}

/// A [`Record`] as it crosses the ABI, borrowing the caller's strings.
#[repr(C)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq)]
pub struct RecordAbi<'a> {
    /// Optimizer step the value belongs to.
    pub step: u64,
    /// `train` or `val`.
    pub split: RStr<'a>,
    /// Metric name.
    pub name: RStr<'a>,
    /// The value.
    pub value: f64,
    /// Wall-clock time, unix seconds.
    pub time: f64,
}

impl<'a> From<&'a Record> for RecordAbi<'a> {
    fn from(r: &'a Record) -> Self {
        RecordAbi {
            step: r.step,
            split: r.split.as_str().into(),
            name: r.name.as_str().into(),
            value: r.value,
            time: r.time,
        }
    }
}

impl From<&RecordAbi<'_>> for Record {
    fn from(r: &RecordAbi<'_>) -> Self {
        Record {
            step: r.step,
            split: r.split.as_str().to_owned(),
            name: r.name.as_str().to_owned(),
            value: r.value,
            time: r.time,
        }
    }
}

/// Owned copies of records that arrived over the ABI, for the authoring traits.
pub(crate) fn records_from_abi(records: RSlice<'_, RecordAbi<'_>>) -> Vec<Record> {
    records.iter().map(Record::from).collect()
}

/// What the host tells a sink constructor.
#[repr(C)]
#[derive(StableAbi)]
pub struct SinkEnv<'a> {
    /// The run directory (sinks that write files write inside it).
    pub run_dir: RStr<'a>,
    /// When resuming: records after this step are superseded and must be dropped.
    pub resume_step: ROption<u64>,
}

/// The ABI face of a sink.
#[sabi_trait]
pub trait SinkAbi: Send {
    /// Take a batch of records.
    fn write(&mut self, records: RSlice<'_, RecordAbi<'_>>) -> RResult<(), PluginError>;
    /// Make everything written so far durable or visible.
    fn flush(&mut self) -> RResult<(), PluginError>;
    /// The run is over.
    #[sabi(last_prefix_field)]
    fn finish(&mut self) -> RResult<(), PluginError>;
}

/// An owned sink object.
pub type SinkBox = SinkAbi_TO<'static, RBox<()>>;

/// A sink constructor: `(params as JSON, env)`.
pub type SinkFactory = extern "C" fn(RStr<'_>, SinkEnv<'_>) -> RResult<SinkBox, PluginError>;

/// What sink authors implement.
pub trait Sink: Describe + Send + Sized + 'static {
    /// Parse `params` (JSON, strictly) and open.
    fn create(params: &str, run_dir: &str, resume_step: Option<u64>) -> Result<Self>;
    /// Take a batch of records.
    fn write(&mut self, records: &[Record]) -> Result<()>;
    /// Flush.
    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
    /// The run is over.
    fn finish(&mut self) -> Result<()> {
        self.flush()
    }
}

struct Adapter<S>(S);

impl<S: Sink> SinkAbi for Adapter<S> {
    fn write(&mut self, records: RSlice<'_, RecordAbi<'_>>) -> RResult<(), PluginError> {
        guard(S::NAME, "write", || {
            self.0.write(&records_from_abi(records))
        })
    }
    fn flush(&mut self) -> RResult<(), PluginError> {
        guard(S::NAME, "flush", || self.0.flush())
    }
    fn finish(&mut self) -> RResult<(), PluginError> {
        guard(S::NAME, "finish", || self.0.finish())
    }
}

extern "C" fn factory<S: Sink>(
    params: RStr<'_>,
    env: SinkEnv<'_>,
) -> RResult<SinkBox, PluginError> {
    guard(S::NAME, "create", || {
        let s = S::create(
            params.as_str(),
            env.run_dir.as_str(),
            env.resume_step.into_option(),
        )?;
        Ok(SinkAbi_TO::from_value(
            Adapter(s),
            abi_stable::sabi_trait::TD_Opaque,
        ))
    })
}

/// The declaration of sink type `S`.
pub fn declare<S: Sink>() -> ComponentDecl {
    decl::<S>(Factory::Sink(factory::<S>))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// What the test sink was given, by the adapter.
    static SEEN: Mutex<Vec<Record>> = Mutex::new(Vec::new());

    struct Keep;

    impl Describe for Keep {
        const NAME: &'static str = "keep";
        const VERSION: &'static str = "0.0.0";
        const DESCRIPTION: &'static str = "keeps what it is given";
    }

    impl Sink for Keep {
        fn create(_: &str, run_dir: &str, resume_step: Option<u64>) -> Result<Self> {
            assert_eq!((run_dir, resume_step), ("runs/x", Some(7)));
            Ok(Keep)
        }
        fn write(&mut self, records: &[Record]) -> Result<()> {
            SEEN.lock().unwrap().extend_from_slice(records);
            Ok(())
        }
    }

    #[test]
    fn records_reach_a_sink_as_they_were_sent() {
        let Factory::Sink(factory) = declare::<Keep>().factory else {
            panic!("a sink declares a sink factory");
        };
        let env = SinkEnv {
            run_dir: RStr::from("runs/x"),
            resume_step: ROption::RSome(7),
        };
        let mut sink = factory(RStr::from(""), env).unwrap();
        let sent = vec![
            Record {
                step: 8,
                split: "train".into(),
                name: "loss".into(),
                value: 2.5,
                time: 1.0,
            },
            Record {
                step: 8,
                split: "val".into(),
                name: "perplexity".into(),
                value: f64::INFINITY,
                time: 2.0,
            },
        ];
        let abi: Vec<RecordAbi<'_>> = sent.iter().map(RecordAbi::from).collect();
        sink.write(RSlice::from_slice(&abi)).unwrap();
        sink.finish().unwrap();
        assert_eq!(*SEEN.lock().unwrap(), sent);
    }
}
