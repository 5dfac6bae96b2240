//! Superseding records after a resume step in a line-oriented metrics file.
//!
//! A run killed after its last checkpoint may have written records for steps it will redo once
//! resumed. Rather than leave duplicated or backwards steps for every reader to untangle, the
//! file sinks rewrite their file on resume, keeping only lines whose step is at most the
//! resume step (write a temporary file, fsync, rename: a crash leaves the old file or the new
//! one, never half of one). A last line without its newline is a write torn by the kill and is
//! dropped; any other line that cannot be read is an error, because dropping it would lose data.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

use codex_plugin_api::{Error, Result};

/// What a file sink knows about one of its lines.
pub trait LineFormat {
    /// The header line (without newline), if the format has one.
    fn header(&self) -> Option<&str>;
    /// The step of a record line, or `None` when the line is not a record.
    fn step_of(&self, line: &str) -> Option<u64>;
}

/// Rewrite `path` keeping the header and the records with `step <= resume_step`.
/// A missing file is left missing.
pub fn truncate_after(path: &Path, resume_step: u64, format: &dyn LineFormat) -> Result<()> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::msg(format!("cannot read {}: {e}", path.display()))),
    };
    let kept = kept_lines(&text, resume_step, format).map_err(|(line, content)| {
        Error::msg(format!(
            "{}:{line}: not a metric record ({content:?}); fix or move the file, then resume again",
            path.display()
        ))
    })?;
    replace(path, kept.as_bytes())
        .map_err(|e| Error::msg(format!("cannot rewrite {} for resume: {e}", path.display())))
}

/// Open `path` for appending records: fresh runs must not find an earlier file there, resumed
/// runs first drop the records their resume supersedes.
pub fn open_for_append(
    sink: &str,
    path: &Path,
    resume_step: Option<u64>,
    format: &dyn LineFormat,
) -> Result<File> {
    match resume_step {
        Some(step) => truncate_after(path, step, format)?,
        None if path.exists() => {
            return Err(Error::msg(format!(
                "sink `{sink}`: {} already exists in a run that is not resumed; resume that run or start a new run directory",
                path.display()
            )))
        }
        None => {}
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| {
            Error::msg(format!(
                "sink `{sink}`: cannot open {}: {e}",
                path.display()
            ))
        })
}

/// The text to keep, or the 1-based number and content of the first unreadable line.
fn kept_lines(
    text: &str,
    resume_step: u64,
    format: &dyn LineFormat,
) -> Result<String, (usize, String)> {
    let mut out = String::with_capacity(text.len());
    let mut lines: Vec<&str> = text.split('\n').collect();
    // `split` yields a final piece after the last newline: empty for a complete file, or a
    // line torn by a crash mid-write; neither is a record to keep.
    lines.pop();
    for (i, line) in lines.iter().enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if i == 0 {
            if let Some(header) = format.header() {
                if line != header {
                    return Err((1, line.to_string()));
                }
                out.push_str(line);
                out.push('\n');
                continue;
            }
        }
        if line.is_empty() {
            continue;
        }
        match format.step_of(line) {
            Some(step) if step <= resume_step => {
                out.push_str(line);
                out.push('\n');
            }
            Some(_) => {}
            None => return Err((i + 1, line.to_string())),
        }
    }
    Ok(out)
}

/// Atomically replace `path` with `bytes`: a temporary `.NAME.resume-tmp` beside it, fsync,
/// rename, fsync of the directory.
pub(crate) fn replace(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("metrics");
    let tmp = path.with_file_name(format!(".{name}.resume-tmp"));
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        // Makes the rename itself durable; not every platform can open a directory.
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Plain;
    impl LineFormat for Plain {
        fn header(&self) -> Option<&str> {
            Some("step")
        }
        fn step_of(&self, line: &str) -> Option<u64> {
            line.parse().ok()
        }
    }

    fn check(input: &str, resume: u64, expect: Result<&str, usize>) {
        let got = kept_lines(input, resume, &Plain).map_err(|(line, _)| line);
        assert_eq!(got.as_deref().map_err(|l| *l), expect, "input {input:?}");
    }

    #[test]
    fn keeps_header_and_steps_up_to_resume() {
        check("step\n1\n2\n3\n4\n", 2, Ok("step\n1\n2\n"));
        check("step\n1\n2\n", 5, Ok("step\n1\n2\n"));
        check("step\n3\n", 0, Ok("step\n"));
        check("", 3, Ok(""));
    }

    #[test]
    fn drops_a_torn_last_line() {
        check("step\n1\n2\n3", 5, Ok("step\n1\n2\n"));
        check("step\n1\n2\n{\"st", 5, Ok("step\n1\n2\n"));
    }

    #[test]
    fn refuses_unreadable_lines_and_foreign_headers() {
        check("step\n1\nxx\n2\n", 5, Err(3));
        check("other\n1\n", 5, Err(1));
    }
}
