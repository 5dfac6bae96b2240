//! The files codex-ml reads that a user or a run wrote, and the strict parsing of each: the
//! experiment config as written on disk (`config`: raw types, `--set` overrides, the `data`
//! section), the plugin manifest (`manifest`), a checkpoint's `trainer_state.json`
//! (`checkpoint`), and the one diagnostics renderer their errors go through (`diagnostics`).
//!
//! Everything here turns text into checked values or into an error that names the file, the
//! position, the field and what to do; nothing here loads a plugin, touches a tensor or starts
//! a run. `codex-host` builds on it (resolving configs, loading plugins, writing checkpoints),
//! and the fuzz targets in `fuzz/` exercise it without building the engine or the sandbox.

#![warn(missing_docs, unreachable_pub)]

pub mod checkpoint;
pub mod config;
pub mod diagnostics;
pub mod manifest;

use std::fs::File;
use std::io;
use std::path::Path;

use sha2::{Digest, Sha256};

/// sha256 of a regular file, as 64 lowercase hex digits, read in one streaming pass.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut file = File::open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}
