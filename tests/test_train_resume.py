"""Resume through the pipeline: a rerun of the `train` flow continues a killed training.

`resume` is how a run continues, not which run it is: the pipeline's run folder does not depend
on it, and the flow resumes an unfinished training of the same key from its newest checkpoint
by itself. `last.ckpt` always sits beside the step files (the evaluate deployment's default).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage.output import read_record
from tasks.pipeline import load_profile
from tests.test_train import ROOT, micro_config, write_shapes


def test_resume_is_not_part_of_the_pipeline_run_folder():
    def folder(settings: dict) -> str:
        cfg = load_profile("tiny", {"train.settings": settings})
        items = dict(item.split("=", 1) for item in cfg.train_items("data/x", "sha256:abc"))
        return json.loads(items["out_dir"])

    plain = folder({"max_steps": 50})
    assert folder({"max_steps": 50, "resume": "auto"}) == plain
    assert folder({"max_steps": 60}) != plain  # what changes the result still names the folder


def logged_steps(path: Path) -> list[int]:
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except json.JSONDecodeError:  # the line the kill cut short
            continue
    return steps


def flow_in_subprocess(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flows.train", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        start_new_session=True,  # its own process group: the trainer below it dies with it
        # its own ephemeral Prefect server, which a loaded machine can take long to start
        env={
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "600",
        },
    )


@pytest.mark.slow
def test_a_rerun_of_the_train_flow_resumes_a_killed_training(tmp_path, prefect_harness, mlflow_tmp):
    from flows.train import train as train_flow

    data = write_shapes(tmp_path / "ds", [40, 40, 40, 40])
    config = micro_config(tmp_path, data, checkpoint={"every_n_steps": 3, "keep_last": 5})
    out = tmp_path / "run"
    args = ["--data", data, "--config", str(config), "--out", str(out), "--max-steps", "15"]

    proc = flow_in_subprocess(*args)
    first = out / "checkpoints" / "step-00000003.ckpt"
    deadline = time.monotonic() + 600
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # the flow, its trainer and the trainer's workers
    proc.wait()
    assert first.exists(), proc.stderr.read()[-3000:]
    assert not (out / "final_metrics.json").exists(), "the training finished before the kill"
    assert (out / "checkpoints" / "last.ckpt").exists()
    # the killed run's folder reads as unfinished, and its lock is left for the rerun to break
    assert read_record(str(out)).state == "open" and not (out / "train_done.json").exists()
    assert (out.parent / f".{out.name}.lock").exists()
    killed_at = max(int(p.stem.split("-")[1]) for p in (out / "checkpoints").glob("step-*.ckpt"))

    result = train_flow(data=data, config=str(config), out_dir=str(out), max_steps=15)
    assert not result.skipped
    assert result.resumed_from == str(out / "checkpoints" / f"step-{killed_at:08d}.ckpt")
    assert result.global_step == 15
    steps = logged_steps(out / "metrics.jsonl")
    assert steps[-(15 - killed_at) :] == list(range(killed_at + 1, 16))
    assert steps.count(1) == 1  # continued, not from step 1
    last = out / "checkpoints" / "last.ckpt"
    assert last.read_bytes() == Path(result.checkpoint).read_bytes()

    assert read_record(str(out)).state == "committed"
    again = train_flow(data=data, config=str(config), out_dir=str(out), max_steps=15)
    assert again.skipped and again.global_step == 15  # finished: reused, not resumed


def test_another_world_size_resumes_at_the_same_sample_of_the_epoch(tmp_path):
    from tests.test_train import datamodule

    data = write_shapes(tmp_path / "ds", [64, 64, 64, 64])
    two_ranks = datamodule(data, rank=0, world_size=2)
    two_ranks.load_state_dict({"epoch": 1, "batches": 5})  # 5 x 2 x 8 = 80 samples in
    state = two_ranks.state_dict()
    one_rank = datamodule(data, rank=0, world_size=1)
    with pytest.warns(UserWarning, match="world_size: 2 -> 1.*80 samples into epoch 1 = batch 10"):
        one_rank.load_state_dict(state)
    assert (one_rank.position.epoch, one_rank.position.batches) == (1, 10)
    four_ranks = datamodule(data, rank=3, world_size=4)
    with pytest.warns(UserWarning, match="batch 2"):
        four_ranks.load_state_dict(state)  # 80 // 32: the partial global batch is replayed
    assert four_ranks.position.batches == 2


@pytest.mark.slow
def test_resumed_at_twice_the_global_batch_the_lr_plan_and_budget_continue_in_samples(tmp_path):
    from clip_model.train import load_config, train

    data = write_shapes(tmp_path / "ds", [40, 40, 40, 40])
    config = micro_config(
        tmp_path,
        data,
        max_steps=12,
        batch_size=8,
        workers=0,
        warmup_steps=3,
        checkpoint={"every_n_steps": 6, "keep_last": 5},
    )
    first = load_config(config, [f"out_dir={tmp_path / 'a'}"])
    train(first)
    checkpoint = tmp_path / "a" / "checkpoints" / "step-00000006.ckpt"
    doubled = load_config(
        config, [f"out_dir={tmp_path / 'b'}", "batch_size=16", f"resume={checkpoint}"]
    )
    with pytest.warns(UserWarning, match="batch_size: 8 -> 16"):
        result = train(doubled)
    # 6 planned steps of 8 samples were left: 3 steps of 16
    assert result["global_step"] == 9
    planned = {
        r["step"]: r["train/lr"] for r in map(json.loads, open(tmp_path / "a" / "metrics.jsonl"))
    }
    resumed = {
        r["step"]: r["train/lr"] for r in map(json.loads, open(tmp_path / "b" / "metrics.jsonl"))
    }
    assert sorted(resumed) == [7, 8, 9]
    # step t's logged lr is the multiplier after t - 1 steps, 6 + 2 (t - 7) of the plan's: the
    # plan logged that one at its step 7 + 2 (t - 7)
    for step, planned_step in {7: 7, 8: 9, 9: 11}.items():
        assert resumed[step] == pytest.approx(planned[planned_step], rel=1e-9), (resumed, planned)
