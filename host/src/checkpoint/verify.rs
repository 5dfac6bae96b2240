//! Reading `SHA256SUMS` and checking a checkpoint against it; finding the newest one that
//! verifies.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::{io_err, parse_step, CheckpointError, SUMS};
use crate::fsio;

/// Parse `SHA256SUMS` into (file name, hash) pairs.
fn read_sums(dir: &Path) -> Result<Vec<(String, String)>, CheckpointError> {
    let path = dir.join(SUMS);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(CheckpointError::MissingSums {
                dir: dir.to_path_buf(),
            })
        }
        Err(e) => return Err(io_err(&path)(e)),
    };
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.is_empty() {
            continue;
        }
        let malformed = || CheckpointError::MalformedSums {
            path: path.clone(),
            line: i + 1,
        };
        // `sha256sum` writes "<hash>  <name>" (text mode) or "<hash> *<name>" (binary mode).
        let (hash, rest) = line.split_once(' ').ok_or_else(malformed)?;
        let name = rest
            .strip_prefix(' ')
            .or_else(|| rest.strip_prefix('*'))
            .ok_or_else(malformed)?;
        let valid_hash = hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit());
        let valid_name = !name.is_empty() && !name.contains('/') && name != "." && name != "..";
        if !valid_hash || !valid_name {
            return Err(malformed());
        }
        out.push((name.to_string(), hash.to_ascii_lowercase()));
    }
    Ok(out)
}

/// Check every hash of the checkpoint at `dir`, and that each of `required` is covered.
pub fn verify(dir: &Path, required: &[&str]) -> Result<(), CheckpointError> {
    let sums = read_sums(dir)?;
    for name in required {
        if !sums.iter().any(|(n, _)| n == name) {
            return Err(CheckpointError::Unlisted {
                dir: dir.to_path_buf(),
                name: name.to_string(),
            });
        }
    }
    for (name, expected) in sums {
        let path = dir.join(&name);
        if !path.exists() {
            return Err(CheckpointError::MissingFile { path });
        }
        let actual = fsio::sha256_file(&path).map_err(io_err(&path))?;
        if actual != expected {
            return Err(CheckpointError::HashMismatch {
                path,
                expected,
                actual,
            });
        }
    }
    Ok(())
}

/// Every `step-*` directory under `root`, newest step first. Temporary directories are skipped.
pub fn list(root: &Path) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
    let entries = match fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(root)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err(root))?;
        let name = entry.file_name();
        if let Some(step) = name.to_str().and_then(parse_step) {
            if entry.path().is_dir() {
                out.push((step, entry.path()));
            }
        }
    }
    out.sort_by_key(|c| std::cmp::Reverse(c.0));
    Ok(out)
}

/// The result of [`latest_valid`]: the checkpoint found (step, directory), if any, and the
/// newer ones skipped on the way, with why.
pub type LatestValid = (Option<(u64, PathBuf)>, Vec<(PathBuf, CheckpointError)>);

/// The newest checkpoint under `root` that verifies, and the ones skipped on the way (with why).
pub fn latest_valid(root: &Path, required: &[&str]) -> Result<LatestValid, CheckpointError> {
    let mut skipped = Vec::new();
    for (step, dir) in list(root)? {
        match verify(&dir, required) {
            Ok(()) => return Ok((Some((step, dir)), skipped)),
            Err(e) => skipped.push((dir, e)),
        }
    }
    Ok((None, skipped))
}
