//! The experiment config parser: strict RON into the raw types, then `--set` overrides.
//!
//! Input: the config text, then optionally NUL-separated `--set` arguments
//! (`CONFIG\0train.max_steps=5\0optimizer.lr=1e-3`). Properties: no panic; an error renders to
//! a short message; a config that parses is written back as RON (as a run's `config.ron` is)
//! and reads back to the same value.
#![no_main]

use std::path::Path;

use codex_formats::config::{self, Override, Params, RawConfig};
use codex_formats::diagnostics::ron_options;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts = text.split('\0');
    let source = parts.next().unwrap_or_default();
    let overrides: Vec<Override> = parts.filter_map(|arg| arg.parse().ok()).collect();
    let path = Path::new("fuzz.ron");
    match config::parse(path, source, &overrides) {
        Ok(raw) => round_trip(&raw),
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.lines().count() <= 8,
                "an error of {} lines: {message}",
                message.lines().count()
            );
        }
    }
});

/// What the host writes into a run directory must read back as the same config.
fn round_trip(raw: &RawConfig) {
    let pretty = ron::ser::PrettyConfig::default();
    let Ok(written) = Params::writing_ron(|| ron_options().to_string_pretty(raw, pretty)) else {
        return;
    };
    let back: RawConfig = match config::parse(Path::new("written.ron"), &written, &[]) {
        Ok(back) => back,
        Err(e) => panic!("the written config does not parse: {e}\n{written}"),
    };
    // Compared as JSON, the form overrides and trackers use (NaN is not equal to itself).
    assert_eq!(
        serde_json::to_value(raw).ok(),
        serde_json::to_value(&back).ok(),
        "the written config reads back differently:\n{written}"
    );
}
