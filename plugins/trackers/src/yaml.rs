//! The one YAML shape an MLflow file store keeps in its `meta.yaml` files: a flat mapping of
//! scalars. A YAML library would be a large dependency for that; this writes what PyYAML's
//! `safe_dump` reads back to the same values, and reads what both it and PyYAML write.
//!
//! Writing: keys sorted (as `safe_dump` sorts them), strings single-quoted (or double-quoted
//! with JSON escapes when they hold control characters), integers plain, `null`, `[]`.
//! Reading: `key: value` lines, a value folded over indented continuation lines (PyYAML wraps
//! long scalars), quoted or plain. Updating ([`set_fields`]) edits only the named keys and keeps
//! every other line as it was, so fields written by other MLflow versions survive.

use std::collections::BTreeMap;

/// A scalar value of a `meta.yaml` field.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Scalar {
    /// A string.
    Str(String),
    /// An integer.
    Int(i64),
    /// `null`.
    Null,
    /// `[]` (the legacy `tags` field).
    EmptyList,
}

impl Scalar {
    fn render(&self) -> String {
        match self {
            Scalar::Str(s) if s.chars().any(char::is_control) => {
                serde_json::to_string(s).unwrap_or_else(|_| "''".to_string())
            }
            Scalar::Str(s) => format!("'{}'", s.replace('\'', "''")),
            Scalar::Int(i) => i.to_string(),
            Scalar::Null => "null".to_string(),
            Scalar::EmptyList => "[]".to_string(),
        }
    }
}

/// The mapping as YAML text, keys sorted.
pub(crate) fn write(fields: &[(&str, Scalar)]) -> String {
    let mut sorted: Vec<&(&str, Scalar)> = fields.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let mut out = String::new();
    for (key, value) in sorted {
        out.push_str(key);
        out.push_str(": ");
        out.push_str(&value.render());
        out.push('\n');
    }
    out
}

/// The top-level fields of a flat mapping: key → the scalar's text, `None` for `null`.
pub(crate) fn read(text: &str) -> BTreeMap<String, Option<String>> {
    let mut out = BTreeMap::new();
    for (key, raw) in entries(text) {
        out.insert(key, unquote(&raw));
    }
    out
}

/// `text` with each of `fields` set to its value (added at the end when absent), every other
/// line unchanged.
pub(crate) fn set_fields(text: &str, fields: &[(&str, Scalar)]) -> String {
    let mut out = String::new();
    let mut done = vec![false; fields.len()];
    let mut skipping = false;
    for line in text.lines() {
        if skipping && line.starts_with([' ', '\t']) {
            continue; // a continuation of a value being replaced
        }
        skipping = false;
        let key = top_level_key(line);
        match key.and_then(|k| fields.iter().position(|(f, _)| *f == k)) {
            Some(i) => {
                out.push_str(&format!("{}: {}\n", fields[i].0, fields[i].1.render()));
                done[i] = true;
                skipping = true;
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    for (i, (key, value)) in fields.iter().enumerate() {
        if !done[i] {
            out.push_str(&format!("{key}: {}\n", value.render()));
        }
    }
    out
}

fn top_level_key(line: &str) -> Option<&str> {
    if line.starts_with([' ', '\t', '#', '-']) {
        return None;
    }
    let (key, _) = line.split_once(':')?;
    (!key.is_empty()).then_some(key.trim_end())
}

/// `(key, raw value text)` pairs, continuation lines folded in with one space.
fn entries(text: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = out.last_mut() {
                let more = line.trim();
                if !more.is_empty() {
                    if !value.is_empty() {
                        value.push(' ');
                    }
                    value.push_str(more);
                }
            }
            continue;
        }
        if let Some(key) = top_level_key(line) {
            let value = line[key.len()..].trim_start_matches(':').trim();
            out.push((key.to_string(), value.to_string()));
        }
    }
    out
}

fn unquote(raw: &str) -> Option<String> {
    let raw = raw.trim();
    if let Some(inner) = raw.strip_prefix('\'').and_then(|r| r.strip_suffix('\'')) {
        return Some(inner.replace("''", "'"));
    }
    if raw.starts_with('"') {
        return Some(serde_json::from_str::<String>(raw).unwrap_or_else(|_| raw.to_string()));
    }
    match raw {
        "" | "null" | "~" => None,
        plain => Some(plain.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_sorted_and_quoted() {
        let text = write(&[
            ("name", Scalar::Str("it's".into())),
            ("experiment_id", Scalar::Str("12".into())),
            ("end_time", Scalar::Null),
            ("status", Scalar::Int(1)),
            ("tags", Scalar::EmptyList),
            ("note", Scalar::Str("a\nb".into())),
        ]);
        assert_eq!(
            text,
            "end_time: null\nexperiment_id: '12'\nname: 'it''s'\nnote: \"a\\nb\"\nstatus: 1\ntags: []\n"
        );
    }

    #[test]
    fn reads_back_what_it_writes_and_what_pyyaml_writes() {
        let ours = write(&[
            ("name", Scalar::Str("it's: here".into())),
            ("id", Scalar::Str("007".into())),
            ("end_time", Scalar::Null),
            ("status", Scalar::Int(3)),
        ]);
        let m = read(&ours);
        assert_eq!(m["name"].as_deref(), Some("it's: here"));
        assert_eq!(m["id"].as_deref(), Some("007"));
        assert_eq!(m["end_time"], None);
        assert_eq!(m["status"].as_deref(), Some("3"));

        // PyYAML: plain scalars, and long values folded onto indented lines.
        let pyyaml = "artifact_location: file:///a/very/long/path/that/pyyaml/wraps/at/eighty\n  /columns\nexperiment_id: '0'\nlifecycle_stage: active\nname: Default\n";
        let m = read(pyyaml);
        assert_eq!(m["name"].as_deref(), Some("Default"));
        assert_eq!(m["experiment_id"].as_deref(), Some("0"));
        assert_eq!(
            m["artifact_location"].as_deref(),
            Some("file:///a/very/long/path/that/pyyaml/wraps/at/eighty /columns")
        );
    }

    #[test]
    fn set_fields_edits_only_the_named_keys() {
        let text = "end_time: null\nother: 'x'\nstatus: 1\nwrapped: 'a\n  b'\n";
        let out = set_fields(
            text,
            &[
                ("status", Scalar::Int(3)),
                ("wrapped", Scalar::Str("c".into())),
                ("added", Scalar::Int(5)),
            ],
        );
        assert_eq!(
            out,
            "end_time: null\nother: 'x'\nstatus: 3\nwrapped: 'c'\nadded: 5\n"
        );
    }
}
