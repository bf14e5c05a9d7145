"""The way a team deploys: a real Prefect server, a CPU and a GPU work pool, `prefect deploy` of
prefect.yaml, a process worker per pool that gets the code by the deployments' pull step (a git
clone of this repository at its HEAD commit: commit what you want tested), `prefect deployment
run`, and an MLflow server whose REST API shows the runs. The workers' own environment names no
MLflow server and no PYTHONPATH: what the runs get comes from the deployments' job variables."""

from __future__ import annotations

import json
import os
import re
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

    def start(name: str, cmd: list[str], *, cwd: Path = ROOT, env: dict = env) -> subprocess.Popen:
        log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
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
            "prefect": f"http://127.0.0.1:{prefect_port}/api",
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


def flow_run(api: str, output: str) -> dict:
    """The flow run `prefect deployment run` created (its output names it `UUID: ...`)."""
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", output).group(1)
    with urllib.request.urlopen(f"{api}/flow_runs/{run_id}", timeout=30) as r:
        return json.load(r)


@pytest.mark.slow
@pytest.mark.timeout(2400)  # micro and an index through workers: over 900 s on a loaded machine
def test_deployments_run_on_their_pools_from_a_clone_and_log_to_mlflow_server(services):
    env, tmp = services["env"], services["tmp"]
    profile = yaml.safe_load((ROOT / "configs/pipeline/micro.yaml").read_text())
    data = tmp / "data"
    profile["data_root"] = str(data)
    (tmp / "micro.yaml").write_text(yaml.safe_dump(profile))
    workdir = tmp / "work"
    workdir.mkdir()
    revision = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    deploy_env = {
        **env,
        "CLIP_PIPELINE_REPO": str(ROOT),
        "CLIP_PIPELINE_REVISION": revision,
        "CLIP_PIPELINE_WORKDIR": str(workdir),
    }

    prefect = str(BIN / "prefect")
    for pool in ("clip-cpu", "clip-gpu"):
        run([prefect, "work-pool", "create", pool, "--type", "process"], env)
    out = run([prefect, "--no-prompt", "deploy", "--all"], deploy_env)
    for name in ("clip-pipeline/micro", "ingest/default", "curate/default", "train/default",
                 "evaluate/default", "index/default", "sample_web/default"):  # fmt: skip
        assert name in out, out[-3000:]
    worker_env = {k: v for k, v in env.items() if k not in ("MLFLOW_TRACKING_URI", "PYTHONPATH")}
    workers = {
        pool: services["start"](
            f"worker-{pool}",
            [prefect, "worker", "start", "--pool", pool, "--limit", "1"],
            cwd=tmp,
            env=worker_env,
        )
        for pool in ("clip-cpu", "clip-gpu")
    }

    out = run(
        [prefect, "deployment", "run", "clip-pipeline/micro", "--param", f"profile={tmp / 'micro.yaml'}",
         "--watch", "--watch-timeout", "1500"],
        env, timeout=1600,
    )  # fmt: skip
    logs = "".join((tmp / f"worker-{p}.log").read_text()[-3000:] for p in workers)
    assert "Completed" in out, out[-3000:] + logs
    pipeline_run = flow_run(services["prefect"], out)
    checkpoint = sorted(data.glob("train/micro/run-*/checkpoints/step-*.ckpt"))[-1]
    out = run(
        [prefect, "deployment", "run", "index/default", "--param", f"checkpoint={checkpoint}",
         "--param", f"data={data / 'curate' / 'micro'}", "--param", f"output={data / 'index'}",
         "--watch", "--watch-timeout", "600"],
        env, timeout=700,
    )  # fmt: skip
    assert "Completed" in out, out[-3000:] + (tmp / "worker-clip-gpu.log").read_text()[-5000:]
    index_run = flow_run(services["prefect"], out)
    assert (data / "index").is_dir()

    # each run on its own pool's worker, from the clone at the deployed revision
    assert pipeline_run["work_pool_name"] == "clip-cpu"
    assert index_run["work_pool_name"] == "clip-gpu"
    cpu_log = (tmp / "worker-clip-cpu.log").read_text()
    gpu_log = (tmp / "worker-clip-gpu.log").read_text()
    assert pipeline_run["id"] in cpu_log and pipeline_run["id"] not in gpu_log
    assert index_run["id"] in gpu_log and index_run["id"] not in cpu_log
    for pool, worker in workers.items():
        assert worker.poll() is None, f"the {pool} worker exited"
    clone = workdir / "clip-pipeline"
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True, check=True
    )
    assert head.stdout.strip() == revision

    base = services["mlflow"]
    experiments = mlflow_api(base, "experiments/search", {"max_results": 100})["experiments"]
    ids = [e["experiment_id"] for e in experiments]
    runs = mlflow_api(base, "runs/search", {"experiment_ids": ids, "max_results": 1000}).get(
        "runs", []
    )
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
    assert any(t.get("stage") == "index" for t in tags), tags
    parents = [r for r, t in zip(runs, tags, strict=True) if t.get("stage") == "pipeline"]
    assert len(parents) == 1, tags
    parent = parents[0]
    parent_id = parent["info"]["run_id"]
    assert parent["info"]["status"] == "FINISHED"
    parent_metrics = {m["key"] for m in parent["data"]["metrics"]}
    assert {"curate/kept", "digits/acc1", "colors/acc1"} <= parent_metrics
    parent_tags = {t["key"]: t["value"] for t in parent["data"]["tags"]}
    assert parent_tags["prefect.flow_run_id"] == pipeline_run["id"]
    children = {
        t["stage"]: r
        for r, t in zip(runs, tags, strict=True)
        if t.get("mlflow.parentRunId") == parent_id
    }
    assert {"ingest", "curate", "train", "evaluate"} <= set(children)
    for stage, child in children.items():
        assert child["data"].get("metrics"), f"the {stage} run has no metrics"
