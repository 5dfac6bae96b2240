//! `--set PATH=VALUE` overrides: parsing the path and the value, and setting them on the JSON
//! tree of the raw config before it is read back into the raw types, so a bad value is reported
//! by its path and blamed on the override that set it.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde_json::{Map, Value};

use super::raw::RawConfig;
use super::ConfigError;
use crate::diagnostics::{
    backticked, did_you_mean, field_path, join_field, plain_words, ron_options, shorten,
};

/// One `--set PATH=VALUE` override.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    /// The argument as given, for messages.
    pub arg: String,
    /// The dotted path as given (`train.max_steps`, `sinks[0].name`).
    pub path: String,
    segments: Vec<Segment>,
    /// The value text as given.
    pub value: String,
}

#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Key(String),
    Index(usize),
}

impl FromStr for Override {
    type Err = String;

    fn from_str(arg: &str) -> Result<Self, Self::Err> {
        let Some((path, value)) = arg.split_once('=') else {
            return Err(format!(
                "`{}` is not PATH=VALUE; write it like `train.max_steps=500`",
                shorten(arg, 120)
            ));
        };
        let path = path.trim();
        let segments =
            parse_path(path).map_err(|why| format!("bad path `{}`: {why}", shorten(path, 120)))?;
        Ok(Override {
            arg: arg.to_owned(),
            path: canonical(&segments),
            segments,
            value: value.to_owned(),
        })
    }
}

impl fmt::Display for Override {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.arg)
    }
}

/// The path in the form errors use: `sinks[0].name` (never `sinks.0.name`).
fn canonical(segments: &[Segment]) -> String {
    let mut out = String::new();
    for segment in segments {
        match segment {
            Segment::Key(key) => {
                out = join_field(&out, key);
            }
            Segment::Index(index) => out.push_str(&format!("[{index}]")),
        }
    }
    out
}

/// Whether `field` is `path`, inside it, or contains it (`train` and `train.seq_len`).
pub fn related(field: &str, path: &str) -> bool {
    let inside = |outer: &str, inner: &str| {
        inner == outer
            || outer.is_empty()
            || inner
                .strip_prefix(outer)
                .is_some_and(|rest| rest.starts_with(['.', '[']))
    };
    inside(path, field) || inside(field, path)
}

/// Deepest override path accepted: far more than any config needs, and few enough that the
/// nested value it builds cannot exhaust the stack when it is read back.
const MAX_DEPTH: usize = 64;

/// `a.b[2].c` or `a.b.2.c` → keys and indices.
fn parse_path(path: &str) -> Result<Vec<Segment>, String> {
    if path.is_empty() {
        return Err("the path is empty; name a field like `train.max_steps`".to_owned());
    }
    let mut segments = Vec::new();
    for part in path.split('.') {
        let (key, mut rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if key.is_empty() && rest.is_empty() {
            return Err("empty segment; separate fields with single dots".to_owned());
        }
        if !key.is_empty() {
            match key.parse::<usize>() {
                Ok(index) => segments.push(Segment::Index(index)),
                Err(_) => segments.push(Segment::Key(key.to_owned())),
            }
        }
        while !rest.is_empty() {
            let close = rest
                .find(']')
                .ok_or_else(|| "unclosed `[`; write indices like `sinks[0]`".to_owned())?;
            let index = rest[1..close]
                .parse::<usize>()
                .map_err(|_| format!("`{}` is not a list index", shorten(&rest[..=close], 40)))?;
            segments.push(Segment::Index(index));
            rest = &rest[close + 1..];
            if !rest.is_empty() && !rest.starts_with('[') {
                return Err(format!("unexpected `{}` after an index", shorten(rest, 40)));
            }
        }
    }
    if segments.len() > MAX_DEPTH {
        return Err(format!(
            "more than {MAX_DEPTH} levels deep; no config field is nested that deeply"
        ));
    }
    Ok(segments)
}

/// Read an override value: a RON literal (`500`, `3e-4`, `true`, `"text"`, `[1, 2]`,
/// `(a: 1)`, `None`), else the text itself as a string (`cosine`, `my run`, `cuda:0`).
fn parse_value(text: &str) -> Value {
    let trimmed = text.trim();
    // ron reads a bare identifier as a unit value, which JSON would turn into null; here it is
    // the name of something (an enum variant, a component), so keep it as a string.
    let bare_identifier = trimmed.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && trimmed
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_');
    if bare_identifier && !matches!(trimmed, "true" | "false" | "None") {
        return Value::String(trimmed.to_owned());
    }
    ron_options()
        .from_str::<Value>(trimmed)
        .unwrap_or_else(|_| Value::String(text.to_owned()))
}

/// Apply `overrides` in order to `raw`, then read the result back into the raw types; a bad
/// value is reported by its field path and blamed on the override that set it.
pub fn apply_overrides(raw: RawConfig, overrides: &[Override]) -> Result<RawConfig, ConfigError> {
    let mut tree = serde_json::to_value(&raw).map_err(|e| ConfigError::Override {
        arg: overrides.first().map(|o| o.arg.clone()).unwrap_or_default(),
        message: format!("the config cannot take overrides: {e}"),
    })?;
    // Sections created by earlier overrides (absent from the file) take any key here; the
    // typed pass below checks them.
    let mut created = BTreeSet::new();
    for o in overrides {
        set(&mut tree, o, &mut created).map_err(|message| ConfigError::Override {
            arg: o.arg.clone(),
            message,
        })?;
    }
    serde_path_to_error::deserialize::<_, RawConfig>(tree).map_err(|e| {
        let field = field_path(e.path());
        let message = plain_words(&e.into_inner().to_string());
        // The last override touching this field (or a parent of it) is the one to blame.
        let culprit = overrides.iter().rev().find(|o| related(&field, &o.path));
        match culprit {
            Some(o) => ConfigError::OverrideValue {
                arg: o.arg.clone(),
                field: if field.is_empty() {
                    o.path.clone()
                } else {
                    field
                },
                message,
            },
            None => ConfigError::OverrideValue {
                arg: overrides
                    .iter()
                    .map(|o| o.arg.as_str())
                    .collect::<Vec<_>>()
                    .join(" --set "),
                field,
                message,
            },
        }
    })
}

/// Set one override in the JSON form of the raw config.
fn set(tree: &mut Value, o: &Override, created: &mut BTreeSet<String>) -> Result<(), String> {
    let mut node = tree;
    let mut walked = String::new();
    // Below `params` (and inside sections the file left out) keys are not known here; the
    // typed pass that follows, or the component itself, checks them.
    let mut free_form = false;
    for segment in &o.segments {
        if node.is_null() {
            *node = match segment {
                Segment::Key(_) => Value::Object(Map::new()),
                Segment::Index(_) => Value::Array(Vec::new()),
            };
            created.insert(walked.clone());
        }
        free_form |= created.contains(&walked);
        node = match (node, segment) {
            (Value::Object(map), Segment::Key(key)) => {
                if !free_form && !map.contains_key(key) {
                    return Err(unknown_key(&walked, key, map));
                }
                walked = join_field(&walked, key);
                free_form |= key == "params";
                map.entry(key.clone()).or_insert(Value::Null)
            }
            (Value::Array(items), Segment::Index(index)) => {
                walked.push_str(&format!("[{index}]"));
                if *index == items.len() {
                    // One past the end appends, so a list can grow: `sinks[2]=(name: "csv")`.
                    items.push(Value::Null);
                }
                let len = items.len();
                items.get_mut(*index).ok_or_else(|| {
                    format!("`{walked}` is out of range: the list has {len} entries (index from 0)")
                })?
            }
            (Value::Object(_), Segment::Index(index)) => {
                return Err(format!(
                    "`{}` is a section, not a list; `[{index}]` cannot index it",
                    display_root(&walked)
                ));
            }
            (Value::Array(items), Segment::Key(key)) => {
                return Err(format!(
                    "`{walked}` is a list of {} entries; index it like `{walked}[0]`, not `.{key}`",
                    items.len()
                ));
            }
            (_, _) => {
                return Err(format!(
                    "`{walked}` is a single value, not a section; set it with `--set {walked}=VALUE`"
                ));
            }
        };
    }
    *node = parse_value(&o.value);
    Ok(())
}

fn display_root(walked: &str) -> &str {
    if walked.is_empty() {
        "the config"
    } else {
        walked
    }
}

fn unknown_key(walked: &str, key: &str, map: &Map<String, Value>) -> String {
    let mut message = format!("unknown field `{}`", join_field(walked, key));
    if let Some(s) = did_you_mean(key, map.keys().map(String::as_str)) {
        message.push_str(&format!(", did you mean `{}`?", join_field(walked, s)));
    }
    message.push_str(&format!(
        "; fields of {}: {}",
        display_root(walked),
        backticked(map.keys().map(String::as_str))
    ));
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn override_paths_parse_into_keys_and_indices() {
        let check = |arg: &str, expect: Vec<Segment>, value: &str| {
            let o: Override = arg.parse().unwrap_or_else(|e| panic!("{arg}: {e}"));
            assert_eq!(o.segments, expect, "{arg}");
            assert_eq!(o.value, value, "{arg}");
        };
        let key = |k: &str| Segment::Key(k.to_owned());
        check("seed=1", vec![key("seed")], "1");
        check(
            "train.max_steps=5",
            vec![key("train"), key("max_steps")],
            "5",
        );
        check(
            "sinks[1].name=csv",
            vec![key("sinks"), Segment::Index(1), key("name")],
            "csv",
        );
        check(
            "sinks.1.name=csv",
            vec![key("sinks"), Segment::Index(1), key("name")],
            "csv",
        );
        check(
            "a[0][2]=x=y",
            vec![key("a"), Segment::Index(0), Segment::Index(2)],
            "x=y",
        );
    }

    #[test]
    fn malformed_overrides_are_refused() {
        for (arg, expect) in [
            ("seed", "is not PATH=VALUE"),
            ("=3", "the path is empty"),
            ("train..seq_len=3", "empty segment"),
            ("sinks[x]=3", "is not a list index"),
            ("sinks[0=3", "unclosed"),
            ("sinks[0]x=3", "after an index"),
        ] {
            let error = arg.parse::<Override>().expect_err(arg);
            assert!(error.contains(expect), "{arg}: {error}");
        }
    }

    #[test]
    fn override_values_are_ron_literals_or_strings() {
        for (text, expect) in [
            ("500", serde_json::json!(500)),
            ("3e-4", serde_json::json!(3e-4)),
            ("-2", serde_json::json!(-2)),
            ("true", serde_json::json!(true)),
            ("None", Value::Null),
            ("\"quoted\"", serde_json::json!("quoted")),
            ("[1, 2]", serde_json::json!([1, 2])),
            ("(a: 1)", serde_json::json!({"a": 1})),
            ("cosine", serde_json::json!("cosine")),
            ("cuda:0", serde_json::json!("cuda:0")),
            ("my run", serde_json::json!("my run")),
            ("", serde_json::json!("")),
        ] {
            assert_eq!(parse_value(text), expect, "{text:?}");
        }
    }
}
