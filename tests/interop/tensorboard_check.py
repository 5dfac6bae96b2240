"""The `tensorboard` sink, read by TensorBoard itself.

Runs a short real `codex-ml run` with the sink, kills it with SIGKILL after it has written
records past its last checkpoint, resumes it, and reads the event files with TensorBoard's
`EventAccumulator`:

- every scalar (tag `<split>/<name>`, step, value as a 32-bit float, wall time) equals the
  run's `metrics.ndjson`, which holds no superseded record after the resume;
- that holds for an accumulator opened after the resume, with and without TensorBoard's purge
  of orphaned data (the resume rewrote the earlier file), and for one that was open before the
  resume and reloads, as a running `tensorboard` would (the resumed session's `SessionLog`
  `START` purges the points it had read past the checkpoint);
- the resolved config is a text summary (plugin `text`) tagged `config` whose text is the
  run directory's `config.ron`.

Usage: python tensorboard_check.py PATH/TO/codex-ml
(.ci/run installs the pinned tensorboard into a virtual environment and runs this.)
"""

import json
import math
import os
import signal
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.util import tensor_util

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "fixtures" / "data" / "code"
STEPS = 12
CHECKPOINT_EVERY = 3
# The run is killed while writing the checkpoint of step 9, so it resumes from step 6 and the
# records of steps 7 to 9 the first session wrote are superseded.
KILL_AT = "9:model.safetensors"
RESUME_STEP = 6

CONFIG = f"""(
    experiment: "tb",
    seed: 7,
    data: (train: [Text(paths: ["{DATA}/*"])], val_fraction: 0.34),
    tokenizer: (name: "bytes"),
    model: (name: "gpt2", params: (n_layer: 1, n_head: 2, n_embd: 32, n_positions: 32)),
    optimizer: (name: "adamw", lr: 1e-2),
    train: (max_steps: {STEPS}, seq_len: 32, batch_size: 4, grad_accum: 1,
        checkpoint_every: {CHECKPOINT_EVERY}, eval_every: 3, log_every: 1,
        schedule: (kind: cosine, warmup_steps: 2, min_lr: 1e-3)),
    sinks: [(name: "tensorboard")],
)
"""

SIZE_GUIDANCE = {ea.SCALARS: 0, ea.TENSORS: 0}


def fail(message):
    print(f"tensorboard check: FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def run_killed(codex_ml, work, env):
    """Start the run, wait until the checkpoint hook pauses it, then SIGKILL it."""
    child = subprocess.Popen(
        [codex_ml, "run", "tb.ron", "--run-dir", "run", "-q"],
        cwd=work,
        env={**env, "CODEX_ML_TEST_CHECKPOINT_PAUSE": KILL_AT},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = []
    paused = False
    for line in child.stderr:
        if line.startswith("checkpoint test hook: paused after"):
            paused = True
            break
        seen.append(line)
    child.send_signal(signal.SIGKILL)
    child.wait()
    if not paused:
        fail(f"the run never paused at {KILL_AT}:\n{''.join(seen)}")


def ndjson_series(run_dir):
    """`metrics.ndjson` as {tag: [(step, value, time)]} in file order."""
    series = {}
    with open(run_dir / "metrics.ndjson") as f:
        for line in f:
            r = json.loads(line)
            series.setdefault(f"{r['split']}/{r['name']}", []).append(
                (r["step"], r["value"], r["time"])
            )
    return series


def f32(x):
    return struct.unpack("f", struct.pack("f", x))[0]


def scalars_of(acc):
    return {
        tag: [(e.step, e.value, e.wall_time) for e in acc.Scalars(tag)]
        for tag in acc.Tags()[ea.SCALARS]
    }


def check_scalars(name, acc, expected):
    got = scalars_of(acc)
    if sorted(got) != sorted(expected):
        fail(f"{name}: tags {sorted(got)}, metrics.ndjson has {sorted(expected)}")
    for tag, want in expected.items():
        have = got[tag]
        if [s for s, _, _ in have] != [s for s, _, _ in want]:
            fail(
                f"{name}: steps of {tag} are {[s for s, _, _ in have]}, "
                f"metrics.ndjson has {[s for s, _, _ in want]}"
            )
        for (step, value, time), (_, v, t) in zip(have, want):
            same = (not math.isfinite(value)) if v is None else value == f32(v)
            if not same:
                fail(f"{name}: {tag} at step {step} is {value}, metrics.ndjson has {v}")
            if t is not None and abs(time - t) > 1e-3:
                fail(f"{name}: {tag} at step {step} has wall time {time}, metrics.ndjson has {t}")


def check_config(name, acc, run_dir):
    if "config" not in acc.PluginTagToContent("text"):
        fail(f"{name}: no text summary `config` (text plugin tags: {acc.PluginTagToContent('text')})")
    events = acc.Tensors("config")
    text = tensor_util.make_ndarray(events[-1].tensor_proto).item().decode()
    lines = text.split("\n")
    if not all(l.startswith("    ") or not l for l in lines):
        fail(f"{name}: the config text is not a Markdown code block:\n{text}")
    config = "\n".join(l[4:] for l in lines)
    want = (run_dir / "config.ron").read_text().rstrip("\n")
    if config != want:
        fail(f"{name}: the config text differs from config.ron:\n{config}\n---\n{want}")
    return [e.step for e in events]


def accumulator(tb_dir, purge=True):
    acc = ea.EventAccumulator(str(tb_dir), size_guidance=SIZE_GUIDANCE, purge_orphaned_data=purge)
    acc.Reload()
    return acc


def main():
    if len(sys.argv) != 2:
        fail("usage: tensorboard_check.py PATH/TO/codex-ml")
    codex_ml = os.path.abspath(sys.argv[1])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "tb.ron").write_text(CONFIG)
        env = {**os.environ, "CODEX_ML_CACHE": str(work / "cache")}
        env.pop("RUST_LOG", None)
        run_dir = work / "run"
        tb_dir = run_dir / "tensorboard"

        run_killed(codex_ml, work, env)
        live = accumulator(tb_dir)
        before = max(e.step for e in live.Scalars("train/loss"))
        if before <= RESUME_STEP:
            fail(f"the killed run recorded train/loss up to step {before} only; nothing to supersede")

        resumed = subprocess.run(
            [codex_ml, "resume", "run", "-q"],
            cwd=work,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        if resumed.returncode != 0:
            fail(f"codex-ml resume exited with {resumed.returncode}:\n{resumed.stderr}")
        files = sorted(p.name for p in tb_dir.iterdir())
        if len(files) != 2 or not all(f.startswith("events.out.tfevents.") for f in files):
            fail(f"expected two event files, one per session, found {files}")

        expected = ndjson_series(run_dir)
        if max(s for s, _, _ in expected["train/loss"]) != STEPS:
            fail("metrics.ndjson does not reach the last step")
        live.Reload()
        for name, acc in [
            ("reloaded accumulator", live),
            ("fresh accumulator", accumulator(tb_dir)),
            ("fresh accumulator without purge", accumulator(tb_dir, purge=False)),
        ]:
            check_scalars(name, acc, expected)
            steps = check_config(name, acc, run_dir)
        if steps != [0, RESUME_STEP + 1]:
            fail(f"config text at steps {steps}, expected one per session: [0, {RESUME_STEP + 1}]")

        tags = sorted(expected)
        points = sum(len(v) for v in expected.values())
        print(
            f"tensorboard check: ok ({points} points in {len(tags)} tags equal metrics.ndjson "
            f"after a kill at step 9 (written up to step {before}) and a resume from step "
            f"{RESUME_STEP}; config text present; tags {', '.join(tags)})"
        )


if __name__ == "__main__":
    main()
