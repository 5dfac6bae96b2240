//! Checkpoints on disk: atomic to write, verified before anything is loaded.
//!
//! A checkpoint is a directory `checkpoints/step-00000200/` holding its files and a
//! `SHA256SUMS` that `sha256sum -c` reads. It is written into a temporary sibling directory,
//! every file fsynced, `SHA256SUMS` written last, then the directory renamed into place and
//! its parent fsynced. A crash at any moment therefore leaves either no `step-*` directory
//! or a whole one; a `step-*` directory whose sums do not match (a later disk error, a hand
//! edit) is detected by [`verify`] and never loaded.
//!
//! This module is mechanism plus one pure policy: *what* goes into a checkpoint is the run's
//! business (`session`); *which* checkpoints to keep is [`retention`], a function from what is
//! on disk to what to delete, which the session executes with [`remove`].
//!
//! For tests only, the environment variable `CODEX_ML_TEST_CHECKPOINT_PAUSE=<step>:<file>`
//! makes the writer stop after writing `<file>` (or `SHA256SUMS`) of the checkpoint at
//! `<step>`: it prints `checkpoint test hook: paused after <file>` on stderr and sleeps, so a
//! test can `kill -9` the process in the middle of a checkpoint write.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Name of the checksum file, written last.
pub const SUMS: &str = "SHA256SUMS";
const PREFIX: &str = "step-";
const TMP_PREFIX: &str = ".tmp-";
/// See the module documentation; read by the writer only, never set outside tests.
const PAUSE_HOOK: &str = "CODEX_ML_TEST_CHECKPOINT_PAUSE";

/// What can go wrong with a checkpoint.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// An IO error on a named path.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// `SHA256SUMS` is missing: the checkpoint was never completed.
    #[error("{dir}: no {SUMS}: the checkpoint is incomplete (interrupted while being written?)")]
    MissingSums {
        /// The checkpoint directory.
        dir: PathBuf,
    },
    /// A line of `SHA256SUMS` is not `<64 hex>  <name>`.
    #[error("{path}:{line}: malformed line in {SUMS}: expected `<sha256>  <file name>`")]
    MalformedSums {
        /// The sums file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
    },
    /// A file listed in `SHA256SUMS` is absent.
    #[error("{path}: listed in {SUMS} but missing")]
    MissingFile {
        /// The missing file.
        path: PathBuf,
    },
    /// A file's hash differs from the one recorded.
    #[error("{path}: sha256 mismatch: expected {expected}, found {actual}")]
    HashMismatch {
        /// The corrupt file.
        path: PathBuf,
        /// Recorded hash.
        expected: String,
        /// Hash of the bytes on disk.
        actual: String,
    },
    /// A file the loader requires is not covered by `SHA256SUMS`.
    #[error("{dir}: required file {name} is not listed in {SUMS}")]
    Unlisted {
        /// The checkpoint directory.
        dir: PathBuf,
        /// The required file name.
        name: String,
    },
    /// A checkpoint for this step already exists.
    #[error("{path}: a checkpoint for this step already exists")]
    Exists {
        /// The existing directory.
        path: PathBuf,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The directory name of the checkpoint at `step`.
pub fn dir_name(step: u64) -> String {
    format!("{PREFIX}{step:08}")
}

/// The step of a checkpoint directory name, if it is one.
pub fn parse_step(name: &str) -> Option<u64> {
    name.strip_prefix(PREFIX)?.parse().ok()
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String, CheckpointError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

fn fsync_dir(dir: &Path) -> Result<(), CheckpointError> {
    // Directories can be opened read-only and fsynced on Unix; elsewhere this is best effort.
    match File::open(dir) {
        Ok(f) => match f.sync_all() {
            Ok(()) => Ok(()),
            Err(e) if cfg!(unix) => Err(io_err(dir)(e)),
            Err(_) => Ok(()),
        },
        Err(e) if cfg!(unix) => Err(io_err(dir)(e)),
        Err(_) => Ok(()),
    }
}

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
        let wanted = spec
            .split_once(':')
            .and_then(|(step, file)| Some((step.parse::<u64>().ok()?, file)));
        if wanted == Some((self.step, name)) {
            eprintln!("checkpoint test hook: paused after {name}");
            std::thread::sleep(std::time::Duration::from_secs(60));
        }
    }

    /// The temporary directory, for writers that need a path (e.g. safetensors).
    pub fn path_for(&self, name: &str) -> PathBuf {
        self.tmp.join(name)
    }

    /// Write a whole file from bytes, fsynced, and record its hash.
    pub fn write(&mut self, name: &str, bytes: &[u8]) -> Result<(), CheckpointError> {
        let path = self.tmp.join(name);
        let mut f = File::create(&path).map_err(io_err(&path))?;
        f.write_all(bytes).map_err(io_err(&path))?;
        f.sync_all().map_err(io_err(&path))?;
        self.sums
            .push((name.to_string(), hex::encode(Sha256::digest(bytes))));
        self.pause_hook(name);
        Ok(())
    }

    /// Record a file that was written at [`Writer::path_for`] by someone else: fsync and hash it.
    pub fn add_written(&mut self, name: &str) -> Result<(), CheckpointError> {
        let path = self.tmp.join(name);
        File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(io_err(&path))?;
        let hash = sha256_file(&path)?;
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
        let mut f = File::create(&sums_path).map_err(io_err(&sums_path))?;
        f.write_all(text.as_bytes()).map_err(io_err(&sums_path))?;
        f.sync_all().map_err(io_err(&sums_path))?;
        fsync_dir(&self.tmp)?;
        self.pause_hook(SUMS);
        fs::rename(&self.tmp, &self.dest).map_err(io_err(&self.dest))?;
        fsync_dir(&self.root)?;
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
        let actual = sha256_file(&path)?;
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
        fsync_dir(root)?;
    }
    Ok(moved)
}

/// Delete the checkpoint directory `dir`. It is first renamed to a temporary name, so a crash
/// halfway through deleting leaves nothing that looks like a (corrupt) checkpoint.
pub fn remove(dir: &Path) -> Result<(), CheckpointError> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let doomed = dir.with_file_name(format!("{TMP_PREFIX}delete-{name}"));
    fs::rename(dir, &doomed).map_err(io_err(dir))?;
    if let Some(parent) = dir.parent() {
        fsync_dir(parent)?;
    }
    fs::remove_dir_all(&doomed).map_err(io_err(&doomed))
}

/// What the retention policy knows of one checkpoint on disk.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// Its step.
    pub step: u64,
    /// Whether every hash matched when it was last checked.
    pub valid: bool,
    /// The validation loss recorded at its step, if the run evaluated there.
    pub val_loss: Option<f64>,
}

/// The retention policy: the steps of the checkpoints to delete so that the newest `keep_last`
/// valid ones and the valid one with the lowest validation loss remain (`keep_last` 0 keeps
/// everything). The newest valid checkpoint is always kept, whatever `keep_last` says, and a
/// checkpoint that does not verify is never deleted here: it is evidence to inspect (`codex-ml
/// verify`), and it may be newer than anything valid. The result is sorted by step.
pub fn retention(checkpoints: &[Summary], keep_last: usize) -> Vec<u64> {
    if keep_last == 0 {
        return Vec::new();
    }
    let mut valid: Vec<&Summary> = checkpoints.iter().filter(|c| c.valid).collect();
    valid.sort_by_key(|c| std::cmp::Reverse(c.step));
    valid.dedup_by_key(|c| c.step);
    let best = valid
        .iter()
        .filter_map(|c| Some((c.val_loss.filter(|l| l.is_finite())?, c.step)))
        // Ties go to the newer checkpoint: `valid` is newest first and `min_by` keeps the first.
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, step)| step);
    let mut doomed: Vec<u64> = valid
        .iter()
        .skip(keep_last)
        .map(|c| c.step)
        .filter(|&step| Some(step) != best)
        .collect();
    doomed.sort_unstable();
    doomed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_ckpt(root: &Path, step: u64, files: &[(&str, &[u8])]) -> PathBuf {
        let mut w = Writer::begin(root, step).unwrap();
        for (name, bytes) in files {
            w.write(name, bytes).unwrap();
        }
        w.commit().unwrap()
    }

    #[test]
    fn written_checkpoint_verifies_and_sha256sum_format_holds() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = write_ckpt(tmp.path(), 7, &[("a.bin", b"hello"), ("b.json", b"{}")]);
        assert_eq!(dir.file_name().unwrap(), "step-00000007");
        verify(&dir, &["a.bin", "b.json"]).unwrap();
        let sums = fs::read_to_string(dir.join(SUMS)).unwrap();
        assert_eq!(
            sums.lines().next().unwrap(),
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824  a.bin"
        );
    }

    #[test]
    fn corruption_is_detected_and_named() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = write_ckpt(tmp.path(), 1, &[("a.bin", b"hello")]);
        fs::write(dir.join("a.bin"), b"hellO").unwrap();
        let e = verify(&dir, &[]).unwrap_err().to_string();
        assert!(
            e.contains("a.bin") && e.contains("expected 2cf24dba"),
            "{e}"
        );

        fs::remove_file(dir.join("a.bin")).unwrap();
        assert!(matches!(
            verify(&dir, &[]),
            Err(CheckpointError::MissingFile { .. })
        ));

        fs::remove_file(dir.join(SUMS)).unwrap();
        assert!(matches!(
            verify(&dir, &[]),
            Err(CheckpointError::MissingSums { .. })
        ));
    }

    #[test]
    fn required_files_must_be_listed_and_sums_well_formed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = write_ckpt(tmp.path(), 1, &[("a.bin", b"x")]);
        assert!(matches!(
            verify(&dir, &["model.safetensors"]),
            Err(CheckpointError::Unlisted { .. })
        ));
        fs::write(dir.join(SUMS), "not a sums line\n").unwrap();
        assert!(matches!(
            verify(&dir, &[]),
            Err(CheckpointError::MalformedSums { line: 1, .. })
        ));
        fs::write(dir.join(SUMS), format!("{}  ../escape\n", "0".repeat(64))).unwrap();
        assert!(matches!(
            verify(&dir, &[]),
            Err(CheckpointError::MalformedSums { .. })
        ));
    }

    #[test]
    fn latest_valid_skips_corrupt_and_abandoned_writes_leave_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        write_ckpt(tmp.path(), 1, &[("a", b"1")]);
        let newer = write_ckpt(tmp.path(), 2, &[("a", b"2")]);
        fs::write(newer.join("a"), b"x").unwrap();
        {
            let mut w = Writer::begin(tmp.path(), 3).unwrap();
            w.write("a", b"3").unwrap();
            // dropped without commit
        }
        let (found, skipped) = latest_valid(tmp.path(), &["a"]).unwrap();
        assert_eq!(found.unwrap().0, 1);
        assert_eq!(skipped.len(), 1);
        assert_eq!(list(tmp.path()).unwrap().len(), 2);
    }

    #[test]
    fn existing_step_is_not_overwritten() {
        let tmp = tempfile::tempdir().unwrap();
        write_ckpt(tmp.path(), 5, &[("a", b"1")]);
        assert!(matches!(
            Writer::begin(tmp.path(), 5),
            Err(CheckpointError::Exists { .. })
        ));
    }

    /// `spec`: one `(step, valid, val_loss)` per checkpoint on disk.
    fn check_retention(spec: &[(u64, bool, Option<f64>)], keep_last: usize, expect: &[u64]) {
        let summaries: Vec<Summary> = spec
            .iter()
            .map(|&(step, valid, val_loss)| Summary {
                step,
                valid,
                val_loss,
            })
            .collect();
        assert_eq!(
            retention(&summaries, keep_last),
            expect,
            "{spec:?} keep {keep_last}"
        );
    }

    #[test]
    fn retention_keeps_the_newest_the_best_and_the_unverifiable() {
        let v = |step| (step, true, None);
        check_retention(&[], 3, &[]);
        check_retention(&[v(1), v(2), v(3)], 3, &[]);
        check_retention(&[v(1), v(2), v(3), v(4), v(5)], 3, &[1, 2]);
        check_retention(&[v(5), v(1), v(4), v(2), v(3)], 2, &[1, 2, 3]);
        check_retention(&[v(1), v(2), v(3), v(4), v(5)], 0, &[]);
        // keep_last 1 still keeps the newest valid one.
        check_retention(&[v(1), v(2)], 1, &[1]);
        // The best validation loss survives outside the window; ties go to the newer.
        check_retention(
            &[(1, true, Some(2.0)), (2, true, Some(1.0)), v(3), v(4), v(5)],
            2,
            &[1, 3],
        );
        check_retention(
            &[(1, true, Some(1.0)), (2, true, Some(1.0)), v(3), v(4)],
            1,
            &[1, 3],
        );
        // A non-finite loss is never the best.
        check_retention(&[(1, true, Some(f64::NAN)), v(2), v(3)], 1, &[1, 2]);
        // Corrupt checkpoints are neither deleted nor counted: the newest valid one stays.
        check_retention(
            &[v(1), v(2), (3, false, Some(0.1)), (4, false, None)],
            1,
            &[1],
        );
        check_retention(&[(1, false, None), (2, false, None)], 1, &[]);
        // A corrupt best does not protect anything, and a valid best is kept.
        check_retention(
            &[(1, true, Some(3.0)), (2, false, Some(1.0)), v(3), v(4)],
            1,
            &[3],
        );
    }

    #[test]
    fn removal_and_stale_writes_leave_no_checkpoint_shaped_leftovers() {
        let tmp = tempfile::tempdir().unwrap();
        let one = write_ckpt(tmp.path(), 1, &[("a", b"1")]);
        write_ckpt(tmp.path(), 2, &[("a", b"2")]);
        remove(&one).unwrap();
        assert_eq!(list(tmp.path()).unwrap().len(), 1);
        let w = Writer::begin(tmp.path(), 3).unwrap();
        std::mem::forget(w); // as a killed process would: no Drop runs
        let removed = remove_stale_writes(tmp.path()).unwrap();
        assert_eq!(removed.len(), 1);
        let names: Vec<String> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["step-00000002"]);
    }

    #[test]
    fn newer_checkpoints_are_set_aside_not_deleted() {
        let tmp = tempfile::tempdir().unwrap();
        for step in [3, 6, 9] {
            write_ckpt(tmp.path(), step, &[("a", b"x")]);
        }
        let moved = set_aside_after(tmp.path(), 3).unwrap();
        assert_eq!(moved.len(), 2);
        let steps: Vec<u64> = list(tmp.path()).unwrap().iter().map(|c| c.0).collect();
        assert_eq!(steps, [3]);
        assert!(tmp.path().join("step-00000006.superseded/a").exists());
        write_ckpt(tmp.path(), 6, &[("a", b"y")]);
        set_aside_after(tmp.path(), 3).unwrap();
        assert!(tmp.path().join("step-00000006.superseded-2/a").exists());
    }
}
