//! The built-in components this binary must carry.
//!
//! `inventory` registrations in a crate the binary never references vanish without a trace, so
//! this list is written out by hand: a built-in that disappears fails here, by name.

use codex_host::plugins::registry::{Origin, Registry};
use codex_plugin_api::{ComponentKind, API_VERSION};

const EXPECTED: &[(ComponentKind, &str)] = &[
    (ComponentKind::Tokenizer, "hf"),
    (ComponentKind::Tokenizer, "bpe"),
    (ComponentKind::Tokenizer, "bytes"),
    (ComponentKind::Model, "gpt2"),
    (ComponentKind::Model, "llama"),
    (ComponentKind::Optimizer, "adamw"),
    (ComponentKind::Optimizer, "sgd"),
    (ComponentKind::Sink, "ndjson"),
    (ComponentKind::Sink, "csv"),
    (ComponentKind::Sink, "tensorboard"),
    (ComponentKind::Sink, "console"),
    (ComponentKind::Tracker, "mlflow"),
    (ComponentKind::Trainer, "default"),
    (ComponentKind::Kernel, "cpu"),
];

fn builtins() -> Registry {
    Registry::with_builtins().unwrap_or_else(|e| panic!("built-in registrations conflict: {e}"))
}

#[test]
fn every_expected_builtin_is_registered() {
    let registry = builtins();
    let missing: Vec<String> = EXPECTED
        .iter()
        .filter(|(kind, name)| !registry.contains(*kind, name))
        .map(|(kind, name)| format!("{} `{name}`", kind.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "built-ins missing from the binary: {} (is the crate referenced from host/src/lib.rs, and \
         does it call `builtin!`?)",
        missing.join(", ")
    );
}

#[test]
fn builtins_describe_themselves() {
    for entry in builtins().entries() {
        let what = format!("{} `{}`", entry.kind.as_str(), entry.name);
        assert!(
            matches!(entry.origin, Origin::Builtin { .. }),
            "{what}: {:?}",
            entry.origin
        );
        assert_eq!(entry.api_version, API_VERSION, "{what}");
        let decl = entry.declaration().expect("a built-in is declared");
        assert_eq!(decl.kind(), entry.kind, "{what}");
        assert!(!entry.version.is_empty(), "{what} has no version");
        let description = entry.description.trim();
        assert!(!description.is_empty(), "{what} has no description");
        assert!(
            !description.contains('\n'),
            "{what}: the description must be one line"
        );
    }
}
