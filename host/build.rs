//! Build facts recorded in every run's `metadata.json`: the git commit the binary was built
//! from and the versions of the key dependencies, read from `Cargo.lock`.
//!
//! Nothing here may fail the build: a tarball without `.git`, a machine without `git`, or a
//! missing `Cargo.lock` give "unknown". `CODEX_GIT_COMMIT` in the build environment overrides
//! the commit (for builds from an exported source tree).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The dependencies whose versions decide numerical results or the plugin ABI.
const KEY_DEPENDENCIES: [&str; 5] = [
    "candle-core",
    "tokenizers",
    "safetensors",
    "abi_stable",
    "wasmtime",
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CODEX_GIT_COMMIT");
    let manifest_dir = env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_default();

    let commit = env::var("CODEX_GIT_COMMIT")
        .ok()
        .map(|c| c.trim().to_string())
        .filter(|c| !c.is_empty())
        .or_else(|| git_commit(&manifest_dir))
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=CODEX_GIT_COMMIT={commit}");

    let lock = manifest_dir.parent().map(|p| p.join("Cargo.lock"));
    let lock_text = lock.as_deref().and_then(|p| {
        println!("cargo:rerun-if-changed={}", p.display());
        std::fs::read_to_string(p).ok()
    });
    let versions: Vec<String> = KEY_DEPENDENCIES
        .iter()
        .map(|dep| {
            let v = lock_text
                .as_deref()
                .and_then(|t| version_in_lock(t, "codex-host", dep))
                .unwrap_or_else(|| "unknown".to_string());
            format!("{dep}={v}")
        })
        .collect();
    println!("cargo:rustc-env=CODEX_DEP_VERSIONS={}", versions.join(";"));

    let rustc = env::var_os("RUSTC")
        .and_then(|r| Command::new(r).arg("-V").output().ok())
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=CODEX_RUSTC_VERSION={rustc}");
}

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

/// The commit of HEAD, and rerun triggers so that a new commit rebuilds with the new id.
fn git_commit(dir: &Path) -> Option<String> {
    let commit = git(dir, &["rev-parse", "HEAD"])?;
    if !commit.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    if let Some(git_dir) = git(dir, &["rev-parse", "--absolute-git-dir"]) {
        let git_dir = PathBuf::from(git_dir);
        println!("cargo:rerun-if-changed={}", git_dir.join("HEAD").display());
        let common = git(dir, &["rev-parse", "--git-common-dir"]).map(|c| {
            let c = PathBuf::from(c);
            if c.is_absolute() {
                c
            } else {
                dir.join(c)
            }
        });
        if let (Some(common), Some(head_ref)) = (common, git(dir, &["symbolic-ref", "-q", "HEAD"]))
        {
            for trigger in [common.join(&head_ref), common.join("packed-refs")] {
                if trigger.exists() {
                    println!("cargo:rerun-if-changed={}", trigger.display());
                }
            }
        }
    }
    Some(commit)
}

struct Package<'a> {
    name: &'a str,
    version: &'a str,
    dependencies: Vec<&'a str>,
}

fn packages(lock: &str) -> Vec<Package<'_>> {
    let mut out = Vec::new();
    for block in lock.split("[[package]]").skip(1) {
        let mut name = None;
        let mut version = None;
        let mut dependencies = Vec::new();
        let mut in_deps = false;
        for line in block.lines() {
            let line = line.trim();
            if in_deps {
                if line.starts_with(']') {
                    in_deps = false;
                } else {
                    dependencies.push(line.trim_end_matches(',').trim_matches('"'));
                }
            } else if let Some(v) = line.strip_prefix("name = ") {
                name = Some(v.trim_matches('"'));
            } else if let Some(v) = line.strip_prefix("version = ") {
                version = Some(v.trim_matches('"'));
            } else if line.starts_with("dependencies = [") {
                in_deps = !line.ends_with(']');
            }
        }
        if let (Some(name), Some(version)) = (name, version) {
            out.push(Package {
                name,
                version,
                dependencies,
            });
        }
    }
    out
}

/// The version of `dep` that `root` links: the one `root` names when it depends on it
/// directly (Cargo.lock spells out the version when several are locked), otherwise every
/// locked version.
fn version_in_lock(lock: &str, root: &str, dep: &str) -> Option<String> {
    let pkgs = packages(lock);
    let direct = pkgs.iter().find(|p| p.name == root).and_then(|r| {
        r.dependencies
            .iter()
            .find(|d| d.split(' ').next() == Some(dep))
    });
    if let Some(entry) = direct {
        if let Some(version) = entry.split(' ').nth(1) {
            return Some(version.to_string());
        }
    }
    let all: Vec<&str> = pkgs
        .iter()
        .filter(|p| p.name == dep)
        .map(|p| p.version)
        .collect();
    (!all.is_empty()).then(|| all.join(", "))
}
