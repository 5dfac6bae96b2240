//! The fuzz targets' inputs, replayed on the stable toolchain by plain `cargo test`: every
//! committed seed (`fuzz/seeds/<target>/`) and every input a fuzzing session found a problem
//! with (`tests/fixtures/fuzz/<target>/`), fed to the same parser the target feeds, through the
//! host's own entry points where it has one. None may panic; each must end in a value or in an
//! error a user can read (docs/fuzzing.md).

use std::path::{Path, PathBuf};

use codex_host::checkpoint::read_state;
use codex_host::config::{Config, Override};
use codex_host::plugins::manifest::Manifest;

/// The inputs of `target`: seeds first, then found problems.
fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dirs = [
        root.join("../fuzz/seeds").join(target),
        root.join("fixtures/fuzz").join(target),
    ];
    let mut found = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut paths: Vec<PathBuf> = entries.map(|e| e.expect("entry").path()).collect();
        paths.sort();
        for path in paths {
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            found.push((path, bytes));
        }
    }
    assert!(!found.is_empty(), "no inputs for the fuzz target {target}");
    found
}

/// A user-facing error: a handful of lines, not a dump.
fn check_short(input: &Path, error: &str) {
    assert!(
        error.lines().count() <= 8 && error.len() <= 2000,
        "{}: an error of {} lines, {} bytes:\n{error}",
        input.display(),
        error.lines().count(),
        error.len()
    );
}

#[test]
fn config_inputs() {
    let dir = tempfile::tempdir().expect("temp dir");
    for (input, bytes) in inputs("config") {
        let Ok(text) = std::str::from_utf8(&bytes) else {
            continue;
        };
        let mut parts = text.split('\0');
        let source = parts.next().unwrap_or_default();
        let overrides: Vec<Override> = parts.filter_map(|arg| arg.parse().ok()).collect();
        let path = dir.path().join("config.ron");
        if let Err(e) = Config::from_source(&path, source, &overrides) {
            check_short(&input, &e.to_string());
        }
    }
}

#[test]
fn manifest_inputs() {
    let dir = tempfile::tempdir().expect("temp dir");
    for (input, bytes) in inputs("manifest") {
        let Ok(text) = std::str::from_utf8(&bytes) else {
            continue;
        };
        if let Err(e) = Manifest::from_source(&dir.path().join("plugins.ron"), text) {
            check_short(&input, &e.to_string());
        }
    }
}

#[test]
fn checkpoint_state_inputs() {
    let dir = tempfile::tempdir().expect("temp dir");
    for (input, bytes) in inputs("checkpoint_state") {
        let file = dir.path().join("trainer_state.json");
        std::fs::write(&file, &bytes).expect("state file");
        let state = match read_state(dir.path()) {
            Ok(state) => state,
            Err(e) => {
                check_short(&input, &e.to_string());
                continue;
            }
        };
        // Written back as a checkpoint writes it, it reads back the same, to the bit: a resumed
        // run continues from exactly these values.
        let written = serde_json::to_string_pretty(&state).expect("serialisable");
        std::fs::write(&file, &written).expect("state file");
        let back = read_state(dir.path()).expect("the written state reads back");
        assert_eq!(
            serde_json::to_value(&state).expect("json"),
            serde_json::to_value(&back).expect("json"),
            "{}",
            input.display()
        );
        assert_eq!(
            state.val_loss.map(f64::to_bits),
            back.val_loss.map(f64::to_bits)
        );
    }
}

#[test]
fn tokenizer_json_inputs() {
    let dir = tempfile::tempdir().expect("temp dir");
    for (input, bytes) in inputs("tokenizer_json") {
        std::fs::write(dir.path().join("tokenizer.json"), &bytes).expect("tokenizer file");
        // Through the `hf` tokenizer's factory, as a run builds it: a tokenizer or an error,
        // never a panic (the plugin glue would turn one into an error: look at the message).
        let built =
            crate::tokenizers::tokenizer("hf", r#"{"path": "tokenizer.json"}"#, dir.path(), &[]);
        if let Err(e) = built {
            assert!(!e.contains("panic"), "{}: {e}", input.display());
            check_short(&input, &e);
        }
    }
}

#[test]
fn safetensors_header_inputs() {
    for (input, bytes) in inputs("safetensors_header") {
        let Ok(file) = safetensors::SafeTensors::deserialize(&bytes) else {
            continue;
        };
        for (name, view) in file.tensors() {
            let elements: usize = view.shape().iter().product();
            assert_eq!(
                elements * view.dtype().bitsize(),
                view.data().len() * 8,
                "{}: `{name}`",
                input.display()
            );
        }
    }
}
