//! Writing a checkpoint directory atomically, and clearing the way for a resumed run's
//! checkpoints: stale temporary directories and checkpoints newer than the resume point.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::{dir_name, io_err, list, CheckpointError, PAUSE_HOOK, SUMS, TMP_PREFIX};
use crate::fsio;

/// A checkpoint being written: files go into a temporary directory until [`Writer::commit`].
pub struct Writer {
    tmp: PathBuf,
    dest: PathBuf,
    root: PathBuf,
    step: u64,
    sums: Vec<(String, String)>,
}

impl Writer {
    /// Start writing the checkpoint for `step` under `root` (the run's `checkpoints/`).
    pub fn begin(root: &Path, step: u64) -> Result<Writer, CheckpointError> {
        fs::create_dir_all(root).map_err(io_err(root))?;
        let dest = root.join(dir_name(step));
        if dest.exists() {
            return Err(CheckpointError::Exists { path: dest });
        }
        let tmp = root.join(format!(
            "{TMP_PREFIX}{}-{}",
            dir_name(step),
            std::process::id()
        ));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
        }
        fs::create_dir(&tmp).map_err(io_err(&tmp))?;
        Ok(Writer {
            tmp,
            dest,
            root: root.to_path_buf(),
            step,
            sums: Vec::new(),
        })
    }

    /// The test hook of the module documentation: pause after `name` when asked to.
    fn pause_hook(&self, name: &str) {
        let Ok(spec) = std::env::var(PAUSE_HOOK) else {
            return;
        };
        let mut parts = spec.splitn(3, ':');
        let step = parts.next().and_then(|s| s.parse::<u64>().ok());
        let file = parts.next();
        let seconds = parts
            .next()
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(60);
        if step == Some(self.step) && file == Some(name) {
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr().lock(),
                "checkpoint test hook: paused after {name}"
            );
            std::thread::sleep(std::time::Duration::from_secs(seconds));
        }
    }

    /// The temporary directory, for writers that need a path (e.g. safetensors).
    pub fn path_for(&self, name: &str) -> PathBuf {
        self.tmp.join(name)
    }

    /// Write a whole file from bytes, fsynced, and record its hash.
    pub fn write(&mut self, name: &str, bytes: &[u8]) -> Result<(), CheckpointError> {
        let path = self.tmp.join(name);
        fsio::write_synced(&path, bytes).map_err(io_err(&path))?;
        self.sums.push((name.to_string(), fsio::sha256_hex(bytes)));
        self.pause_hook(name);
        Ok(())
    }

    /// Record a file that was written at [`Writer::path_for`] by someone else: fsync and hash it.
    pub fn add_written(&mut self, name: &str) -> Result<(), CheckpointError> {
        let path = self.tmp.join(name);
        fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(io_err(&path))?;
        let hash = fsio::sha256_file(&path).map_err(io_err(&path))?;
        self.sums.push((name.to_string(), hash));
        self.pause_hook(name);
        Ok(())
    }

    /// Write `SHA256SUMS` last, then move the directory into place. Returns its final path.
    pub fn commit(mut self) -> Result<PathBuf, CheckpointError> {
        self.sums.sort();
        let text: String = self
            .sums
            .iter()
            .map(|(name, hash)| format!("{hash}  {name}\n"))
            .collect();
        let sums_path = self.tmp.join(SUMS);
        fsio::write_synced(&sums_path, text.as_bytes()).map_err(io_err(&sums_path))?;
        fsio::fsync_dir(&self.tmp).map_err(io_err(&self.tmp))?;
        self.pause_hook(SUMS);
        fs::rename(&self.tmp, &self.dest).map_err(io_err(&self.dest))?;
        fsio::fsync_dir(&self.root).map_err(io_err(&self.root))?;
        let dest = std::mem::take(&mut self.dest);
        self.tmp = PathBuf::new();
        Ok(dest)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // An abandoned write leaves nothing that could be mistaken for a checkpoint.
        if !self.tmp.as_os_str().is_empty() {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Remove temporary directories that writers killed mid-write left under `root`. Returns
/// what was removed. Only call it when no other process writes checkpoints there.
pub fn remove_stale_writes(root: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    let entries = match fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(root)(e)),
    };
    let mut removed = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err(root))?;
        let is_tmp = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(TMP_PREFIX));
        if is_tmp && entry.path().is_dir() {
            fs::remove_dir_all(entry.path()).map_err(io_err(&entry.path()))?;
            removed.push(entry.path());
        }
    }
    Ok(removed)
}

/// Move every checkpoint directory of a step after `step` out of the way, to
/// `step-N.superseded` (then `.superseded-2`, ...), which [`list`] does not see. A run resumed
/// from `step` writes those steps again; the old directories are kept, not deleted, because
/// they may be the only copy of something the user wants (a corrupt checkpoint to inspect, or
/// a valid one when resuming from an older checkpoint on purpose). Returns (from, to) pairs.
pub fn set_aside_after(root: &Path, step: u64) -> Result<Vec<(PathBuf, PathBuf)>, CheckpointError> {
    let mut moved = Vec::new();
    for (s, dir) in list(root)? {
        if s <= step {
            continue;
        }
        let base = format!("{}.superseded", dir_name(s));
        let to = (1u32..)
            .map(|n| match n {
                1 => root.join(&base),
                n => root.join(format!("{base}-{n}")),
            })
            .find(|p| !p.exists())
            .unwrap_or_else(|| root.join(&base));
        fs::rename(&dir, &to).map_err(io_err(&dir))?;
        moved.push((dir, to));
    }
    if !moved.is_empty() {
        fsio::fsync_dir(root).map_err(io_err(root))?;
    }
    Ok(moved)
}
