//! Experiment trackers: follow a run's lifecycle — parameters, metrics, artifacts, status.
//!
//! Where a sink is a stream of numbers, a tracker is a record of a whole run in some external
//! system (an MLflow store, say). Like sinks they run off the training thread, and an error
//! disables the tracker for the rest of the run with a warning.
//!
//! A resumed run is announced with [`TrackerAbi::resume`] instead of `start`, with the step of
//! the checkpoint it continues from: a tracker then continues the run it recorded before (where
//! its system allows) and drops what it holds after that step, since the resumed run records
//! those steps again. `resume` came after the first release (plugin API 1.1), so it sits after
//! the vtable's last prefix field with a default: a tracker built against 1.0 has no `resume`
//! and is told `start`, as before.

use abi_stable::sabi_trait;
use abi_stable::std_types::{RBox, RResult, RSlice, RStr, RString, Tuple2};
use abi_stable::StableAbi;

use crate::component::{decl, ComponentDecl, Describe, Factory};
use crate::error::{guard, PluginError, Result};
use crate::sink::Record;

/// The run being tracked.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct RunInfo {
    /// Experiment name (from the config).
    pub experiment: RString,
    /// Run id (the run directory's name).
    pub run_id: RString,
    /// The run directory.
    pub run_dir: RString,
}

/// How a run ended.
#[repr(u8)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq)]
pub enum RunStatus {
    /// Reached its last step.
    Finished,
    /// Stopped by an error.
    Failed,
    /// Stopped by the user (Ctrl-C); resumable.
    Killed,
}

/// The ABI face of a tracker.
#[sabi_trait]
pub trait TrackerAbi: Send {
    /// The run started (or resumed).
    fn start(&mut self, run: RunInfo) -> RResult<(), PluginError>;
    /// Flattened configuration values, `("optimizer.lr", "0.0003")`.
    fn log_params(
        &mut self,
        params: RSlice<'_, Tuple2<RString, RString>>,
    ) -> RResult<(), PluginError>;
    /// A batch of metric records.
    fn log_metrics(&mut self, records: RSlice<'_, Record>) -> RResult<(), PluginError>;
    /// A file produced by the run (path inside the run directory).
    fn log_artifact(&mut self, path: RStr<'_>) -> RResult<(), PluginError>;
    /// The run ended.
    #[sabi(last_prefix_field)]
    fn finish(&mut self, status: RunStatus) -> RResult<(), PluginError>;
    /// The run resumed from its checkpoint at `step` (instead of `start`); what was recorded
    /// after `step` is superseded. Plugin API 1.1; trackers built against 1.0 get `start`.
    fn resume(&mut self, run: RunInfo, step: u64) -> RResult<(), PluginError> {
        let _ = step;
        self.start(run)
    }
}

/// An owned tracker object.
pub type TrackerBox = TrackerAbi_TO<'static, RBox<()>>;

/// A tracker constructor: `(params as JSON)`.
pub type TrackerFactory = extern "C" fn(RStr<'_>) -> RResult<TrackerBox, PluginError>;

/// What tracker authors implement.
pub trait Tracker: Describe + Send + Sized + 'static {
    /// Parse `params` (JSON, strictly).
    fn create(params: &str) -> Result<Self>;
    /// The run started.
    fn start(&mut self, run: &RunInfo) -> Result<()>;
    /// The run resumed from its checkpoint at `step`: continue the run recorded before where
    /// possible, and drop what was recorded after `step` (the resumed run records it again).
    /// Default: treat it as a fresh start.
    fn resume(&mut self, run: &RunInfo, step: u64) -> Result<()> {
        let _ = step;
        self.start(run)
    }
    /// Configuration values.
    fn log_params(&mut self, params: &[(String, String)]) -> Result<()>;
    /// Metric records.
    fn log_metrics(&mut self, records: &[Record]) -> Result<()>;
    /// An artifact.
    fn log_artifact(&mut self, path: &str) -> Result<()>;
    /// The run ended.
    fn finish(&mut self, status: RunStatus) -> Result<()>;
}

struct Adapter<T>(T);

impl<T: Tracker> TrackerAbi for Adapter<T> {
    fn start(&mut self, run: RunInfo) -> RResult<(), PluginError> {
        guard(T::NAME, "start", || self.0.start(&run))
    }
    fn log_params(
        &mut self,
        params: RSlice<'_, Tuple2<RString, RString>>,
    ) -> RResult<(), PluginError> {
        guard(T::NAME, "log_params", || {
            let params: Vec<(String, String)> = params
                .iter()
                .map(|t| (t.0.to_string(), t.1.to_string()))
                .collect();
            self.0.log_params(&params)
        })
    }
    fn log_metrics(&mut self, records: RSlice<'_, Record>) -> RResult<(), PluginError> {
        guard(T::NAME, "log_metrics", || {
            self.0.log_metrics(records.as_slice())
        })
    }
    fn log_artifact(&mut self, path: RStr<'_>) -> RResult<(), PluginError> {
        guard(T::NAME, "log_artifact", || {
            self.0.log_artifact(path.as_str())
        })
    }
    fn finish(&mut self, status: RunStatus) -> RResult<(), PluginError> {
        guard(T::NAME, "finish", || self.0.finish(status))
    }
    fn resume(&mut self, run: RunInfo, step: u64) -> RResult<(), PluginError> {
        guard(T::NAME, "resume", || self.0.resume(&run, step))
    }
}

extern "C" fn factory<T: Tracker>(params: RStr<'_>) -> RResult<TrackerBox, PluginError> {
    guard(T::NAME, "create", || {
        let t = T::create(params.as_str())?;
        Ok(TrackerAbi_TO::from_value(
            Adapter(t),
            abi_stable::sabi_trait::TD_Opaque,
        ))
    })
}

/// The declaration of tracker type `T`.
pub fn declare<T: Tracker>() -> ComponentDecl {
    decl::<T>(Factory::Tracker(factory::<T>))
}
