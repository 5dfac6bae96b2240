//! Experiment trackers: follow a run's lifecycle — parameters, metrics, artifacts, status.
//!
//! Where a sink is a stream of numbers, a tracker is a record of a whole run in some external
//! system (an MLflow store, say). Like sinks they run off the training thread, and an error
//! disables the tracker for the rest of the run with a warning.
//!
//! A resumed run is announced with [`Tracker::resume`] instead of `start`, with the step of
//! the checkpoint it continues from: a tracker then continues the run it recorded before (where
//! its system allows) and drops what it holds after that step, since the resumed run records
//! those steps again.

use abi_stable::sabi_trait;
use abi_stable::std_types::{RBox, RResult, RSlice, RStr, RString, RVec, Tuple2};
use abi_stable::StableAbi;

use crate::component::{decl, ComponentDecl, Describe, Factory};
use crate::error::{guard, PluginError, Result};
use crate::sink::{records_from_abi, Record, RecordAbi};

/// The run being tracked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunInfo {
    /// Experiment name (from the config).
    pub experiment: String,
    /// Run id (the run directory's name).
    pub run_id: String,
    /// The run directory.
    pub run_dir: String,
}

/// A [`RunInfo`] as it crosses the ABI.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct RunInfoAbi {
    /// Experiment name.
    pub experiment: RString,
    /// Run id.
    pub run_id: RString,
    /// The run directory.
    pub run_dir: RString,
}

impl From<&RunInfo> for RunInfoAbi {
    fn from(r: &RunInfo) -> Self {
        RunInfoAbi {
            experiment: r.experiment.as_str().into(),
            run_id: r.run_id.as_str().into(),
            run_dir: r.run_dir.as_str().into(),
        }
    }
}

impl From<RunInfoAbi> for RunInfo {
    fn from(r: RunInfoAbi) -> Self {
        RunInfo {
            experiment: r.experiment.into_string(),
            run_id: r.run_id.into_string(),
            run_dir: r.run_dir.into_string(),
        }
    }
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
    /// The run started.
    fn start(&mut self, run: RunInfoAbi) -> RResult<(), PluginError>;
    /// The run resumed from its checkpoint at `step` (instead of `start`); what was recorded
    /// after `step` is superseded.
    fn resume(&mut self, run: RunInfoAbi, step: u64) -> RResult<(), PluginError>;
    /// Flattened configuration values, `("optimizer.lr", "0.0003")`.
    fn log_params(
        &mut self,
        params: RSlice<'_, Tuple2<RString, RString>>,
    ) -> RResult<(), PluginError>;
    /// A batch of metric records.
    fn log_metrics(&mut self, records: RSlice<'_, RecordAbi<'_>>) -> RResult<(), PluginError>;
    /// A file produced by the run (path inside the run directory).
    fn log_artifact(&mut self, path: RStr<'_>) -> RResult<(), PluginError>;
    /// The run ended.
    #[sabi(last_prefix_field)]
    fn finish(&mut self, status: RunStatus) -> RResult<(), PluginError>;
    /// Messages for the person running the run since the last call (API 2.1; a 2.0 plugin
    /// has none).
    fn take_notices(&mut self) -> RVec<RString> {
        RVec::new()
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
    /// Messages for the person running the run, gathered since the last call: what they
    /// should know but that is no reason to stop tracking (the tracker's server went away,
    /// and came back). The host asks after every call and shows each message once, as a
    /// warning naming the tracker. Default: none.
    fn take_notices(&mut self) -> Vec<String> {
        Vec::new()
    }
}

struct Adapter<T>(T);

impl<T: Tracker> TrackerAbi for Adapter<T> {
    fn start(&mut self, run: RunInfoAbi) -> RResult<(), PluginError> {
        guard(T::NAME, "start", || self.0.start(&run.into()))
    }
    fn resume(&mut self, run: RunInfoAbi, step: u64) -> RResult<(), PluginError> {
        guard(T::NAME, "resume", || self.0.resume(&run.into(), step))
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
    fn log_metrics(&mut self, records: RSlice<'_, RecordAbi<'_>>) -> RResult<(), PluginError> {
        guard(T::NAME, "log_metrics", || {
            self.0.log_metrics(&records_from_abi(records))
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
    fn take_notices(&mut self) -> RVec<RString> {
        // A panic here loses the notices, nothing else.
        guard(T::NAME, "take_notices", || Ok(self.0.take_notices()))
            .into_result()
            .map(|notices| notices.into_iter().map(RString::from).collect())
            .unwrap_or_default()
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
