//! Metric sinks: receive batches of metric records, off the training thread.
//!
//! A record is one number at one step: `{step, split, name, value, time}`. Sinks get records
//! in batches and must not assume anything about timing; an error disables the sink for the
//! rest of the run (with a warning) and never stops training.

use abi_stable::sabi_trait;
use abi_stable::std_types::{RBox, RResult, RSlice, RStr, RString};
use abi_stable::StableAbi;

use crate::component::{decl, ComponentDecl, Describe, Factory};
use crate::error::{guard, PluginError, Result};

/// One metric value.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct Record {
    /// Optimizer step the value belongs to.
    pub step: u64,
    /// `train` or `val`.
    pub split: RString,
    /// Metric name: `loss`, `perplexity`, `accuracy`, `lr`, `grad_norm`, `tokens_per_s`, ...
    pub name: RString,
    /// The value.
    pub value: f64,
    /// Wall-clock time, unix seconds.
    pub time: f64,
}

/// What the host tells a sink constructor.
#[repr(C)]
#[derive(StableAbi)]
pub struct SinkEnv<'a> {
    /// The run directory (sinks that write files write inside it).
    pub run_dir: RStr<'a>,
    /// When resuming: records after this step are superseded and must be dropped.
    pub resume_step: abi_stable::std_types::ROption<u64>,
}

/// The ABI face of a sink.
#[sabi_trait]
pub trait SinkAbi: Send {
    /// Take a batch of records.
    fn write(&mut self, records: RSlice<'_, Record>) -> RResult<(), PluginError>;
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
    fn write(&mut self, records: RSlice<'_, Record>) -> RResult<(), PluginError> {
        guard(S::NAME, "write", || self.0.write(records.as_slice()))
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
