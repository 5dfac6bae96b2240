//! `codex-ml verify PATH`: check the SHA-256 sums of one checkpoint, or of every checkpoint of
//! a run, the way `resume` does before loading anything.
//!
//! One line per checkpoint on stdout (`valid  PATH` or `corrupt  PATH: why`), so the output
//! can be read by scripts; the exit code is 1 when any checkpoint is corrupt. Directories left
//! by interrupted writes are listed as `incomplete` but are not failures: they were never
//! checkpoints, resume ignores them and removes them.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use super::{UsageError, VerifyArgs};
use crate::checkpoint;
use crate::run::Latest;

/// The verdict on one checkpoint.
#[derive(Debug)]
pub struct Verdict {
    /// The checkpoint directory.
    pub path: PathBuf,
    /// `None` when valid, else why not.
    pub problem: Option<String>,
}

/// Check `path`: a checkpoint directory, or a run directory (each of its checkpoints).
pub fn check(path: &Path) -> Result<Vec<Verdict>> {
    let is_checkpoint = path.join(checkpoint::SUMS).exists()
        || path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(checkpoint::parse_step)
            .is_some();
    let dirs: Vec<PathBuf> = if is_checkpoint {
        vec![path.to_path_buf()]
    } else if path.join("checkpoints").is_dir() {
        checkpoint::list(&path.join("checkpoints"))?
            .into_iter()
            .map(|(_, dir)| dir)
            .collect()
    } else if path.is_dir() {
        return Err(UsageError(format!(
            "{}: neither a checkpoint nor a run directory with checkpoints/; pass runs/<experiment>/<run-id> or one of its checkpoints",
            path.display()
        ))
        .into());
    } else {
        return Err(UsageError(format!("{}: no such directory", path.display())).into());
    };
    Ok(dirs
        .into_iter()
        .map(|dir| {
            let problem = checkpoint::verify(&dir, &checkpoint::CHECKPOINT_FILES)
                .err()
                .map(|e| e.to_string());
            Verdict { path: dir, problem }
        })
        .collect())
}

/// `codex-ml verify`.
pub fn verify(args: VerifyArgs) -> Result<()> {
    let path = super::run_target(&args.path, Latest::WithCheckpoints)?;
    let verdicts = check(&path)?;
    let mut incomplete = Vec::new();
    if let Ok(entries) = std::fs::read_dir(path.join("checkpoints")) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                incomplete.push(entry.path());
            }
        }
    }
    incomplete.sort();
    let corrupt = verdicts.iter().filter(|v| v.problem.is_some()).count();
    if args.json {
        let checkpoints: Vec<_> = verdicts
            .iter()
            .map(|v| {
                serde_json::json!({
                    "path": v.path,
                    "step": v.path.file_name().and_then(|n| n.to_str()).and_then(checkpoint::parse_step),
                    "valid": v.problem.is_none(),
                    "problem": v.problem,
                })
            })
            .collect();
        super::print_json(&serde_json::json!({
            "path": path,
            "checkpoints": checkpoints,
            "incomplete": incomplete,
            "valid": verdicts.len() - corrupt,
            "corrupt": corrupt,
        }))?;
    } else {
        let mut out = std::io::stdout().lock();
        for v in &verdicts {
            match &v.problem {
                None => writeln!(out, "valid    {}", v.path.display())?,
                Some(why) => writeln!(out, "corrupt  {}: {why}", v.path.display())?,
            }
        }
        for dir in &incomplete {
            writeln!(
                out,
                "incomplete  {}: an interrupted write, never a checkpoint (resume removes it)",
                dir.display()
            )?;
        }
        out.flush()?;
    }
    if verdicts.is_empty() {
        bail!(
            "{}: no checkpoints to verify (a run writes one every train.checkpoint_every steps and at its end)",
            path.display()
        );
    }
    if corrupt > 0 {
        bail!(
            "{corrupt} of {} checkpoints are corrupt; resume skips them (`codex-ml resume` uses the newest valid one)",
            verdicts.len()
        );
    }
    Ok(())
}
