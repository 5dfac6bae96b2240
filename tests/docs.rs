//! `docs/components.md` lists exactly the built-ins the binary registers.

use std::path::Path;

use codex_host::plugins::registry::Registry;
use codex_plugin_api::ComponentKind;

const START: &str = "<!-- builtins:start";
const END: &str = "<!-- builtins:end -->";

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

#[test]
fn components_doc_lists_every_builtin() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/components.md");
    let text = std::fs::read_to_string(&path).unwrap();
    let start = text.find(START).expect("start marker");
    let body_start = start + text[start..].find('\n').expect("marker line") + 1;
    let end = text.find(END).expect("end marker");
    let current = &text[body_start..end];
    let expected = table();
    if current != expected {
        if std::env::var_os("CODEX_BLESS").is_some() {
            let updated = format!("{}{}{}", &text[..body_start], expected, &text[end..]);
            std::fs::write(&path, updated).unwrap();
        } else {
            panic!(
                "docs/components.md is out of date; run with CODEX_BLESS=1 to rewrite it.\nexpected:\n{expected}\nfound:\n{current}"
            );
        }
    }
}
