//! The built-in run trackers: `mlflow`.
//!
//! Each tracker is an ordinary implementation of [`codex_plugin_api::Tracker`], registered the
//! way a third-party one would be, so the host treats it exactly like a plugin: it runs it off
//! the training thread and disables it for the rest of the run if it fails.

#![warn(missing_docs, unreachable_pub)]

mod mlflow;
mod yaml;

pub use mlflow::MlflowTracker;

codex_plugin_api::builtin!(codex_plugin_api::tracker::declare::<MlflowTracker>);
