"""SigLIP as the training loss (`loss: siglip`): a real run on coloured shapes lowers the loss and
learns the sigmoid's bias and temperature from the paper's init (b = -10, t = 10); the bias is a
parameter of the training checkpoint, without weight decay, and a resumed run continues exactly.
(The loss itself, and its ring exchange across ranks: tests/test_loss.py; with accum_freq:
tests/test_accum.py.)"""

from __future__ import annotations

import json
import math

import pytest
import torch

from clip_model.train import ConfigError, load_config, train
from tests.test_train import micro_config, write_shapes

STEPS, HALF = 8, 4  # a checkpoint at HALF to resume from


def rows(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


@pytest.fixture(scope="module")
def siglip_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("siglip")
    data = write_shapes(tmp / "ds", [48, 48, 48, 48])
    config = micro_config(
        tmp,
        data,
        loss="siglip",
        max_steps=STEPS,
        workers=0,
        lr=2e-3,
        warmup_steps=1,
        checkpoint={"every_n_steps": HALF, "keep_last": 5},
    )
    result = train(load_config(config, [f"out_dir={tmp / 'whole'}"]))
    return tmp, config, result


def test_a_loss_other_than_clip_or_siglip_is_refused_naming_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"loss=sigmoid: loss: .*'clip' or 'siglip'"):
        load_config(None, [f"data={tmp_path}", "max_steps=1", "loss=sigmoid"])
    assert load_config(None, [f"data={tmp_path}", "max_steps=1"]).loss == "clip"


def test_siglip_training_lowers_the_loss_and_learns_the_bias_and_temperature(siglip_run):
    from clip_model.checkpoint import load_clip
    from clip_model.lightning_module import no_weight_decay
    from clip_model.model import create_model

    tmp, _, result = siglip_run
    logged = rows(tmp / "whole" / "metrics.jsonl")
    assert [r["step"] for r in logged] == list(range(1, STEPS + 1))
    # each step logs the values it computed with: the first, the paper's init
    assert logged[0]["train/logit_bias"] == -10.0
    assert logged[0]["train/temperature"] == pytest.approx(0.1, rel=1e-6)
    losses = [r["train/loss"] for r in logged]
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    assert logged[-1]["train/logit_bias"] > -10.0  # all pairs start as negatives: b rises
    assert logged[-1]["train/temperature"] != logged[0]["train/temperature"]
    assert result["metrics"]["train/logit_bias"] == logged[-1]["train/logit_bias"]

    checkpoint = torch.load(result["checkpoint"], weights_only=False)
    assert checkpoint["hyper_parameters"]["loss"] == "siglip"
    state = checkpoint["state_dict"]
    assert state["loss_fn.logit_bias"].item() > logged[-1]["train/logit_bias"] - 1e-3
    assert state["model.logit_scale"].item() != math.log(10)
    # the bias is in the optimizer's group without weight decay, with the temperature
    groups = checkpoint["optimizer_states"][0]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.0, 0.2]
    config = checkpoint["hyper_parameters"]["model"]
    names = [f"model.{n}" for n, p in create_model(config).named_parameters()]
    params = dict(create_model(config).named_parameters())
    plain = [n for n in names if no_weight_decay(n, params[n.removeprefix("model.")])]
    assert len(groups[0]["params"]) == len(plain) + 1  # ... and the bias, last
    # embedding and evaluation read the model alone: the bias is the loss's, not the model's
    loaded = load_clip(result["checkpoint"])
    assert not hasattr(loaded.model, "logit_bias")
    torch.testing.assert_close(loaded.model.logit_scale, state["model.logit_scale"])


def test_a_resumed_siglip_run_continues_with_the_checkpoints_bias(siglip_run):
    tmp, config, result = siglip_run
    midway = tmp / "whole" / "checkpoints" / f"step-{HALF:08d}.ckpt"
    resumed = train(load_config(config, [f"out_dir={tmp / 'resumed'}", f"resume={midway}"]))
    assert resumed["resumed_from"] == str(midway) and resumed["global_step"] == STEPS
    whole = {r["step"]: r for r in rows(tmp / "whole" / "metrics.jsonl")}
    again = rows(tmp / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in again] == list(range(HALF + 1, STEPS + 1))
    assert again[0]["train/logit_bias"] != -10.0  # the learnt bias, not a fresh one
    for row in again:
        for key in ("train/loss", "train/logit_bias", "train/temperature"):
            assert row[key] == pytest.approx(whole[row["step"]][key], abs=1e-6), (key, row)
    end = torch.load(resumed["checkpoint"], weights_only=False)["state_dict"]
    expected = torch.load(result["checkpoint"], weights_only=False)["state_dict"]
    for key in ("loss_fn.logit_bias", "model.logit_scale"):
        torch.testing.assert_close(end[key], expected[key], atol=1e-6, rtol=0)


def test_resuming_with_the_other_loss_is_refused_naming_both(siglip_run):
    tmp, config, _ = siglip_run
    midway = tmp / "whole" / "checkpoints" / f"step-{HALF:08d}.ckpt"
    cfg = load_config(config, [f"out_dir={tmp / 'as-clip'}", f"resume={midway}", "loss=clip"])
    with pytest.raises(ValueError, match=r"trained with loss=siglip.*this run has loss=clip"):
        train(cfg)
