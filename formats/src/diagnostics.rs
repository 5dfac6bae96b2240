//! One renderer for every error found in a file a user wrote (experiment config, plugin
//! manifest), so they all read the same way:
//!
//! ```text
//! configs/quickstart.ron:14:9: train.batch_size: expected integer
//!    |
//! 14 |         batch_size: "sixteen",
//!    |                     ^^^^^^^^^
//! ```
//!
//! `file:line:col: field: message` first (what editors and terminals turn into links), then the
//! offending line with a caret under the span. ron 0.12 reports 1-based lines and 1-based
//! columns counted in chars (see FACTS.md), which is exactly what we print, so no byte offsets
//! are involved. Field paths come from `serde_path_to_error`; ron's own messages are rewritten
//! here because they name our internal Rust types (`RawTrain`) rather than the user's keys.
//!
//! The same module holds the strict RON parser both files go through (`parse_ron`) and the
//! "did you mean" helper shared with the registry and `--set` overrides.

use std::fmt;
use std::path::{Path, PathBuf};

use ron::extensions::Extensions;
use serde::de::DeserializeOwned;

/// A 1-based position in a file: line, and column counted in chars.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// Line, from 1.
    pub line: usize,
    /// Column in chars, from 1.
    pub col: usize,
}

/// An error in a user-written file: where, which field, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file, as the user named it.
    pub file: PathBuf,
    /// Start of the offending text; `None` for errors found after parsing (validation).
    pub start: Option<Position>,
    /// End of the offending text (exclusive), when ron reports one.
    pub end: Option<Position>,
    /// Dotted path of the field (`train.batch_size`, `plugins[1].sha256`), when known.
    pub field: Option<String>,
    /// What is wrong, lowercase, saying what to do where it can.
    pub message: String,
    /// The source line the error points into, kept so the error can be shown on its own.
    snippet: Option<String>,
}

impl Diagnostic {
    /// An error about `field` of `file` without a position (found during validation).
    pub fn new(
        file: impl Into<PathBuf>,
        field: Option<String>,
        message: impl Into<String>,
    ) -> Self {
        Diagnostic {
            file: file.into(),
            start: None,
            end: None,
            field,
            message: message.into(),
            snippet: None,
        }
    }

    /// An error at a span of `source` (the text of `file`).
    pub fn at(
        file: impl Into<PathBuf>,
        source: &str,
        start: Position,
        end: Option<Position>,
        field: Option<String>,
        message: impl Into<String>,
    ) -> Self {
        let snippet = start
            .line
            .checked_sub(1)
            .and_then(|index| source.lines().nth(index))
            .map(str::to_owned);
        Diagnostic {
            file: file.into(),
            start: Some(start),
            end,
            field,
            message: message.into(),
            snippet,
        }
    }

    /// `file:line:col`, or just the file when the position is unknown.
    pub fn location(&self) -> String {
        match self.start {
            Some(p) => format!("{}:{}:{}", self.file.display(), p.line, p.col),
            None => self.file.display().to_string(),
        }
    }
}

impl fmt::Display for Diagnostic {
    /// At most four lines, each of bounded length whatever the input: a deeply nested or
    /// minified file must not turn one error into kilobytes of terminal output.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.location())?;
        if let Some(field) = &self.field {
            write!(f, "{}: ", shorten_middle(field, MAX_FIELD))?;
        }
        f.write_str(&shorten(&self.message, MAX_MESSAGE))?;
        if let (Some(start), Some(line)) = (self.start, &self.snippet) {
            let number = start.line.to_string();
            let gutter = " ".repeat(number.len());
            let (text, caret_at, caret_len) = caret_line(line, start, self.end);
            write!(
                f,
                "\n{gutter} |\n{number} | {text}\n{gutter} | {}{}",
                " ".repeat(caret_at),
                "^".repeat(caret_len)
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostic {}

/// Longest field path shown; longer ones (deep nesting) keep their start and end.
const MAX_FIELD: usize = 120;
/// Longest message shown, in chars.
const MAX_MESSAGE: usize = 400;
/// Widest excerpt of the offending line shown, in display columns.
const MAX_EXCERPT: usize = 100;
/// Columns of context kept left of the caret when the line is cut.
const EXCERPT_BEFORE: usize = 40;

/// `text` on one line, cut to `max` chars with `…`: control characters (a newline in a
/// quoted value) are escaped.
pub(crate) fn shorten(text: &str, max: usize) -> String {
    let cut = text.chars().nth(max).is_some();
    let keep = if cut { max.saturating_sub(1) } else { max };
    let mut out = escape_controls(text.chars().take(keep));
    if cut {
        out.push('…');
    }
    out
}

/// `text` on one line, cut in the middle to `max` chars, keeping both ends
/// (`data.train[0]…[0].x`).
fn shorten_middle(text: &str, max: usize) -> String {
    let count = text.chars().count();
    if count <= max {
        return escape_controls(text.chars());
    }
    let head = (max - 1) / 2;
    let tail = max - 1 - head;
    let mut out = escape_controls(text.chars().take(head));
    out.push('…');
    out.push_str(&escape_controls(text.chars().skip(count - tail)));
    out
}

fn escape_controls(chars: impl Iterator<Item = char>) -> String {
    let mut out = String::new();
    for c in chars {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// The line with tabs expanded, and where (in display columns) the caret starts and how long
/// it is. A span that runs onto later lines is underlined to the end of its first line. A
/// line wider than [`MAX_EXCERPT`] is cut to a window around the caret, marked with `…`.
fn caret_line(line: &str, start: Position, end: Option<Position>) -> (String, usize, usize) {
    let (text, from, len) = full_caret_line(line, start, end);
    let chars: Vec<char> = text.chars().collect();
    if chars.len() <= MAX_EXCERPT {
        return (text, from, len);
    }
    let first = from
        .saturating_sub(EXCERPT_BEFORE)
        .min(chars.len().saturating_sub(MAX_EXCERPT));
    let last = (first + MAX_EXCERPT).min(chars.len());
    let mut window = String::new();
    let mut caret_at = from - first;
    if first > 0 {
        window.push('…');
        caret_at += 1;
    }
    window.extend(
        chars[first..last]
            .iter()
            .map(|&c| if c.is_control() { ' ' } else { c }),
    );
    if last < chars.len() {
        window.push('…');
    }
    let caret_len = len.min(last.saturating_sub(from)).max(1);
    (window, caret_at, caret_len)
}

fn full_caret_line(line: &str, start: Position, end: Option<Position>) -> (String, usize, usize) {
    const TAB: &str = "    ";
    let mut text = String::with_capacity(line.len());
    // Display column where each char starts, plus one entry for the end of the line.
    let mut columns = Vec::with_capacity(line.len() + 1);
    for c in line.chars() {
        columns.push(text.chars().count());
        if c == '\t' {
            text.push_str(TAB);
        } else {
            text.push(c);
        }
    }
    let width = text.chars().count();
    columns.push(width);
    let column_of = |char_col: usize| columns[(char_col.saturating_sub(1)).min(columns.len() - 1)];
    let from = column_of(start.col);
    let to = match end {
        Some(end) if end.line == start.line && end.col > start.col => column_of(end.col),
        Some(end) if end.line > start.line => width,
        _ => from + 1,
    };
    (text, from, to.saturating_sub(from).max(1))
}

/// The ron options every user-written file is parsed with: `IMPLICIT_SOME`, so optional
/// fields are written `max_steps: 200` rather than `max_steps: Some(200)` (both work).
pub fn ron_options() -> ron::Options {
    ron::Options::default().with_default_extension(Extensions::IMPLICIT_SOME)
}

/// Parse `source` (the text of `file`) strictly into `T`: any syntax error, unknown or
/// missing field, wrong type or trailing text becomes a [`Diagnostic`] with position and field.
pub fn parse_ron<T: DeserializeOwned>(file: &Path, source: &str) -> Result<T, Box<Diagnostic>> {
    let options = ron_options();
    let mut de = ron::Deserializer::from_str_with_options(source, &options)
        .map_err(|e| spanned(file, source, &e, String::new()))?;
    let value = match serde_path_to_error::deserialize::<_, T>(&mut de) {
        Ok(value) => value,
        Err(e) => {
            let path = field_path(e.path());
            let code = e.into_inner();
            let spanned_error = de.span_error(code);
            return Err(spanned(file, source, &spanned_error, path));
        }
    };
    if let Err(code) = de.end() {
        let spanned_error = de.span_error(code);
        return Err(spanned(file, source, &spanned_error, String::new()));
    }
    Ok(value)
}

fn spanned(
    file: &Path,
    source: &str,
    error: &ron::error::SpannedError,
    path: String,
) -> Box<Diagnostic> {
    let (field, message) = describe(&error.code, path);
    let start = skip_blanks(
        source,
        Position {
            line: error.span.start.line,
            col: error.span.start.col,
        },
    );
    let mut end = Position {
        line: error.span.end.line,
        col: error.span.end.col,
    };
    if end.line == start.line && end.col <= start.col {
        end.col = start.col + 1;
    }
    Box::new(Diagnostic::at(
        file,
        source,
        start,
        Some(end),
        field,
        message,
    ))
}

/// What [`at_field`] points at: the key of a field (an unknown or misspelt name) or its value
/// (a value of the wrong type or out of range).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// The field's key.
    Key,
    /// The field's value.
    Value,
}

/// An error about the field at `path` (`model.params.n_layer`, `sinks[1].params.file`) of
/// `source`, the text of `file`, found after parsing: positioned at the field's key or value
/// when the field is written in the file, else (a value that came from a default or a `--set`)
/// naming the file and the field only.
pub fn at_field(
    file: &Path,
    source: &str,
    path: &str,
    point: Point,
    message: impl Into<String>,
) -> Diagnostic {
    let message = message.into();
    match locate::span(source, path, point) {
        Some((start, end)) => {
            let start = skip_blanks(source, start);
            let end = (end.line > start.line || end.col > start.col).then_some(end);
            Diagnostic::at(file, source, start, end, Some(path.to_owned()), message)
        }
        None => Diagnostic::new(file, Some(path.to_owned()), message),
    }
}

/// Finding where a field is written: ron reports the position of an error raised while it
/// parses, so a deserializer seed walks the file along the path, skipping everything else,
/// and raises a marker error on reaching the field; the error's span is the field's place.
mod locate {
    use std::fmt;

    use serde::de::{
        self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor,
    };

    use super::{ron_options, Point, Position};

    /// The marker error; any other error means the path is not in the file as written.
    const FOUND: &str = "\u{0}codex-ml: field located";

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Segment {
        Key(String),
        Index(usize),
    }

    /// `a.b[2].c` → keys and indices; `None` for anything else.
    fn segments(path: &str) -> Option<Vec<Segment>> {
        let mut out = Vec::new();
        for part in path.split('.') {
            let (key, mut rest) = match part.find('[') {
                Some(i) => (&part[..i], &part[i..]),
                None => (part, ""),
            };
            if key.is_empty() {
                return None;
            }
            out.push(Segment::Key(key.to_owned()));
            while let Some(tail) = rest.strip_prefix('[') {
                let close = tail.find(']')?;
                out.push(Segment::Index(tail[..close].parse().ok()?));
                rest = &tail[close + 1..];
            }
            if !rest.is_empty() {
                return None;
            }
        }
        Some(out)
    }

    /// Where the field at `path` is written in `source`, as (start, end).
    pub(super) fn span(source: &str, path: &str, point: Point) -> Option<(Position, Position)> {
        let path = segments(path)?;
        let seed = Walk { path: &path, point };
        match ron_options().from_str_seed(source, seed) {
            Err(e) if e.code.to_string().contains(FOUND) => Some((
                Position {
                    line: e.span.start.line,
                    col: e.span.start.col,
                },
                Position {
                    line: e.span.end.line,
                    col: e.span.end.col,
                },
            )),
            _ => None,
        }
    }

    /// Walks towards the rest of the path from the current value.
    struct Walk<'p> {
        path: &'p [Segment],
        point: Point,
    }

    impl<'de> DeserializeSeed<'de> for Walk<'_> {
        type Value = ();

        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            if self.path.is_empty() {
                return Err(de::Error::custom(FOUND));
            }
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Walk<'_> {
        type Value = ();

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any value")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let Segment::Key(wanted) = &self.path[0] else {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                return Ok(());
            };
            let last = self.path.len() == 1;
            loop {
                let key = KeySeed {
                    wanted,
                    found_here: last && self.point == Point::Key,
                };
                match map.next_key_seed(key)? {
                    None => return Ok(()),
                    Some(true) => {
                        return map.next_value_seed(Walk {
                            path: &self.path[1..],
                            point: self.point,
                        })
                    }
                    Some(false) => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            let Segment::Index(wanted) = self.path[0] else {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                return Ok(());
            };
            for _ in 0..wanted {
                if seq.next_element::<IgnoredAny>()?.is_none() {
                    return Ok(());
                }
            }
            seq.next_element_seed(Walk {
                path: &self.path[1..],
                point: self.point,
            })
            .map(|_| ())
        }

        fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
            use de::VariantAccess;
            // A data source such as `Text(paths: [...])`: the path goes on inside the variant.
            let (_, variant): (IgnoredAny, _) = data.variant()?;
            variant.newtype_variant_seed(self)
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }

        fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }

        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }

        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }

        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }

        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            Ok(())
        }

        fn visit_str<E>(self, _: &str) -> Result<(), E> {
            Ok(())
        }

        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }

        fn visit_none<E>(self) -> Result<(), E> {
            Ok(())
        }
    }

    /// Reads one key: `Some(true)` when it is the wanted one. Raises the marker instead when
    /// the key itself is what to point at, so the span is the key's.
    struct KeySeed<'w> {
        wanted: &'w str,
        found_here: bool,
    }

    impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
        type Value = bool;

        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
            let key = d.deserialize_any(KeyText)?;
            let matches = key.as_deref() == Some(self.wanted);
            if matches && self.found_here {
                return Err(de::Error::custom(FOUND));
            }
            Ok(matches)
        }
    }

    struct KeyText;

    /// A key as text; keys that are not text (numbers in a map) match nothing.
    impl Visitor<'_> for KeyText {
        type Value = Option<String>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a field name")
        }

        fn visit_str<E>(self, key: &str) -> Result<Self::Value, E> {
            Ok(Some(key.to_owned()))
        }

        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
}

/// ron's spans start before the whitespace that precedes the offending token; point at the
/// token itself when it is on the same line.
fn skip_blanks(source: &str, start: Position) -> Position {
    let Some(line) = start
        .line
        .checked_sub(1)
        .and_then(|i| source.lines().nth(i))
    else {
        return start;
    };
    let skipped = line
        .chars()
        .skip(start.col.saturating_sub(1))
        .take_while(|c| c.is_whitespace())
        .count();
    if start.col.saturating_sub(1) + skipped < line.chars().count() {
        Position {
            line: start.line,
            col: start.col + skipped,
        }
    } else {
        start
    }
}

/// The dotted path of a `serde_path_to_error` path, without its unknown (`?`) segments.
pub fn field_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } => push_key(&mut out, key),
            Segment::Enum { variant } => push_key(&mut out, variant),
            Segment::Unknown => {}
        }
    }
    out
}

/// `path.key`, or `key` when `path` is empty.
pub fn join_field(path: &str, key: &str) -> String {
    let mut out = path.to_owned();
    push_key(&mut out, key);
    out
}

fn push_key(out: &mut String, key: &str) {
    if !out.is_empty() {
        out.push('.');
    }
    out.push_str(key);
}

/// The field a ron error is about and a message in the user's terms (ron's own `Display`
/// names our Rust types and capitalises).
fn describe(code: &ron::Error, path: String) -> (Option<String>, String) {
    use ron::Error as E;
    let non_empty = |p: String| if p.is_empty() { None } else { Some(p) };
    match code {
        E::NoSuchStructField {
            expected, found, ..
        } => {
            let message = unknown_message("field", found, expected);
            // serde_path_to_error has usually recorded the unknown key already.
            let field = if path == *found || path.ends_with(&format!(".{found}")) {
                path
            } else {
                join_field(&path, found)
            };
            (Some(field), message)
        }
        E::MissingStructField { field, .. } => (
            Some(join_field(&path, field)),
            format!("missing field `{field}`; add it, it has no default"),
        ),
        E::DuplicateStructField { field, .. } => (
            Some(join_field(&path, field)),
            format!("field `{field}` is given twice; keep one"),
        ),
        E::NoSuchEnumVariant {
            expected, found, ..
        } => (non_empty(path), unknown_message("variant", found, expected)),
        E::InvalidValueForType { expected, found } => (
            non_empty(path),
            format!("expected {}, found {found}", plain_expected(expected)),
        ),
        E::ExpectedDifferentLength { expected, found } => (
            non_empty(path),
            format!(
                "expected {}, found {found} element(s)",
                plain_expected(expected)
            ),
        ),
        E::ExpectedNamedStructLike(_) | E::ExpectedStructLike => (
            non_empty(path),
            format!("expected {}", plain_expected("struct")),
        ),
        E::ExpectedDifferentStructName { found, .. } => (
            non_empty(path),
            format!("unexpected name `{found}` before `(`; write the structure without a name"),
        ),
        E::ExpectedStructName(_) => (
            non_empty(path),
            "expected a structure `(field: value, ...)`".to_owned(),
        ),
        E::ExceededRecursionLimit => (
            non_empty(path),
            "nested too deeply (brackets inside brackets, more than 128 levels); no config \
             needs that many, check for unclosed or repeated brackets"
                .to_owned(),
        ),
        E::Message(message) => (non_empty(path), plain_words(message)),
        E::SuggestRawIdentifier(found) | E::InvalidIdentifier(found) => {
            (non_empty(path), format!("expected a name, found `{found}`"))
        }
        E::TrailingCharacters => (
            None,
            "unexpected text after the end of the document; remove it".to_owned(),
        ),
        E::Eof => (
            non_empty(path),
            "unexpected end of file; a bracket or parenthesis is probably not closed".to_owned(),
        ),
        E::IntegerOutOfBounds => (
            non_empty(path),
            "integer out of range for this field".to_owned(),
        ),
        other => (non_empty(path), lowercase_first(&other.to_string())),
    }
}

/// What a serde or ron "expected ..." names, in the user's words: serde derives describe a
/// value by its Rust type (`struct RawTrain`, `u64`), which means nothing to someone writing
/// a config.
pub(crate) fn plain_expected(expected: &str) -> String {
    let expected = expected.trim();
    let word = |prefix: &str| expected == prefix || expected.starts_with(&format!("{prefix} "));
    let plain = if word("struct") {
        "a structure `(field: value, ...)`"
    } else if word("tuple struct") || word("tuple variant") || word("tuple") {
        "a tuple `(value, ...)`"
    } else if word("unit struct") || word("unit variant") {
        "`()`"
    } else if word("struct variant") {
        "a variant with fields `Name(field: value, ...)`"
    } else if word("enum") {
        "one of the variants this field accepts (see docs/config.md)"
    } else {
        match expected {
            "u8" | "u16" | "u32" | "u64" | "u128" | "usize" => "a non-negative integer",
            "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "an integer",
            "f32" | "f64" => "a number",
            "variant identifier" => "a variant name",
            "field identifier" => "a field name",
            "option" => "a value or `None`",
            "a sequence" => "a list `[...]`",
            "a map" => "a map `{...}`",
            "path string" => "a path (a string)",
            other => return other.to_owned(),
        }
    };
    plain.to_owned()
}

/// A serde message (``invalid type: integer `5`, expected struct RawTrain``) with what it
/// expects in the user's words (as `plain_expected` words them).
pub fn plain_words(message: &str) -> String {
    match message.rsplit_once(", expected ") {
        Some((head, expected)) => format!("{head}, expected {}", plain_expected(expected)),
        None => match message.strip_prefix("expected ") {
            Some(expected) => format!("expected {}", plain_expected(expected)),
            None => message.to_owned(),
        },
    }
}

fn unknown_message(what: &str, found: &str, expected: &[&str]) -> String {
    let mut message = format!("unknown {what} `{found}`");
    if let Some(suggestion) = did_you_mean(found, expected.iter().copied()) {
        message.push_str(&format!(", did you mean `{suggestion}`?"));
    }
    if expected.is_empty() {
        message.push_str(&format!("; no {what}s are accepted here"));
    } else {
        message.push_str(&format!(
            "; expected one of {}",
            backticked(expected.iter().copied())
        ));
    }
    message
}

/// `` `a`, `b`, `c` `` for a list of names.
pub fn backticked<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    names
        .into_iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn lowercase_first(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// The candidate closest to `found`, if it is close enough to be a likely typo: at most one
/// edit per three characters (transpositions count once), ignoring case; failing that, a
/// candidate that `found` abbreviates or extends (`memory` for `memory_mib`).
pub fn did_you_mean<'a>(
    found: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let found_lower = found.to_lowercase();
    let budget = (found.chars().count() / 3).max(1);
    let candidates: Vec<&'a str> = candidates.into_iter().collect();
    let closest = candidates
        .iter()
        .map(|candidate| {
            let distance = strsim::damerau_levenshtein(&found_lower, &candidate.to_lowercase());
            (distance, *candidate)
        })
        .filter(|(distance, _)| *distance <= budget)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate);
    closest.or_else(|| {
        let prefix_of =
            |short: &str, long: &str| short.chars().count() >= 3 && long.starts_with(short);
        candidates.into_iter().find(|candidate| {
            let candidate = candidate.to_lowercase();
            prefix_of(&found_lower, &candidate) || prefix_of(&candidate, &found_lower)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        inner: Inner,
        #[serde(default)]
        kinds: Vec<Kind>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        count: usize,
        limit: Option<u64>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "lowercase")]
    enum Kind {
        Cosine,
        Linear,
    }

    /// Parse `source` and compare the rendered error with `expect`.
    fn check(source: &str, expect: &str) {
        let error =
            parse_ron::<Outer>(Path::new("x.ron"), source).expect_err("the source is invalid");
        assert_eq!(error.to_string(), expect, "for source {source:?}");
    }

    #[test]
    fn fields_are_located_at_their_key_or_value() {
        let source = "(\n    model: (name: \"gpt2\", params: (n_layer: 2, n_layr: 3)),\n    data: (train: [Text(paths: [\"a\", 7])]),\n    sinks: [(name: \"csv\"), (name: \"x\", params: {\"file\": 1})],\n)";
        let check = |path: &str, point: Point, expect: &str| {
            let d = at_field(Path::new("c.ron"), source, path, point, "bad");
            assert_eq!(d.location(), expect, "{path}");
        };
        check("model.params.n_layr", Point::Key, "c.ron:2:48");
        check("model.params.n_layr", Point::Value, "c.ron:2:56");
        check("data.train[0].paths[1]", Point::Value, "c.ron:3:38");
        check("sinks[1].params.file", Point::Key, "c.ron:4:50");
        check("model.params.dropout", Point::Key, "c.ron");
        check("sinks[5].name", Point::Value, "c.ron");
        check("not a path", Point::Key, "c.ron");
    }

    #[test]
    fn unknown_field_names_path_position_and_suggestion() {
        check(
            "(\n  inner: (count: 1, limt: 2),\n)",
            "x.ron:2:21: inner.limt: unknown field `limt`, did you mean `limit`?; expected one of `count`, `limit`\n  |\n2 |   inner: (count: 1, limt: 2),\n  |                     ^^^^",
        );
    }

    #[test]
    fn wrong_type_points_at_the_value() {
        check(
            "(inner: (count: \"x\"))",
            "x.ron:1:17: inner.count: expected integer\n  |\n1 | (inner: (count: \"x\"))\n  |                 ^",
        );
    }

    #[test]
    fn missing_field_names_the_field() {
        check(
            "(inner: (limit: 3))",
            "x.ron:1:18: inner.count: missing field `count`; add it, it has no default\n  |\n1 | (inner: (limit: 3))\n  |                  ^",
        );
    }

    #[test]
    fn unknown_variant_in_a_list() {
        check(
            "(inner: (count: 1), kinds: [linear, cosin])",
            "x.ron:1:37: kinds[1]: unknown variant `cosin`, did you mean `cosine`?; expected one of `cosine`, `linear`\n  |\n1 | (inner: (count: 1), kinds: [linear, cosin])\n  |                                     ^^^^^",
        );
    }

    #[test]
    fn trailing_text_is_rejected() {
        let error = parse_ron::<Outer>(Path::new("x.ron"), "(inner: (count: 1)) )")
            .expect_err("trailing text");
        assert!(error.message.contains("after the end"), "{error}");
        assert_eq!(error.start, Some(Position { line: 1, col: 21 }));
    }

    #[test]
    fn implicit_some_and_explicit_some_both_work() {
        for source in [
            "(inner: (count: 1, limit: 5))",
            "(inner: (count: 1, limit: Some(5)))",
        ] {
            let outer: Outer = parse_ron(Path::new("x.ron"), source).expect("valid");
            assert_eq!(outer.inner.limit, Some(5));
        }
    }

    #[test]
    fn tabs_are_expanded_under_the_caret() {
        let d = Diagnostic::at(
            "t.ron",
            "\tab: 1",
            Position { line: 1, col: 2 },
            Some(Position { line: 1, col: 4 }),
            None,
            "bad",
        );
        assert_eq!(
            d.to_string(),
            "t.ron:1:2: bad\n  |\n1 |     ab: 1\n  |     ^^"
        );
    }

    #[test]
    fn suggestions_are_close_matches_only() {
        let names = ["gpt2", "llama", "max_steps", "cosine"];
        for (found, expect) in [
            ("gtp2", Some("gpt2")),
            ("max_step", Some("max_steps")),
            ("Cosine", Some("cosine")),
            ("lama", Some("llama")),
            ("max", Some("max_steps")),
            ("cosine_decay", Some("cosine")),
            ("ma", None),
            ("bert", None),
            ("x", None),
        ] {
            assert_eq!(did_you_mean(found, names), expect, "for {found}");
        }
    }
}
