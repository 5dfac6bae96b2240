//! Helpers shared by the integration tests (the tests themselves are in `main.rs`'s modules).
//!
//! The `codex-ml` binary belongs to `codex-host`, and cargo builds only the test target's own
//! package's binaries, so the first test to need it builds it (once, with the same profile and
//! target directory as this test binary).

#![warn(missing_docs, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use assert_cmd::Command;

/// The directory holding this test binary's profile outputs (`target/debug`).
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test binary>
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .expect("the test binary lives in target/<profile>/deps")
}

/// `cargo build --offline` of `packages` (and `bin`, when given) with this test binary's
/// profile and target directory, so that what it builds lands in [`profile_dir`].
pub fn cargo_build(packages: &[&str], bin: Option<&str>) -> Result<(), String> {
    let profile_dir = profile_dir();
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or("unexpected target layout")?
        .to_owned();
    let target_dir = profile_dir.parent().ok_or("unexpected target layout")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let mut build = std::process::Command::new(cargo);
    build.args(["build", "--quiet", "--offline"]);
    for package in packages {
        build.args(["-p", package]);
    }
    if let Some(bin) = bin {
        build.args(["--bin", bin]);
    }
    build
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(target_dir);
    match profile.as_str() {
        "debug" => {}
        "release" => {
            build.arg("--release");
        }
        other => {
            build.args(["--profile", other]);
        }
    }
    let status = build
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("building {} failed: {status}", packages.join(", ")))
    }
}

/// The `codex-ml` binary, built first if needed (for tests that spawn and kill it).
pub fn codex_ml_path() -> PathBuf {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    if let Err(e) = BUILT.get_or_init(|| cargo_build(&["codex-host"], Some("codex-ml"))) {
        panic!("{e}");
    }
    profile_dir().join(format!("codex-ml{}", std::env::consts::EXE_SUFFIX))
}

/// The token cache the tests share, beside the build outputs: tests keep out of the user's
/// cache directory (the default), through `CODEX_ML_CACHE` for the binary and
/// `data.cache_dir` for runs started in the test process.
pub fn token_cache() -> PathBuf {
    profile_dir().join("token-cache")
}

/// A command running the `codex-ml` binary, built first if needed.
pub fn codex_ml() -> Command {
    let mut cmd = Command::new(codex_ml_path());
    cmd.env_remove("RUST_LOG");
    cmd.env("CODEX_ML_CACHE", token_cache());
    cmd
}
