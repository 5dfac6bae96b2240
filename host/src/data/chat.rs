//! Chat templates: conversations → text, as transformers' `apply_chat_template` renders them.
//!
//! A Hugging Face tokenizer carries its chat template as a Jinja string (`chat_template.jinja`,
//! or `chat_template` in `tokenizer_config.json`: a string, or a list of named templates of
//! which `default` is used). It is rendered with minijinja, set up as transformers sets up
//! Jinja2: `trim_blocks` and `lstrip_blocks`, loop controls, `raise_exception`, a `tojson`
//! that writes what Python's `json.dumps` writes (not HTML-escaped), Python's string and dict
//! methods, and the variables `messages`, `add_generation_prompt`, `tools` and `documents`
//! (none) and the tokenizer's special tokens (`bos_token`, `eos_token`, ...). `strftime_now` is
//! left undefined, so templates that ask for today's date fall back to their fixed one and the
//! same data always gives the same tokens.
//!
//! `{% generation %}` ... `{% endgeneration %}` marks the assistant's text, the extension
//! transformers adds for `return_assistant_tokens_mask`. minijinja has no custom tags, so the
//! template's source is rewritten first: each mark becomes a `filter` block (a block tag too, so
//! whitespace control and `trim_blocks` act on it alike) whose filter wraps its output in two
//! Unicode noncharacters; the rendered text is then cut at them into the text and the byte
//! ranges of the assistant's parts.

use std::ops::Range;
use std::path::{Path, PathBuf};

use minijinja::value::Kwargs;
use minijinja::{Environment, Error, ErrorKind, Value};
use serde_json::{Map, Value as Json};

/// Opens and closes an assistant part in rendered text; noncharacters, refused in messages.
const START: char = '\u{FDD0}';
const END: char = '\u{FDD1}';
const NAME: &str = "chat template";
const GENERATION_FILTER: &str = "__codex_generation";
/// Starts the detail of an error `raise_exception` raised.
const RAISED: &str = "raise_exception: ";

/// The file in which a run's checkpoints keep the chat template they were trained with
/// ([`ChatTemplate::to_saved`]), so that resuming and evaluating render as the run did
/// whatever has become of the tokenizer's directory since.
pub const SAVED_FILE: &str = "chat_template.json";

/// A chat template as a checkpoint keeps it.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Saved {
    chat_template: String,
    origin: String,
    special_tokens: Map<String, Json>,
}

/// A chat template, ready to render.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    /// The template as written; part of the token cache key.
    source: String,
    /// Where it came from, for messages.
    origin: String,
    /// The tokenizer's special tokens by name (`bos_token`, ...).
    specials: Map<String, Json>,
    /// Whether the template marks the assistant's text with `{% generation %}`.
    marks_generation: bool,
}

/// A rendered conversation: the text, and the byte ranges of what the template marked as the
/// assistant's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// The text, marks removed.
    pub text: String,
    /// Byte ranges of `text` inside `{% generation %}` blocks, in order.
    pub assistant: Vec<Range<usize>>,
}

impl ChatTemplate {
    /// Compile `source`; `origin` names it in errors, `specials` are the tokenizer's special
    /// tokens (`bos_token` → `"<s>"`).
    pub fn new(source: &str, origin: String, specials: Map<String, Json>) -> Result<Self, String> {
        let (rewritten, marks_generation) = rewrite_generation(source);
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<Value, Error> {
                Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("{RAISED}{message}"),
                ))
            },
        );
        env.add_filter("tojson", tojson);
        env.add_filter(GENERATION_FILTER, |body: String| {
            format!("{START}{body}{END}")
        });
        env.add_template_owned(NAME, rewritten)
            .map_err(|e| format!("{origin}: the chat template does not compile: {e}"))?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            origin,
            specials,
            marks_generation,
        })
    }

    /// The template, where it came from and the special tokens it sees, as JSON: what
    /// [`ChatTemplate::from_saved`] reads back.
    pub fn to_saved(&self) -> String {
        let saved = Saved {
            chat_template: self.source.clone(),
            origin: self.origin.clone(),
            special_tokens: self.specials.clone(),
        };
        // A struct of strings and JSON values always serialises.
        serde_json::to_string_pretty(&saved).unwrap_or_default()
    }

    /// The template [`ChatTemplate::to_saved`] wrote into `path`.
    pub fn from_saved(text: &str, path: &Path) -> Result<Self, String> {
        let saved: Saved = serde_json::from_str(text)
            .map_err(|e| format!("{}: not a saved chat template: {e}", path.display()))?;
        ChatTemplate::new(&saved.chat_template, saved.origin, saved.special_tokens)
    }

    /// The template as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Where the template came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Whether the template marks the assistant's text with `{% generation %}`.
    pub fn marks_generation(&self) -> bool {
        self.marks_generation
    }

    /// The tokenizer's special tokens the template sees (`bos_token` → `"<s>"`).
    pub fn specials(&self) -> &Map<String, Json> {
        &self.specials
    }

    /// Render `messages` (a JSON list of message objects), with the assistant's turn opened
    /// at the end when `add_generation_prompt`.
    pub fn render(&self, messages: &Json, add_generation_prompt: bool) -> Result<Rendered, String> {
        let text = messages.to_string();
        if text.contains([START, END]) {
            return Err(format!(
                "the messages contain U+{:04X} or U+{:04X}, Unicode noncharacters the \
                 renderer reserves; remove them",
                START as u32, END as u32
            ));
        }
        let mut context = self.specials.clone();
        context.insert("messages".into(), messages.clone());
        context.insert(
            "add_generation_prompt".into(),
            Json::Bool(add_generation_prompt),
        );
        context.insert("tools".into(), Json::Null);
        context.insert("documents".into(), Json::Null);
        let template = self.env.get_template(NAME).map_err(|e| e.to_string())?;
        let out = template
            .render(Value::from_serialize(&context))
            .map_err(|e| self.explain(&e))?;
        split_marks(&out)
    }

    /// Render a conversation with the assistant's text found: the `{% generation %}` blocks
    /// when the template has them; otherwise, for each assistant message, the text the
    /// conversation through it adds to the conversation before it with the generation prompt
    /// (the message and the end-of-turn text the template writes after it). A template whose
    /// rendering of a shorter conversation is not the start of the whole one (it rewrites
    /// earlier turns as later ones come) cannot be read that way, and is refused.
    pub fn render_assistant(&self, messages: &Json) -> Result<Rendered, String> {
        if self.marks_generation {
            return self.render(messages, false);
        }
        let whole = self.render(messages, false)?;
        let Some(turns) = messages.as_array() else {
            return Ok(whole);
        };
        let mut assistant = Vec::new();
        for (i, turn) in turns.iter().enumerate() {
            if turn.get("role").and_then(Json::as_str) != Some("assistant") {
                continue;
            }
            let before = self.render(&Json::Array(turns[..i].to_vec()), true)?.text;
            let through = self.render(&Json::Array(turns[..=i].to_vec()), false)?.text;
            if !through.starts_with(&before) || !whole.text.starts_with(&through) {
                return Err(format!(
                    "the chat template rewrites earlier turns as the conversation grows (message \
                     {} changes what comes before it), so the assistant's tokens cannot be told \
                     apart: mark them with {{% generation %}} ... {{% endgeneration %}} in a \
                     template of your own (`data.sft.chat_template`), or set \
                     `assistant_only_loss: false`",
                    i + 1
                ));
            }
            if through.len() > before.len() {
                assistant.push(before.len()..through.len());
            }
        }
        Ok(Rendered {
            text: whole.text,
            assistant,
        })
    }
}

impl ChatTemplate {
    /// A rendering error in a user's words: what went wrong and where in the template.
    fn explain(&self, e: &Error) -> String {
        let line = e.line().map(|l| format!(", line {l}")).unwrap_or_default();
        let detail = e.detail().unwrap_or_default();
        match detail.strip_prefix(RAISED) {
            Some(words) if e.kind() == ErrorKind::InvalidOperation => {
                format!("the template refused it: {words} ({}{line})", self.origin)
            }
            _ if detail.is_empty() => format!("{} ({}{line})", e.kind(), self.origin),
            _ => format!("{}: {detail} ({}{line})", e.kind(), self.origin),
        }
    }
}

/// The text of `rendered` without marks, and the byte ranges the marks enclosed.
fn split_marks(rendered: &str) -> Result<Rendered, String> {
    let mut text = String::with_capacity(rendered.len());
    let mut assistant = Vec::new();
    let mut open: Option<usize> = None;
    let mut depth = 0usize;
    for c in rendered.chars() {
        match c {
            START => {
                if depth == 0 {
                    open = Some(text.len());
                }
                depth += 1;
            }
            END => {
                depth = depth
                    .checked_sub(1)
                    .ok_or("unbalanced {% endgeneration %}")?;
                if depth == 0 {
                    let start = open.take().unwrap_or(text.len());
                    if start < text.len() {
                        assistant.push(start..text.len());
                    }
                }
            }
            c => text.push(c),
        }
    }
    if depth != 0 {
        return Err("a {% generation %} block is not closed".to_string());
    }
    Ok(Rendered { text, assistant })
}

/// `source` with each `{% generation %}` and `{% endgeneration %}` turned into a `filter`
/// block of the same whitespace control, and whether there was one.
fn rewrite_generation(source: &str) -> (String, bool) {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    let mut found = false;
    while let Some(at) = rest.find("{%") {
        out.push_str(&rest[..at]);
        let tag = &rest[at..];
        match parse_mark(tag) {
            Some((len, left, word, right)) => {
                let body = if word == "generation" {
                    format!("filter {GENERATION_FILTER}")
                } else {
                    "endfilter".to_string()
                };
                out.push_str(&format!("{{%{left} {body} {right}%}}"));
                rest = &tag[len..];
                found = true;
            }
            None => {
                out.push_str("{%");
                rest = &tag[2..];
            }
        }
    }
    out.push_str(rest);
    (out, found)
}

/// A `{%[-+] generation|endgeneration [-+]%}` tag at the start of `tag`: its length, its
/// whitespace-control signs and its word.
fn parse_mark(tag: &str) -> Option<(usize, &str, &str, &str)> {
    let inner = tag.strip_prefix("{%")?;
    let end = inner.find("%}")?;
    let body = &inner[..end];
    let (left, body) = match body.chars().next() {
        Some(c @ ('-' | '+')) => (&inner[..c.len_utf8()], &body[1..]),
        _ => ("", body),
    };
    let (body, right) = match body.chars().last() {
        Some('-' | '+') => (&body[..body.len() - 1], &body[body.len() - 1..]),
        _ => (body, ""),
    };
    let word = body.trim();
    matches!(word, "generation" | "endgeneration").then_some((end + 4, left, word, right))
}

/// transformers' `tojson`: Python's `json.dumps(value, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)`.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.as_i64() {
            Some(n) => Some(" ".repeat(n.max(0) as usize)),
            None => Some(v.to_string()),
        },
    };
    let (item, key) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be two strings",
            ))
        }
        // Python's defaults: (', ', ': '), or (',', ': ') when indenting.
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let style = PyJson {
        indent,
        item,
        key,
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    style.write(&json, 0, &mut out);
    Ok(Value::from(out))
}

/// How Python's `json.dumps` lays out a value.
struct PyJson {
    indent: Option<String>,
    item: String,
    key: String,
    sort_keys: bool,
}

impl PyJson {
    fn newline(&self, level: usize, out: &mut String) {
        if let Some(indent) = &self.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(indent);
            }
        }
    }

    fn write(&self, value: &Json, level: usize, out: &mut String) {
        match value {
            Json::Array(items) if !items.is_empty() => {
                out.push('[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item);
                    }
                    self.newline(level + 1, out);
                    self.write(v, level + 1, out);
                }
                self.newline(level, out);
                out.push(']');
            }
            Json::Object(map) if !map.is_empty() => {
                let mut entries: Vec<(&String, &Json)> = map.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                out.push('{');
                for (i, (k, v)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item);
                    }
                    self.newline(level + 1, out);
                    out.push_str(&Json::String(k.clone()).to_string());
                    out.push_str(&self.key);
                    self.write(v, level + 1, out);
                }
                self.newline(level, out);
                out.push('}');
            }
            other => out.push_str(&other.to_string()),
        }
    }
}

/// Where a tokenizer's chat template is found: `chat_template.jinja` beside its
/// `tokenizer.json` (transformers saves it there and prefers it), else `chat_template` in
/// `tokenizer_config.json` there.
pub fn find_in(tokenizer_dir: &Path) -> Option<PathBuf> {
    let jinja = tokenizer_dir.join("chat_template.jinja");
    if jinja.is_file() {
        return Some(jinja);
    }
    let config = tokenizer_dir.join("tokenizer_config.json");
    config.is_file().then_some(config)
}

/// The template text in `file`: a Jinja file as it is, or the `chat_template` of a
/// `tokenizer_config.json` (a `.json` file); `Ok(None)` when the JSON has none.
pub fn read_template(file: &Path) -> Result<Option<String>, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("cannot be read: {e}"))?;
    if file.extension().is_none_or(|e| e != "json") {
        return Ok(Some(text));
    }
    let value: Json = serde_json::from_str(&text).map_err(|e| format!("is not valid JSON: {e}"))?;
    match value.get("chat_template") {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Array(list)) => {
            let named = |name: &str| {
                list.iter()
                    .find(|t| t.get("name").and_then(Json::as_str) == Some(name))
                    .and_then(|t| t.get("template"))
                    .and_then(Json::as_str)
            };
            match named("default") {
                Some(t) => Ok(Some(t.to_string())),
                None => {
                    let names: Vec<&str> = list
                        .iter()
                        .filter_map(|t| t.get("name").and_then(Json::as_str))
                        .collect();
                    Err(format!(
                        "chat_template: a list of named templates with none named `default` \
                         (it has {}); point `data.sft.chat_template` at a file holding the one \
                         to use",
                        names.join(", ")
                    ))
                }
            }
        }
        Some(other) => Err(format!(
            "chat_template: expected a string or a list of {{\"name\", \"template\"}}, found {other}"
        )),
    }
}

/// The special tokens of a `tokenizer_config.json` (`*_token` fields, each a string or an
/// object with `content`), as the template's variables; none when the file is absent.
pub fn read_specials(tokenizer_dir: &Path) -> Result<Map<String, Json>, String> {
    let path = tokenizer_dir.join("tokenizer_config.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Map::new()),
        Err(e) => return Err(format!("{}: cannot be read: {e}", path.display())),
    };
    let value: Json = serde_json::from_str(&text)
        .map_err(|e| format!("{}: is not valid JSON: {e}", path.display()))?;
    let mut specials = Map::new();
    if let Json::Object(map) = value {
        for (name, v) in map {
            if !name.ends_with("_token") {
                continue;
            }
            let token = match &v {
                Json::String(s) => Some(s.clone()),
                Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_string),
                _ => None,
            };
            if let Some(token) = token {
                specials.insert(name, Json::String(token));
            }
        }
    }
    Ok(specials)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One byte range, as a list.
    fn one(start: usize, end: usize) -> Vec<std::ops::Range<usize>> {
        std::iter::once(start..end).collect()
    }
    use serde_json::json;

    fn render(source: &str, messages: Json, gen: bool) -> Result<Rendered, String> {
        let mut specials = Map::new();
        specials.insert("bos_token".into(), json!("<s>"));
        ChatTemplate::new(source, "test".into(), specials)?.render(&messages, gen)
    }

    #[test]
    fn generation_marks_become_byte_ranges() {
        let t = "{{ bos_token }}{% for m in messages %}{% if m.role == 'assistant' %}\
                 {% generation %}{{ m.content }}{% endgeneration %}{% else %}[{{ m.content }}]\
                 {% endif %}{% endfor %}";
        let m = json!([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]);
        let r = render(t, m, false).expect("render");
        assert_eq!(r.text, "<s>[hi]yo");
        assert_eq!(r.assistant, one(7, 9));
    }

    #[test]
    fn marks_keep_whitespace_control_and_trim_blocks() {
        // What Jinja2 renders for the same template with `filter` blocks in their place.
        let t = "A\n  {%- generation -%}\n  B  \n{%- endgeneration %}\nC";
        let r = render(t, json!([]), false).expect("render");
        assert_eq!(r.text, "ABC");
        assert_eq!(r.assistant, one(1, 2));
        let r = render(
            "A\n  {% generation %}\n  B  \n{% endgeneration %}\nC",
            json!([]),
            false,
        )
        .expect("render");
        assert_eq!(r.text, "A\n  B  \nC");
        assert_eq!(r.assistant, one(2, 8));
        assert!(ChatTemplate::new(t, "t".into(), Map::new())
            .expect("compiles")
            .marks_generation());
    }

    #[test]
    fn raise_exception_and_python_methods() {
        let t = "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}\
                 {% endif %}{{ messages[0].content.strip().upper() }}";
        let ok = render(t, json!([{"role": "user", "content": "  hi "}]), false).expect("ok");
        assert_eq!(ok.text, "HI");
        let err = render(t, json!([{"role": "system", "content": "x"}]), false).expect_err("raise");
        assert!(err.contains("first must be user"), "{err}");
    }

    #[test]
    fn tojson_writes_what_python_writes() {
        let t = "{{ messages[0] | tojson }}|{{ messages[0] | tojson(indent=2) }}";
        let r = render(t, json!([{"a": [1, "<b>"], "c": {}}]), false).expect("render");
        assert_eq!(
            r.text,
            "{\"a\": [1, \"<b>\"], \"c\": {}}|{\n  \"a\": [\n    1,\n    \"<b>\"\n  ],\n  \"c\": {}\n}"
        );
    }

    #[test]
    fn loop_controls() {
        let t = "{% for m in messages %}{% if loop.index0 == 1 %}{% break %}{% endif %}\
                 {{ m.content }}{% endfor %}";
        let m = json!([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]);
        assert_eq!(render(t, m, false).expect("render").text, "a");
    }

    #[test]
    fn reserved_characters_in_messages_are_refused() {
        let m = json!([{"role": "user", "content": "\u{FDD0}"}]);
        let err = render("{{ messages }}", m, false).expect_err("refused");
        assert!(err.contains("noncharacter"), "{err}");
    }

    #[test]
    fn named_template_lists_use_default() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("tokenizer_config.json");
        std::fs::write(
            &file,
            r#"{"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}"#,
        )
        .expect("write");
        assert_eq!(read_template(&file).expect("read").as_deref(), Some("D"));
        std::fs::write(
            &file,
            r#"{"chat_template": [{"name": "rag", "template": "R"}]}"#,
        )
        .expect("write");
        let err = read_template(&file).expect_err("no default");
        assert!(err.contains("rag"), "{err}");
        std::fs::write(&file, r#"{"eos_token": "x"}"#).expect("write");
        assert_eq!(read_template(&file).expect("read"), None);
    }
}
