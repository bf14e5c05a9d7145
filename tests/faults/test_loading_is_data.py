"""Loading a checkpoint reads data and never runs code (issue 11, class 3).

A TorchScript archive (OpenAI's released .pt files are TorchScript) carries code that runs when
it is loaded: here a `__setstate__` that prints a marker. It is refused unless the caller opts
in (`allow_torchscript=True`, `--allow-torchscript` on the CLIs), and the refusal names the flag.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch

from clip_model import CheckpointError, ModelConfig, from_state_dict
from clip_model.checkpoint import load_clip, read_checkpoint

FIXTURES = Path(__file__).parent.parent / "fixtures" / "openclip"
MARKER = "SIDE EFFECT: __setstate__ ran"


class _SideEffect(torch.nn.Module):
    """A module whose unpickling runs code of the file's choosing (here: a print)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, bool]:
        return (self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, bool]) -> None:
        print("SIDE EFFECT: __setstate__ ran")
        self.weight = state[0]
        self.training = state[1]


@pytest.fixture
def side_effect_archive(tmp_path) -> Path:
    path = tmp_path / "ViT-B-32.pt"  # named like OpenAI's releases
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated
        torch.jit.save(torch.jit.script(_SideEffect()), str(path))
    return path


def test_torchscript_archive_is_refused_without_running_its_code(side_effect_archive, capfd):
    for load in (read_checkpoint, from_state_dict, load_clip):
        with pytest.raises(CheckpointError) as error:
            load(side_effect_archive)
        message = str(error.value)
        assert str(side_effect_archive) in message and "TorchScript" in message, message
        assert "--allow-torchscript" in message and "allow_torchscript=True" in message, message
    out, err = capfd.readouterr()
    assert MARKER not in out + err  # nothing of the file ran


def test_torchscript_archive_loads_with_the_opt_in(side_effect_archive, capfd):
    # the same file, opted in: its code runs (so the test above can see it when it does)
    state = read_checkpoint(side_effect_archive, allow_torchscript=True)
    assert torch.equal(state["weight"], torch.ones(2))
    assert MARKER in "".join(capfd.readouterr())


def test_openai_style_torchscript_clip_loads_with_the_opt_in(tmp_path):
    base = FIXTURES / "vit_tiny"
    config = ModelConfig.load(json.loads((base / "config.json").read_text()))
    inputs, expected = torch.load(base / "inputs.pt"), torch.load(base / "expected.pt")
    model = from_state_dict(base / "state_dict.pt", config=config)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated; tracer warnings
        half = copy.deepcopy(model).half()
        traced = torch.jit.trace(half, (inputs["images"].half(), inputs["text"]), check_trace=False)
        torch.jit.save(traced, tmp_path / "ViT-tiny.pt")
    with pytest.raises(CheckpointError, match="--allow-torchscript"):
        from_state_dict(tmp_path / "ViT-tiny.pt", config=config)
    loaded = from_state_dict(tmp_path / "ViT-tiny.pt", config=config, allow_torchscript=True)
    with torch.no_grad():
        features = loaded.encode_image(inputs["images"])
    torch.testing.assert_close(features, expected["image_features"], atol=1e-5, rtol=0)


def test_pickled_code_in_a_plain_checkpoint_is_refused(tmp_path):
    """A non-TorchScript file goes through torch.load(weights_only=True): a pickled callable
    (the classic `__reduce__` payload) is refused, and names the file."""

    class Payload:
        def __reduce__(self):
            return (print, (MARKER,))

    path = tmp_path / "epoch_1.pt"
    torch.save({"state_dict": {}, "payload": Payload()}, path)
    with pytest.raises(CheckpointError, match=r"epoch_1\.pt.*weights-only"):
        read_checkpoint(path)


@pytest.mark.parametrize("flow", ["evaluate", "index", "search"])
def test_every_loading_cli_offers_the_opt_in_as_a_flow_parameter(flow, tmp_path):
    """`--allow-torchscript` parses into a parameter the stage takes (not a CLI-only switch)."""
    import importlib
    import inspect

    from flows.cli import parse_fields

    module = importlib.import_module(f"flows.{flow}")
    argv = {
        "evaluate": ["--checkpoint", "m.pt", "--suite", "s.yaml"],
        "index": ["--checkpoint", "m.pt", "--data", "d", "--output", "o"],
        "search": ["--index", "i", "--text", "a cat"],
    }[flow]
    args = parse_fields(flow, [*argv, "--allow-torchscript"]).model_dump()
    assert args["allow_torchscript"] is True
    assert parse_fields(flow, argv).allow_torchscript is False
    if flow == "search":
        assert "allow_torchscript" in inspect.signature(module.SearchIndex.open).parameters
    else:
        inspect.signature(getattr(module, flow).fn).bind(**args)


def test_evaluate_task_refuses_torchscript_naming_the_flag_and_loads_it_opted_in(tmp_path):
    from tasks.evaluate import load_model

    base = FIXTURES / "vit_tiny"
    config = ModelConfig.load(json.loads((base / "config.json").read_text()))
    inputs = torch.load(base / "inputs.pt")
    model = from_state_dict(base / "state_dict.pt", config=config)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (inputs["images"], inputs["text"]), check_trace=False)
        torch.jit.save(traced, tmp_path / "ViT-tiny.pt")
    with pytest.raises(CheckpointError, match="TorchScript archive.*--allow-torchscript"):
        load_model.fn(str(tmp_path / "ViT-tiny.pt"))
    clip = load_model.fn(str(tmp_path / "ViT-tiny.pt"), allow_torchscript=True)
    assert clip.model.config.embed_dim == config.embed_dim
