"""Four stages starting at once on a fresh SQLite MLflow database (issue 11, class 7; docs/design.md,
trap 14): each stage creates the database, its schema and the experiment once, under a file lock,
before it opens its run, so every one of them starts (without it, schema creation raced and 3 of
4 failed)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

STAGE = """
import sys, time
from pathlib import Path
import mlflow
from storage.tracking import stage_run
print("ready", flush=True)
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.01)
with stage_run(sys.argv[1]):
    mlflow.log_metric("started", 1)
"""

STAGES = ("ingest", "curate", "index", "evaluate")


@pytest.mark.slow  # four processes importing MLflow: over a minute on a loaded 2-core machine
def test_four_stages_starting_at_once_on_a_fresh_database_all_run(tmp_path):
    import mlflow

    db, go = tmp_path / "mlflow.db", tmp_path / "go"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    env.pop("MLFLOW_EXPERIMENT_NAME", None)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", STAGE, stage, str(go)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for stage in STAGES
    ]
    for proc in procs:  # all imported, none has touched the database: then all at once
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()[-2000:]
    assert not db.exists()
    go.touch()
    failed = []
    for stage, proc in zip(STAGES, procs, strict=True):
        _, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            errors = [line for line in err.splitlines() if "Error" in line] or [err[-300:]]
            failed.append(f"{stage}: {errors[-1]}")
    assert not failed, failed
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted(r.data.tags["stage"] for r in runs) == sorted(STAGES)
