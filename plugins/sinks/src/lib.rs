//! The built-in metric sinks: `ndjson`, `csv` and `console`.
//!
//! Each sink is an ordinary implementation of [`codex_plugin_api::Sink`], registered the way a
//! third-party one would be, so the host treats them exactly like plugins: it runs them off the
//! training thread and disables one that fails. The two file sinks share one rule for resumed
//! runs (module `resume`): records after the resume step are superseded, so a metric stream never
//! holds a duplicated or backwards step.

#![warn(missing_docs, unreachable_pub)]

mod console;
mod csv_sink;
mod ndjson;
mod params;
mod resume;

pub use console::ConsoleSink;
pub use csv_sink::CsvSink;
pub use ndjson::NdjsonSink;

codex_plugin_api::builtin!(codex_plugin_api::sink::declare::<NdjsonSink>);
codex_plugin_api::builtin!(codex_plugin_api::sink::declare::<CsvSink>);
codex_plugin_api::builtin!(codex_plugin_api::sink::declare::<ConsoleSink>);
