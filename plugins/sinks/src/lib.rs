//! The built-in metric sinks `csv`, `tensorboard` and `console`, and the helpers every sink that keeps a
//! line-oriented file in the run directory shares: strict parameters and file names
//! ([`params`]) and the rule for resumed runs ([`resume`]). The run's own record,
//! `metrics.ndjson`, is the host's (it is written whatever the config says), and uses the
//! same helpers.
//!
//! Each sink is an ordinary implementation of [`codex_plugin_api::Sink`], registered the way a
//! third-party one would be, so the host treats them exactly like plugins: it runs them off the
//! training thread and disables one that fails. File sinks share one rule for resumed runs
//! (module [`resume`]): records after the resume step are superseded, so a metric stream never
//! holds a duplicated or backwards step.

#![warn(missing_docs, unreachable_pub)]

mod console;
mod csv_sink;
pub mod params;
pub mod resume;
pub mod tensorboard;

pub use console::ConsoleSink;
pub use csv_sink::CsvSink;
pub use tensorboard::TensorboardSink;

codex_plugin_api::builtin!(codex_plugin_api::sink::declare::<CsvSink>);
codex_plugin_api::builtin!(codex_plugin_api::sink::declare::<TensorboardSink>);
codex_plugin_api::builtin!(codex_plugin_api::sink::declare::<ConsoleSink>);
