"""A training resumed into its own folder (issue 11, class 8): metrics.jsonl keeps one row per
step. The interrupted run had written rows past the checkpoint the rerun resumes from; the rerun
drops them before writing its own, instead of appending duplicates."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from storage import DatasetWriter

MICRO_MODEL = {
    "image_size": 32,
    "vision_width": 64,
    "vision_layers": 1,
    "vision_patch_size": 8,
    "vision_head_width": 32,
    "text_width": 64,
    "text_heads": 2,
    "text_layers": 1,
    "embed_dim": 32,
    "context_length": 16,
}


def _dataset(path: Path, n: int = 64) -> str:
    rng = np.random.default_rng(0)
    with DatasetWriter(str(path), stage="test", samples_per_shard=n // 2) as writer:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, "JPEG")
            writer.write(f"s{i:03d}", buf.getvalue(), f"picture number {i % 7}")
    return str(path)


def _steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # two short trainings: ~40 s on a loaded 2-core machine
def test_a_run_resumed_into_its_folder_keeps_one_metrics_row_per_step(tmp_path):
    from clip_model.train import load_config, train

    out = tmp_path / "run"
    config = {
        "data": _dataset(tmp_path / "ds"),
        "model": "tiny",
        "model_overrides": MICRO_MODEL,
        "batch_size": 16,
        "max_steps": 6,
        "warmup_steps": 1,
        "precision": "32",
        "workers": 0,
        "shuffle_buffer": 1,
        "val_fraction": 0.0,
        "out_dir": str(out),
        "checkpoint": {"every_n_steps": 3, "keep_last": 2},
        "mlflow": {"enabled": False},
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    threads = torch.get_num_threads()
    try:
        train(load_config(path, []).model_copy(update={"cpu_threads": 1}))
        assert _steps(out) == [1, 2, 3, 4, 5, 6]
        # the rerun resumes from step 3 (as if the run had died after writing step 6's row)
        resume = out / "checkpoints" / "step-00000003.ckpt"
        cfg = load_config(path, [f"resume={resume}"]).model_copy(update={"cpu_threads": 1})
        train(cfg)
    finally:
        torch.set_num_threads(threads)
    assert _steps(out) == [1, 2, 3, 4, 5, 6]
