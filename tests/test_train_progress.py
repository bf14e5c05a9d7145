"""Training progress (clip_model/train_progress.py): step/total, samples/s and the ETA on a
terminal, nothing in a log; a real micro training run in this process."""

from __future__ import annotations

import re

import pytest

from clip_model.progress import ENV
from clip_model.train import load_config, train
from tests.test_train import micro_config, write_shapes

pytestmark = pytest.mark.slow  # two micro training runs in this process (~1 min on 2 busy cores)


def test_training_draws_step_total_rate_and_eta_on_a_terminal_only(tmp_path, capsys, monkeypatch):
    data = write_shapes(tmp_path / "shapes", [24, 24])
    monkeypatch.setenv(ENV, "1")  # what a terminal gets
    cfg = load_config(str(micro_config(tmp_path, data)), ["max_steps=3", "print_every_n_steps=0"])
    train(cfg)
    drawn = capsys.readouterr().err.replace("\r", "\n")
    final = [line for line in drawn.splitlines() if line.startswith("train")][-1]
    # "train: 100%|...| 3/3 [00:02<00:00, 1.4step/s, 22 samples/s]"
    assert re.search(r"\b3/3\b", final), final
    assert re.search(r"<\d\d:\d\d", final), final  # the ETA (remaining) field
    assert re.search(r"[\d.]+(step/s|s/step)", final), final  # tqdm flips a slow rate
    assert re.search(r"[\d,]+ samples/s", final), final

    monkeypatch.setenv(ENV, "0")  # a log: no bar at all
    cfg = load_config(
        str(micro_config(tmp_path, data, out_dir=str(tmp_path / "quiet"))),
        ["max_steps=2", "print_every_n_steps=0"],
    )
    train(cfg)
    assert "samples/s" not in capsys.readouterr().err
