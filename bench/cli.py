"""CLI responsiveness: how fast each `python -m flows.<stage>` refuses bad input and shows --help.

    .venv/bin/python bench/cli.py                  # every case once
    .venv/bin/python bench/cli.py --rounds 3 --only help
    .venv/bin/python bench/cli.py --timeout 120 --root /tmp/base   # another checkout's code

Each case runs the real command in a fresh subprocess (as a user would type it) and prints its
wall time, its CPU time (user + system: less sensitive to a busy machine than the wall time),
exit status, the number of lines it wrote to stderr and the first of them. Goal
(issue 14, Deliver 1): every refusal in < 2 s, exit 2, one line `error: ...` naming the field,
file or column at fault; --help in < 2 s. Inputs are made in a temporary folder; nothing is
crawled, trained or written to the project's data/.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["ingest", "curate", "train", "evaluate", "index", "search", "sample", "pipeline", "sweep"]


def cases(work: Path, root: Path) -> dict[str, list[str]]:
    """name -> arguments after `python -m`. Inputs that must exist are made in `work`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    urls = work / "urls.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a.jpg"], "caption": ["a"]}), urls)
    missing = str(work / "no-such-dataset")
    out = str(work / "out")
    filters = str(root / "configs/filters/sample.yaml")
    suite = str(root / "configs/eval/sample.yaml")
    found = {
        "pipeline: bad --set key": ["flows.pipeline", "--profile", "tiny", "--set", "bogus=1"],
        "pipeline: --set train.settings.max_stepz": [
            "flows.pipeline",
            "--profile",
            "tiny",
            "--set",
            "train.settings.max_stepz=5",
        ],
        "ingest: wrong column": [
            "flows.ingest",
            *("--url-list", str(urls), "--output", out, "--url-col", "link"),
        ],
        "ingest: bad --resize-mode": [
            "flows.ingest",
            *("--url-list", str(urls), "--output", out, "--resize-mode", "squash"),
        ],
        "train: missing dataset": ["flows.train", "--data", missing, "--max-steps", "5"],
        "curate: missing dataset": [
            "flows.curate",
            *("--input", missing, "--output", out, "--filters", filters),
        ],
        "evaluate: missing checkpoint": [
            "flows.evaluate",
            *("--checkpoint", str(work / "no.ckpt"), "--suite", suite),
        ],
        "index: missing dataset": [
            "flows.index",
            *("--checkpoint", str(work / "no.ckpt"), "--data", missing, "--output", out),
        ],
        "search: missing index": ["flows.search", "--index", missing, "--text", "a"],
        "sample: bad --port": ["flows.sample", "--out", out, "--port", "99999"],
    }
    for stage in STAGES:
        if (root / "flows" / f"{stage}.py").is_file():
            found[f"{stage}: --help"] = [f"flows.{stage}", "--help"]
    return found


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(
    args: list[str], cwd: Path, root: Path, timeout: float
) -> tuple[float, float, int | None, list[str]]:
    t0, cpu0 = time.perf_counter(), _children_cpu()
    try:
        p = subprocess.run(
            [sys.executable, "-m", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "PYTHONPATH": str(root)},
        )
    except subprocess.TimeoutExpired:
        return time.perf_counter() - t0, float("nan"), None, ["(timed out)"]
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    return time.perf_counter() - t0, _children_cpu() - cpu0, p.returncode, lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=1, help="runs per case (median shown)")
    p.add_argument("--only", help="cases whose name contains this text")
    p.add_argument("--timeout", type=float, default=120, help="seconds before a case is cut off")
    p.add_argument("--root", type=Path, default=ROOT, help="the checkout whose code is measured")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        work = Path(tmp)
        # A private MLflow and cwd: a case that gets as far as starting a stage writes nothing here.
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
        load = os.getloadavg()[0]
        print(f"{args.root}: {os.cpu_count()} cores, load {load:.1f}; {args.rounds} round(s)")
        print(f"{'case':<44}{'wall s':>8}{'cpu s':>7}{'exit':>6}{'lines':>7}  first stderr line")
        for name, argv in cases(work, args.root.resolve()).items():
            if args.only and args.only not in name:
                continue
            times, cpus, rc, lines = [], [], None, []
            for _ in range(args.rounds):
                seconds, cpu, rc, lines = run(argv, work, args.root.resolve(), args.timeout)
                times.append(seconds)
                cpus.append(cpu)
            first = lines[0] if lines else ""
            first = first if len(first) <= 100 else first[:97] + "..."
            print(
                f"{name:<44}{statistics.median(times):>8.2f}{statistics.median(cpus):>7.2f}"
                f"{rc!s:>6}{len(lines):>7}  {first}",
                flush=True,
            )


if __name__ == "__main__":
    main()
