//! Generated parts of the docs stay current: `docs/components.md` lists exactly the built-ins
//! the binary registers, and `docs/config.md` documents exactly the fields the config reads.
//! Run with `CODEX_BLESS=1` to rewrite them.

use std::path::Path;

use codex_host::plugins::registry::Registry;
use codex_plugin_api::ComponentKind;

fn table() -> String {
    let registry = Registry::with_builtins().unwrap();
    let mut out = String::from("| kind | name | version | description |\n|---|---|---|---|\n");
    for kind in ComponentKind::ALL {
        let mut entries: Vec<_> = registry.of_kind(kind).collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        for e in entries {
            out.push_str(&format!(
                "| {} | `{}` | {} | {} |\n",
                kind.as_str(),
                e.name,
                e.version,
                e.description.replace('|', "\\|")
            ));
        }
    }
    out
}

/// The block of `doc` (under `docs/`) between the line starting `start` and the line `end` must
/// be `expected`; with `CODEX_BLESS` set it is rewritten instead.
fn check_block(doc: &str, start: &str, end: &str, expected: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docs")
        .join(doc);
    let text = std::fs::read_to_string(&path).unwrap();
    let start = text.find(start).expect("start marker");
    let body_start = start + text[start..].find('\n').expect("marker line") + 1;
    let end = text.find(end).expect("end marker");
    let current = &text[body_start..end];
    if current != expected {
        if std::env::var_os("CODEX_BLESS").is_some() {
            let updated = format!("{}{}{}", &text[..body_start], expected, &text[end..]);
            std::fs::write(&path, updated).unwrap();
        } else {
            panic!(
                "docs/{doc} is out of date; run with CODEX_BLESS=1 to rewrite it.\nexpected:\n{expected}\nfound:\n{current}"
            );
        }
    }
}

#[test]
fn components_doc_lists_every_builtin() {
    check_block(
        "components.md",
        "<!-- builtins:start",
        "<!-- builtins:end -->",
        &table(),
    );
}

#[test]
fn config_doc_describes_every_field() {
    check_block(
        "config.md",
        "<!-- reference:start",
        "<!-- reference:end -->",
        &codex_host::config::reference(),
    );
}
