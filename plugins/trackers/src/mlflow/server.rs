//! The `mlflow` tracker's server client: the run recorded on an MLflow tracking server through
//! its REST API (`/api/2.0/mlflow/...`), as MLflow's own client records it.
//!
//! Choices, and why:
//! - **Never in training's way.** The tracker runs on its own thread, and a server that is slow
//!   or gone must not cost the run anything: every call the run makes only queues its work in
//!   an outbox, then sends what it can. A failed request (no connection, a timeout, HTTP 429 or
//!   5xx) is not an error: the work stays queued, the tracker says once that the server is
//!   unreachable, and it tries again on later calls after a growing pause (0.5 s doubling to
//!   30 s), saying so when the server answers again. The outbox holds at most
//!   [`MAX_PENDING_POINTS`] metric points; past that the oldest go, and the tracker says how many.
//! - **Refusals** (HTTP 4xx other than 429) are the server's answer, not an outage: a refused
//!   batch of metrics, params or an artifact is dropped with a notice naming the server's
//!   message; a refused run creation or status update ends the tracker with that message
//!   (wrong credentials, a deleted experiment).
//! - **Batched** as MLflow's client does: `runs/log-batch` with at most 1000 metric points or
//!   100 params per request; the metric points queued while the server was away go out
//!   together when it is back.
//! - **The end of the run** waits for the outbox at most [`FINISH_WAIT`] (less than the host
//!   gives a tracker to finish); what could not be sent by then is named in a notice —
//!   `metrics.ndjson` keeps every record.
//! - **At least once.** A request whose answer is lost is sent again; MLflow's store ignores
//!   a metric point it already has, and a run creation is looked up by the tag
//!   `codex.session` (one value per codex-ml process) before it is sent again, so a run is never
//!   made twice.
//! - **Resume** finds the MLflow run tagged with the same `codex.run_id` (the one from the same
//!   run directory first), sets it `RUNNING` again and continues it; a value already on the
//!   server for a metric at a step is not sent again (a resumed run computes the same values
//!   for the steps it repeats). MLflow forbids changing a param's value: a resumed run whose
//!   config changed records the new value as the tag `codex.param.<key>`.
//! - **Artifacts** go through the server's artifact proxy (`mlflow-artifacts:` artifact URIs,
//!   the default of `mlflow server`) when at most `max_copy_bytes`; larger files, and runs
//!   whose artifact store the client would have to reach itself (`s3://`, ...), are recorded by
//!   path in the tag `codex.artifact.<path inside the run directory>`.
//! - **Credentials** come from MLflow's environment variables, never from the config:
//!   `MLFLOW_TRACKING_TOKEN` (a bearer token), else `MLFLOW_TRACKING_USERNAME` and
//!   `MLFLOW_TRACKING_PASSWORD` (basic auth). `MLFLOW_TRACKING_SERVER_CERT_PATH` names a CA
//!   bundle to trust, and `MLFLOW_TRACKING_INSECURE_TLS=true` turns certificate checks off.

use std::collections::{HashMap, VecDeque};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use codex_plugin_api::{Error, Record, Result, RunInfo, RunStatus};
use serde_json::{json, Value};

use super::{now_ms, percent_encode, record_ms, rel_key, safe_key, RUN_DIR_TAG, RUN_ID_TAG};

/// The most metric points kept for a server that does not answer.
pub(super) const MAX_PENDING_POINTS: usize = 1_000_000;
/// The longest `finish` waits for the outbox to empty.
pub(super) const FINISH_WAIT: Duration = Duration::from_secs(25);
/// Tag naming the codex-ml session that created an MLflow run.
const SESSION_TAG: &str = "codex.session";
/// MLflow's limits per `log-batch` request.
const BATCH_POINTS: usize = 1000;
const BATCH_PARAMS: usize = 100;
/// MLflow's longest param value.
const MAX_PARAM_CHARS: usize = 6000;
const FIRST_PAUSE: Duration = Duration::from_millis(500);
const LONGEST_PAUSE: Duration = Duration::from_secs(30);

fn fail(what: impl std::fmt::Display) -> Error {
    Error::msg(format!("mlflow: {what}"))
}

/// Why a request did not succeed.
#[derive(Debug)]
enum Failure {
    /// The server could not be reached or was overloaded: try again later.
    Unreachable(String),
    /// The server answered no.
    Refused(Refusal),
}

/// A server's no: the HTTP status and MLflow's error code and message.
#[derive(Debug)]
struct Refusal {
    status: u16,
    code: String,
    message: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.status, self.code.is_empty()) {
            (0, _) => write!(f, "{}", self.message),
            (status, true) => write!(f, "HTTP {status}: {}", self.message),
            (status, false) => write!(f, "HTTP {status} {}: {}", self.code, self.message),
        }
    }
}

fn refused(message: impl Into<String>) -> Failure {
    Failure::Refused(Refusal {
        status: 0,
        code: String::new(),
        message: message.into(),
    })
}

/// One metric point as MLflow takes it.
#[derive(Clone, Debug)]
struct Point {
    key: String,
    value: f64,
    timestamp: i64,
    step: u64,
}

/// Work for the server, in the order the run asked for it.
#[derive(Debug)]
enum Op {
    Open { run: RunInfo, resume: Option<u64> },
    Params(Vec<(String, String)>),
    Metrics(Vec<Point>),
    Artifact(PathBuf),
    Finish(RunStatus),
}

/// The MLflow run being recorded, once the server has answered.
struct ServerRun {
    run_id: String,
    /// Where the server keeps the run's artifacts.
    artifact_uri: String,
    /// The codex-ml run directory, to place artifacts relative to it.
    run_dir: PathBuf,
    /// Resumed: per metric, the last step the server has.
    logged: HashMap<String, u64>,
    /// Resumed: the params the server has.
    params: HashMap<String, String>,
}

/// A time the server did not answer.
struct Outage {
    since: Instant,
    failures: u32,
    next_try: Instant,
}

/// The HTTP side: base URL, credentials, one connection pool.
struct Api {
    base: String,
    agent: ureq::Agent,
    auth: Option<String>,
}

/// Records a run on an MLflow server.
pub(super) struct Server {
    api: Api,
    experiment_name: Option<String>,
    max_copy_bytes: u64,
    run: Option<ServerRun>,
    outbox: VecDeque<Op>,
    /// Metric points in the outbox.
    pending_points: usize,
    /// Metric points dropped because the outbox was full.
    dropped_points: u64,
    outage: Option<Outage>,
    notices: Vec<String>,
    /// [`MAX_PENDING_POINTS`] and [`FINISH_WAIT`], smaller in tests.
    max_pending: usize,
    finish_wait: Duration,
    /// This session's value of the tag [`SESSION_TAG`], by which a run creation whose answer
    /// was lost is found instead of made twice.
    session: String,
    /// A run creation was sent, whatever came of it.
    create_sent: bool,
    /// Said already: an artifact store it cannot reach, a param that changed.
    said_artifact_store: bool,
    said_param_changed: bool,
}

impl Server {
    pub(super) fn new(
        uri: &str,
        experiment_name: Option<String>,
        max_copy_bytes: u64,
        timeout: Duration,
    ) -> Result<Server> {
        Ok(Server {
            api: Api::new(uri, timeout, &|key| std::env::var(key).ok())?,
            experiment_name,
            max_copy_bytes,
            run: None,
            outbox: VecDeque::new(),
            pending_points: 0,
            dropped_points: 0,
            outage: None,
            notices: Vec::new(),
            session: format!("{:016x}", rand::random::<u64>()),
            create_sent: false,
            max_pending: MAX_PENDING_POINTS,
            finish_wait: FINISH_WAIT,
            said_artifact_store: false,
            said_param_changed: false,
        })
    }

    pub(super) fn start(&mut self, run: &RunInfo) -> Result<()> {
        self.push(Op::Open {
            run: run.clone(),
            resume: None,
        });
        self.send(None)
    }

    pub(super) fn resume(&mut self, run: &RunInfo, step: u64) -> Result<()> {
        self.push(Op::Open {
            run: run.clone(),
            resume: Some(step),
        });
        self.send(None)
    }

    pub(super) fn log_params(&mut self, params: &[(String, String)]) -> Result<()> {
        for chunk in params.chunks(BATCH_PARAMS) {
            self.push(Op::Params(chunk.to_vec()));
        }
        self.send(None)
    }

    pub(super) fn log_metrics(&mut self, records: &[Record]) -> Result<()> {
        let points: Vec<Point> = records
            .iter()
            .map(|r| Point {
                key: safe_key(&format!("{}/{}", r.split, r.name)),
                value: r.value,
                timestamp: record_ms(r),
                step: r.step,
            })
            .collect();
        for chunk in points.chunks(BATCH_POINTS) {
            self.push(Op::Metrics(chunk.to_vec()));
        }
        self.send(None)
    }

    pub(super) fn log_artifact(&mut self, path: &str) -> Result<()> {
        self.push(Op::Artifact(PathBuf::from(path)));
        self.send(None)
    }

    pub(super) fn finish(&mut self, status: RunStatus) -> Result<()> {
        self.push(Op::Finish(status));
        self.send(Some(Instant::now() + self.finish_wait))?;
        if !self.outbox.is_empty() {
            let mut what = Vec::new();
            if self.pending_points > 0 {
                what.push(format!("{} metric points", self.pending_points));
            }
            let count = |f: fn(&Op) -> bool| self.outbox.iter().filter(|op| f(op)).count();
            let params = count(|op| matches!(op, Op::Params(_)));
            if params > 0 {
                what.push(format!("{params} batches of params"));
            }
            let artifacts = count(|op| matches!(op, Op::Artifact(_)));
            if artifacts > 0 {
                what.push(format!("{artifacts} artifacts"));
            }
            what.push("the run's final status".to_string());
            self.notices.push(format!(
                "the MLflow server at {} did not answer before the run ended: {} were not \
                 recorded there (metrics.ndjson in the run directory has every record)",
                self.api.base,
                what.join(", ")
            ));
        }
        Ok(())
    }

    pub(super) fn take_notices(&mut self) -> Vec<String> {
        std::mem::take(&mut self.notices)
    }

    fn push(&mut self, op: Op) {
        if let Op::Metrics(points) = &op {
            self.pending_points += points.len();
        }
        self.outbox.push_back(op);
        // A server away for long: make room by dropping the oldest metric points.
        let mut dropped = 0;
        while self.pending_points > self.max_pending {
            let Some(at) = self
                .outbox
                .iter()
                .position(|op| matches!(op, Op::Metrics(_)))
            else {
                break;
            };
            if let Some(Op::Metrics(points)) = self.outbox.remove(at) {
                self.pending_points -= points.len();
                dropped += points.len() as u64;
            }
        }
        if dropped > 0 {
            if self.dropped_points == 0 {
                self.notices.push(format!(
                    "the MLflow server at {} has been away so long that more than {} metric \
                     points are waiting; the oldest are dropped from now on (metrics.ndjson keeps \
                     them)",
                    self.api.base, self.max_pending
                ));
            }
            self.dropped_points += dropped;
        }
    }

    /// Send what is queued, in order. Without `until`, stop at the first failure (and skip
    /// sending at all while an outage's pause lasts); with it, keep trying until then.
    fn send(&mut self, until: Option<Instant>) -> Result<()> {
        while !self.outbox.is_empty() {
            if let Some(outage) = &self.outage {
                let now = Instant::now();
                if now < outage.next_try {
                    match until {
                        Some(deadline) if now < deadline => {
                            std::thread::sleep(outage.next_try.min(deadline) - now);
                            continue;
                        }
                        _ => return Ok(()),
                    }
                }
            }
            self.coalesce_front();
            let Some(op) = self.outbox.pop_front() else {
                break;
            };
            match self.execute(&op) {
                Ok(()) => {
                    if let Op::Metrics(points) = &op {
                        self.pending_points -= points.len();
                    }
                    if let Some(outage) = self.outage.take() {
                        self.notices.push(format!(
                            "the MLflow server at {} answers again after {:.0} s; sending what \
                             was kept meanwhile",
                            self.api.base,
                            outage.since.elapsed().as_secs_f64()
                        ));
                    }
                }
                Err(Failure::Unreachable(why)) => {
                    self.outbox.push_front(op);
                    let now = Instant::now();
                    match &mut self.outage {
                        None => {
                            self.notices.push(format!(
                                "cannot reach the MLflow server at {} ({why}); training goes on, \
                                 and what the tracker has to send is kept and sent when the \
                                 server answers again",
                                self.api.base
                            ));
                            self.outage = Some(Outage {
                                since: now,
                                failures: 1,
                                next_try: now + FIRST_PAUSE,
                            });
                        }
                        Some(outage) => {
                            outage.failures += 1;
                            let pause = FIRST_PAUSE
                                .saturating_mul(1 << outage.failures.min(8))
                                .min(LONGEST_PAUSE);
                            outage.next_try = now + pause;
                        }
                    }
                    if until.is_none_or(|deadline| now >= deadline) {
                        return Ok(());
                    }
                }
                Err(Failure::Refused(why)) => {
                    let base = &self.api.base;
                    match op {
                        Op::Open { .. } => {
                            return Err(fail(format!(
                                "the MLflow server at {base} refused to start the run: {why}"
                            )))
                        }
                        Op::Finish(_) => {
                            return Err(fail(format!(
                                "the MLflow server at {base} refused the run's final status: {why}"
                            )))
                        }
                        Op::Metrics(points) => {
                            self.pending_points -= points.len();
                            self.notices.push(format!(
                                "the MLflow server at {base} refused {} metric points, which are \
                                 dropped: {why}",
                                points.len()
                            ));
                        }
                        Op::Params(params) => self.notices.push(format!(
                            "the MLflow server at {base} refused {} params, which are dropped: \
                             {why}",
                            params.len()
                        )),
                        Op::Artifact(path) => self.notices.push(format!(
                            "the MLflow server at {base} refused the artifact {}: {why}",
                            path.display()
                        )),
                    }
                }
            }
        }
        Ok(())
    }

    /// Merge the metric batches at the front of the outbox into one request's worth.
    fn coalesce_front(&mut self) {
        while let [Some(Op::Metrics(first)), Some(Op::Metrics(second))] =
            [self.outbox.front(), self.outbox.get(1)]
        {
            if first.len() + second.len() > BATCH_POINTS {
                return;
            }
            if let Some(Op::Metrics(second)) = self.outbox.remove(1) {
                if let Some(Op::Metrics(first)) = self.outbox.front_mut() {
                    first.extend(second);
                }
            }
        }
    }

    fn execute(&mut self, op: &Op) -> std::result::Result<(), Failure> {
        if let Op::Open { run, resume } = op {
            return self.open_run(run, *resume);
        }
        let Some(run) = &self.run else {
            // `Open` is always first, and a refused one ends the tracker.
            return Err(refused("the MLflow run was not started"));
        };
        let run_id = run.run_id.as_str();
        match op {
            Op::Open { .. } => Ok(()),
            Op::Params(params) => {
                let mut fresh = Vec::new();
                let mut changed = Vec::new();
                for (key, value) in params {
                    let key = safe_key(key);
                    let value = cut(value, MAX_PARAM_CHARS);
                    match run.params.get(&key) {
                        Some(old) if *old == value => {}
                        Some(_) => changed
                            .push(json!({"key": format!("codex.param.{key}"), "value": value})),
                        None => fresh.push(json!({"key": key, "value": value})),
                    }
                }
                if !changed.is_empty() && !self.said_param_changed {
                    self.said_param_changed = true;
                    self.notices.push(format!(
                        "{} params of this resumed run differ from those the MLflow run holds, \
                         which MLflow does not let change; the new values are the tags \
                         `codex.param.<key>`",
                        changed.len()
                    ));
                }
                if fresh.is_empty() && changed.is_empty() {
                    return Ok(());
                }
                self.api
                    .post(
                        "runs/log-batch",
                        &json!({"run_id": run_id, "params": fresh, "tags": changed}),
                    )
                    .map(drop)
            }
            Op::Metrics(points) => {
                let metrics: Vec<Value> = points
                    .iter()
                    .filter(|p| run.logged.get(&p.key).is_none_or(|last| p.step > *last))
                    .map(|p| {
                        json!({"key": p.key, "value": json_number(p.value), "timestamp": p.timestamp, "step": p.step})
                    })
                    .collect();
                if metrics.is_empty() {
                    return Ok(());
                }
                self.api
                    .post(
                        "runs/log-batch",
                        &json!({"run_id": run_id, "metrics": metrics}),
                    )
                    .map(drop)
            }
            Op::Artifact(path) => self.upload(path),
            Op::Finish(status) => {
                let status = match status {
                    RunStatus::Finished => "FINISHED",
                    RunStatus::Failed => "FAILED",
                    RunStatus::Killed => "KILLED",
                };
                self.api
                    .post(
                        "runs/update",
                        &json!({"run_id": run_id, "status": status, "end_time": now_ms()}),
                    )
                    .map(drop)
            }
        }
    }

    /// Find or create the experiment, then continue the MLflow run of a resumed run or create
    /// one.
    fn open_run(&mut self, run: &RunInfo, resume: Option<u64>) -> std::result::Result<(), Failure> {
        let name = self
            .experiment_name
            .clone()
            .unwrap_or_else(|| run.experiment.clone());
        let experiment_id = self.experiment_id(&name)?;
        let found = match resume {
            Some(_) => self.find_run(&experiment_id, RUN_ID_TAG, &run.run_id, &run.run_dir)?,
            // A creation sent before may have made the run though its answer was lost.
            None if self.create_sent => {
                self.find_run(&experiment_id, SESSION_TAG, &self.session, &run.run_dir)?
            }
            None => None,
        };
        let mut opened = match found {
            Some(found) if resume.is_none() => found,
            Some(found) => {
                self.api.post(
                    "runs/update",
                    &json!({"run_id": found.run_id, "status": "RUNNING"}),
                )?;
                found
            }
            None => self.create_run(&experiment_id, run)?,
        };
        if let Some(step) = resume {
            self.api.post(
                "runs/log-batch",
                &json!({"run_id": opened.run_id, "tags": [{"key": "codex.resumed_from_step", "value": step.to_string()}]}),
            )?;
        }
        opened.run_dir = PathBuf::from(&run.run_dir);
        self.run = Some(opened);
        Ok(())
    }

    /// The id of the active experiment `name`, created when missing.
    fn experiment_id(&self, name: &str) -> std::result::Result<String, Failure> {
        for _ in 0..2 {
            match self
                .api
                .get("experiments/get-by-name", &[("experiment_name", name)])
            {
                Ok(answer) => {
                    let experiment = &answer["experiment"];
                    if experiment["lifecycle_stage"] == "deleted" {
                        return Err(refused(format!(
                            "experiment `{name}` is deleted on the server; restore it \
                             (`mlflow experiments restore`) or set the tracker's experiment_name"
                        )));
                    }
                    return text(experiment, "experiment_id");
                }
                Err(Failure::Refused(r)) if r.code == "RESOURCE_DOES_NOT_EXIST" => {}
                Err(other) => return Err(other),
            }
            match self.api.post("experiments/create", &json!({"name": name})) {
                Ok(answer) => return text(&answer, "experiment_id"),
                // Created meanwhile by someone else: look it up again.
                Err(Failure::Refused(r)) if r.code == "RESOURCE_ALREADY_EXISTS" => {}
                Err(other) => return Err(other),
            }
        }
        Err(refused(format!(
            "experiment `{name}` can be neither found nor created"
        )))
    }

    fn create_run(
        &mut self,
        experiment_id: &str,
        run: &RunInfo,
    ) -> std::result::Result<ServerRun, Failure> {
        let user = std::env::var("USER")
            .or_else(|_| std::env::var("USERNAME"))
            .unwrap_or_else(|_| "codex-ml".to_string());
        let tags: Vec<Value> = [
            ("mlflow.runName", run.run_id.as_str()),
            ("mlflow.user", user.as_str()),
            ("mlflow.source.type", "LOCAL"),
            ("mlflow.source.name", "codex-ml"),
            (RUN_ID_TAG, run.run_id.as_str()),
            (RUN_DIR_TAG, run.run_dir.as_str()),
            (SESSION_TAG, self.session.as_str()),
        ]
        .iter()
        .map(|(key, value)| json!({"key": key, "value": value}))
        .collect();
        self.create_sent = true;
        let answer = self.api.post(
            "runs/create",
            &json!({
                "experiment_id": experiment_id,
                "run_name": run.run_id,
                "user_id": user,
                "start_time": now_ms(),
                "tags": tags,
            }),
        )?;
        server_run(&answer["run"])
    }

    /// The MLflow run of the experiment tagged `tag` = `value` (the one recorded from
    /// `run_dir` first), if any: by `codex.run_id`, the run an earlier session of a resumed
    /// run recorded.
    fn find_run(
        &self,
        experiment_id: &str,
        tag: &str,
        value: &str,
        run_dir: &str,
    ) -> std::result::Result<Option<ServerRun>, Failure> {
        // Run ids are directory names; one that needs quoting in a filter is not looked up.
        if value.contains(['\'', '`', '\\']) {
            return Ok(None);
        }
        let answer = self.api.post(
            "runs/search",
            &json!({
                "experiment_ids": [experiment_id],
                "filter": format!("tags.`{tag}` = '{value}'"),
                "max_results": 100,
            }),
        )?;
        let runs = answer["runs"].as_array().cloned().unwrap_or_default();
        let same_dir = |r: &Value| {
            r["data"]["tags"].as_array().is_some_and(|tags| {
                tags.iter()
                    .any(|t| t["key"] == RUN_DIR_TAG && t["value"] == run_dir)
            })
        };
        // Prefer the run recorded from this very directory; else any with the same run id.
        match runs.iter().find(|r| same_dir(r)).or(runs.first()) {
            Some(found) => server_run(found).map(Some),
            None => Ok(None),
        }
    }

    /// Upload `path` (a file or a directory) into the run's artifacts, or record it by path.
    fn upload(&mut self, path: &Path) -> std::result::Result<(), Failure> {
        let Some(run) = &self.run else {
            return Err(refused("the MLflow run was not started"));
        };
        let rel = match path.strip_prefix(&run.run_dir) {
            Ok(rel) if !rel.as_os_str().is_empty() => rel.to_path_buf(),
            _ => PathBuf::from(path.file_name().unwrap_or(path.as_os_str())),
        };
        let mut files = Vec::new();
        walk(path, &rel, &mut files);
        let proxied = proxy_location(&run.artifact_uri);
        let mut by_path = Vec::new();
        for (file, rel, size) in files {
            let key = safe_key(&rel_key(&rel));
            match &proxied {
                Some(location) if size <= self.max_copy_bytes => {
                    // Retention may remove a checkpoint before this thread reaches it.
                    let Ok(bytes) = fs::read(&file) else { continue };
                    self.api.put_artifact(
                        &format!("{location}/{}", percent_encode(&key, b"")),
                        bytes,
                    )?;
                }
                _ => {
                    let absolute = std::path::absolute(&file).unwrap_or(file);
                    by_path.push(json!({
                        "key": format!("codex.artifact.{key}"),
                        "value": absolute.to_string_lossy(),
                    }));
                }
            }
        }
        if proxied.is_none() && !by_path.is_empty() && !self.said_artifact_store {
            self.said_artifact_store = true;
            self.notices.push(format!(
                "the MLflow run's artifact store ({}) is not one the server proxies; artifacts \
                 are recorded by path (tags `codex.artifact.<path>`) instead of uploaded",
                run.artifact_uri
            ));
        }
        for tags in by_path.chunks(BATCH_PARAMS) {
            self.api.post(
                "runs/log-batch",
                &json!({"run_id": run.run_id, "tags": tags}),
            )?;
        }
        Ok(())
    }
}

/// The run an MLflow answer describes (`{"info": {...}, "data": {...}}`).
fn server_run(run: &Value) -> std::result::Result<ServerRun, Failure> {
    let info = &run["info"];
    let run_id = text(info, "run_id").or_else(|_| text(info, "run_uuid"))?;
    let mut logged = HashMap::new();
    for m in run["data"]["metrics"].as_array().into_iter().flatten() {
        if let (Some(key), Some(step)) = (m["key"].as_str(), m["step"].as_u64()) {
            logged.insert(key.to_string(), step);
        }
    }
    let mut params = HashMap::new();
    for p in run["data"]["params"].as_array().into_iter().flatten() {
        if let (Some(key), Some(value)) = (p["key"].as_str(), p["value"].as_str()) {
            params.insert(key.to_string(), value.to_string());
        }
    }
    Ok(ServerRun {
        run_id,
        artifact_uri: info["artifact_uri"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        run_dir: PathBuf::new(),
        logged,
        params,
    })
}

/// A string field of an answer, or a refusal saying the answer is not MLflow's.
fn text(value: &Value, field: &str) -> std::result::Result<String, Failure> {
    match &value[field] {
        Value::String(s) if !s.is_empty() => Ok(s.clone()),
        _ => Err(refused(format!(
            "the answer has no `{field}`; is this an MLflow tracking server?"
        ))),
    }
}

/// A metric value in JSON: MLflow reads the non-finite ones as these strings.
fn json_number(value: f64) -> Value {
    if value.is_nan() {
        json!("NaN")
    } else if value == f64::INFINITY {
        json!("Infinity")
    } else if value == f64::NEG_INFINITY {
        json!("-Infinity")
    } else {
        json!(value)
    }
}

/// At most `max` characters of `value`.
fn cut(value: &str, max: usize) -> String {
    match value.char_indices().nth(max) {
        Some((at, _)) => value[..at].to_string(),
        None => value.to_string(),
    }
}

/// The files under `path` (itself, or inside it), each with its path inside the run directory
/// and its size; what has gone meanwhile is skipped.
fn walk(path: &Path, rel: &Path, out: &mut Vec<(PathBuf, PathBuf, u64)>) {
    let Ok(meta) = fs::metadata(path) else { return };
    if meta.is_dir() {
        let Ok(entries) = fs::read_dir(path) else {
            return;
        };
        let mut entries: Vec<_> = entries.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            walk(&entry.path(), &rel.join(entry.file_name()), out);
        }
    } else {
        out.push((path.to_path_buf(), rel.to_path_buf(), meta.len()));
    }
}

/// The path under the server's artifact proxy of an `mlflow-artifacts:` artifact URI
/// (`mlflow-artifacts:/1/<run>/artifacts`, or with a host: `mlflow-artifacts://host/1/...`).
fn proxy_location(artifact_uri: &str) -> Option<String> {
    let rest = artifact_uri.strip_prefix("mlflow-artifacts:")?;
    let rest = match rest.strip_prefix("//") {
        Some(with_host) => &with_host[with_host.find('/')?..],
        None => rest,
    };
    let rest = rest.trim_matches('/');
    (!rest.is_empty()).then(|| rest.to_string())
}

impl Api {
    /// `env` reads an environment variable (a parameter, for tests).
    fn new(uri: &str, timeout: Duration, env: &dyn Fn(&str) -> Option<String>) -> Result<Api> {
        let set = |key: &str| env(key).filter(|v| !v.is_empty());
        let auth = if let Some(token) = set("MLFLOW_TRACKING_TOKEN") {
            Some(format!("Bearer {token}"))
        } else {
            match (
                set("MLFLOW_TRACKING_USERNAME"),
                set("MLFLOW_TRACKING_PASSWORD"),
            ) {
                (Some(user), Some(password)) => Some(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
                )),
                (None, None) => None,
                _ => {
                    return Err(fail(
                        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD go together; set \
                         both, or neither",
                    ))
                }
            }
        };
        let insecure = set("MLFLOW_TRACKING_INSECURE_TLS")
            .is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
        let mut tls = ureq::tls::TlsConfig::builder().disable_verification(insecure);
        if let Some(path) = set("MLFLOW_TRACKING_SERVER_CERT_PATH") {
            let pem = fs::read(&path).map_err(|e| {
                fail(format!(
                    "cannot read MLFLOW_TRACKING_SERVER_CERT_PATH {path}: {e}; give a PEM file \
                     of the certificates to trust"
                ))
            })?;
            let certs: Vec<_> = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(cert)) => Some(cert),
                    _ => None,
                })
                .collect();
            if certs.is_empty() {
                return Err(fail(format!(
                    "MLFLOW_TRACKING_SERVER_CERT_PATH {path} holds no PEM certificate"
                )));
            }
            tls = tls.root_certs(ureq::tls::RootCerts::Specific(Arc::new(certs)));
        }
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .user_agent(concat!("codex-ml/", env!("CARGO_PKG_VERSION")))
            .tls_config(tls.build())
            .build()
            .new_agent();
        Ok(Api {
            base: uri.to_string(),
            agent,
            auth,
        })
    }

    fn post(&self, endpoint: &str, body: &Value) -> std::result::Result<Value, Failure> {
        let url = format!("{}/api/2.0/mlflow/{endpoint}", self.base);
        let mut request = self.agent.post(&url).content_type("application/json");
        if let Some(auth) = &self.auth {
            request = request.header("Authorization", auth);
        }
        answer(request.send(body.to_string()))
    }

    fn get(&self, endpoint: &str, query: &[(&str, &str)]) -> std::result::Result<Value, Failure> {
        let url = format!("{}/api/2.0/mlflow/{endpoint}", self.base);
        let mut request = self.agent.get(&url);
        for (key, value) in query {
            request = request.query(*key, *value);
        }
        if let Some(auth) = &self.auth {
            request = request.header("Authorization", auth);
        }
        answer(request.call())
    }

    /// PUT a file's bytes at `location` under the server's artifact proxy.
    fn put_artifact(&self, location: &str, bytes: Vec<u8>) -> std::result::Result<(), Failure> {
        let url = format!(
            "{}/api/2.0/mlflow-artifacts/artifacts/{location}",
            self.base
        );
        let mut request = self
            .agent
            .put(&url)
            .content_type("application/octet-stream");
        if let Some(auth) = &self.auth {
            request = request.header("Authorization", auth);
        }
        answer(request.send(&bytes[..])).map(drop)
    }
}

/// What a request came to: the answer's JSON, or why not.
fn answer(
    result: std::result::Result<ureq::http::Response<ureq::Body>, ureq::Error>,
) -> std::result::Result<Value, Failure> {
    let mut response = match result {
        Ok(response) => response,
        Err(
            e @ (ureq::Error::Io(_)
            | ureq::Error::Timeout(_)
            | ureq::Error::HostNotFound
            | ureq::Error::ConnectionFailed
            | ureq::Error::Protocol(_)),
        ) => return Err(Failure::Unreachable(e.to_string())),
        Err(e) => return Err(refused(format!("the request failed: {e}"))),
    };
    let status = response.status().as_u16();
    let mut body = String::new();
    if let Err(e) = response
        .body_mut()
        .as_reader()
        .take(64 << 20)
        .read_to_string(&mut body)
    {
        return Err(Failure::Unreachable(format!("reading the answer: {e}")));
    }
    let parsed: Option<Value> = serde_json::from_str(&body).ok();
    if (200..300).contains(&status) {
        return match parsed {
            Some(value) => Ok(value),
            None if body.trim().is_empty() => Ok(Value::Null),
            None => Err(refused(
                "the answer is not JSON; is this an MLflow tracking server?",
            )),
        };
    }
    let field = |name: &str| {
        parsed
            .as_ref()
            .and_then(|v| v[name].as_str())
            .unwrap_or_default()
            .to_string()
    };
    let mut message = field("message");
    if message.is_empty() {
        message = cut(body.trim(), 300);
    }
    if status == 429 || status >= 500 {
        return Err(Failure::Unreachable(format!("HTTP {status}: {message}")));
    }
    if status == 401 || status == 403 {
        message.push_str(
            "; check MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and \
             MLFLOW_TRACKING_PASSWORD",
        );
    }
    Err(Failure::Refused(Refusal {
        status,
        code: field("error_code"),
        message,
    }))
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::{Arc, Mutex};

    use super::*;

    /// One request the fake server got: method, path (with query), body.
    #[derive(Clone, Debug)]
    struct Seen {
        method: String,
        path: String,
        body: String,
        /// Answered with success.
        ok: bool,
    }

    impl Seen {
        fn json(&self) -> Value {
            serde_json::from_str(&self.body).unwrap_or(Value::Null)
        }
    }

    /// What the fake server does.
    #[derive(Default)]
    struct Behaviour {
        /// Answer 503 to everything.
        down: bool,
        /// Answer this status and body to `runs/create`.
        refuse_create: Option<(u16, &'static str)>,
        /// The runs `runs/search` finds.
        search: Vec<Value>,
        /// Make the next run asked for, but close the connection instead of answering.
        lose_create_answer: bool,
        seen: Vec<Seen>,
    }

    /// A fake MLflow server on 127.0.0.1: enough of the REST API to follow a run.
    struct Fake {
        url: String,
        state: Arc<Mutex<Behaviour>>,
    }

    impl Fake {
        fn start() -> Fake {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
            let url = format!(
                "http://{}",
                listener.local_addr().unwrap_or_else(|e| panic!("{e}"))
            );
            let state = Arc::new(Mutex::new(Behaviour::default()));
            let shared = Arc::clone(&state);
            std::thread::spawn(move || {
                for stream in listener.incoming().flatten() {
                    serve(stream, &shared);
                }
            });
            Fake { url, state }
        }

        fn with<T>(&self, f: impl FnOnce(&mut Behaviour) -> T) -> T {
            f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()))
        }

        /// The requests to `path` that succeeded.
        fn seen(&self, path: &str) -> Vec<Seen> {
            self.with(|b| {
                b.seen
                    .iter()
                    .filter(|s| s.ok && s.path.starts_with(path))
                    .cloned()
                    .collect()
            })
        }

        fn server(&self) -> Server {
            let mut server = Server::new(&self.url, None, 1 << 20, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("{e}"));
            server.finish_wait = Duration::from_secs(2);
            server
        }
    }

    fn serve(stream: TcpStream, state: &Mutex<Behaviour>) {
        let mut reader = BufReader::new(match stream.try_clone() {
            Ok(s) => s,
            Err(_) => return,
        });
        let mut line = String::new();
        if reader.read_line(&mut line).is_err() {
            return;
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_string();
        let path = parts.next().unwrap_or_default().to_string();
        let mut length = 0usize;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).is_err() || header.trim().is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let body = String::from_utf8_lossy(&body).into_owned();
        let (status, answer) = {
            let mut b = state.lock().unwrap_or_else(|e| e.into_inner());
            let (status, answer) = respond(&mut b, &path, &body);
            b.seen.push(Seen {
                method,
                path,
                body,
                ok: status == 200,
            });
            (status, answer)
        };
        if status == 0 {
            return;
        }
        let mut stream = stream;
        let _ = write!(
            stream,
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{answer}",
            answer.len()
        );
    }

    fn respond(b: &mut Behaviour, path: &str, body: &str) -> (u16, String) {
        if b.down {
            return (
                503,
                r#"{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "down"}"#.into(),
            );
        }
        let route = path.split('?').next().unwrap_or_default();
        let api = "/api/2.0/mlflow/";
        match route.strip_prefix(api).unwrap_or(route) {
            "experiments/get-by-name" => {
                let created = b.seen.iter().any(|s| s.path.ends_with("experiments/create"));
                if created {
                    (200, r#"{"experiment": {"experiment_id": "7", "lifecycle_stage": "active"}}"#.into())
                } else {
                    (404, r#"{"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no"}"#.into())
                }
            }
            "experiments/create" => (200, r#"{"experiment_id": "7"}"#.into()),
            "runs/create" if b.lose_create_answer => {
                b.lose_create_answer = false;
                let asked: Value = serde_json::from_str(body).unwrap_or(Value::Null);
                b.search.push(json!({
                    "info": {"run_id": "made", "artifact_uri": "mlflow-artifacts:/7/made/artifacts"},
                    "data": {"tags": asked["tags"]},
                }));
                (0, String::new())
            }
            "runs/create" => match b.refuse_create {
                Some((status, body)) => (status, body.into()),
                None => (
                    200,
                    r#"{"run": {"info": {"run_id": "r1", "artifact_uri": "mlflow-artifacts:/7/r1/artifacts"}}}"#.into(),
                ),
            },
            "runs/search" => (200, json!({"runs": b.search}).to_string()),
            "runs/log-batch" | "runs/update" => (200, "{}".into()),
            _ if route.starts_with("/api/2.0/mlflow-artifacts/artifacts/") => (200, "{}".into()),
            _ => (404, r#"{"error_code": "ENDPOINT_NOT_FOUND", "message": "?"}"#.into()),
        }
    }

    fn info() -> RunInfo {
        RunInfo {
            experiment: "exp".into(),
            run_id: "run-1".into(),
            run_dir: "/runs/exp/run-1".into(),
        }
    }

    fn records(steps: std::ops::RangeInclusive<u64>) -> Vec<Record> {
        steps
            .map(|step| Record {
                step,
                split: "train".into(),
                name: "loss".into(),
                value: 1.0 / step as f64,
                time: 1764000000.5,
            })
            .collect()
    }

    /// Every metric point the fake got, as (key, step, value).
    fn points(fake: &Fake) -> Vec<(String, u64, Value)> {
        fake.seen("/api/2.0/mlflow/runs/log-batch")
            .iter()
            .flat_map(|s| s.json()["metrics"].as_array().cloned().unwrap_or_default())
            .map(|m| {
                (
                    m["key"].as_str().unwrap_or_default().to_string(),
                    m["step"].as_u64().unwrap_or(u64::MAX),
                    m["value"].clone(),
                )
            })
            .collect()
    }

    #[test]
    fn a_run_is_recorded_as_mlflows_client_records_it() {
        let fake = Fake::start();
        let mut server = fake.server();
        server.start(&info()).unwrap_or_else(|e| panic!("{e}"));
        // The experiment is looked up, created, and the run created in it with its tags.
        let create = fake.seen("/api/2.0/mlflow/runs/create");
        assert_eq!(create.len(), 1);
        let body = create[0].json();
        assert_eq!(body["experiment_id"], "7");
        assert_eq!(body["run_name"], "run-1");
        let tags = body["tags"].as_array().cloned().unwrap_or_default();
        for (key, value) in [(RUN_ID_TAG, "run-1"), (RUN_DIR_TAG, "/runs/exp/run-1")] {
            assert!(
                tags.iter().any(|t| t["key"] == key && t["value"] == value),
                "{tags:?}"
            );
        }
        server
            .log_params(&[("optimizer.lr".into(), "0.001".into())])
            .unwrap_or_else(|e| panic!("{e}"));
        let mut all = records(1..=2500);
        all[0].value = f64::NAN;
        all[1].value = f64::NEG_INFINITY;
        server.log_metrics(&all).unwrap_or_else(|e| panic!("{e}"));
        server
            .finish(RunStatus::Killed)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(server.take_notices().is_empty());

        let batches = fake.seen("/api/2.0/mlflow/runs/log-batch");
        // One batch of params, then the points in MLflow's batches of at most 1000.
        assert_eq!(batches[0].json()["params"][0]["key"], "optimizer.lr");
        let sizes: Vec<usize> = batches[1..]
            .iter()
            .map(|s| s.json()["metrics"].as_array().map_or(0, Vec::len))
            .collect();
        assert_eq!(sizes, [1000, 1000, 500]);
        let got = points(&fake);
        assert_eq!(got.len(), 2500);
        assert_eq!(got[0], ("train/loss".into(), 1, json!("NaN")));
        assert_eq!(got[1], ("train/loss".into(), 2, json!("-Infinity")));
        assert_eq!(got[2], ("train/loss".into(), 3, json!(1.0 / 3.0)));
        assert!(batches[1].json()["metrics"][0]["timestamp"] == 1764000000500i64);
        let update = fake.seen("/api/2.0/mlflow/runs/update");
        assert_eq!(update.len(), 1);
        assert_eq!(update[0].json()["status"], "KILLED");
        assert!(update[0].json()["end_time"].as_i64().is_some());
    }

    #[test]
    fn a_server_that_goes_away_loses_nothing_and_is_said_twice() {
        let fake = Fake::start();
        let mut server = fake.server();
        server.start(&info()).unwrap_or_else(|e| panic!("{e}"));
        fake.with(|b| b.down = true);
        server
            .log_metrics(&records(1..=10))
            .unwrap_or_else(|e| panic!("{e}"));
        server
            .log_metrics(&records(11..=20))
            .unwrap_or_else(|e| panic!("{e}"));
        let notices = server.take_notices();
        assert_eq!(notices.len(), 1, "{notices:?}");
        assert!(
            notices[0].contains("cannot reach the MLflow server") && notices[0].contains("503")
        );
        assert!(points(&fake).is_empty());
        // Within the pause, the tracker does not even try.
        let tried = fake.with(|b| b.seen.len());
        server
            .log_metrics(&records(21..=30))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(fake.with(|b| b.seen.len()), tried);

        fake.with(|b| b.down = false);
        std::thread::sleep(FIRST_PAUSE * 2);
        server
            .log_metrics(&records(31..=40))
            .unwrap_or_else(|e| panic!("{e}"));
        let notices = server.take_notices();
        assert!(
            notices.len() == 1 && notices[0].contains("answers again"),
            "{notices:?}"
        );
        let steps: Vec<u64> = points(&fake).iter().map(|p| p.1).collect();
        assert_eq!(steps, (1..=40).collect::<Vec<_>>());
        // What waited went out together.
        assert_eq!(fake.seen("/api/2.0/mlflow/runs/log-batch").len(), 1);
    }

    #[test]
    fn an_unreachable_server_costs_the_run_nothing_and_the_end_says_what_was_lost() {
        // A port with nobody listening.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("{e}"));
        let mut server = Server::new(
            &format!("http://127.0.0.1:{port}"),
            None,
            1 << 20,
            Duration::from_secs(5),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        server.finish_wait = Duration::from_millis(300);
        server.max_pending = 25;
        server.start(&info()).unwrap_or_else(|e| panic!("{e}"));
        server
            .log_metrics(&records(1..=10))
            .unwrap_or_else(|e| panic!("{e}"));
        server
            .log_metrics(&records(11..=20))
            .unwrap_or_else(|e| panic!("{e}"));
        server
            .log_metrics(&records(21..=30))
            .unwrap_or_else(|e| panic!("{e}"));
        server
            .finish(RunStatus::Finished)
            .unwrap_or_else(|e| panic!("{e}"));
        let notices = server.take_notices();
        assert!(notices[0].contains("cannot reach"), "{notices:?}");
        assert!(
            notices.iter().any(|n| n.contains("oldest are dropped")),
            "{notices:?}"
        );
        let last = notices.last().cloned().unwrap_or_default();
        assert!(
            last.contains("did not answer before the run ended")
                && last.contains("20 metric points")
                && last.contains("final status"),
            "{last}"
        );
    }

    #[test]
    fn a_run_whose_creation_answer_was_lost_is_found_not_made_twice() {
        let fake = Fake::start();
        fake.with(|b| b.lose_create_answer = true);
        let mut server = fake.server();
        server.start(&info()).unwrap_or_else(|e| panic!("{e}"));
        assert!(server.take_notices()[0].contains("cannot reach"));
        std::thread::sleep(FIRST_PAUSE * 2);
        server
            .log_metrics(&records(1..=3))
            .unwrap_or_else(|e| panic!("{e}"));
        let creates = fake.with(|b| {
            b.seen
                .iter()
                .filter(|s| s.path.ends_with("runs/create"))
                .count()
        });
        assert_eq!(creates, 1);
        let search = fake.seen("/api/2.0/mlflow/runs/search");
        assert!(search[0].json()["filter"]
            .as_str()
            .is_some_and(|f| f.starts_with("tags.`codex.session` = ")));
        let batch = fake.seen("/api/2.0/mlflow/runs/log-batch")[0].json();
        assert_eq!(batch["run_id"], "made");
        assert_eq!(points(&fake).len(), 3);
    }

    #[test]
    fn a_refused_run_ends_the_tracker_with_the_servers_reason() {
        let fake = Fake::start();
        fake.with(|b| {
            b.refuse_create = Some((
                401,
                r#"{"error_code": "UNAUTHENTICATED", "message": "bad token"}"#,
            ))
        });
        let mut server = fake.server();
        let e = server.start(&info()).map_err(|e| e.to_string());
        let e = e.err().unwrap_or_default();
        assert!(
            e.contains("refused to start the run")
                && e.contains("HTTP 401 UNAUTHENTICATED: bad token")
                && e.contains("MLFLOW_TRACKING_TOKEN"),
            "{e}"
        );
    }

    #[test]
    fn a_resumed_run_continues_its_mlflow_run_without_repeating_it() {
        let fake = Fake::start();
        let found = |id: &str, dir: &str| {
            json!({
                "info": {"run_id": id, "artifact_uri": "s3://bucket/x"},
                "data": {
                    "metrics": [{"key": "train/loss", "value": 0.5, "step": 20, "timestamp": 1}],
                    "params": [{"key": "optimizer.lr", "value": "0.001"}],
                    "tags": [{"key": RUN_DIR_TAG, "value": dir}],
                },
            })
        };
        fake.with(|b| {
            b.search = vec![
                found("other", "/elsewhere/run-1"),
                found("mine", "/runs/exp/run-1"),
            ]
        });
        let mut server = fake.server();
        server.resume(&info(), 10).unwrap_or_else(|e| panic!("{e}"));
        assert!(fake.seen("/api/2.0/mlflow/runs/create").is_empty());
        let search = fake.seen("/api/2.0/mlflow/runs/search")[0].json();
        assert_eq!(search["filter"], "tags.`codex.run_id` = 'run-1'");
        let update = fake.seen("/api/2.0/mlflow/runs/update")[0].json();
        assert_eq!(
            (&update["run_id"], &update["status"]),
            (&json!("mine"), &json!("RUNNING"))
        );
        server
            .log_params(&[
                ("optimizer.lr".into(), "0.001".into()),
                ("train.max_steps".into(), "50".into()),
            ])
            .unwrap_or_else(|e| panic!("{e}"));
        server
            .log_params(&[("optimizer.lr".into(), "0.002".into())])
            .unwrap_or_else(|e| panic!("{e}"));
        server
            .log_metrics(&records(11..=25))
            .unwrap_or_else(|e| panic!("{e}"));

        let batches = fake.seen("/api/2.0/mlflow/runs/log-batch");
        assert_eq!(
            batches[0].json()["tags"][0]["key"],
            "codex.resumed_from_step"
        );
        assert_eq!(
            batches[1].json()["params"],
            json!([{"key": "train.max_steps", "value": "50"}])
        );
        assert_eq!(
            batches[2].json()["tags"],
            json!([{"key": "codex.param.optimizer.lr", "value": "0.002"}])
        );
        let notices = server.take_notices();
        assert!(
            notices.iter().any(|n| n.contains("codex.param.<key>")),
            "{notices:?}"
        );
        let steps: Vec<u64> = points(&fake).iter().map(|p| p.1).collect();
        assert_eq!(steps, (21..=25).collect::<Vec<_>>());
    }

    #[test]
    fn artifacts_go_through_the_proxy_or_are_recorded_by_path() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let run_dir = dir.path().join("run-1");
        fs::create_dir_all(run_dir.join("checkpoints/step-2")).unwrap_or_else(|e| panic!("{e}"));
        fs::write(run_dir.join("config.ron"), "(x: 1)").unwrap_or_else(|e| panic!("{e}"));
        fs::write(
            run_dir.join("checkpoints/step-2/model weights.bin"),
            vec![7u8; 4096],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let fake = Fake::start();
        let mut server = fake.server();
        server.max_copy_bytes = 1024;
        let run = RunInfo {
            run_dir: run_dir.to_string_lossy().into_owned(),
            ..info()
        };
        server.start(&run).unwrap_or_else(|e| panic!("{e}"));
        for path in ["config.ron", "checkpoints/step-2", "gone-by-retention"] {
            server
                .log_artifact(&run_dir.join(path).to_string_lossy())
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let puts = fake.seen("/api/2.0/mlflow-artifacts/");
        assert_eq!(puts.len(), 1);
        assert_eq!(puts[0].method, "PUT");
        assert_eq!(
            puts[0].path,
            "/api/2.0/mlflow-artifacts/artifacts/7/r1/artifacts/config.ron"
        );
        assert_eq!(puts[0].body, "(x: 1)");
        let tags = fake.seen("/api/2.0/mlflow/runs/log-batch")[0].json()["tags"].clone();
        assert_eq!(
            tags[0]["key"],
            "codex.artifact.checkpoints/step-2/model weights.bin"
        );
        assert!(server.take_notices().is_empty());
    }

    #[test]
    fn credentials_come_from_mlflows_variables() {
        let api = |vars: &[(&str, &str)]| {
            let vars: HashMap<String, String> = vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            Api::new("http://h", Duration::from_secs(1), &|key| {
                vars.get(key).cloned()
            })
            .map(|api| api.auth)
            .map_err(|e| e.to_string())
        };
        assert_eq!(api(&[]), Ok(None));
        assert_eq!(
            api(&[("MLFLOW_TRACKING_TOKEN", "t0k")]),
            Ok(Some("Bearer t0k".into()))
        );
        assert_eq!(
            api(&[
                ("MLFLOW_TRACKING_USERNAME", "ann"),
                ("MLFLOW_TRACKING_PASSWORD", "pw")
            ]),
            Ok(Some("Basic YW5uOnB3".into()))
        );
        let e = api(&[("MLFLOW_TRACKING_USERNAME", "ann")])
            .err()
            .unwrap_or_default();
        assert!(e.contains("go together"), "{e}");
        let e = api(&[("MLFLOW_TRACKING_SERVER_CERT_PATH", "/nonexistent/ca.pem")])
            .err()
            .unwrap_or_default();
        assert!(
            e.contains("MLFLOW_TRACKING_SERVER_CERT_PATH") && e.contains("PEM"),
            "{e}"
        );
    }

    #[test]
    fn artifact_uris_and_paths() {
        assert_eq!(
            proxy_location("mlflow-artifacts:/7/r1/artifacts").as_deref(),
            Some("7/r1/artifacts")
        );
        assert_eq!(
            proxy_location("mlflow-artifacts://host:5000/7/r1/artifacts").as_deref(),
            Some("7/r1/artifacts")
        );
        assert_eq!(proxy_location("s3://bucket/7/r1/artifacts"), None);
        assert_eq!(proxy_location("mlflow-artifacts:"), None);
        assert_eq!(percent_encode("a b/c%d/é", b""), "a%20b/c%25d/%C3%A9");
        assert_eq!(cut("héllo", 2), "hé");
    }
}
