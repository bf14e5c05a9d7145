"""Where training runs: several ranks on the CPU only when `accelerator: cpu` asks for them."""

from __future__ import annotations

import time

import pytest
import torch

from clip_model.train import ConfigError, check_hardware, load_config, main

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="the refusal is about a machine without a GPU"
)


def config(tmp_path, *overrides: str):
    return load_config(
        None, [f"data={tmp_path}", "max_steps=2", f"out_dir={tmp_path / 'run'}", *overrides]
    )


def test_several_devices_that_resolve_to_the_cpu_are_refused_unless_asked_for(tmp_path):
    with pytest.raises(ConfigError, match=r"devices=2 .*accelerator=auto resolves to the CPU"):
        check_hardware(config(tmp_path, "devices=2", "strategy=ddp"))
    with pytest.raises(ConfigError, match="Set accelerator=cpu"):
        check_hardware(config(tmp_path, "num_nodes=2"))
    check_hardware(config(tmp_path, "devices=2", "accelerator=cpu"))  # asked for: allowed
    check_hardware(config(tmp_path))  # one process: nothing to refuse


def test_the_trainer_command_refuses_before_starting_anything(tmp_path, capsys):
    assert main([f"data={tmp_path}", "max_steps=2", f"out_dir={tmp_path}/run", "devices=2"]) == 2
    assert "accelerator=cpu" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_train_flow_refuses_before_launching(tmp_path, prefect_harness, mlflow_tmp):
    from flows.train import train as train_flow

    started = time.monotonic()
    with pytest.raises(ConfigError, match="resolves to the CPU"):
        train_flow(data=str(tmp_path), max_steps=2, devices=2, out_dir=str(tmp_path / "run"))
    assert time.monotonic() - started < 60  # no torchrun, no trainer: refused up front
    assert not (tmp_path / "run").exists()
