//! The run directory: where everything a run produces lives, and the facts needed to
//! reproduce it.
//!
//! ```text
//! runs/<experiment>/<run-id>/   config.ron  metadata.json  status.json  metrics.ndjson
//!                               metrics.csv  log.txt  tokenizer.json  checkpoints/
//! ```
//!
//! Rules, all in service of "never clobber data":
//! - A new run gets `runs/<experiment>/<UTC start, 20261124-201500>`, suffixed `-2`, `-3`, ...
//!   when taken. The directory is claimed with an atomic `create_dir`, so two runs started in
//!   the same second get different ids.
//! - An explicit `--run-dir PATH` ([`RunDir::create_at`]) is created if missing and accepted if
//!   empty. A non-empty directory is refused: if it holds an earlier run of the same
//!   experiment the message says to resume it, otherwise to pick another path.
//! - A resumed run reopens its directory ([`RunDir::open_existing`]), which must hold a run of
//!   the same experiment. Its `config.ron` is kept and the resumed session's config goes next
//!   to it as `config.resume-1.ron`, ...; `metadata.json` keeps the first session's facts and
//!   gains one entry per resumed session in its `resumes` list ([`RunDir::record_resume`]).
//! - One process at a time: a run holds an exclusive advisory lock on `run.lock` in its
//!   directory from the moment it claims or reopens it ([`RunDir::lock`]); the kernel releases
//!   it when the process ends, however it ends. A second process (a second resume, say) is
//!   refused with the holder's pid before it changes anything.
//! - Files that matter are written to a temporary file, fsynced and renamed
//!   ([`crate::fsio::write_atomic`]): a crash leaves the old file or the new one, never half of one.
//!
//! `metadata.json` records the tool version, the git commit (captured by `build.rs`), the
//! versions of the key dependencies (from `Cargo.lock`), OS, CPU, thread count, device,
//! seeds, the plugin lock, and what reading the data found (files read, files skipped as not
//! UTF-8 text).

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::data::DataReport;

/// Errors of creating, opening or writing a run directory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunDirError {
    /// The experiment name cannot be a directory name.
    #[error("experiment name `{name}` cannot name a directory: use letters, digits, `-`, `_` or `.`, not starting with `.`")]
    BadExperiment {
        /// The name.
        name: String,
    },
    /// An explicit run directory is not empty and holds no run of this experiment.
    #[error("run directory {} is not empty; choose a new or empty --run-dir", path.display())]
    NotEmpty {
        /// The directory.
        path: PathBuf,
    },
    /// An explicit run directory already holds a run of this experiment.
    #[error("run directory {} already holds a run of experiment `{experiment}`; resume it with --resume, or choose another --run-dir", path.display())]
    ExistingRun {
        /// The directory.
        path: PathBuf,
        /// Its experiment.
        experiment: String,
    },
    /// A directory to resume holds no run.
    #[error("{} holds no run ({} is missing or unreadable); pass the directory of an earlier run", path.display(), METADATA)]
    NotARun {
        /// The directory.
        path: PathBuf,
    },
    /// A directory to resume holds a run of another experiment.
    #[error("{} holds a run of experiment `{found}`, not `{expected}`; resume it with its own config", path.display())]
    OtherExperiment {
        /// The directory.
        path: PathBuf,
        /// The experiment of the config.
        expected: String,
        /// The experiment recorded in the directory.
        found: String,
    },
    /// Another process holds the run directory's lock.
    #[error("run directory {} is in use by another codex-ml process ({}); wait for it to end, or stop it (kill -TERM <pid>: it checkpoints first) and then resume", path.display(), if holder.is_empty() { "its pid is not recorded" } else { holder.as_str() })]
    InUse {
        /// The directory.
        path: PathBuf,
        /// What the holder wrote into the lock file (`pid N`).
        holder: String,
    },
    /// A path exists but is not a directory.
    #[error("{} exists and is not a directory; choose another --run-dir", path.display())]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// Too many runs started in the same second.
    #[error("no free run id under {} for {base}; remove stale run directories", parent.display())]
    NoFreeId {
        /// `runs/<experiment>`.
        parent: PathBuf,
        /// The timestamp id.
        base: String,
    },
    /// An IO operation failed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done: "create", "write", ...
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The metadata could not be serialised.
    #[error("cannot encode {}: {source}", METADATA)]
    Encode {
        /// The cause.
        source: serde_json::Error,
    },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> RunDirError {
    let path = path.to_path_buf();
    move |source| RunDirError::Io {
        action,
        path,
        source,
    }
}

pub(crate) const CONFIG: &str = "config.ron";
const METADATA: &str = "metadata.json";

/// The lock file of a run directory.
const LOCK: &str = "run.lock";

/// A run's directory and the paths inside it. It holds the directory's lock while it (or a
/// clone) lives.
#[derive(Debug, Clone)]
pub struct RunDir {
    path: PathBuf,
    experiment: String,
    run_id: String,
    resumed: bool,
    _lock: Arc<fs::File>,
}

impl RunDir {
    /// Claim `runs_root/<experiment>/<run-id>` for a new run, the id from `started` (UTC).
    pub fn create_new(
        runs_root: &Path,
        experiment: &str,
        started: SystemTime,
    ) -> Result<RunDir, RunDirError> {
        check_experiment(experiment)?;
        let parent = runs_root.join(experiment);
        fs::create_dir_all(&parent).map_err(io_err("create", &parent))?;
        let base = run_id_for(started);
        for n in 1..=10_000u32 {
            let id = if n == 1 {
                base.clone()
            } else {
                format!("{base}-{n}")
            };
            let path = parent.join(&id);
            match fs::create_dir(&path) {
                Ok(()) => {
                    return Ok(RunDir {
                        _lock: RunDir::lock(&path)?,
                        path,
                        experiment: experiment.to_string(),
                        run_id: id,
                        resumed: false,
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err("create", &path)(e)),
            }
        }
        Err(RunDirError::NoFreeId { parent, base })
    }

    /// Use `path` (from `--run-dir`) for a new run: created if missing, accepted if empty.
    pub fn create_at(path: &Path, experiment: &str) -> Result<RunDir, RunDirError> {
        check_experiment(experiment)?;
        if path.exists() {
            if !path.is_dir() {
                return Err(RunDirError::NotADirectory {
                    path: path.to_path_buf(),
                });
            }
            let mut entries = fs::read_dir(path).map_err(io_err("read", path))?;
            if entries.next().is_some() {
                return Err(match recorded_experiment(path) {
                    Some(found) if found == experiment => RunDirError::ExistingRun {
                        path: path.to_path_buf(),
                        experiment: found,
                    },
                    _ => RunDirError::NotEmpty {
                        path: path.to_path_buf(),
                    },
                });
            }
        } else {
            fs::create_dir_all(path).map_err(io_err("create", path))?;
        }
        Ok(RunDir {
            _lock: RunDir::lock(path)?,
            path: path.to_path_buf(),
            experiment: experiment.to_string(),
            run_id: dir_name(path),
            resumed: false,
        })
    }

    /// Reopen the directory of an earlier run of `experiment`, to resume it.
    pub fn open_existing(path: &Path, experiment: &str) -> Result<RunDir, RunDirError> {
        check_experiment(experiment)?;
        if path.exists() && !path.is_dir() {
            return Err(RunDirError::NotADirectory {
                path: path.to_path_buf(),
            });
        }
        let found = recorded_experiment(path).ok_or_else(|| RunDirError::NotARun {
            path: path.to_path_buf(),
        })?;
        if found != experiment {
            return Err(RunDirError::OtherExperiment {
                path: path.to_path_buf(),
                expected: experiment.to_string(),
                found,
            });
        }
        Ok(RunDir {
            _lock: RunDir::lock(path)?,
            path: path.to_path_buf(),
            experiment: experiment.to_string(),
            run_id: dir_name(path),
            resumed: true,
        })
    }

    /// Take the exclusive lock of the run directory `path`, writing this process's id into
    /// the lock file for the next one to name. Refused with [`RunDirError::InUse`] while
    /// another process holds it.
    pub fn lock(path: &Path) -> Result<Arc<fs::File>, RunDirError> {
        let file_path = path.join(LOCK);
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&file_path)
            .map_err(io_err("open", &file_path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = io::Read::read_to_string(&mut file, &mut holder);
                return Err(RunDirError::InUse {
                    path: path.to_path_buf(),
                    holder: holder.trim().to_owned(),
                });
            }
            Err(fs::TryLockError::Error(e)) => return Err(io_err("lock", &file_path)(e)),
        }
        let holder = format!("pid {}\n", std::process::id());
        file.set_len(0)
            .and_then(|()| io::Write::write_all(&mut file, holder.as_bytes()))
            .map_err(io_err("write", &file_path))?;
        Ok(Arc::new(file))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The run id: the directory's name.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// The experiment.
    pub fn experiment(&self) -> &str {
        &self.experiment
    }

    /// True when reopened to resume.
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// `config.ron`.
    pub fn config_path(&self) -> PathBuf {
        self.path.join(CONFIG)
    }

    /// `metadata.json`.
    pub fn metadata_path(&self) -> PathBuf {
        self.path.join(METADATA)
    }

    /// `metrics.ndjson`.
    pub fn metrics_ndjson_path(&self) -> PathBuf {
        self.path.join("metrics.ndjson")
    }

    /// `metrics.csv`.
    pub fn metrics_csv_path(&self) -> PathBuf {
        self.path.join("metrics.csv")
    }

    /// `log.txt`.
    pub fn log_path(&self) -> PathBuf {
        self.path.join("log.txt")
    }

    /// `tokenizer.json`.
    pub fn tokenizer_path(&self) -> PathBuf {
        self.path.join("tokenizer.json")
    }

    /// `checkpoints/` (created by whoever writes the first checkpoint).
    pub fn checkpoints_dir(&self) -> PathBuf {
        self.path.join("checkpoints")
    }

    /// Write the resolved config. Returns the path written: `config.ron`, or
    /// `config.resume-N.ron` when resuming a run whose `config.ron` must be kept.
    pub fn write_config(&self, text: &str) -> Result<PathBuf, RunDirError> {
        let path = free_path(&self.path, "config", "ron");
        crate::fsio::write_atomic(&path, text.as_bytes()).map_err(io_err("write", &path))?;
        Ok(path)
    }

    /// Write the metadata of a new run; when `metadata.json` exists it is kept and this goes
    /// to `metadata.resume-N.json`. Resumed sessions use [`RunDir::record_resume`] instead.
    pub fn write_metadata(&self, metadata: &Metadata) -> Result<PathBuf, RunDirError> {
        let mut text = serde_json::to_string_pretty(metadata)
            .map_err(|source| RunDirError::Encode { source })?;
        text.push('\n');
        let path = free_path(&self.path, "metadata", "json");
        crate::fsio::write_atomic(&path, text.as_bytes()).map_err(io_err("write", &path))?;
        Ok(path)
    }
}

impl RunDir {
    /// Add a resumed session to `metadata.json` without losing what is there: the first
    /// session's facts stay as they are, and the `resumes` list gains this session's (when,
    /// from which checkpoint and step — no checkpoint and step 0 for a run started again — and its own tool, OS, CPU, threads, device, seeds and
    /// plugins, which may differ from the first session's).
    pub fn record_resume(
        &self,
        metadata: &Metadata,
        from_step: u64,
        checkpoint: Option<&Path>,
    ) -> Result<PathBuf, RunDirError> {
        let path = self.metadata_path();
        let text = fs::read_to_string(&path).map_err(io_err("read", &path))?;
        let mut doc: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| RunDirError::Io {
                action: "parse",
                path: path.clone(),
                source: io::Error::new(io::ErrorKind::InvalidData, e),
            })?;
        let mut entry =
            serde_json::to_value(metadata).map_err(|source| RunDirError::Encode { source })?;
        if let Some(fields) = entry.as_object_mut() {
            fields.remove("experiment");
            fields.remove("run_id");
            fields.remove("resumed");
            fields.insert("from_step".into(), from_step.into());
            // No checkpoint: the run was started again from step 0.
            let checkpoint = checkpoint.map(|c| c.display().to_string());
            fields.insert("checkpoint".into(), checkpoint.into());
        }
        let Some(fields) = doc.as_object_mut() else {
            return Err(RunDirError::NotARun {
                path: self.path.clone(),
            });
        };
        match fields.get_mut("resumes").and_then(|r| r.as_array_mut()) {
            Some(list) => list.push(entry),
            None => {
                fields.insert("resumes".into(), serde_json::Value::Array(vec![entry]));
            }
        }
        let mut out =
            serde_json::to_string_pretty(&doc).map_err(|source| RunDirError::Encode { source })?;
        out.push('\n');
        crate::fsio::write_atomic(&path, out.as_bytes()).map_err(io_err("write", &path))?;
        Ok(path)
    }
}

impl RunDir {
    /// The plugin lock of the run's latest session: its newest `resumes` entry's, else the
    /// first session's (from `metadata.json`).
    pub fn plugin_lock_in_use(&self) -> Result<Vec<PluginLock>, RunDirError> {
        let path = self.metadata_path();
        let text = fs::read_to_string(&path).map_err(io_err("read", &path))?;
        let bad = |e: serde_json::Error| RunDirError::Io {
            action: "parse",
            path: path.clone(),
            source: io::Error::new(io::ErrorKind::InvalidData, e),
        };
        let doc: serde_json::Value = serde_json::from_str(&text).map_err(bad)?;
        let latest = doc
            .get("resumes")
            .and_then(|r| r.as_array())
            .and_then(|r| r.last())
            .unwrap_or(&doc);
        match latest.get("plugins") {
            Some(plugins) => serde_json::from_value(plugins.clone()).map_err(bad),
            None => Ok(Vec::new()),
        }
    }
}

fn dir_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// `<stem>.<ext>` if free, else the first free `<stem>.resume-N.<ext>`.
fn free_path(dir: &Path, stem: &str, ext: &str) -> PathBuf {
    let first = dir.join(format!("{stem}.{ext}"));
    if !first.exists() {
        return first;
    }
    (1u32..)
        .map(|n| dir.join(format!("{stem}.resume-{n}.{ext}")))
        .find(|p| !p.exists())
        .unwrap_or(first)
}

fn check_experiment(name: &str) -> Result<(), RunDirError> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(RunDirError::BadExperiment {
            name: name.to_string(),
        })
    }
}

/// The experiment of the run in `dir`: from `metadata.json`, or, for a run stopped before it
/// got that far, from the `config.ron` it writes first.
fn recorded_experiment(dir: &Path) -> Option<String> {
    let from_metadata = || {
        let text = fs::read_to_string(dir.join(METADATA)).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        v.get("experiment")?.as_str().map(str::to_string)
    };
    let from_config = || {
        #[derive(serde::Deserialize)]
        struct Named {
            experiment: String,
        }
        let text = fs::read_to_string(dir.join(CONFIG)).ok()?;
        ron::from_str::<Named>(&text).ok().map(|n| n.experiment)
    };
    from_metadata().or_else(from_config)
}

/// Whether `dir` holds a run (its `metadata.json`, or the `config.ron` a run writes first).
pub fn holds_run(dir: &Path) -> bool {
    recorded_experiment(dir).is_some()
}

/// The run directories under `runs_root` (`<experiment>/<run-id>`), of `experiment` or, with
/// `None`, of every experiment, oldest first. Run ids are UTC start times, so they order runs
/// across experiments too; `20261124-201500-2` comes after `20261124-201500`, as it started
/// later. Directories that hold no run (the token cache of older versions, say) are left out.
pub fn runs(runs_root: &Path, experiment: Option<&str>) -> io::Result<Vec<PathBuf>> {
    let experiments: Vec<PathBuf> = match experiment {
        Some(name) => vec![runs_root.join(name)],
        None => fs::read_dir(runs_root)?
            .filter_map(Result::ok)
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect(),
    };
    let mut found = Vec::new();
    for parent in experiments {
        for entry in fs::read_dir(&parent)?.filter_map(Result::ok) {
            let path = entry.path();
            if holds_run(&path) {
                found.push((run_id_key(&entry.file_name().to_string_lossy()), path));
            }
        }
    }
    found.sort();
    Ok(found.into_iter().map(|(_, path)| path).collect())
}

/// `(timestamp, suffix)` of a run id, so `-10` sorts after `-9`.
fn run_id_key(id: &str) -> (String, u32) {
    match id.get(..15).zip(id.get(15..)) {
        Some((stamp, rest)) => (
            stamp.to_string(),
            rest.strip_prefix('-')
                .and_then(|n| n.parse().ok())
                .unwrap_or(if rest.is_empty() { 1 } else { 0 }),
        ),
        None => (id.to_string(), 0),
    }
}

/// `YYYYMMDD-HHMMSS` of `t` in UTC.
pub fn run_id_for(t: SystemTime) -> String {
    let (y, mo, d, h, mi, s) = utc(t);
    format!("{y:04}{mo:02}{d:02}-{h:02}{mi:02}{s:02}")
}

/// RFC 3339 (`2026-11-24T20:15:00Z`) of `t` in UTC, to the second.
pub fn rfc3339(t: SystemTime) -> String {
    let (y, mo, d, h, mi, s) = utc(t);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// `t` as seconds since the Unix epoch.
pub fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Calendar fields of `t` in UTC (times before 1970 clamp to the epoch).
fn utc(t: SystemTime) -> (i64, u32, u32, u32, u32, u32) {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    (
        y,
        m,
        d,
        (rem / 3600) as u32,
        (rem % 3600 / 60) as u32,
        (rem % 60) as u32,
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// One entry of the plugin lock: which component came from where.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct PluginLock {
    /// Registry name (`adamw`, `myplugin/lion`).
    pub name: String,
    /// `builtin`, or the path of the native or WASM plugin file.
    pub origin: String,
    /// Hex sha256 of the plugin file; `None` for built-ins.
    pub sha256: Option<String>,
}

/// What the caller knows about the run that [`Metadata::collect`] cannot find out itself.
#[derive(Debug, Clone)]
pub struct MetadataInput {
    /// When the run (or this resumed session) started.
    pub started: SystemTime,
    /// Worker threads in use for tensor work.
    pub threads: usize,
    /// The device, e.g. `cpu`, `cuda:0`.
    pub device: String,
    /// Every seed in use, by role (`run`, `data`, ...).
    pub seeds: BTreeMap<String, u64>,
    /// The plugin lock.
    pub plugins: Vec<PluginLock>,
    /// What reading the data found (files read and skipped), when the data was read.
    pub data: Option<DataReport>,
}

/// The content of `metadata.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Metadata {
    /// The experiment.
    pub experiment: String,
    /// The run id.
    pub run_id: String,
    /// True for a resumed session.
    pub resumed: bool,
    /// Start time, RFC 3339 UTC.
    pub started: String,
    /// Start time, unix seconds.
    pub started_unix: f64,
    /// This tool.
    pub tool: ToolInfo,
    /// Versions of the key dependencies, from `Cargo.lock` at build time.
    pub dependencies: BTreeMap<String, String>,
    /// The operating system.
    pub os: OsInfo,
    /// The processor.
    pub cpu: CpuInfo,
    /// Worker threads in use.
    pub threads: usize,
    /// The device.
    pub device: String,
    /// Every seed, by role.
    pub seeds: BTreeMap<String, u64>,
    /// Every component and where it came from.
    pub plugins: Vec<PluginLock>,
    /// Files of text sources read, and those skipped as not UTF-8 text (counted, the first
    /// few named); globs that matched nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<DataReport>,
}

/// The tool that ran.
#[derive(Debug, Clone, Serialize)]
pub struct ToolInfo {
    /// `codex-ml`.
    pub name: String,
    /// Its version.
    pub version: String,
    /// Git commit it was built from, or `unknown`.
    pub git_commit: String,
    /// The compiler that built it.
    pub rustc: String,
}

/// The operating system.
#[derive(Debug, Clone, Serialize)]
pub struct OsInfo {
    /// `linux`, `macos`, `windows`, ...
    pub name: String,
    /// `x86_64`, `aarch64`, ...
    pub arch: String,
    /// The distribution's pretty name, where known.
    pub release: Option<String>,
    /// The kernel release, where known.
    pub kernel: Option<String>,
}

/// The processor.
#[derive(Debug, Clone, Serialize)]
pub struct CpuInfo {
    /// Model name, or `unknown`.
    pub model: String,
    /// Logical cores available to this process.
    pub logical_cores: usize,
}

impl Metadata {
    /// Gather the facts of this machine and build for `run`.
    pub fn collect(run: &RunDir, input: MetadataInput) -> Metadata {
        Metadata {
            experiment: run.experiment.clone(),
            run_id: run.run_id.clone(),
            resumed: run.resumed,
            started: rfc3339(input.started),
            started_unix: unix_seconds(input.started),
            tool: ToolInfo {
                name: "codex-ml".to_string(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                git_commit: env!("CODEX_GIT_COMMIT").to_string(),
                rustc: env!("CODEX_RUSTC_VERSION").to_string(),
            },
            dependencies: dependency_versions(),
            os: OsInfo {
                name: std::env::consts::OS.to_string(),
                arch: std::env::consts::ARCH.to_string(),
                release: os_release(),
                kernel: read_trimmed("/proc/sys/kernel/osrelease"),
            },
            cpu: CpuInfo {
                model: cpu_model().unwrap_or_else(|| "unknown".to_string()),
                logical_cores: std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1),
            },
            threads: input.threads,
            device: input.device,
            seeds: input.seeds,
            plugins: input.plugins,
            data: input.data,
        }
    }
}

/// `name=version;...` as captured by `build.rs`.
fn dependency_versions() -> BTreeMap<String, String> {
    env!("CODEX_DEP_VERSIONS")
        .split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn read_trimmed(path: &str) -> Option<String> {
    let s = fs::read_to_string(path).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_string())
}

fn os_release() -> Option<String> {
    let text = fs::read_to_string("/etc/os-release").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
}

fn cpu_model() -> Option<String> {
    if let Ok(text) = fs::read_to_string("/proc/cpuinfo") {
        // x86 says "model name"; many ARM kernels say "Hardware" or only "CPU part".
        for key in ["model name", "Hardware", "Processor", "cpu model"] {
            let found = text.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == key && !v.trim().is_empty()).then(|| v.trim().to_string())
            });
            if found.is_some() {
                return found;
            }
        }
    }
    if cfg!(target_os = "macos") {
        let out = std::process::Command::new("sysctl")
            .args(["-n", "machdep.cpu.brand_string"])
            .output()
            .ok()?;
        let s = String::from_utf8(out.stdout).ok()?;
        let s = s.trim();
        return (out.status.success() && !s.is_empty()).then(|| s.to_string());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn run_ids_sort_by_start_then_suffix() {
        let mut ids = vec![
            "20261124-201500-10",
            "20261124-201500-2",
            "20261124-201500",
            "20261123-235959",
            "20261124-201501",
        ];
        ids.sort_by_key(|id| run_id_key(id));
        assert_eq!(
            ids,
            [
                "20261123-235959",
                "20261124-201500",
                "20261124-201500-2",
                "20261124-201500-10",
                "20261124-201501",
            ]
        );
    }

    #[test]
    fn runs_are_listed_oldest_first_across_experiments() {
        let tmp = tempfile::tempdir().unwrap();
        let make = |experiment: &str, id: &str| {
            let dir = tmp.path().join(experiment).join(id);
            fs::create_dir_all(&dir).unwrap();
            let config = format!("(experiment: \"{experiment}\")");
            fs::write(dir.join(CONFIG), config).unwrap();
            dir
        };
        let b2 = make("b", "20261124-201500-2");
        let a1 = make("a", "20261124-201500");
        let b1 = make("b", "20261123-235959");
        let a2 = make("a", "20261125-000000");
        fs::create_dir_all(tmp.path().join("a/not-a-run")).unwrap();
        fs::create_dir_all(tmp.path().join(".cache/x")).unwrap();
        assert_eq!(
            runs(tmp.path(), None).unwrap(),
            [&b1, &a1, &b2, &a2].map(Clone::clone)
        );
        assert_eq!(runs(tmp.path(), Some("a")).unwrap(), [a1, a2]);
        assert!(runs(tmp.path(), Some("c")).is_err());
    }

    #[test]
    fn run_ids_are_utc_timestamps() {
        for (secs, id, rfc) in [
            (0, "19700101-000000", "1970-01-01T00:00:00Z"),
            (951_782_400, "20000229-000000", "2000-02-29T00:00:00Z"),
            (1_795_551_300, "20261124-201500", "2026-11-24T20:15:00Z"),
            (4_102_444_799, "20991231-235959", "2099-12-31T23:59:59Z"),
        ] {
            assert_eq!(run_id_for(at(secs)), id);
            assert_eq!(rfc3339(at(secs)), rfc);
        }
    }

    #[test]
    fn experiment_names_must_be_plain() {
        for ok in ["tiny", "gpt2-small_v1.2"] {
            assert!(check_experiment(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a\\b", ".hidden", "a b"] {
            assert!(check_experiment(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn build_facts_are_present() {
        let deps = dependency_versions();
        for key in ["candle-core", "tokenizers", "safetensors", "abi_stable"] {
            assert!(
                deps.get(key).is_some_and(|v| !v.is_empty()),
                "{key}: {deps:?}"
            );
        }
        assert!(!env!("CODEX_GIT_COMMIT").is_empty());
    }
}
