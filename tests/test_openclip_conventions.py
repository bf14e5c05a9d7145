"""OpenCLIP's conventions: model names, hub layout, safetensors, one precision vocabulary.

The fixtures hold one set of random weights and what OpenCLIP 3.3.0 computes from them with
QuickGELU (`expected.pt`) and with GELU (`expected_gelu.pt`): the tensors are identical, only
the model name (or config) tells which activation the weights were trained with.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from clip_model import CheckpointError, ModelConfig, create_model, from_state_dict
from clip_model.checkpoint import ModelUnknown, load_clip
from clip_model.embedder import Embedder
from clip_model.precision import PRECISIONS, parse_precision

FIXTURES = Path(__file__).parent / "fixtures" / "openclip"
FAMILIES = ["RN50", "RN101", "ViT-B-16", "ViT-B-32", "ViT-L-14", "ViT-L-14-336"]


def openclip_fixture(name: str, activation: str):
    """(OpenCLIP config dict with that activation, inputs, what OpenCLIP computes)."""
    base = FIXTURES / name
    config = json.loads((base / "config.json").read_text())
    config["quick_gelu"] = activation == "quick_gelu"
    expected = "expected.pt" if activation == "quick_gelu" else "expected_gelu.pt"
    return config, torch.load(base / "inputs.pt"), torch.load(base / expected)


def features(model, inputs) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        images, texts, scale = model(inputs["images"], inputs["text"])
        return {
            "image_features": model.encode_image(inputs["images"]),
            "text_features": model.encode_text(inputs["text"]),
            "logits_per_image": scale * images @ texts.T,
        }


def assert_matches(got: dict, expected: dict) -> None:
    for key in ("image_features", "text_features", "logits_per_image"):
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=0, msg=key)


def differs(got: dict, expected: dict) -> bool:
    return (got["text_features"] - expected["text_features"]).abs().max() > 1e-3


# ---- names ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_preset_names_are_openclips_plain_is_gelu_quickgelu_is_openais(family):
    assert ModelConfig.load(family).activation == "gelu"
    quick = ModelConfig.load(f"{family}-quickgelu")
    assert quick.activation == "quick_gelu"
    assert quick.same_architecture(ModelConfig.load(family).model_copy(update=dict(quick)))


def test_preset_sizes_are_the_published_ones():
    millions = {"RN50": 102.0, "RN101": 119.7, "ViT-B-32": 151.3, "ViT-B-16": 149.6}
    millions |= {"ViT-L-14": 427.6, "ViT-L-14-336": 427.9}
    for name, expected in millions.items():
        for variant in (name, f"{name}-quickgelu"):
            with torch.device("meta"):  # shapes only, no memory
                model = create_model(variant)
            assert model.config.name == variant
            params = sum(p.numel() for p in model.parameters()) / 1e6
            assert params == pytest.approx(expected, abs=0.05), variant


@pytest.mark.parametrize(
    ("old", "plain"),
    [("ViT-B/32", "ViT-B-32"), ("ViT-L/14", "ViT-L-14"), ("ViT-L/14@336px", "ViT-L-14-336")],
)
def test_openais_slash_names_are_refused_pointing_at_both_openclip_names(old, plain):
    with pytest.raises(ValueError) as error:
        ModelConfig.load(old)
    message = str(error.value)
    assert f"{plain}-quickgelu (QuickGELU)" in message and f"{plain} is the same" in message
    ModelConfig.load(plain), ModelConfig.load(f"{plain}-quickgelu")  # both names exist


# ---- GELU vs QuickGELU weights --------------------------------------------------------------


@pytest.mark.parametrize("name", ["vit_tiny", "rn_tiny"])
@pytest.mark.parametrize("activation", ["gelu", "quick_gelu"])
def test_weights_are_scored_with_the_activation_their_model_name_says(name, activation, tmp_path):
    config, inputs, expected = openclip_fixture(name, activation)
    wrong = "gelu" if activation == "quick_gelu" else "quick_gelu"
    right_file, wrong_file = tmp_path / "right.json", tmp_path / "wrong.json"
    right_file.write_text(json.dumps(config))
    wrong_file.write_text(json.dumps({**config, "quick_gelu": wrong == "quick_gelu"}))
    weights = FIXTURES / name / "state_dict.pt"  # a bare OpenCLIP state dict (fp16)

    assert_matches(features(from_state_dict(weights, config=str(right_file)), inputs), expected)
    assert differs(features(from_state_dict(weights, config=str(wrong_file)), inputs), expected)


def test_bare_state_dict_is_refused_asking_for_the_model_not_guessed():
    """Before: inferred as QuickGELU with 64-wide heads, silently, whatever the weights were."""
    with pytest.raises(ModelUnknown) as error:
        from_state_dict(FIXTURES / "vit_tiny" / "state_dict.pt")
    message = str(error.value)
    assert "state_dict.pt does not say which CLIP it holds" in message
    assert "GELU or QuickGELU" in message and "head width" in message
    assert "--model NAME or --model config.yaml" in message and "open_clip_config.json" in message


def test_bare_state_dict_of_a_preset_size_names_the_presets_that_fit():
    with torch.device("meta"):
        shapes = create_model("ViT-B-32").state_dict()
    state_dict = {k: torch.empty(v.shape) for k, v in shapes.items()}  # CPU, uninitialised
    with pytest.raises(ModelUnknown, match="match the presets ViT-B-32, ViT-B-32-quickgelu"):
        from_state_dict(state_dict)
    assert (
        from_state_dict(state_dict, config="ViT-B-32-quickgelu").config.activation == "quick_gelu"
    )


def test_load_clip_takes_the_model_and_the_evaluate_task_passes_it(tmp_path):
    from tasks.evaluate import load_model

    config, inputs, expected = openclip_fixture("vit_tiny", "gelu")
    path = tmp_path / "gelu.json"
    path.write_text(json.dumps(config))
    weights = str(FIXTURES / "vit_tiny" / "state_dict.pt")
    with pytest.raises(ModelUnknown, match="--model"):
        load_model.fn(weights)
    clip = load_model.fn(weights, model=str(path))
    assert clip.model.config.activation == "gelu" and clip.tokenizer.name == "openai"
    assert_matches(features(clip.model, inputs), expected)
    as_yaml = tmp_path / "same.yaml"  # the same architecture, spelled as our YAML preset
    as_yaml.write_text(yaml.safe_dump(ModelConfig.load(str(path)).model_dump(mode="json")))
    assert load_clip(weights, model=str(as_yaml)).model_id == clip.model_id
    config["quick_gelu"] = True
    path.write_text(json.dumps(config))
    assert load_clip(weights, model=str(path)).model_id != clip.model_id  # the activation counts


# ---- OpenCLIP's hub layout and safetensors --------------------------------------------------


def hub_folder(tmp_path: Path, name: str, activation: str, weights: str) -> Path:
    config, _, _ = openclip_fixture(name, activation)
    folder = tmp_path / f"hf-{name}-{activation}"
    folder.mkdir()
    hub = {"model_cfg": config, "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073]}}
    (folder / "open_clip_config.json").write_text(json.dumps(hub))
    state_dict = torch.load(FIXTURES / name / "state_dict.pt")
    if weights.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(folder / weights))
    else:
        torch.save(state_dict, folder / weights)
    return folder


@pytest.mark.parametrize("activation", ["gelu", "quick_gelu"])
@pytest.mark.parametrize("weights", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
def test_openclip_hub_folder_says_its_own_architecture(tmp_path, activation, weights):
    folder = hub_folder(tmp_path, "vit_tiny", activation, weights)
    _, inputs, expected = openclip_fixture("vit_tiny", activation)
    for source in (folder, folder / weights):  # the folder, or the weights beside the config
        clip = load_clip(source)
        assert clip.model.config.activation == activation
        assert clip.model.config.name == folder.name
        assert_matches(features(clip.model, inputs), expected)


def test_a_model_that_contradicts_open_clip_config_json_is_refused(tmp_path):
    folder = hub_folder(tmp_path, "vit_tiny", "gelu", "open_clip_model.safetensors")
    config, _, _ = openclip_fixture("vit_tiny", "quick_gelu")
    (tmp_path / "quick.json").write_text(json.dumps(config))
    with pytest.raises(ModelUnknown) as error:
        load_clip(folder, model=str(tmp_path / "quick.json"))
    message = str(error.value)
    assert "open_clip_config.json describes" in message and "(GELU" in message
    assert "(QuickGELU" in message


def test_a_folder_that_is_not_the_hub_layout_names_what_it_expected(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(CheckpointError, match="open_clip_model.safetensors or open_clip_pytorch"):
        load_clip(tmp_path)


def test_safetensors_weights_load_and_a_corrupt_file_is_named(tmp_path):
    config, inputs, expected = openclip_fixture("rn_tiny", "gelu")
    state_dict = torch.load(FIXTURES / "rn_tiny" / "state_dict.pt")
    path = tmp_path / "rn.safetensors"
    save_file(state_dict, str(path))
    assert_matches(features(from_state_dict(path, config=config), inputs), expected)
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: not a readable safetensors"):
        from_state_dict(tmp_path / "bad.safetensors", config=config)


def test_our_own_checkpoint_needs_no_model_and_refuses_a_contradicting_one(tmp_path):
    model = create_model("tiny")
    path = tmp_path / "export.pt"
    torch.save({"state_dict": model.state_dict(), "model_config": model.config.model_dump()}, path)
    assert from_state_dict(path).config.same_architecture(model.config)
    assert from_state_dict(path, config="tiny").config.same_architecture(model.config)
    with pytest.raises(ModelUnknown, match="its model_config describes 'tiny'"):
        from_state_dict(path, config="ViT-B-32")


# ---- one precision vocabulary ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("spelling", "name", "lightning"),
    [
        ("fp32", "fp32", "32-true"),
        (32, "fp32", "32-true"),
        ("32-true", "fp32", "32-true"),
        ("bf16", "bf16", "bf16-mixed"),
        ("bf16-mixed", "bf16", "bf16-mixed"),
        ("amp_bf16", "bf16", "bf16-mixed"),
        ("amp_bfloat16", "bf16", "bf16-mixed"),
        ("amp", "fp16", "16-mixed"),
        ("fp16", "fp16", "16-mixed"),
        ("16-mixed", "fp16", "16-mixed"),
        ("pure_bf16", "pure_bf16", "bf16-true"),
        ("bf16-true", "pure_bf16", "bf16-true"),
        ("pure_fp16", "pure_fp16", "16-true"),
    ],
)
def test_every_spelling_names_one_behaviour(spelling, name, lightning):
    precision = parse_precision(spelling)
    assert (precision.name, precision.lightning) == (name, lightning)


def test_an_unknown_precision_lists_every_accepted_spelling():
    with pytest.raises(ValueError) as error:
        parse_precision("fp64")
    message = str(error.value)
    assert "'fp64'" in message and all(spelling in message for spelling in PRECISIONS)


def test_the_configs_of_every_stage_take_the_same_vocabulary(tmp_path):
    from clip_model.train_config import EvalConfig, TrainConfig
    from tasks.curation.spec import ClipScore
    from tasks.pipeline import EvaluateSection

    assert ClipScore(name="clip_score", precision="amp_bf16").precision == "bf16"
    assert EvaluateSection(suite="s.yaml", precision="amp").precision == "fp16"
    assert EvalConfig(suite="s.yaml", precision="bf16-mixed").precision == "bf16"
    train = TrainConfig(data="d", max_steps=1, precision="amp_bf16")
    assert parse_precision(train.precision).lightning == "bf16-mixed"
    for make in (
        lambda: ClipScore(name="clip_score", precision="fp64"),
        lambda: EvaluateSection(suite="s.yaml", precision="fp64"),
        lambda: TrainConfig(data="d", max_steps=1, precision="fp64"),
    ):
        with pytest.raises(ValueError, match="precision 'fp64' is not one of: fp32 = 32"):
            make()
    with pytest.raises(ValueError, match="fp16 mixed.*needs a GPU"):
        TrainConfig(data="d", max_steps=1, precision="amp", accelerator="cpu")


@pytest.mark.parametrize("spelling", ["bf16", "fp16", "pure_bf16", "pure_fp16"])
def test_low_precision_evaluation_runs_on_the_cpu_close_to_fp32(spelling):
    """fp16 (mixed, or pure weights) is what GPUs without bfloat16 evaluate in."""
    config, inputs, _ = openclip_fixture("vit_tiny", "gelu")
    weights = FIXTURES / "vit_tiny" / "state_dict.pt"
    model = from_state_dict(weights, config=config)
    texts = ["a photo of a cat", "a diagram", "two red squares"]
    kwargs = dict(device=None, batch_size=2)  # the caller's model, where and as it is
    reference = Embedder(model, _tokenizer(), **kwargs).texts(texts)
    precision = parse_precision(spelling)
    if precision.weights != torch.float32:  # an fp32 model would silently compute in fp32
        with pytest.raises(ValueError, match="call parse_precision"):
            Embedder(model, _tokenizer(), precision=spelling, **kwargs)
    low = precision.prepare(from_state_dict(weights, config=config))
    got = Embedder(low, _tokenizer(), precision=spelling, **kwargs).texts(texts)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, reference, atol=3e-2, rtol=0)
    with torch.no_grad(), precision.autocast("cpu"):
        image_features = low.encode_image(inputs["images"])
    assert image_features.dtype == precision.autocast_dtype or precision.weights
    with torch.no_grad():
        fp32_features = model.encode_image(inputs["images"])
    torch.testing.assert_close(image_features.float(), fp32_features, atol=3e-2, rtol=0)


def _tokenizer():
    from clip_model import get_tokenizer

    return get_tokenizer("openai")


def test_a_hub_config_whose_preprocessing_evaluation_does_not_do_is_refused(tmp_path):
    folder = hub_folder(tmp_path, "vit_tiny", "gelu", "open_clip_model.safetensors")
    hub = json.loads((folder / "open_clip_config.json").read_text())
    hub["preprocess_cfg"] = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}  # SigLIP's
    (folder / "open_clip_config.json").write_text(json.dumps(hub))
    with pytest.raises(CheckpointError, match=r"preprocess_cfg\.mean=\[0\.5, 0\.5, 0\.5\]"):
        load_clip(folder)


@pytest.mark.parametrize("flow", ["evaluate", "index", "search"])
def test_model_and_precision_flags_parse_into_the_stage_parameters(flow):
    import importlib
    import inspect

    from flows.cli import parse_fields

    module = importlib.import_module(f"flows.{flow}")
    argv = {
        "evaluate": ["--checkpoint", "m.pt", "--suite", "s.yaml", "--precision", "amp_bf16"],
        "index": ["--checkpoint", "m.pt", "--data", "d", "--output", "o", "--precision", "amp"],
        "search": ["--index", "i", "--text", "a cat"],
    }[flow]
    args = parse_fields(flow, [*argv, "--model", "ViT-B-32-quickgelu"]).model_dump()
    assert args["model"] == "ViT-B-32-quickgelu"
    if flow == "search":
        assert "model" in inspect.signature(module.SearchIndex.open).parameters
    else:
        inspect.signature(getattr(module, flow).fn).bind(**args)
        with pytest.raises(SystemExit):
            parse_fields(flow, [*argv[:-1], "fp64"])  # refused, naming the accepted spellings


def test_training_time_evaluation_refuses_a_precision_that_casts_the_weights():
    from clip_model.eval_callback import ZeroShotEvalCallback

    with pytest.raises(ValueError, match="cannot cast the model's weights"):
        ZeroShotEvalCallback("no-suite.yaml", every_n_steps=1, precision="pure_bf16")
