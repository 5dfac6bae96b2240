//! The plugin manifest: strict parsing with positions, and the checks made before any plugin
//! is loaded (files present, sha256 pins, unique names, no WASM settings on native entries).

use std::path::{Path, PathBuf};

use codex_host::diagnostics::Position;
use codex_host::plugins::manifest::{
    Capabilities, Manifest, ManifestError, OutputFile, PluginKind, PluginOrigin, WasmLimits,
};

const NATIVE_BYTES: &str = "native plugin bytes";
const NATIVE_SHA: &str = "a98a6988ac3cfc463ccb30099c41ad630369037333c7afca9b46671cd214bfbd";
const WASM_BYTES: &str = "wasm plugin bytes";
const WASM_SHA: &str = "90beea531034ca95a6267531a0de6aff3f8a0826b2156ddc739cc3a874c7a800";

/// A directory with two plugin files and the manifest `source` next to them.
struct Fixture {
    dir: tempfile::TempDir,
    manifest: PathBuf,
}

fn fixture(source: &str) -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir(dir.path().join("plugins")).expect("plugins dir");
    std::fs::write(dir.path().join("plugins/liblion.so"), NATIVE_BYTES).expect("native file");
    std::fs::write(dir.path().join("plugins/sink.wasm"), WASM_BYTES).expect("wasm file");
    let manifest = dir.path().join("plugins.ron");
    std::fs::write(&manifest, source).expect("manifest");
    Fixture { dir, manifest }
}

fn load(source: &str) -> (Fixture, Result<Manifest, ManifestError>) {
    let f = fixture(source);
    let result = Manifest::load(&f.manifest);
    (f, result)
}

/// The manifest must fail to parse at `line:col` on `field`, with `message` in the text.
fn check_invalid(source: &str, line: usize, col: usize, field: &str, message: &str) {
    let (f, result) = load(source);
    let error = match result {
        Err(ManifestError::Invalid(d)) => d,
        Err(other) => panic!("expected a diagnostic, got: {other}"),
        Ok(m) => panic!("expected an error, got {m:?}"),
    };
    assert_eq!(error.file, f.manifest);
    assert_eq!(error.start, Some(Position { line, col }), "{error}");
    assert_eq!(error.field.as_deref(), Some(field), "{error}");
    assert!(error.message.contains(message), "{error}");
    let rendered = error.to_string();
    let location = format!("{}:{line}:{col}: {field}: ", f.manifest.display());
    assert!(rendered.starts_with(&location), "{rendered}");
    assert!(
        rendered.contains('^'),
        "no caret under the source line: {rendered}"
    );
}

/// The manifest must be refused after parsing; the message must contain every part.
fn check_refused(source: &str, parts: &[&str]) {
    let (f, result) = load(source);
    let error = result.expect_err("the manifest is invalid");
    let text = error.to_string();
    assert!(
        text.contains(&f.manifest.display().to_string()),
        "the manifest is not named: {text}"
    );
    for part in parts {
        assert!(text.contains(part), "`{part}` missing from: {text}");
    }
}

#[test]
fn a_valid_manifest_resolves_paths_hashes_and_defaults() {
    let source = format!(
        r#"(
    plugins: [
        (name: "lion", origin: native, path: "plugins/liblion.so", sha256: "{}"),
        (
            name: "sink",
            origin: wasm,
            path: "plugins/sink.wasm",
            limits: (memory_mib: 32, fuel: 1000000),
            capabilities: (
                output_file: (path: "sink/out.txt", quota_bytes: 4096),
                log_lines: 100,
                env: ["HOME"],
            ),
        ),
        (name: "bare", origin: wasm, path: "plugins/sink.wasm"),
    ],
)"#,
        NATIVE_SHA.to_uppercase()
    );
    let (f, result) = load(&source);
    let m = result.unwrap_or_else(|e| panic!("{e}"));
    let dir = std::fs::canonicalize(f.dir.path()).expect("canonical dir");
    assert_eq!(m.plugins.len(), 3);

    let lion = &m.plugins[0];
    assert_eq!(
        (lion.name.as_str(), lion.kind()),
        ("lion", PluginKind::Native)
    );
    assert_eq!(lion.path, dir.join("plugins/liblion.so"));
    assert_eq!(lion.declared_path, "plugins/liblion.so");
    assert_eq!(lion.sha256, NATIVE_SHA);
    assert!(lion.pinned);
    assert_eq!(lion.origin, PluginOrigin::Native);

    let sink = &m.plugins[1];
    assert_eq!(sink.sha256, WASM_SHA);
    assert!(!sink.pinned);
    let expected_limits = WasmLimits {
        memory_mib: 32,
        fuel: Some(1_000_000),
        ..WasmLimits::default()
    };
    let expected_capabilities = Capabilities {
        output_file: Some(OutputFile {
            path: "sink/out.txt".into(),
            quota_bytes: 4096,
        }),
        log_lines: Some(100),
        env: vec!["HOME".into()],
        clock: false,
    };
    assert_eq!(
        sink.origin,
        PluginOrigin::Wasm {
            limits: expected_limits,
            capabilities: expected_capabilities
        }
    );

    // Nothing granted, documented limits, when the entry says nothing.
    assert_eq!(
        m.plugins[2].origin,
        PluginOrigin::Wasm {
            limits: WasmLimits::default(),
            capabilities: Capabilities::default()
        }
    );
    let d = WasmLimits::default();
    assert_eq!(
        (
            d.memory_mib,
            d.call_timeout_ms,
            d.fuel,
            d.max_return_bytes,
            d.queue_size
        ),
        (64, 1000, None, 1 << 20, 1024)
    );
}

#[test]
fn an_empty_manifest_declares_nothing() {
    for source in ["()", "(plugins: [])"] {
        let (_f, result) = load(source);
        assert!(result
            .unwrap_or_else(|e| panic!("{source}: {e}"))
            .plugins
            .is_empty());
    }
}

#[test]
fn unknown_key() {
    check_invalid(
        "(\n  plugins: [\n    (name: \"lion\", origin: native, pth: \"plugins/liblion.so\"),\n  ],\n)",
        3,
        36,
        "plugins[0].pth",
        "unknown field `pth`, did you mean `path`?",
    );
    check_invalid(
        "(\n  plugin: [],\n)",
        2,
        3,
        "plugin",
        "did you mean `plugins`?",
    );
    check_invalid(
        "(plugins: [(name: \"s\", origin: wasm, path: \"plugins/sink.wasm\",\n  limits: (memory: 3))])",
        2,
        12,
        "plugins[0].limits.memory",
        "unknown field `memory`, did you mean `memory_mib`?",
    );
}

#[test]
fn wrong_type() {
    check_invalid(
        "(plugins: [\n  (name: \"s\", origin: wasm, path: \"plugins/sink.wasm\",\n   limits: (memory_mib: \"lots\")),\n])",
        3,
        25,
        "plugins[0].limits.memory_mib",
        "expected integer",
    );
    check_invalid(
        "(plugins: [(name: \"s\", origin: dylib, path: \"x\")])",
        1,
        32,
        "plugins[0].origin",
        "unknown variant `dylib`; expected one of `native`, `wasm`",
    );
}

#[test]
fn missing_field() {
    check_invalid(
        "(plugins: [\n  (name: \"lion\", origin: native),\n])",
        2,
        32,
        "plugins[0].path",
        "missing field `path`",
    );
}

#[test]
fn wasm_only_field_on_a_native_entry() {
    // Whichever comes first, the error points at the second of the pair.
    check_invalid(
        "(plugins: [\n  (name: \"lion\", origin: native, path: \"plugins/liblion.so\",\n   limits: (memory_mib: 8)),\n])",
        3,
        4,
        "plugins[0]",
        "`limits` is only for wasm plugins",
    );
    check_invalid(
        "(plugins: [\n  (name: \"lion\", capabilities: (clock: true),\n   origin: native, path: \"plugins/liblion.so\"),\n])",
        3,
        12,
        "plugins[0].origin",
        "`capabilities` is only for wasm plugins",
    );
}

#[test]
fn missing_plugin_file() {
    check_refused(
        "(plugins: [(name: \"gone\", origin: native, path: \"plugins/libgone.so\")])",
        &["plugin `gone`", "plugins/libgone.so", "No such file"],
    );
}

#[test]
fn sha256_mismatch_shows_expected_and_actual() {
    let wrong = "0".repeat(64);
    check_refused(
        &format!("(plugins: [(name: \"lion\", origin: native, path: \"plugins/liblion.so\", sha256: \"{wrong}\")])"),
        &["plugin `lion`", "plugins/liblion.so", &format!("expected {wrong}"), &format!("actual {NATIVE_SHA}")],
    );
}

#[test]
fn malformed_sha256_is_refused() {
    check_refused(
        "(plugins: [(name: \"lion\", origin: native, path: \"plugins/liblion.so\", sha256: \"abc\")])",
        &["plugins[0].sha256", "64 hex digits"],
    );
}

#[test]
fn duplicate_names() {
    check_refused(
        "(plugins: [\n  (name: \"lion\", origin: native, path: \"plugins/liblion.so\"),\n  (name: \"lion\", origin: wasm, path: \"plugins/sink.wasm\"),\n])",
        &[
            "plugins[1].name",
            "`lion` is declared twice",
            "plugins[0] and plugins[1]: plugins/liblion.so and plugins/sink.wasm",
        ],
    );
}

#[test]
fn capability_and_limit_values_are_checked() {
    let entry = |extra: &str| {
        format!("(plugins: [(name: \"s\", origin: wasm, path: \"plugins/sink.wasm\", {extra})])")
    };
    for (extra, parts) in [
        (
            "limits: (queue_size: 0)",
            ["plugins[0].limits.queue_size", "at least 1"],
        ),
        (
            "limits: (fuel: 0)",
            ["plugins[0].limits.fuel", "at least 1"],
        ),
        (
            "capabilities: (output_file: (path: \"../escape.txt\"))",
            [
                "plugins[0].capabilities.output_file.path",
                "inside the run directory",
            ],
        ),
        (
            "capabilities: (env: [\"A=B\"])",
            ["plugins[0].capabilities.env", "`A=B`"],
        ),
    ] {
        check_refused(&entry(extra), &parts);
    }
}

#[test]
fn unreadable_manifest_names_the_path() {
    let error = Manifest::load(Path::new("/nonexistent/plugins.ron")).expect_err("no such file");
    assert!(
        error.to_string().contains("/nonexistent/plugins.ron"),
        "{error}"
    );
}
