//! `tokenizer.json` loading as the `hf` tokenizer does it (plugins/tokenizers/src/hf.rs,
//! `parse_json`): the JSON syntax checked first, then the `tokenizers` crate with the host's
//! features; then one encode and decode with whatever loaded.
//!
//! The syntax check is there because tokenizers 0.23 panics on a syntax error inside the
//! `decoder` object; keep the two in step.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if serde_json::from_str::<serde::de::IgnoredAny>(text).is_err() {
        return;
    }
    let Ok(tokenizer) = text.parse::<tokenizers::Tokenizer>() else {
        return;
    };
    let _ = tokenizer.get_vocab_size(true);
    if let Ok(encoding) = tokenizer.encode("fn main() { println!(\"héllo\"); }\n", false) {
        let _ = tokenizer.decode(encoding.get_ids(), false);
    }
});
