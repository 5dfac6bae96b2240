//! The plugin manifest parser and its validation (names, pins, limits, capabilities).
//!
//! Plugin paths resolve against a directory that does not exist, so every entry that passes
//! validation ends in a "cannot read" error: the fuzzer exercises parsing, not the disk.
#![no_main]

use std::path::Path;

use codex_formats::manifest::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = Manifest::from_source(Path::new("/nonexistent/codex-fuzz/plugins.ron"), text) {
        let message = e.to_string();
        assert!(
            message.lines().count() <= 8,
            "an error of {} lines: {message}",
            message.lines().count()
        );
    }
});
