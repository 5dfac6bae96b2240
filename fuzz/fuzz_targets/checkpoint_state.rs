//! A checkpoint's `trainer_state.json`: parsing and the format-version check. A state that
//! parses is written back as the host writes it and must read back the same.
#![no_main]

use std::path::Path;

use codex_formats::checkpoint::parse_state;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("trainer_state.json");
    match parse_state(path, text) {
        Ok(state) => {
            let written = serde_json::to_string_pretty(&state).expect("plain data serialises");
            let back = parse_state(path, &written)
                .unwrap_or_else(|e| panic!("the written state does not parse: {e}\n{written}"));
            assert_eq!(
                serde_json::to_value(&state).ok(),
                serde_json::to_value(&back).ok()
            );
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
