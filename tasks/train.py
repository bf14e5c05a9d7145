"""Tasks of the `train` flow: resolve the training config, run `clip_model.train` in a subprocess.

Training never runs in the flow's own process: a DDP Trainer there would relaunch `sys.argv`, the
flow itself (docs/design.md, trap 5). One device runs `python -m clip_model.train`; N devices run it
under `python -m torch.distributed.run --standalone --nproc_per_node N` (gloo on CPU, NCCL on
GPU). The trainer's output is streamed into the Prefect log line by line, and its
`final_metrics.json` is what the task returns.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import deque
from collections.abc import Mapping
from typing import Any

import yaml
from prefect import get_run_logger, task
from pydantic import BaseModel

from clip_model.progress import ENV as PROGRESS_ENV
from clip_model.progress import progress_enabled
from clip_model.train import TrainConfig, check_hardware, load_config
from storage.fs import atomic_write_bytes, filesystem, is_local, join

__all__ = [
    "TrainResult",
    "finished_training",
    "record_training",
    "resume_unfinished",
    "training_key",
    "launch_command",
    "promote_champion",
    "launcher",
    "resolve_train_config",
    "run_training",
    "write_train_config",
]


class TrainResult(BaseModel):
    """What a finished training run left behind (read from its final_metrics.json)."""

    checkpoint: str | None
    checkpoint_dir: str
    out_dir: str
    global_step: int
    world_size: int
    global_batch_size: int
    metrics: dict[str, float]
    data: dict[str, Any]
    mlflow_run_id: str | None = None
    model_uri: str | None = None
    registered_model: str | None = None
    registered_version: int | None = None
    resumed_from: str | None = None  # the checkpoint this run continued, if any
    skipped: bool = False  # True: an earlier run with the same config and data, reused


DONE_FILE = "train_done.json"
STARTED_FILE = "train_started.json"  # the key of the training this out_dir holds, from its start


# MLflow settings that change where and how a run is tracked, never what it trains
_UNTRAINED = {
    "parent_run_id",
    "tracking_uri",
    "promote",
    "champion_metric",
    "champion_goal",
    "system_metrics_interval",
}


def training_key(cfg: TrainConfig, data_digest: str) -> str:
    """What decides a training run's result: the resolved config (less where it is tracked and
    how it resumes) and the input dataset's manifest digest. Not wall time, not paths of logs."""
    spec = cfg.model_dump(
        mode="json", exclude={"resume": True, "launch": True, "mlflow": _UNTRAINED}
    )
    blob = json.dumps({"config": spec, "data": data_digest}, sort_keys=True, default=str)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


@task(name="find-finished-training")
def finished_training(cfg: TrainConfig, key: str) -> TrainResult | None:
    """The result of an earlier run of this very training, if its checkpoint is still there."""
    fs, path = filesystem(join(cfg.out_dir, DONE_FILE))
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        done = json.load(f)
    result = TrainResult.model_validate(done["result"])
    if (
        done.get("key") != key
        or not result.checkpoint
        or not filesystem(result.checkpoint)[0].exists(filesystem(result.checkpoint)[1])
    ):
        return None
    return result.model_copy(update={"skipped": True})


@task(name="promote-champion")
def promote_champion(cfg: TrainConfig, result: TrainResult) -> bool:
    """Move the registry's @champion to this run's version: `mlflow.promote` (--promote) does it
    unconditionally; `mlflow.champion_metric` when this run's final value beats the champion's.
    Also for a reused run: --promote on a rerun promotes the version it registered then."""
    from storage.tracking import promote

    logger = get_run_logger()
    name, version = result.registered_model, result.registered_version
    wanted = cfg.mlflow.promote or cfg.mlflow.champion_metric
    if not wanted or not name or version is None:
        if cfg.mlflow.promote:
            logger.warning("--promote: no model version was registered (mlflow.log_model off?)")
        return False
    metric = cfg.mlflow.champion_metric
    value = result.metrics.get(metric) if metric else None
    if metric and value is None:
        logger.warning(
            "mlflow.champion_metric=%s: the run has no such final metric (it has %s)",
            metric,
            ", ".join(sorted(result.metrics)),
        )
    moved = promote(
        name,
        version,
        metric=metric,
        value=value,
        goal=cfg.mlflow.champion_goal,
        force=cfg.mlflow.promote,
        uri=cfg.mlflow.tracking_uri,
    )
    logger.info("models:/%s@champion %s version %s", name, "->" if moved else "stays; not", version)
    return moved


@task(name="record-finished-training")
def record_training(cfg: TrainConfig, key: str, result: TrainResult) -> None:
    """Written last: from here on a rerun with the same key reuses this result."""
    record = {"key": key, "result": result.model_dump(mode="json")}
    atomic_write_bytes(join(cfg.out_dir, DONE_FILE), json.dumps(record, indent=2).encode())


@task(name="resume-unfinished-training")
def resume_unfinished(cfg: TrainConfig, key: str) -> TrainConfig:
    """`cfg`, resuming from the newest checkpoint when `out_dir` holds an unfinished run of this
    very training (same key: config less `resume`, and data); then marks `out_dir` as this
    training's. A rerun after a crash or preemption thus continues, never restarts from step 0.

    Checkpoints of another training (another key, or none recorded) are left for the trainer to
    refuse (it names them and `resume=auto`): they are never silently continued or pruned.
    """
    from clip_model.step_checkpoint import latest_checkpoint

    started = join(cfg.out_dir, STARTED_FILE)
    fs, path = filesystem(started)
    ours = fs.exists(path) and json.loads(fs.cat_file(path)).get("key") == key
    if cfg.resume is None and ours and latest_checkpoint(cfg.checkpoints) is not None:
        get_run_logger().info("resuming the unfinished training in %s", cfg.checkpoints)
        cfg = cfg.model_copy(update={"resume": "auto"})
    if not ours and latest_checkpoint(cfg.checkpoints) is None:
        atomic_write_bytes(started, json.dumps({"key": key}).encode())
    return cfg


@task(name="resolve-train-config")
def resolve_train_config(
    config: str | None, overrides: dict[str, Any], extra: list[str] | tuple = ()
) -> TrainConfig:
    """A config file (or defaults), then the flow's parameters, then `key=value` strings."""
    items = [f"{k}={json.dumps(v)}" for k, v in overrides.items() if v is not None]
    cfg = load_config(config, [*items, *extra])  # ConfigError names the field at fault
    check_hardware(cfg)  # before anything starts: N CPU ranks nobody asked for are refused
    return cfg


@task(name="write-train-config")
def write_train_config(cfg: TrainConfig) -> str:
    """The resolved config as `out_dir/train_config.yaml`: what the trainer subprocess reads."""
    path = join(cfg.out_dir, "train_config.yaml")
    atomic_write_bytes(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).encode())
    return path


def launcher(cfg: TrainConfig, env: Mapping[str, str] | None = None) -> str:
    """ "python" (one process), "torchrun" (several on this node, or this node's share of several
    nodes) or "srun" (every node's ranks from inside a SLURM allocation)."""
    env = os.environ if env is None else env
    if cfg.num_nodes == 1:
        return "torchrun" if isinstance(cfg.devices, int) and cfg.devices > 1 else "python"
    if cfg.launch.launcher != "auto":
        return cfg.launch.launcher
    return "srun" if "SLURM_JOB_ID" in env else "torchrun"


def launch_command(
    cfg: TrainConfig, config_path: str, env: Mapping[str, str] | None = None
) -> list[str]:
    """The trainer's command line on this machine.

    One process: `python -m clip_model.train`. Several devices on one node: torchrun
    --standalone. Several nodes: torchrun with a c10d rendezvous at `launch.rdzv_endpoint` (the
    same command runs on every node; the flow's node is one of them), or one `srun` across the
    SLURM allocation (Lightning reads each task's SLURM_* variables). The config file and out_dir
    must then be on storage every node reads (a shared filesystem or an object store).
    """
    # a URL stays one (every node reads it; the trainer fetches a local copy), a path absolute
    config = config_path if not is_local(config_path) else filesystem(config_path)[1]
    trainer = ["-m", "clip_model.train", "--config", config]
    kind = launcher(cfg, env)
    if kind == "python":
        return [sys.executable, *trainer]
    if cfg.strategy != "ddp":
        raise ValueError(
            f"devices={cfg.devices} x num_nodes={cfg.num_nodes} needs strategy=ddp, got "
            f"{cfg.strategy!r}"
        )
    if cfg.num_nodes > 1 and not isinstance(cfg.devices, int):
        raise ValueError(f"num_nodes={cfg.num_nodes} needs devices per node as a number")
    if kind == "srun":
        return [
            "srun",
            f"--nodes={cfg.num_nodes}",
            f"--ntasks-per-node={cfg.devices}",
            "--kill-on-bad-exit=1",
            sys.executable,
            *trainer,
        ]
    if cfg.num_nodes == 1:
        rendezvous = ["--standalone"]
    elif cfg.launch.rdzv_endpoint is None:
        raise ValueError(
            f"num_nodes={cfg.num_nodes} with torchrun needs launch.rdzv_endpoint=HOST:PORT (a "
            "port on one of the nodes that all of them reach), or run the flow inside a SLURM "
            "allocation (launch.launcher=srun)"
        )
    else:
        rendezvous = [
            f"--nnodes={cfg.num_nodes}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={cfg.launch.rdzv_endpoint}",
            f"--rdzv_id={cfg.launch.rdzv_id}",
        ]
    launch = ["-m", "torch.distributed.run", *rendezvous, f"--nproc_per_node={cfg.devices}"]
    return [sys.executable, *launch, *trainer]


@task(name="run-training")
def run_training(cfg: TrainConfig, config_path: str) -> TrainResult:
    """Run the trainer to completion, streaming its output; its final metrics come back."""
    logger = get_run_logger()
    command = launch_command(cfg, config_path)
    logger.info("launching: %s", " ".join(command))
    if cfg.num_nodes > 1 and command[0] != "srun":
        logger.info(
            "this is one node of %d: run the same command on each of the others (shared "
            "out_dir %s): %s",
            cfg.num_nodes,
            cfg.out_dir,
            " ".join(["python", *command[1:]]),
        )
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    # on a terminal the trainer's progress bar (stderr) draws there: piped, its carriage
    # returns would become a log line per redraw. Off a terminal, stderr joins the log.
    stderr = subprocess.STDOUT
    if progress_enabled():
        env[PROGRESS_ENV] = "1"
        stderr = None
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=stderr, text=True, bufsize=1, env=env
    )
    tail: deque[str] = deque(maxlen=40)
    for line in proc.stdout:
        line = line.rstrip()
        if line:
            logger.info("trainer: %s", line)
            tail.append(line)
    rc = proc.wait()
    if rc != 0:
        raise RuntimeError(f"training exited with {rc}; its last lines:\n" + "\n".join(tail))
    final = join(cfg.out_dir, "final_metrics.json")
    fs, path = filesystem(final)
    if not fs.exists(path):
        raise RuntimeError(f"training exited cleanly but wrote no {final}")
    with fs.open(path, "r") as f:
        report = json.load(f)
    tracked = report.get("mlflow") or {}
    return TrainResult(
        checkpoint=report["checkpoint"],
        checkpoint_dir=report["checkpoint_dir"],
        out_dir=cfg.out_dir,
        global_step=report["global_step"],
        world_size=report["world_size"],
        global_batch_size=report["global_batch_size"],
        metrics=report["metrics"],
        data=report["data"],
        mlflow_run_id=tracked.get("run_id"),
        model_uri=tracked.get("model_uri"),
        registered_model=tracked.get("registered_model"),
        registered_version=tracked.get("registered_version"),
        resumed_from=report.get("resumed_from"),
    )
