"""The way a user deploys: a real Prefect server, work pool, `prefect deploy`, a process worker,
`prefect deployment run`, and an MLflow server whose REST API shows the pipeline's runs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{proc.args[0]} exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout}s:\n{log.read_text()[-3000:]}")


def mlflow_api(base: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(
        f"{base}/api/2.0/mlflow/{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


@pytest.fixture
def services(tmp_path):
    """A Prefect server and an MLflow server on free loopback ports, stopped afterwards."""
    procs: list[subprocess.Popen] = []
    prefect_port, mlflow_port = free_port(), free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
    }

    def start(name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        procs.append(proc)
        return proc

    try:
        prefect = start(
            "prefect-server",
            [
                str(BIN / "prefect"),
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(prefect_port),
            ],
        )
        mlflow = start("mlflow-server", [
            str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
            "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--artifacts-destination", str(tmp_path / "mlartifacts"), "--workers", "1",
        ])  # fmt: skip
        wait_http(
            f"http://127.0.0.1:{prefect_port}/api/health", prefect, tmp_path / "prefect-server.log"
        )
        wait_http(f"http://127.0.0.1:{mlflow_port}/health", mlflow, tmp_path / "mlflow-server.log")
        yield {
            "env": env,
            "start": start,
            "mlflow": f"http://127.0.0.1:{mlflow_port}",
            "tmp": tmp_path,
        }
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def run(cmd: list[str], env: dict, timeout: float = 300) -> str:
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (
        f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done.stdout


def test_deployed_pipeline_runs_on_a_worker_and_logs_to_mlflow_server(services):
    env, tmp = services["env"], services["tmp"]
    profile = yaml.safe_load((ROOT / "configs/pipeline/micro.yaml").read_text())
    profile["data_root"] = str(tmp / "data")
    (tmp / "micro.yaml").write_text(yaml.safe_dump(profile))

    prefect = str(BIN / "prefect")
    run([prefect, "work-pool", "create", "clip-process", "--type", "process"], env)
    out = run([prefect, "--no-prompt", "deploy", "--all"], env)
    assert "clip-pipeline/micro" in out
    worker = services["start"](
        "worker", [prefect, "worker", "start", "--pool", "clip-process", "--limit", "1"]
    )
    out = run(
        [prefect, "deployment", "run", "clip-pipeline/micro", "--param", f"profile={tmp / 'micro.yaml'}",
         "--watch", "--watch-timeout", "1500"],
        env, timeout=1600,
    )  # fmt: skip
    assert worker.poll() is None, (tmp / "worker.log").read_text()[-3000:]
    assert "Completed" in out, out[-3000:] + (tmp / "worker.log").read_text()[-5000:]

    base = services["mlflow"]
    experiments = mlflow_api(base, "experiments/search", {"max_results": 100})["experiments"]
    ids = [e["experiment_id"] for e in experiments]
    runs = mlflow_api(base, "runs/search", {"experiment_ids": ids, "max_results": 1000}).get(
        "runs", []
    )
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
    parents = [r for r, t in zip(runs, tags, strict=True) if t.get("stage") == "pipeline"]
    assert len(parents) == 1, tags
    parent = parents[0]
    parent_id = parent["info"]["run_id"]
    assert parent["info"]["status"] == "FINISHED"
    parent_metrics = {m["key"] for m in parent["data"]["metrics"]}
    assert {"curate/kept", "digits/acc1", "colors/acc1"} <= parent_metrics
    parent_tags = {t["key"]: t["value"] for t in parent["data"]["tags"]}
    assert parent_tags["prefect.flow_run_id"]
    children = {
        t["stage"]: r
        for r, t in zip(runs, tags, strict=True)
        if t.get("mlflow.parentRunId") == parent_id
    }
    assert {"ingest", "curate", "train", "evaluate"} <= set(children)
    for stage, child in children.items():
        assert child["data"].get("metrics"), f"the {stage} run has no metrics"
