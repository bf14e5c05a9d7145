"""How the `train` flow launches the trainer: one process, torchrun on one node, torchrun across
nodes with a c10d rendezvous, srun inside a SLURM allocation; and two "nodes" of one CPU rank
each on this machine, meeting at a rendezvous on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from clip_model.train import ConfigError, load_config
from tasks.train import launch_command, launcher

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
TRAINER = ["-m", "clip_model.train", "--config", "/shared/run/train_config.yaml"]


def config(tmp_path, *overrides: str):
    return load_config(
        None, [f"data={tmp_path}", "max_steps=2", "accelerator=cpu", "strategy=ddp", *overrides]
    )


def test_one_node_runs_python_or_a_standalone_torchrun(tmp_path):
    cfg = load_config(None, [f"data={tmp_path}", "max_steps=2"])
    assert launch_command(cfg, "/shared/run/train_config.yaml", env={}) == [PY, *TRAINER]
    cfg = config(tmp_path, "devices=4")
    assert launch_command(cfg, "/shared/run/train_config.yaml", env={}) == [
        PY,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=4",
        *TRAINER,
    ]


def test_several_nodes_meet_at_a_torchrun_rendezvous(tmp_path):
    cfg = config(tmp_path, "devices=8", "num_nodes=4", "launch.rdzv_endpoint=node0:29500")
    assert launcher(cfg, env={}) == "torchrun"
    assert launch_command(cfg, "/shared/run/train_config.yaml", env={}) == [
        PY,
        "-m",
        "torch.distributed.run",
        "--nnodes=4",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=node0:29500",
        "--rdzv_id=clip-train",
        "--nproc_per_node=8",
        *TRAINER,
    ]


def test_inside_a_slurm_allocation_one_srun_starts_every_node(tmp_path):
    cfg = config(tmp_path, "devices=8", "num_nodes=4")
    slurm = {"SLURM_JOB_ID": "123", "SLURM_NNODES": "4"}
    assert launcher(cfg, env=slurm) == "srun"
    assert launch_command(cfg, "/shared/run/train_config.yaml", env=slurm) == [
        "srun",
        "--nodes=4",
        "--ntasks-per-node=8",
        "--kill-on-bad-exit=1",
        PY,
        *TRAINER,
    ]
    # asked for torchrun: the allocation does not override it
    cfg = config(tmp_path, "devices=8", "num_nodes=4", "launch.launcher=torchrun")
    with pytest.raises(ValueError, match=r"launch.rdzv_endpoint=HOST:PORT"):
        launch_command(cfg, "/shared/run/train_config.yaml", env=slurm)


def test_launch_errors_name_what_is_missing(tmp_path):
    with pytest.raises(ValueError, match="num_nodes=2 with torchrun needs launch.rdzv_endpoint"):
        launch_command(config(tmp_path, "num_nodes=2"), "/x/train_config.yaml", env={})
    cfg = load_config(None, [f"data={tmp_path}", "max_steps=2", "num_nodes=2"])
    with pytest.raises(ValueError, match="needs strategy=ddp"):
        launch_command(cfg, "/x/train_config.yaml", env={})
    with pytest.raises(ConfigError, match="expected HOST:PORT"):
        config(tmp_path, "launch.rdzv_endpoint=node0")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two torchrun agents and two Lightning ranks: ~2 min on 2 shared cores
def test_two_nodes_of_one_cpu_rank_train_through_a_rendezvous(tmp_path):
    from test_train import UNEVEN, micro_config, write_shapes

    data = write_shapes(tmp_path / "ds", UNEVEN)
    path = micro_config(
        tmp_path,
        data,
        max_steps=3,
        accelerator="cpu",
        strategy="ddp",
        num_nodes=2,
        devices=1,
        launch={"rdzv_endpoint": f"127.0.0.1:{_free_port()}"},
    )
    cfg = load_config(path)
    command = launch_command(cfg, str(path), env={})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    # the same command on both "nodes": the rendezvous gives each its node rank
    nodes = [
        subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    report = json.loads((Path(cfg.out_dir) / "final_metrics.json").read_text())
    assert report["world_size"] == 2 and report["global_step"] == 3
    assert report["metrics"]["train/global_batch"] == 32  # 2 nodes x 16, gathered


def test_the_tokenizer_goes_through_storage_so_every_node_finds_it(tmp_path):
    # an object store out_dir (fsspec's memory://): rank 0 writes, another node's rank reads
    import fsspec
    from test_train import write_shapes

    from clip_model.config import ModelConfig
    from clip_model.train import prepare_tokenizer
    from storage import open_dataset

    dataset = open_dataset(write_shapes(tmp_path / "ds", [40]))
    out = "memory://launch-test/run"
    cfg = load_config(None, [f"data={dataset.url}", "max_steps=1", f"out_dir={out}"])
    model = ModelConfig.load("tiny")
    first, ref, fitted = prepare_tokenizer(cfg, dataset, model, rank=0)
    assert ref == f"{out}/tokenizer.json"
    assert fsspec.filesystem("memory").exists("/launch-test/run/tokenizer.json")
    other, other_ref, _ = prepare_tokenizer(cfg, dataset, model, rank=1)  # waits for none
    assert other_ref == ref and other.vocab_size == first.vocab_size == fitted.vocab_size
    assert other("a red circle").tolist() == first("a red circle").tolist()
