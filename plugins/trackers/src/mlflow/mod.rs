//! `mlflow`: the run recorded where MLflow users look for it — an MLflow server, through its
//! REST API ([`server`]), or an MLflow file store, offline ([`files`]).
//!
//! Which one is the tracking URI's choice, as in MLflow itself: the `tracking_uri` parameter,
//! else the `MLFLOW_TRACKING_URI` environment variable, else a file store at `root` (by default
//! `mlruns` beside the experiment's runs). `http://` and `https://` mean a server; a `file:`
//! URI or a plain path means a file store. Both record the same things under the same names:
//! the run's params, every metric record as `<split>/<name>`, the run's files as artifacts,
//! the tags `codex.run_id` and `codex.run_dir` by which a resumed run finds its MLflow run
//! again, and the status the run ended with.

mod files;
mod server;

use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use codex_plugin_api::{Describe, Error, Record, Result, RunInfo, RunStatus, Tracker};
use serde::Deserialize;

use files::FileStore;
use server::Server;

/// Parameters of the `mlflow` tracker.
#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields, default)]
struct MlflowParams {
    /// Where to record: `http(s)://host:port` for an MLflow server, or a file store (a `file:`
    /// URI or a directory). Default: `MLFLOW_TRACKING_URI` when set, else the file store at
    /// `root`.
    tracking_uri: Option<String>,
    /// The file store's directory. Default: `mlruns` in the parent of the run directory; a
    /// relative path resolves against that parent too.
    root: Option<String>,
    /// The MLflow experiment. Default: the config's `experiment`.
    experiment_name: Option<String>,
    /// Files up to this size are copied (uploaded, for a server) into the run's artifacts;
    /// larger ones are recorded by path. Default: 16 MiB.
    max_copy_bytes: Option<u64>,
    /// Seconds one request to a server may take before it counts as failed. Default: 10.
    timeout_s: Option<f64>,
}

const ACCEPTED: &str = "tracking_uri, root, experiment_name, max_copy_bytes, timeout_s";
const DEFAULT_MAX_COPY_BYTES: u64 = 16 << 20;
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Tag holding the codex-ml run id, by which a resumed run finds its MLflow run.
pub(crate) const RUN_ID_TAG: &str = "codex.run_id";
/// Tag holding the codex-ml run directory.
pub(crate) const RUN_DIR_TAG: &str = "codex.run_dir";

/// Records a run in MLflow: on a server or in a file store.
pub struct MlflowTracker {
    store: Store,
}

enum Store {
    Files(FileStore),
    Server(Box<Server>),
}

/// Where the parameters (and the environment) say to record.
#[derive(Debug, PartialEq)]
enum Target {
    Files(Option<PathBuf>),
    Server(String),
}

impl Describe for MlflowTracker {
    const NAME: &'static str = "mlflow";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "the run in MLflow (params, metrics, artifacts, status): \
         an MLflow server, or a file store for `mlflow ui`";

    fn check_params(params: &str) -> Result<()> {
        parse(params, env_uri().as_deref()).map(drop)
    }
}

fn invalid(what: impl std::fmt::Display) -> Error {
    Error::msg(format!("invalid parameters for tracker `mlflow`: {what}"))
}

/// `MLFLOW_TRACKING_URI`, when set to something.
fn env_uri() -> Option<String> {
    std::env::var("MLFLOW_TRACKING_URI")
        .ok()
        .filter(|v| !v.trim().is_empty())
}

/// The parameters, checked, and the target they name (`env_uri` standing in for
/// `MLFLOW_TRACKING_URI`).
fn parse(params: &str, env_uri: Option<&str>) -> Result<(MlflowParams, Target)> {
    let p: MlflowParams = codex_plugin_api::strict::parse_params(params)
        .map_err(|e| invalid(format!("{}; accepted: {ACCEPTED}", e.message())))?;
    if p.root.as_deref().is_some_and(|r| r.trim().is_empty()) {
        return Err(invalid(
            "`root` is empty; give a directory or leave it out for `mlruns` beside the run",
        ));
    }
    if let Some(name) = &p.experiment_name {
        if name.trim().is_empty() || name.chars().any(char::is_control) {
            return Err(invalid(format!(
                "`experiment_name` {name:?}: give a non-empty name without control characters, \
                 or leave it out for the config's experiment"
            )));
        }
    }
    if let Some(t) = p.timeout_s {
        if !(t.is_finite() && t > 0.0 && t <= 3600.0) {
            return Err(invalid(format!(
                "`timeout_s` {t}: give seconds above 0 and at most 3600"
            )));
        }
    }
    let target = match (&p.tracking_uri, &p.root) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "both `tracking_uri` and `root` are set; give one (`root` is a file store's \
                 directory, `tracking_uri` a server or a file store)",
            ))
        }
        (Some(uri), None) => target_of(uri, "`tracking_uri`")?,
        (None, Some(root)) => Target::Files(Some(PathBuf::from(root))),
        (None, None) => match env_uri {
            Some(uri) => target_of(uri, "MLFLOW_TRACKING_URI (from the environment)")?,
            None => Target::Files(None),
        },
    };
    Ok((p, target))
}

/// What a tracking URI names; `source` says where it came from, for the error.
fn target_of(uri: &str, source: &str) -> Result<Target> {
    let uri = uri.trim();
    let lower = uri.to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        let rest = &uri[uri.find("://").map_or(0, |i| i + 3)..];
        if rest.is_empty() || rest.starts_with('/') {
            return Err(invalid(format!("{source} {uri:?} names no host")));
        }
        if rest
            .split('/')
            .next()
            .is_some_and(|host| host.contains('@'))
        {
            return Err(invalid(format!(
                "{source} holds credentials; give them in MLFLOW_TRACKING_USERNAME and \
                 MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead, so that they stay \
                 out of the run's config"
            )));
        }
        return Ok(Target::Server(uri.trim_end_matches('/').to_string()));
    }
    if let Some(path) = uri.strip_prefix("file://") {
        if !path.starts_with('/') {
            return Err(invalid(format!(
                "{source} {uri:?}: a file URI holds an absolute path (`file:///...`)"
            )));
        }
        return Ok(Target::Files(Some(PathBuf::from(path))));
    }
    if let Some(path) = uri.strip_prefix("file:") {
        return Ok(Target::Files(Some(PathBuf::from(path))));
    }
    if uri.is_empty() {
        return Err(invalid(format!("{source} is empty")));
    }
    if lower.contains("://") || lower.starts_with("databricks") || lower.starts_with("uc:") {
        return Err(invalid(format!(
            "{source} {uri:?}: codex-ml records to an MLflow server (`http://` or `https://`) \
             or a file store (`file:` or a directory), not to this kind of tracking URI"
        )));
    }
    Ok(Target::Files(Some(PathBuf::from(uri))))
}

/// A relative path as a `/`-separated key.
pub(crate) fn rel_key(rel: &Path) -> String {
    rel.components()
        .filter_map(|c| match c {
            Component::Normal(part) => Some(part.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// `text` with every byte but letters, digits, `/ - . _ ~` and those of `keep` written `%XX`.
pub(crate) fn percent_encode(text: &str, keep: &[u8]) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) || keep.contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A record's time in milliseconds, as MLflow keeps it.
pub(crate) fn record_ms(r: &Record) -> i64 {
    let ms = (r.time * 1000.0).round();
    if ms.is_finite() {
        ms as i64
    } else {
        0
    }
}

impl Tracker for MlflowTracker {
    fn create(params: &str) -> Result<Self> {
        let (p, target) = parse(params, env_uri().as_deref())?;
        let max_copy_bytes = p.max_copy_bytes.unwrap_or(DEFAULT_MAX_COPY_BYTES);
        let store = match target {
            Target::Files(root) => {
                Store::Files(FileStore::new(root, p.experiment_name, max_copy_bytes))
            }
            Target::Server(uri) => Store::Server(Box::new(Server::new(
                &uri,
                p.experiment_name,
                max_copy_bytes,
                p.timeout_s.map_or(DEFAULT_TIMEOUT, Duration::from_secs_f64),
            )?)),
        };
        Ok(MlflowTracker { store })
    }

    fn start(&mut self, run: &RunInfo) -> Result<()> {
        match &mut self.store {
            Store::Files(s) => s.start(run),
            Store::Server(s) => s.start(run),
        }
    }

    fn resume(&mut self, run: &RunInfo, step: u64) -> Result<()> {
        match &mut self.store {
            Store::Files(s) => s.resume(run, step),
            Store::Server(s) => s.resume(run, step),
        }
    }

    fn log_params(&mut self, params: &[(String, String)]) -> Result<()> {
        match &mut self.store {
            Store::Files(s) => s.log_params(params),
            Store::Server(s) => s.log_params(params),
        }
    }

    fn log_metrics(&mut self, records: &[Record]) -> Result<()> {
        match &mut self.store {
            Store::Files(s) => s.log_metrics(records),
            Store::Server(s) => s.log_metrics(records),
        }
    }

    fn log_artifact(&mut self, path: &str) -> Result<()> {
        match &mut self.store {
            Store::Files(s) => s.log_artifact(path),
            Store::Server(s) => s.log_artifact(path),
        }
    }

    fn finish(&mut self, status: RunStatus) -> Result<()> {
        match &mut self.store {
            Store::Files(s) => s.finish(status),
            Store::Server(s) => s.finish(status),
        }
    }

    fn take_notices(&mut self) -> Vec<String> {
        match &mut self.store {
            Store::Files(_) => Vec::new(),
            Store::Server(s) => s.take_notices(),
        }
    }
}

/// A key as MLflow accepts it (letters, digits, `_ - . /` and space), safe as a relative path:
/// other characters become `_`, and so do empty, `.` and `..` segments.
pub(crate) fn safe_key(key: &str) -> String {
    let cleaned: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/' | ' ') {
                c
            } else {
                '_'
            }
        })
        .collect();
    cleaned
        .split('/')
        .map(|segment| match segment {
            "" | "." | ".." => "_",
            s => s,
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_stay_inside_their_folder() {
        let check = |key: &str, expect: &str| assert_eq!(safe_key(key), expect, "{key:?}");
        check("optimizer.lr", "optimizer.lr");
        check("train/loss", "train/loss");
        check("../../etc/passwd", "_/_/etc/passwd");
        check("/abs", "_/abs");
        check("a//b", "a/_/b");
        check("model.params.\"q\":x", "model.params._q__x");
        check("", "_");
    }

    #[test]
    fn strict_params_with_clear_errors() {
        let err = |params: &str| match MlflowTracker::create(params) {
            Ok(_) => panic!("{params} accepted"),
            Err(e) => e.to_string(),
        };
        let e = err(r#"{"rot": "x"}"#);
        assert!(e.contains("tracker `mlflow`") && e.contains("rot"), "{e}");
        assert!(e.contains("accepted: tracking_uri"), "{e}");
        let e = err(r#"{"max_copy_bytes": "big"}"#);
        assert!(e.contains("max_copy_bytes"), "{e}");
        let e = err(r#"{"root": " "}"#);
        assert!(e.contains("`root`"), "{e}");
        let e = err(r#"{"experiment_name": ""}"#);
        assert!(e.contains("`experiment_name`"), "{e}");
        for ok in [
            "",
            "null",
            "{}",
            r#"{"root": "/tmp/x", "experiment_name": "e"}"#,
        ] {
            assert!(MlflowTracker::create(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn the_tracking_uri_chooses_the_store() {
        let target = |params: &str, env: Option<&str>| {
            parse(params, env)
                .map(|(_, t)| t)
                .map_err(|e| e.to_string())
        };
        let files = |p: &str| Ok(Target::Files(Some(PathBuf::from(p))));
        assert_eq!(target("{}", None), Ok(Target::Files(None)));
        assert_eq!(
            target(r#"{"tracking_uri": "http://127.0.0.1:5000/"}"#, None),
            Ok(Target::Server("http://127.0.0.1:5000".into()))
        );
        assert_eq!(
            target("{}", Some("https://mlflow.example")),
            Ok(Target::Server("https://mlflow.example".into()))
        );
        // The parameter wins over the environment, and so does `root`.
        assert_eq!(
            target(
                r#"{"tracking_uri": "file:///srv/mlruns"}"#,
                Some("http://x")
            ),
            files("/srv/mlruns")
        );
        assert_eq!(
            target(r#"{"root": "store"}"#, Some("http://x")),
            files("store")
        );
        assert_eq!(target("{}", Some("file:rel/mlruns")), files("rel/mlruns"));
        assert_eq!(target("{}", Some("/abs/mlruns")), files("/abs/mlruns"));
    }

    #[test]
    fn unusable_tracking_uris_are_refused_with_the_reason() {
        let err = |params: &str, env: Option<&str>| match parse(params, env) {
            Ok(_) => panic!("{params} {env:?} accepted"),
            Err(e) => e.to_string(),
        };
        let e = err(r#"{"tracking_uri": "http://x", "root": "y"}"#, None);
        assert!(e.contains("both `tracking_uri` and `root`"), "{e}");
        let e = err("{}", Some("databricks"));
        assert!(
            e.contains("MLFLOW_TRACKING_URI") && e.contains("not to this kind"),
            "{e}"
        );
        let e = err(r#"{"tracking_uri": "s3://bucket/x"}"#, None);
        assert!(
            e.contains("`tracking_uri`") && e.contains("not to this kind"),
            "{e}"
        );
        let e = err(r#"{"tracking_uri": "https://me:secret@host"}"#, None);
        assert!(
            e.contains("MLFLOW_TRACKING_PASSWORD") && !e.contains("secret"),
            "{e}"
        );
        let e = err(r#"{"tracking_uri": "http://"}"#, None);
        assert!(e.contains("names no host"), "{e}");
        let e = err(r#"{"tracking_uri": "file://rel"}"#, None);
        assert!(e.contains("absolute path"), "{e}");
        let e = err(r#"{"timeout_s": 0}"#, None);
        assert!(e.contains("`timeout_s`"), "{e}");
    }
}
