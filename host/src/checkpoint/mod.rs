//! Checkpoints on disk: atomic to write, verified before anything is loaded.
//!
//! A checkpoint is a directory `checkpoints/step-00000200/` holding its files and a
//! `SHA256SUMS` that `sha256sum -c` reads. It is written into a temporary sibling directory,
//! every file fsynced, `SHA256SUMS` written last, then the directory renamed into place and
//! its parent fsynced. A crash at any moment therefore leaves either no `step-*` directory
//! or a whole one; a `step-*` directory whose sums do not match (a later disk error, a hand
//! edit) is detected by [`verify`] and never loaded.
//!
//! This module is the format ([`HostState`], [`CHECKPOINT_FILES`]), the mechanism, and one
//! pure policy: *what* goes into a checkpoint is decided by the run (`run::session`); *which*
//! checkpoints to keep is [`retention`], a function from what is on disk to what to delete,
//! which the run executes with [`remove`].
//!
//! For tests only, the environment variable
//! `CODEX_ML_TEST_CHECKPOINT_PAUSE=<step>:<file>[:<seconds>]` makes the writer stop after
//! writing `<file>` (or `SHA256SUMS`) of the checkpoint at `<step>`: it prints
//! `checkpoint test hook: paused after <file>` on stderr and sleeps (60 seconds unless told),
//! so a test can `kill -9` the process, or signal it, in the middle of a checkpoint write.

mod retention;
mod state;
mod verify;
mod write;

use std::io;
use std::path::{Path, PathBuf};

pub use retention::{remove, retention, Summary};
pub use state::{
    is_checkpoint_dir, read_state, resolve, HostState, RngStreams, ScheduleState, StateError,
    CHECKPOINT_FILES, HOST_STATE_VERSION, STATE_FILE,
};
pub use verify::{latest_valid, list, verify, LatestValid};
pub use write::{remove_stale_writes, set_aside_after, Writer};

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

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CheckpointError + '_ {
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

#[cfg(test)]
mod tests {
    use std::fs;

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
