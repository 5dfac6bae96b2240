"""`codex-ml report`, opened in a real browser: headless Chromium (Debian's `chromium`).

Trains two short runs (one with validation, one without), writes their report, and opens it
offline (every host name resolves nowhere, so a page that fetched anything would log an
error):

- the page loads nothing (the browser's resource timing lists no request) and logs nothing
  to the console: no error, no warning;
- in the rendered DOM, every chart holds as many curves (coloured `<polyline>`s with a
  non-empty bounding box) as it declares, and the declared counts are those of the records:
  per metric, the number of runs whose `metrics.ndjson` holds it;
- a screenshot of the page is written (`--screenshot DIR`, default: a temporary directory)
  for a person to look at.

The curves are counted by a small script appended to a copy of the page (the report itself
has none); the original page is what the screenshot shows.

Usage: python3 report_check.py PATH/TO/codex-ml [--screenshot DIR]
(.ci/run installs `chromium` when it is missing and runs this; it needs no pip package.)
"""

import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from html.parser import HTMLParser
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "fixtures" / "data" / "code"
MARK = "REPORT_CHECK"

CONFIG = """(
    experiment: "check",
    seed: 7,
    data: (train: [Text(paths: ["{data}/*"])], val_fraction: 0.34, cache_dir: "{cache}"),
    tokenizer: (name: "bytes"),
    model: (name: "gpt2", params: (n_layer: 1, n_head: 2, n_embd: 32, n_positions: 32)),
    optimizer: (name: "adamw", lr: 1e-3),
    train: (max_steps: 12, seq_len: 16, batch_size: 4, log_every: 1, eval_every: 4),
    sinks: [],
)
"""

# Appended to a copy of the page: counts each chart's curves as the browser laid them out.
COUNT_SCRIPT = """<script>
window.addEventListener("load", () => {
  const charts = [...document.querySelectorAll("figure.chart")].map(f => {
    const curves = [...f.querySelectorAll("svg polyline")].filter(p => {
      const stroke = (p.getAttribute("stroke") || "").toUpperCase();
      const box = p.getBBox();
      return stroke !== "#000000" && (box.width > 0 || box.height > 0);
    });
    return {metric: f.dataset.metric, declared: Number(f.dataset.curves), drawn: curves.length,
            width: f.getBoundingClientRect().width};
  });
  // Everything the page asked the network or the disk for, fetched or not.
  const fetched = performance.getEntriesByType("resource").map(e => e.name);
  const out = document.createElement("pre");
  out.id = "report-check";
  out.textContent = JSON.stringify({charts, fetched});
  document.body.appendChild(out);
});
</script>
"""


def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("no chromium on PATH: install Debian's `chromium` package")


def browse(page, *extra):
    """Run headless Chromium on `page` offline; return (stdout, console lines)."""
    args = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=5000",
        *extra,
        page.as_uri(),
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        sys.exit(f"chromium failed ({done.returncode}):\n{done.stderr}")
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return done.stdout, console


def expected_curves(runs):
    """Per metric, how many of `runs` recorded a finite value of it."""
    counts = defaultdict(int)
    for run in runs:
        names = set()
        for line in (run / "metrics.ndjson").read_text().splitlines():
            record = json.loads(line)
            if record["value"] is not None:
                names.add(f"{record['split']}/{record['name']}")
        for name in names:
            counts[name] += 1
    return counts


class Result(HTMLParser):
    """The text of `<pre id="report-check">` in a dumped DOM."""

    def __init__(self):
        super().__init__()
        self.inside = False
        self.text = ""

    def handle_starttag(self, tag, attrs):
        self.inside = tag == "pre" and ("id", "report-check") in attrs

    def handle_endtag(self, tag):
        self.inside = False

    def handle_data(self, data):
        if self.inside:
            self.text += data


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    codex_ml = Path(sys.argv[1]).resolve()
    shots = None
    if "--screenshot" in sys.argv:
        shots = Path(sys.argv[sys.argv.index("--screenshot") + 1]).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shots = shots or tmp
        shots.mkdir(parents=True, exist_ok=True)
        (tmp / "check.ron").write_text(CONFIG.format(data=DATA, cache=tmp / "cache"))
        for run, sets in (("with-val", []), ("no-val", ["data.val_fraction=0.0", "optimizer.lr=3e-3"])):
            cmd = [codex_ml, "run", "check.ron", "--run-dir", run, "-q"]
            for s in sets:
                cmd += ["--set", s]
            done = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"codex-ml run failed ({done.returncode}):\n{done.stderr}")
        out = subprocess.run(
            [codex_ml, "report", "with-val", "no-val", "-o", "report.html"],
            cwd=tmp, check=True, capture_output=True, text=True,
        )
        assert out.stdout.strip() == "report.html", out.stdout
        page = tmp / "report.html"
        text = page.read_text()
        assert not re.search(r"""(src|href)\s*=\s*["']?https?:""", text, re.I), "external reference"

        counted = tmp / "counted.html"
        counted.write_text(text.replace("</body>", COUNT_SCRIPT + "</body>"))
        dom, console = browse(counted, "--dump-dom")
        result = Result()
        result.feed(dom)
        if not result.text:
            sys.exit(f"the counting script left no result; console:\n" + "\n".join(console))
        checked = json.loads(result.text)
        charts = checked["charts"]

        expected = expected_curves([tmp / "with-val", tmp / "no-val"])
        problems = [f"the page fetched {url}" for url in checked["fetched"]]
        for chart in charts:
            want = expected.get(chart["metric"], 0)
            if chart["declared"] != want or chart["drawn"] != want:
                problems.append(f"{chart['metric']}: {chart['drawn']} drawn, "
                                f"{chart['declared']} declared, {want} in the records")
            if chart["width"] <= 0:
                problems.append(f"{chart['metric']}: not laid out")
        missing = set(expected) - {c["metric"] for c in charts}
        problems += [f"{m}: no chart" for m in sorted(missing)]
        if expected.get("val/loss") != 1:
            problems.append("the fixture should have exactly one run with val/loss")

        _, console_original = browse(
            page, f"--screenshot={shots / 'report.png'}", "--window-size=1000,3400",
            "--hide-scrollbars",
        )
        browse(page, f"--screenshot={shots / 'report-narrow.png'}", "--window-size=420,2400",
               "--hide-scrollbars")
        problems += [f"console: {line}" for line in console + console_original]

        total = sum(c["drawn"] for c in charts)
        print(f"{len(charts)} charts, {total} curves, as the records say; "
              f"screenshots in {shots}")
        if problems:
            sys.exit("report check failed:\n  " + "\n  ".join(problems))


if __name__ == "__main__":
    main()
