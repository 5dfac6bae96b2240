//! Writing the config back: component params as one-line RON literals in the `config.ron` of a
//! run directory, and as they are in the JSON tree that overrides and trackers work on.

use std::borrow::Cow;
use std::cell::Cell;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;

/// A component's own parameters: free-form here, read and checked by the component. Carried
/// as JSON — an object, or null for none (`params: ()`, or left out) — and written by
/// the host's `Config::to_ron` as a one-line RON struct (`(n_layer: 2)`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(transparent)]
pub struct Params(pub Value);

thread_local! {
    /// Set while the host's `Config::to_ron` serialises: params are then written
    /// as RON structs, and left out when there are none. Every other serialisation (the JSON
    /// tree overrides and trackers work on) carries them as they are.
    static WRITING_RON: Cell<bool> = const { Cell::new(false) };
}

impl Params {
    /// Serialise with `f` as RON: params as RON literals, empty ones left out.
    pub fn writing_ron<T>(f: impl FnOnce() -> T) -> T {
        struct Restore(bool);
        impl Drop for Restore {
            fn drop(&mut self) {
                WRITING_RON.set(self.0);
            }
        }
        let _restore = Restore(WRITING_RON.replace(true));
        f()
    }

    fn is_empty(&self) -> bool {
        self.0.as_object().is_none_or(|m| m.is_empty())
    }

    /// Left out of the RON form when there are none, as the file may do.
    pub fn omitted(&self) -> bool {
        WRITING_RON.get() && self.is_empty()
    }
}

impl Serialize for Params {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if !WRITING_RON.get() {
            return self.0.serialize(serializer);
        }
        let text = ron_literal(&self.0);
        let raw = ron::value::RawValue::from_boxed_ron(text.into_boxed_str())
            .map_err(|e| serde::ser::Error::custom(format!("params as RON: {e}")))?;
        raw.serialize(serializer)
    }
}

impl JsonSchema for Params {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        "Params".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "type": ["object", "null"] })
    }
}

/// A JSON value as a one-line RON literal that parses back into the same JSON value.
fn ron_literal(value: &Value) -> String {
    match value {
        Value::Null => "None".to_owned(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => ron::to_string(s).unwrap_or_else(|_| format!("{s:?}")),
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(ron_literal).collect();
            format!("[{}]", items.join(", "))
        }
        Value::Object(map) if map.is_empty() => "{}".to_owned(),
        Value::Object(map) if map.keys().all(|k| is_identifier(k)) => {
            let fields: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{k}: {}", ron_literal(v)))
                .collect();
            format!("({})", fields.join(", "))
        }
        Value::Object(map) => {
            let entries: Vec<String> = map
                .iter()
                .map(|(k, v)| {
                    format!(
                        "{}: {}",
                        ron_literal(&Value::String(k.clone())),
                        ron_literal(v)
                    )
                })
                .collect();
            format!("{{{}}}", entries.join(", "))
        }
    }
}

fn is_identifier(key: &str) -> bool {
    key.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !matches!(key, "true" | "false" | "None" | "Some" | "inf" | "NaN")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_literals_parse_back_to_the_same_json() {
        let cases = [
            serde_json::json!({"n_layer": 2, "dropout": 0.1, "name": "x \"q\"", "tied": true}),
            serde_json::json!({"nested": {"a": [1, 2.5, null]}, "empty": {}}),
            serde_json::json!({"with space": 1, "true": 2}),
            serde_json::json!({"list": [], "neg": -3, "big": 1e300}),
        ];
        for value in cases {
            let text = ron_literal(&value);
            let back: Value = crate::diagnostics::ron_options()
                .from_str(&text)
                .unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(back, value, "through {text}");
        }
    }
}
