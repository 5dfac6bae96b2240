//! Text that comes from a plugin, made safe to print.
//!
//! A plugin's strings (its name, its errors, its log lines) end up on a terminal and in the
//! run's log. Raw, they could forge lines (a newline followed by a fake warning), drive the
//! terminal (ESC sequences) or make text read other than it is (bidirectional overrides), and
//! a huge one would be copied whole before anyone cut it. [`clean`] is the one function the
//! host passes every such string through, whatever the plugin's origin.
//!
//! Host-only: plugin authors have no use for it.

use std::fmt::Write;

/// `text` with every control character (newlines and ESC included), bidirectional control,
/// line or paragraph separator and invisible format character escaped as `\n`, `\r`, `\t` or
/// `\u{..}`, and cut to about `max_bytes` bytes of output with a note saying how long it was.
///
/// Only the part that is kept is read, so cleaning a string of many megabytes costs no more
/// than cleaning its first `max_bytes`.
pub fn clean(text: &str, max_bytes: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max_bytes) + 16);
    for c in text.chars() {
        if out.len() >= max_bytes {
            let _ = write!(out, "… (cut, {} bytes in all)", text.len());
            return out;
        }
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// Characters that change how the text around them is shown rather than showing themselves.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            // Arabic letter mark, Mongolian vowel separator.
            '\u{061c}' | '\u{180e}'
            // Zero-width space, joiners, left-to-right and right-to-left marks.
            | '\u{200b}'..='\u{200f}'
            // Line and paragraph separators; embeddings and overrides (LRE, RLE, PDF, LRO, RLO).
            | '\u{2028}'..='\u{202e}'
            // Word joiner, invisible operators; isolates (LRI, RLI, FSI, PDI) and the
            // deprecated format characters after them.
            | '\u{2060}'..='\u{206f}'
            // Byte order mark, interlinear annotation.
            | '\u{feff}' | '\u{fff9}'..='\u{fffb}'
        )
}

#[cfg(test)]
mod tests {
    use super::clean;

    fn check(input: &str, max: usize, expect: &str) {
        assert_eq!(clean(input, max), expect, "{input:?}");
    }

    #[test]
    fn control_and_bidi_characters_are_escaped() {
        check("plain text, é ü 漢字", 100, "plain text, é ü 漢字");
        check("a\nb\r\tc", 100, "a\\nb\\r\\tc");
        check("\u{1b}[31mred\u{7}", 100, "\\u{1b}[31mred\\u{7}");
        check("\u{202e}gnp.exe\u{202c}", 100, "\\u{202e}gnp.exe\\u{202c}");
        check(
            "\u{2066}x\u{2069}\u{200f}\u{2028}",
            100,
            "\\u{2066}x\\u{2069}\\u{200f}\\u{2028}",
        );
        check("\u{85}\u{9b}\u{feff}", 100, "\\u{85}\\u{9b}\\u{feff}");
    }

    #[test]
    fn long_text_is_cut_with_its_length() {
        check("abcdef", 3, "abc… (cut, 6 bytes in all)");
        check("abc", 3, "abc");
        // Cut on a character, never inside one.
        check("ééé", 3, "éé… (cut, 6 bytes in all)");
    }

    #[test]
    fn a_huge_text_costs_only_what_is_kept() {
        let huge = "x".repeat(40 << 20);
        let cleaned = clean(&huge, 1024);
        assert!(cleaned.len() < 1100, "{}", cleaned.len());
        assert!(cleaned.ends_with("(cut, 41943040 bytes in all)"));
    }
}
