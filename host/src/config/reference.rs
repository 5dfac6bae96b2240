//! The field reference of `docs/config.md`, rendered from the raw types: their JSON Schema (doc
//! comments and types) and their serde shape (field order).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::diagnostics::join_field;
use codex_formats::config::RawConfig;

/// The field reference of `docs/config.md`, rendered from the raw types: a table per section
/// in the order the file is written, each row from a field's doc comment (its meaning, and
/// its default or "Required.") and its JSON Schema type. Shared shapes (components, data
/// sources) get one section each.
pub fn reference() -> String {
    let schema = schemars::schema_for!(RawConfig).to_value();
    Reference::new(&schema, shape::of::<RawConfig>()).render()
}

/// What [`reference()`] renders from: the JSON Schema (doc comments and types, but no field
/// order) and the serde shape (field order).
struct Reference<'a> {
    root: &'a Value,
    shape: shape::Shape,
    /// The paths each struct or enum appears at, by type name.
    paths: BTreeMap<&'static str, Vec<String>>,
}

impl<'a> Reference<'a> {
    fn new(root: &'a Value, shape: shape::Shape) -> Self {
        let mut paths: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
        for (path, node) in shape.iter() {
            paths.entry(node.name()).or_default().push(path.to_owned());
        }
        Reference { root, shape, paths }
    }

    fn render(&self) -> String {
        let mut out = String::new();
        let mut done = BTreeSet::new();
        self.section("", &mut done, &mut out);
        out
    }

    /// The schema of the type named `name` (the root's title, or an entry of `$defs`).
    fn definition(&self, name: &str) -> &'a Value {
        if self.root["title"] == name {
            self.root
        } else {
            &self.root["$defs"][name]
        }
    }

    /// Whether the type named `name` appears at several paths: its section is then named by
    /// its label (`component`), which is also the type shown for those fields.
    fn shared(&self, name: &str) -> bool {
        self.paths.get(name).is_some_and(|p| p.len() > 1)
    }

    /// The section of the type at `path` (once per type), then those of the types inside it.
    fn section(&self, path: &str, done: &mut BTreeSet<&'static str>, out: &mut String) {
        let Some(node) = self.shape.get(path) else {
            return;
        };
        if !done.insert(node.name()) {
            return;
        }
        let definition = self.definition(node.name());
        if !enum_values(definition).is_empty() {
            // An enum of plain names: its values are its type, shown inline.
            return;
        }
        let shared = self.shared(node.name());
        let shown_at = |p: &str| format!("`{}`", p.replace("[]", "[i]"));
        let heading = if path.is_empty() {
            "Top level".to_owned()
        } else if shared {
            let at: Vec<String> = self.paths[node.name()]
                .iter()
                .map(|p| shown_at(p))
                .collect();
            let label = label(node.name());
            let (first, rest) = label.split_at(label.len().min(1));
            format!("{}{rest}: {}", first.to_uppercase(), at.join(", "))
        } else {
            shown_at(path)
        };
        out.push_str(&format!("### {heading}\n\n"));
        if !path.is_empty() {
            out.push_str(&format!("{}\n\n", text(definition)));
        }
        let mut inner = Vec::new();
        match node {
            shape::Node::Struct { fields, .. } => {
                out.push_str("| field | type | default | meaning |\n|---|---|---|---|\n");
                for field in *fields {
                    let schema = &definition["properties"][field];
                    let (meaning, default) = split_default(&text(schema));
                    let shown = if shared || path.is_empty() {
                        (*field).to_owned()
                    } else {
                        format!("{path}.{field}")
                    };
                    out.push_str(&format!(
                        "| `{shown}` | {} | {} | {} |\n",
                        self.type_of(schema),
                        cell(&default),
                        cell(&meaning)
                    ));
                    inner.push(join_field(path, field));
                }
            }
            shape::Node::Enum { variants, .. } => {
                out.push_str("| written as | meaning |\n|---|---|\n");
                let choices = definition["oneOf"]
                    .as_array()
                    .map_or(&[][..], Vec::as_slice);
                for variant in *variants {
                    let Some(schema) = choices.iter().find(|c| !c["properties"][variant].is_null())
                    else {
                        continue;
                    };
                    let body = &schema["properties"][variant];
                    let fields = match self.shape.get(&format!("{path}.{variant}")) {
                        Some(shape::Node::Struct { fields, .. }) => *fields,
                        _ => &[],
                    };
                    let fields: Vec<String> = fields
                        .iter()
                        .map(|f| format!("{f}: {}", self.type_of(&body["properties"][f])))
                        .collect();
                    out.push_str(&format!(
                        "| `{variant}({})` | {} |\n",
                        fields.join(", "),
                        cell(&text(schema))
                    ));
                }
            }
        }
        out.push('\n');
        for path in inner {
            for nested in [path.clone(), format!("{path}[]")] {
                self.section(&nested, done, out);
            }
        }
    }

    /// A field's type in plain words: `integer`, `string`, `[source]`, `struct`, the names of
    /// an enum's values. Optional values show the type they hold.
    fn type_of(&self, schema: &Value) -> String {
        let schema = match schema["anyOf"].as_array() {
            Some(choices) => choices
                .iter()
                .find(|c| c["type"] != "null")
                .unwrap_or(schema),
            None => schema,
        };
        if let Some(reference) = schema["$ref"].as_str() {
            let name = reference.rsplit('/').next().unwrap_or(reference);
            let definition = self.definition(name);
            let values = enum_values(definition);
            return if !values.is_empty() {
                let values: Vec<String> = values.iter().map(|v| format!("`{v}`")).collect();
                match values.split_last() {
                    Some((last, [])) => last.clone(),
                    Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
                    None => String::new(),
                }
            } else if let Some(choices) = definition["anyOf"].as_array() {
                // An untagged enum: one of several shapes.
                let kinds: Vec<String> = choices.iter().map(|c| self.type_of(c)).collect();
                kinds.join(" or ")
            } else if self.shared(name) {
                label(name)
            } else {
                "struct".to_owned()
            };
        }
        let kinds: Vec<&str> = match &schema["type"] {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        match kinds.iter().find(|k| **k != "null") {
            Some(&"array") => format!("[{}]", self.type_of(&schema["items"])),
            Some(&"object") => "struct".to_owned(),
            Some(kind) => (*kind).to_owned(),
            None => "any".to_owned(),
        }
    }
}

/// A doc comment as schemars keeps it (title and description), on one line.
fn text(schema: &Value) -> String {
    let parts = [&schema["title"], &schema["description"]];
    let parts: Vec<&str> = parts.iter().filter_map(|p| p.as_str()).collect();
    parts
        .join(" ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// A field's doc comment split into its meaning and its default: the text after the last
/// "Default:", or "required" for one that ends with "Required.".
fn split_default(doc: &str) -> (String, String) {
    if let Some(meaning) = doc.strip_suffix("Required.") {
        return (meaning.trim().to_owned(), "required".to_owned());
    }
    match doc.rsplit_once("Default:") {
        Some((meaning, default)) => (
            meaning.trim().to_owned(),
            default.trim().trim_end_matches('.').to_owned(),
        ),
        None => (doc.to_owned(), String::new()),
    }
}

/// The values of an enum of plain names (`constant`, `linear`, `cosine`); empty otherwise.
fn enum_values(schema: &Value) -> Vec<String> {
    if let Some(values) = schema["enum"].as_array() {
        return values
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect();
    }
    let Some(choices) = schema["oneOf"].as_array() else {
        return Vec::new();
    };
    let values: Vec<String> = choices
        .iter()
        .filter_map(|c| c["const"].as_str().map(str::to_owned))
        .collect();
    if values.len() == choices.len() {
        values
    } else {
        Vec::new()
    }
}

/// A type's name for readers: `RawComponent` → `component`, `Source` → `source`.
fn label(name: &str) -> String {
    name.strip_prefix("Raw").unwrap_or(name).to_lowercase()
}

/// Text safe inside a table cell.
fn cell(text: &str) -> String {
    text.replace('|', "\\|")
}

/// The shape of a serde type as its `Deserialize` declares it: every struct's fields and every
/// enum's variants, in declaration order, by path (`train`, `train.schedule`, `sinks[]` for
/// the entries of a list, `data.train[].Text` for a struct variant). JSON Schema objects are
/// unordered; this is the order the file is written in. Found by deserialising the type from a
/// probe that offers every field.
pub(super) mod shape {
    use std::collections::BTreeMap;
    use std::fmt;

    use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, Visitor};

    /// A struct or an enum, by its serde name.
    #[derive(Debug)]
    pub(in crate::config) enum Node {
        Struct {
            name: &'static str,
            fields: &'static [&'static str],
        },
        Enum {
            name: &'static str,
            variants: &'static [&'static str],
        },
    }

    impl Node {
        pub(super) fn name(&self) -> &'static str {
            match self {
                Node::Struct { name, .. } | Node::Enum { name, .. } => name,
            }
        }
    }

    /// The structs and enums of a type by path, and the paths in the order they were found
    /// (declaration order, depth first).
    #[derive(Debug, Default)]
    pub(in crate::config) struct Shape {
        nodes: BTreeMap<String, Node>,
        order: Vec<String>,
    }

    impl Shape {
        pub(in crate::config) fn get(&self, path: &str) -> Option<&Node> {
            self.nodes.get(path)
        }

        /// Every path with its node, in the order found.
        pub(super) fn iter(&self) -> impl Iterator<Item = (&str, &Node)> {
            self.order.iter().map(|p| (p.as_str(), &self.nodes[p]))
        }

        fn record(&mut self, path: &str, node: Node) {
            if !self.nodes.contains_key(path) {
                self.nodes.insert(path.to_owned(), node);
                self.order.push(path.to_owned());
            }
        }
    }

    /// The shape of `T`, every variant of every enum visited.
    pub(in crate::config) fn of<T: DeserializeOwned>() -> Shape {
        let mut found = Shape::default();
        let mut pass = 0;
        loop {
            // The probe gives each field a value; what `T` makes of them does not matter.
            let _ = T::deserialize(Probe {
                found: &mut found,
                path: String::new(),
                pass,
            });
            pass += 1;
            let most = found
                .nodes
                .values()
                .map(|n| match n {
                    Node::Enum { variants, .. } => variants.len(),
                    Node::Struct { .. } => 1,
                })
                .max()
                .unwrap_or(1);
            if pass >= most {
                return found;
            }
        }
    }

    #[derive(Debug)]
    struct Stop(String);

    impl fmt::Display for Stop {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(&self.0)
        }
    }

    impl std::error::Error for Stop {}

    impl de::Error for Stop {
        fn custom<T: fmt::Display>(msg: T) -> Self {
            Stop(msg.to_string())
        }
    }

    /// Deserializer methods that offer a fixed plain value.
    macro_rules! plain {
        ($de:lifetime; $($method:ident => $visit:ident($value:expr),)*) => {$(
            fn $method<V: Visitor<$de>>(self, visitor: V) -> Result<V::Value, Stop> {
                visitor.$visit($value)
            }
        )*};
    }

    /// Offers a plain value of whatever type is asked for; in pass N, variant N of an enum.
    struct Probe<'a> {
        found: &'a mut Shape,
        path: String,
        pass: usize,
    }

    impl Probe<'_> {
        fn at(&mut self, path: String) -> Probe<'_> {
            Probe {
                found: self.found,
                path,
                pass: self.pass,
            }
        }
    }

    impl<'de> de::Deserializer<'de> for Probe<'_> {
        type Error = Stop;

        fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Stop> {
            visitor.visit_unit()
        }

        plain! {
            'de;
            deserialize_bool => visit_bool(false),
            deserialize_i8 => visit_i64(0),
            deserialize_i16 => visit_i64(0),
            deserialize_i32 => visit_i64(0),
            deserialize_i64 => visit_i64(0),
            deserialize_u8 => visit_u64(0),
            deserialize_u16 => visit_u64(0),
            deserialize_u32 => visit_u64(0),
            deserialize_u64 => visit_u64(0),
            deserialize_f32 => visit_f64(0.0),
            deserialize_f64 => visit_f64(0.0),
            deserialize_char => visit_char(' '),
            deserialize_str => visit_str(""),
            deserialize_string => visit_str(""),
            deserialize_bytes => visit_bytes(&[]),
            deserialize_byte_buf => visit_bytes(&[]),
        }

        fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Stop> {
            visitor.visit_map(Fields {
                probe: self,
                fields: &[],
                next: 0,
            })
        }

        fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Stop> {
            visitor.visit_some(self)
        }

        fn deserialize_newtype_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            visitor: V,
        ) -> Result<V::Value, Stop> {
            visitor.visit_newtype_struct(self)
        }

        fn deserialize_seq<V: Visitor<'de>>(mut self, visitor: V) -> Result<V::Value, Stop> {
            let path = format!("{}[]", self.path);
            visitor.visit_seq(One(Some(self.at(path))))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            name: &'static str,
            fields: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, Stop> {
            self.found.record(&self.path, Node::Struct { name, fields });
            visitor.visit_map(Fields {
                probe: self,
                fields,
                next: 0,
            })
        }

        fn deserialize_enum<V: Visitor<'de>>(
            self,
            name: &'static str,
            variants: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, Stop> {
            self.found.record(&self.path, Node::Enum { name, variants });
            let Some(variant) = variants.get(self.pass % variants.len().max(1)) else {
                return Err(de::Error::custom("an enum without variants"));
            };
            visitor.visit_enum(Variant {
                probe: self,
                variant,
            })
        }

        serde::forward_to_deserialize_any! {
            i128 u128 unit unit_struct tuple tuple_struct identifier ignored_any
        }
    }

    /// A list of one entry.
    struct One<'a>(Option<Probe<'a>>);

    impl<'de> de::SeqAccess<'de> for One<'_> {
        type Error = Stop;

        fn next_element_seed<T: DeserializeSeed<'de>>(
            &mut self,
            seed: T,
        ) -> Result<Option<T::Value>, Stop> {
            self.0
                .take()
                .map(|probe| seed.deserialize(probe))
                .transpose()
        }
    }

    /// Every field of a struct, in order.
    struct Fields<'a> {
        probe: Probe<'a>,
        fields: &'static [&'static str],
        next: usize,
    }

    impl<'de> de::MapAccess<'de> for Fields<'_> {
        type Error = Stop;

        fn next_key_seed<K: DeserializeSeed<'de>>(
            &mut self,
            seed: K,
        ) -> Result<Option<K::Value>, Stop> {
            match self.fields.get(self.next) {
                Some(field) => seed.deserialize(field.into_deserializer()).map(Some),
                None => Ok(None),
            }
        }

        fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Stop> {
            let field = self.fields[self.next];
            self.next += 1;
            let path = super::join_field(&self.probe.path, field);
            seed.deserialize(self.probe.at(path))
        }
    }

    /// The variant an enum's probe picked.
    struct Variant<'a> {
        probe: Probe<'a>,
        variant: &'static str,
    }

    impl<'de, 'a> de::EnumAccess<'de> for Variant<'a> {
        type Error = Stop;
        type Variant = Self;

        fn variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<(S::Value, Self), Stop> {
            let value = seed.deserialize(self.variant.into_deserializer())?;
            Ok((value, self))
        }
    }

    impl<'de> de::VariantAccess<'de> for Variant<'_> {
        type Error = Stop;

        fn unit_variant(self) -> Result<(), Stop> {
            Ok(())
        }

        fn newtype_variant_seed<T: DeserializeSeed<'de>>(
            mut self,
            seed: T,
        ) -> Result<T::Value, Stop> {
            let path = format!("{}.{}", self.probe.path, self.variant);
            seed.deserialize(self.probe.at(path))
        }

        fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, Stop> {
            visitor.visit_seq(One(None))
        }

        fn struct_variant<V: Visitor<'de>>(
            mut self,
            fields: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, Stop> {
            let path = format!("{}.{}", self.probe.path, self.variant);
            let name = self.variant;
            self.probe
                .found
                .record(&path, Node::Struct { name, fields });
            visitor.visit_map(Fields {
                probe: self.probe.at(path),
                fields,
                next: 0,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shape_lists_fields_in_declaration_order() {
        let shape = shape::of::<RawConfig>();
        let fields = |path: &str| match shape.get(path) {
            Some(shape::Node::Struct { fields, .. }) => fields.to_vec(),
            other => panic!("{path}: {other:?}"),
        };
        assert_eq!(fields("")[..3], ["experiment", "seed", "device"]);
        assert_eq!(fields("train.schedule"), ["kind", "warmup_steps", "min_lr"]);
        assert_eq!(fields("sinks[]"), ["name", "params"]);
        assert_eq!(fields("data.train[].Jsonl"), ["path", "field"]);
        assert!(matches!(
            shape.get("data.val[]"),
            Some(shape::Node::Enum { name: "Source", .. })
        ));
    }

    /// The reference renders each field's default from its doc comment, so every field of the
    /// raw types must state one, or say it is required.
    #[test]
    fn every_field_states_its_default_or_that_it_is_required() {
        let schema = schemars::schema_for!(RawConfig).to_value();
        let reference = Reference::new(&schema, shape::of::<RawConfig>());
        let mut checked = 0;
        for (path, node) in reference.shape.iter() {
            let shape::Node::Struct { name, fields } = node else {
                continue;
            };
            if reference.definition(name).is_null() {
                continue; // a struct variant: its fields are all required
            }
            for field in *fields {
                let doc = text(&reference.definition(name)["properties"][field]);
                let (meaning, default) = split_default(&doc);
                assert!(
                    !meaning.is_empty() && !default.is_empty(),
                    "{}: say what it means and end with \"Default: ...\" or \"Required.\": {doc:?}",
                    join_field(path, field)
                );
                checked += 1;
            }
        }
        assert!(checked > 40, "only {checked} fields found");
    }
}
