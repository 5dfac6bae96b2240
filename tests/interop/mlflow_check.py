"""The `mlflow` tracker, recording to a real MLflow tracking server.

Starts `mlflow server` on 127.0.0.1 (a SQLite store and an artifact proxy in a temporary
directory), runs short real `codex-ml run`s with `tracking_uri` pointing at it, and reads them
back with MLflow's own client:

- finished: status FINISHED with an end time; the params of the config; every metric's history
  (step, value, timestamp) equal to the run's `metrics.ndjson`; the run's files as artifacts
  (config.ron byte for byte, the checkpoints);
- failed (a learning rate that diverges): status FAILED;
- interrupted (SIGINT, as Ctrl-C): status KILLED;
- killed with SIGKILL mid-checkpoint and resumed: one MLflow run, continued (RUNNING again,
  then FINISHED), tagged `codex.resumed_from_step`, whose histories equal the resumed run's
  `metrics.ndjson` (the repeated steps are not recorded twice: the server keeps their first
  values, equal but for timings and system readings);
- the server stopped (SIGSTOP) in the middle of a run and let go again (SIGCONT): training
  goes on, `log.txt` says the server went away and came back, and nothing is lost.

The server is stopped by its process group at the end, whatever happened.

Usage: python mlflow_check.py PATH/TO/codex-ml
(.ci/run installs the pinned mlflow into a virtual environment and runs this.)
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "fixtures" / "data" / "code"
EXPERIMENT = "mlflow-check"


def fail(message):
    print(f"mlflow check: FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def config(uri, steps, lr="1e-2", checkpoint_every=3):
    return f"""(
    experiment: "{EXPERIMENT}",
    seed: 7,
    data: (train: [Text(paths: ["{DATA}/*"])], val_fraction: 0.34),
    tokenizer: (name: "bytes"),
    model: (name: "gpt2", params: (n_layer: 1, n_head: 2, n_embd: 32, n_positions: 32)),
    optimizer: (name: "adamw", lr: {lr}),
    train: (max_steps: {steps}, seq_len: 32, batch_size: 4, grad_accum: 1,
        checkpoint_every: {checkpoint_every}, eval_every: 3, log_every: 1),
    trackers: [(name: "mlflow", params: (tracking_uri: "{uri}", timeout_s: 3))],
)
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(work):
    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    log = open(work / "server.log", "w")
    server = subprocess.Popen(
        [
            str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1",
            "--backend-store-uri", f"sqlite:///{work}/mlflow.db",
            "--artifacts-destination", str(work / "artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while time.time() < deadline:
        if server.poll() is not None:
            fail(f"mlflow server exited with {server.returncode}:\n"
                 f"{(work / 'server.log').read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    return server, uri
        except OSError:
            time.sleep(0.5)
    stop_server(server)
    fail(f"mlflow server did not answer on {uri} within 240 s")


def stop_server(server):
    try:
        os.killpg(server.pid, signal.SIGCONT)
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        server.wait()


def codex(codex_ml, work, *args, env=None, expect=0):
    done = subprocess.run(
        [codex_ml, *args], cwd=work, capture_output=True, text=True,
        env={**os.environ, **(env or {})}, timeout=600,
    )
    if expect is not None and done.returncode != expect:
        fail(f"`codex-ml {' '.join(args)}` exited with {done.returncode}, expected {expect}:\n"
             f"{done.stderr[-3000:]}")
    return done


def ndjson_series(run_dir):
    """`metrics.ndjson` as {key: [(step, value, timestamp_ms)]} in file order."""
    series = {}
    for line in (run_dir / "metrics.ndjson").read_text().splitlines():
        r = json.loads(line)
        value = float("nan") if r["value"] is None else r["value"]
        series.setdefault(f"{r['split']}/{r['name']}", []).append(
            (r["step"], value, round(r["time"] * 1000))
        )
    return series


def mlflow_run(client, run_id):
    """The one MLflow run tagged with codex-ml run id `run_id`."""
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`codex.run_id` = '{run_id}'"
    )
    if len(runs) != 1:
        fail(f"{len(runs)} MLflow runs are tagged codex.run_id = {run_id}, expected 1")
    return runs[0]


def same_value(a, b):
    return (a != a and b != b) or a == b


# What a step computes again after a resume equals what it computed the first time, except
# timings and system readings.
def deterministic(key):
    return not (key.startswith("sys/") or key == "train/tokens_per_s")


def check_histories(client, run, run_dir, name, repeated=()):
    """Every metric's history equals metrics.ndjson; at the `repeated` steps (those a resumed
    run computed again, which the server keeps from the first time) the deterministic values
    only."""
    want = ndjson_series(run_dir)
    have = set(run.data.metrics)
    if have != set(want):
        fail(f"{name}: metrics {sorted(have)}, metrics.ndjson has {sorted(want)}")
    for key, points in want.items():
        history = sorted(
            ((m.step, m.value, m.timestamp) for m in client.get_metric_history(run.info.run_id, key)),
            key=lambda p: p[0],
        )
        if [p[0] for p in history] != [p[0] for p in points]:
            fail(f"{name}: steps of {key} are {[p[0] for p in history]}, "
                 f"metrics.ndjson has {[p[0] for p in points]}")
        for (step, value, ms), (_, v, t) in zip(history, points):
            if step in repeated:
                if deterministic(key) and not same_value(value, v):
                    fail(f"{name}: {key} at repeated step {step} is {value!r}, "
                         f"metrics.ndjson has {v!r}")
                continue
            if not same_value(value, v):
                fail(f"{name}: {key} at step {step} is {value!r}, metrics.ndjson has {v!r}")
            if abs(ms - t) > 1:
                fail(f"{name}: {key} at step {step} has timestamp {ms}, metrics.ndjson {t}")


def check_status(run, status, name):
    if run.info.status != status:
        fail(f"{name}: status {run.info.status}, expected {status}")
    if run.info.end_time is None:
        fail(f"{name}: no end time")


def finished(client, codex_ml, work, uri):
    (work / "a.ron").write_text(config(uri, steps=9))
    codex(codex_ml, work, "run", "a.ron", "--run-dir", "runs/a", "-q")
    run = mlflow_run(client, "a")
    check_status(run, "FINISHED", "finished run")
    params = run.data.params
    for key, value in [("optimizer.lr", "0.01"), ("train.max_steps", "9")]:
        if params.get(key) != value:
            fail(f"finished run: param {key} is {params.get(key)!r}, expected {value!r} "
                 f"(params: {sorted(params)})")
    check_histories(client, run, work / "runs" / "a", "finished run")
    if run.data.tags.get("codex.run_dir") != str(work / "runs" / "a"):
        fail(f"finished run: tag codex.run_dir is {run.data.tags.get('codex.run_dir')!r}")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    if not {"config.ron", "checkpoints"} <= artifacts:
        fail(f"finished run: artifacts {sorted(artifacts)} lack config.ron or checkpoints")
    got = Path(client.download_artifacts(run.info.run_id, "config.ron", str(work))).read_bytes()
    if got != (work / "runs" / "a" / "config.ron").read_bytes():
        fail("finished run: the config.ron artifact differs from the run's")
    print(f"finished run: FINISHED, {len(params)} params, {len(run.data.metrics)} metrics equal "
          f"to metrics.ndjson, artifacts {sorted(artifacts)}")


def failed(client, codex_ml, work, uri):
    (work / "b.ron").write_text(config(uri, steps=9, lr="1e30"))
    done = codex(codex_ml, work, "run", "b.ron", "--run-dir", "runs/b", "-q", expect=None)
    if done.returncode == 0:
        fail("the diverging run succeeded")
    check_status(mlflow_run(client, "b"), "FAILED", "failed run")
    print(f"failed run (exit {done.returncode}): FAILED")


def wait_for_step(run_dir, step, child, what):
    deadline = time.time() + 120
    while time.time() < deadline:
        if child.poll() is not None:
            fail(f"{what}: the run ended (exit {child.returncode}) before step {step}")
        try:
            lines = (run_dir / "metrics.ndjson").read_text().splitlines()
            if any(json.loads(l)["step"] >= step for l in lines if l.endswith("}")):
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    fail(f"{what}: no record of step {step} within 120 s")


def interrupted(client, codex_ml, work, uri):
    (work / "c.ron").write_text(config(uri, steps=100000))
    child = subprocess.Popen(
        [codex_ml, "run", "c.ron", "--run-dir", "runs/c", "-q"], cwd=work,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    wait_for_step(work / "runs" / "c", 4, child, "interrupted run")
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=120)
    if child.returncode == 0:
        fail(f"the interrupted run exited 0:\n{stderr}")
    check_status(mlflow_run(client, "c"), "KILLED", "interrupted run")
    print(f"interrupted run (exit {child.returncode}): KILLED")


def killed_and_resumed(client, codex_ml, work, uri):
    (work / "d.ron").write_text(config(uri, steps=12))
    child = subprocess.Popen(
        [codex_ml, "run", "d.ron", "--run-dir", "runs/d", "-q"], cwd=work,
        env={**os.environ, "CODEX_ML_TEST_CHECKPOINT_PAUSE": "9:model.safetensors"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    seen = []
    for line in child.stderr:
        if line.startswith("checkpoint test hook: paused after"):
            break
        seen.append(line)
    else:
        fail("the run never paused in its checkpoint of step 9:\n" + "".join(seen))
    # Let the tracker send what it has, as it would before a kill that came later.
    time.sleep(1.5)
    child.send_signal(signal.SIGKILL)
    child.wait()
    if mlflow_run(client, "d").info.status != "RUNNING":
        fail("the killed run's MLflow run is not RUNNING")
    codex(codex_ml, work, "resume", "runs/d", "-q")
    run = mlflow_run(client, "d")
    check_status(run, "FINISHED", "resumed run")
    if run.data.tags.get("codex.resumed_from_step") != "6":
        fail(f"resumed run: tag codex.resumed_from_step is "
             f"{run.data.tags.get('codex.resumed_from_step')!r}, expected '6'")
    check_histories(client, run, work / "runs" / "d", "resumed run", repeated=range(7, 10))
    print("killed at step 9 and resumed from 6: one MLflow run, FINISHED, histories equal to "
          "metrics.ndjson (steps 7 to 9 recorded once)")


def outage(client, codex_ml, work, uri, server):
    (work / "e.ron").write_text(config(uri, steps=400, checkpoint_every=100))
    run_dir = work / "runs" / "e"
    child = subprocess.Popen(
        [codex_ml, "run", "e.ron", "--run-dir", "runs/e", "-q"], cwd=work,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    wait_for_step(run_dir, 10, child, "outage run")
    os.killpg(server.pid, signal.SIGSTOP)
    stopped_at = time.time()
    try:
        while "cannot reach the MLflow server" not in (run_dir / "log.txt").read_text():
            if time.time() - stopped_at > 60:
                fail("outage run: log.txt never said the server was unreachable")
            time.sleep(0.1)
        time.sleep(1)
    finally:
        os.killpg(server.pid, signal.SIGCONT)
    _, stderr = child.communicate(timeout=300)
    if child.returncode != 0:
        fail(f"outage run exited {child.returncode}:\n{stderr}")
    log = (run_dir / "log.txt").read_text()
    if "answers again" not in log:
        fail(f"outage run: log.txt never said the server answered again:\n{log[-3000:]}")
    run = mlflow_run(client, "e")
    check_status(run, "FINISHED", "outage run")
    check_histories(client, run, run_dir, "outage run")
    print("server stopped mid-run and let go: training went on, log.txt said so both ways, "
          "histories equal to metrics.ndjson")


def main():
    if len(sys.argv) != 2:
        fail("usage: python mlflow_check.py PATH/TO/codex-ml")
    codex_ml = str(Path(sys.argv[1]).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(os.environ.get("MLFLOW_CHECK_DIR") or tmp)
        work.mkdir(parents=True, exist_ok=True)
        server, uri = start_server(work)
        try:
            client = MlflowClient(tracking_uri=uri)
            finished(client, codex_ml, work, uri)
            failed(client, codex_ml, work, uri)
            interrupted(client, codex_ml, work, uri)
            killed_and_resumed(client, codex_ml, work, uri)
            outage(client, codex_ml, work, uri, server)
        finally:
            stop_server(server)
    print("mlflow check: OK")


if __name__ == "__main__":
    main()
