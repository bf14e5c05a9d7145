"""Training's out_dir as a stage output (issue 11, classes 2 and 7; docs/stage-outputs.md,
"Training"): never the training data or inside it, one run at a time (the lock names its
owner), a folder no training wrote is refused without --force, and the folder reads complete
(`finished_training`, the record) only once the run that is writing it has finished."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from storage import LockError, OutputError
from storage.output import read_record
from tests.test_train import ROOT, micro_config, write_shapes


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def data(tmp_path) -> Path:
    return Path(write_shapes(tmp_path / "ds", [20, 20]))


@pytest.mark.parametrize("where", ["data", "inside", "dotdot", "symlink"])
def test_an_out_dir_that_is_or_lies_inside_the_training_data_is_refused_writing_nothing(
    where, data, tmp_path, prefect_harness, mlflow_tmp
):
    from flows.train import train as train_flow

    (tmp_path / "link").symlink_to(data)
    out_dir = {
        "data": f"{data}/.",
        "inside": f"{data}/run",
        "dotdot": f"{tmp_path}/elsewhere/../ds",
        "symlink": f"{tmp_path}/link/run",
    }[where]
    config = micro_config(tmp_path, str(data))
    before = _listing(data)
    with pytest.raises(OutputError, match="input"):
        train_flow(data=str(data), config=str(config), out_dir=out_dir, max_steps=1)
    assert _listing(data) == before


def test_a_folder_no_training_wrote_is_refused_without_force(
    data, tmp_path, prefect_harness, mlflow_tmp
):
    from flows.train import train as train_flow

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("someone's notes")
    config = micro_config(tmp_path, str(data))
    with pytest.raises(OutputError, match="--force"):
        train_flow(data=str(data), config=str(config), out_dir=str(out), max_steps=1)
    assert _listing(out) == ["notes.txt"]


def test_a_run_folder_from_before_output_records_is_kept_as_a_trainings(data, tmp_path):
    """Written by the train flow before outputs carried a record: its train_started.json names a
    training key, so the folder is this stage's (the pipeline's run folders rerun as before)."""
    from clip_model.train_config import load_config
    from tasks.train import STARTED_FILE
    from tasks.train_output import training_output

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / STARTED_FILE).write_text(json.dumps({"key": "sha256:" + "0" * 64}))
    (out / "checkpoints" / "step-00000003.ckpt").write_bytes(b"weights")
    cfg = load_config(str(micro_config(tmp_path, str(data))), [f"out_dir={out}", "max_steps=1"])
    with training_output(cfg) as opened:
        opened.commit()
    assert read_record(str(out)).stage == "train"
    assert (out / "checkpoints" / "step-00000003.ckpt").read_bytes() == b"weights"


HOLD = """
import sys, time
from storage.output import stage_output
with stage_output(sys.argv[1], stage="train", mode="in_place"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_second_training_on_one_out_dir_is_refused_naming_the_owner(
    data, tmp_path, prefect_harness, mlflow_tmp
):
    from flows.train import train as train_flow

    out = tmp_path / "run"
    config = micro_config(tmp_path, str(data))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen(  # another training writing out_dir
        [sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _listing(out)
        with pytest.raises(LockError, match=rf"stage 'train', host .* pid {holder.pid}"):
            train_flow(data=str(data), config=str(config), out_dir=str(out), max_steps=1)
        assert _listing(out) == before  # nothing written beside the other run's files
    finally:
        holder.kill()
        holder.wait()


LONGER = 20  # steps of the continued run: enough for the watcher to see it writing


def _watch(out: Path, seen: list, stop: threading.Event, looks_complete) -> None:
    """While the run resumed past step 3 writes out_dir: (step, record state, looks complete)."""
    while not stop.is_set():
        try:
            lines = (out / "metrics.jsonl").read_text().splitlines()
            step = max(json.loads(line)["step"] for line in lines if line.endswith("}"))
        except (OSError, ValueError):
            step = 0
        if step > 3:
            record = read_record(str(out))
            seen.append((step, record and record.state, looks_complete()))
        time.sleep(0.02)


@pytest.mark.slow  # two trainings (their subprocesses import torch and Lightning)
def test_force_replaces_a_foreign_folder_and_out_dir_reads_complete_only_when_complete(
    data, tmp_path, prefect_harness, mlflow_tmp
):
    from flows.train import train as train_flow
    from tasks.train import DONE_FILE, finished_training, resolve_train_config, training_key

    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("someone's notes")
    config = micro_config(tmp_path, str(data))
    first = train_flow(
        data=str(data), config=str(config), out_dir=str(out), max_steps=3, force=True
    )
    assert not (out / "notes.txt").exists()
    assert read_record(str(out)).state == "committed"
    assert json.loads((out / DONE_FILE).read_text())["result"]["global_step"] == 3

    # the same folder continued to step LONGER (another training key): while that run writes, the
    # first run's result must not read as complete (its checkpoints are being replaced)
    cfg = resolve_train_config.fn(str(config), {"out_dir": str(out), "max_steps": 3})
    from storage import open_dataset

    key = training_key(cfg, open_dataset(str(data)).digest)
    assert finished_training.fn(cfg, key) is not None  # the first run, reusable
    seen, stop = [], threading.Event()
    watcher = threading.Thread(
        target=_watch, args=(out, seen, stop, lambda: finished_training.fn(cfg, key) is not None)
    )
    watcher.start()
    try:
        second = train_flow(
            data=str(data),
            config=str(config),
            out_dir=str(out),
            max_steps=LONGER,
            settings=["resume=auto"],
        )
    finally:
        stop.set()
        watcher.join()
    assert second.global_step == LONGER and second.resumed_from and first.checkpoint
    during = [s for s in seen if s[0] < LONGER]
    assert during, f"the second run was never seen writing: {seen}"
    assert all(state == "open" and not complete for _, state, complete in during), during
    assert read_record(str(out)).state == "committed"
    assert json.loads((out / DONE_FILE).read_text())["result"]["global_step"] == LONGER
