"""The CLIP model: parity with OpenCLIP 3.3.0 on the fixtures, checkpoints, configs, bad input."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clip_model import (
    CheckpointError,
    ModelConfig,
    create_model,
    from_state_dict,
    infer_config,
    to_state_dict,
)
from clip_model.model import attention

FIXTURES = Path(__file__).parent / "fixtures" / "openclip"
SMALL = dict(  # a ViT small enough to run many times in a test
    name="small",
    embed_dim=32,
    image_size=32,
    vision_layers=2,
    vision_width=64,
    vision_patch_size=8,
    vision_head_width=32,
    context_length=16,
    vocab_size=300,
    text_width=64,
    text_heads=2,
    text_layers=2,
    tokenizer="bpe",
)


def fixture(name: str):
    base = FIXTURES / name
    config = ModelConfig.load(json.loads((base / "config.json").read_text()))
    return base, config, torch.load(base / "inputs.pt"), torch.load(base / "expected.pt")


def random_text(config: ModelConfig, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, config.vocab_size - 2, (n, config.context_length), generator=g)
    lengths = torch.randint(2, config.context_length, (n,), generator=g)
    text[torch.arange(n), lengths] = config.vocab_size - 1  # [EOS]: the highest id
    text[torch.arange(config.context_length) > lengths[:, None]] = 0
    return text


# ---- parity with OpenCLIP -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vit_tiny", "rn_tiny"])
def test_fixture_checkpoint_reproduces_openclip_features_and_logits(name):
    base, config, inputs, expected = fixture(name)
    model = from_state_dict(base / "state_dict.pt", config=config)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp16 file, fp32 model
    with torch.no_grad():
        image_features = model.encode_image(inputs["images"])
        text_features = model.encode_text(inputs["text"])
        images, texts, scale = model(inputs["images"], inputs["text"])
    torch.testing.assert_close(image_features, expected["image_features"], atol=1e-5, rtol=0)
    torch.testing.assert_close(text_features, expected["text_features"], atol=1e-5, rtol=0)
    torch.testing.assert_close(
        scale * images @ texts.T, expected["logits_per_image"], atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("name", ["vit_tiny", "rn_tiny"])
def test_architecture_is_inferred_from_tensor_shapes(name):
    base, config, _, _ = fixture(name)
    inferred = infer_config(torch.load(base / "state_dict.pt"))
    for field in ("embed_dim", "image_size", "vision_layers", "vision_width", "vision_patch_size"):
        assert getattr(inferred, field) == getattr(config, field), field
    for field in ("context_length", "vocab_size", "text_width", "text_layers", "mlp_ratio"):
        assert getattr(inferred, field) == getattr(config, field), field
    assert inferred.activation == "quick_gelu"  # OpenAI's convention, unless told otherwise


def test_openclip_training_checkpoint_with_ddp_and_compile_prefixes_loads(tmp_path):
    base, config, inputs, expected = fixture("vit_tiny")
    state_dict = torch.load(base / "state_dict.pt")
    wrapped = {
        "epoch": 3,
        "name": "run",
        "state_dict": {
            ("module._orig_mod." if i % 2 else "module.") + k: v
            for i, (k, v) in enumerate(state_dict.items())
        },
    }
    torch.save(wrapped, tmp_path / "epoch_3.pt")
    model = from_state_dict(tmp_path / "epoch_3.pt", config=config)
    with torch.no_grad():
        features = model.encode_text(inputs["text"])
    torch.testing.assert_close(features, expected["text_features"], atol=1e-5, rtol=0)


def test_to_state_dict_round_trips_through_compile_and_our_checkpoint_file(tmp_path):
    torch.manual_seed(0)
    model = create_model(SMALL).eval()
    state_dict = to_state_dict(torch.compile(model, backend="eager"))  # wrapper, not compiled
    assert set(state_dict) == set(model.state_dict())
    assert "text_projection" in state_dict and "visual.class_embedding" in state_dict
    # our file format carries the config, so heads and activation need not be guessed
    path = tmp_path / "model.pt"
    torch.save({"state_dict": state_dict, "model_config": model.config.model_dump()}, path)
    loaded = from_state_dict(path)
    assert loaded.config == model.config
    images, text = torch.randn(2, 3, 32, 32), random_text(model.config, 2)
    with torch.no_grad():
        for a, b in zip(model(images, text), loaded(images, text), strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


# ---- bad checkpoints and configs ------------------------------------------------------------


def test_state_dict_without_clip_keys_names_what_is_missing():
    with pytest.raises(CheckpointError, match=r"missing visual\.conv1\.weight"):
        from_state_dict({"fc.weight": torch.zeros(2, 2)})


def test_state_dict_that_fits_no_architecture_names_missing_and_mismatched_keys():
    base, config, _, _ = fixture("vit_tiny")
    state_dict = torch.load(base / "state_dict.pt")
    del state_dict["visual.ln_post.bias"]
    state_dict["text_projection"] = torch.zeros(32, 16)
    state_dict["logit_bias"] = torch.zeros(())  # a SigLIP key
    with pytest.raises(CheckpointError) as error:
        from_state_dict(state_dict, config=config)
    message = str(error.value)
    assert "missing keys: visual.ln_post.bias" in message
    assert "unexpected keys: logit_bias" in message
    assert "text_projection: checkpoint [32, 16] vs model [32, 32]" in message


def test_checkpoint_for_another_architecture_names_mismatched_shapes():
    base, _, _, _ = fixture("rn_tiny")
    with pytest.raises(CheckpointError, match="visual"):
        from_state_dict(base / "state_dict.pt", config=fixture("vit_tiny")[1])


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"vision_width": 100}, "vision_width=100 is not divisible by vision_head_width=32"),
        ({"text_heads": 3}, "text_width=64 is not divisible by text_heads=3"),
        ({"image_size": 30}, "image_size=30 is not divisible by vision_patch_size=8"),
        ({"vision_layers": [1, 1, 1, 1]}, "vision_layers=[1, 1, 1, 1]: a ViT"),
        ({"vision_patch_size": None}, "a ResNet (vision_patch_size: null)"),
        ({"tokenizer": "openai"}, "vocab_size=300 but tokenizer='openai'"),
        ({"embed_dim": 0}, "embed_dim"),
        ({"heads": 4}, "heads"),  # unknown field: extra="forbid"
    ],
)
def test_inconsistent_config_is_rejected_naming_the_field(change, field):
    with pytest.raises(ValueError) as error:
        ModelConfig(**{**SMALL, **change})
    assert field in str(error.value)


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(
        ValueError, match="unknown model 'ViT-Q-7'.*available: RN101, RN101-quickgelu"
    ):
        create_model("ViT-Q-7")


def test_tiny_preset_is_a_small_bpe_vit():
    config = ModelConfig.load("tiny")
    assert (config.image_size, config.tokenizer, config.is_vit) == (64, "bpe", True)
    assert 4096 <= config.vocab_size <= 8192


# ---- the model's behaviour ------------------------------------------------------------------


def test_temperature_starts_at_007_and_the_scale_never_exceeds_100():
    torch.manual_seed(0)
    model = create_model(SMALL)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    images, text = torch.randn(2, 3, 32, 32), random_text(model.config, 2)
    with torch.no_grad():
        _, _, scale = model(images, text)
        assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
        model.logit_scale.fill_(10.0)
        image_features, text_features, scale = model(images, text)
    assert scale.item() == pytest.approx(100.0)
    torch.testing.assert_close(image_features.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(text_features.norm(dim=-1), torch.ones(2))


def test_text_feature_is_read_at_eos_and_sees_only_earlier_tokens():
    torch.manual_seed(0)
    model = create_model(SMALL).eval()
    text = random_text(model.config, 3)
    eos = text.argmax(dim=-1)
    after, before = text.clone(), text.clone()
    for i in range(3):
        after[i, eos[i] + 1 :] = 7  # whatever follows [EOS] is invisible to it (causal mask)
        before[i, 1] = (before[i, 1] + 1) % (model.config.vocab_size - 2)
    with torch.no_grad():
        reference = model.encode_text(text)
        torch.testing.assert_close(model.encode_text(after), reference, atol=1e-6, rtol=0)
        assert (model.encode_text(before) - reference).abs().amax(dim=-1).min() > 1e-4


@pytest.mark.parametrize(
    "config",
    [
        SMALL,
        {
            **SMALL,
            "vision_patch_size": None,
            "vision_layers": [1, 1, 1, 1],
            "vision_width": 16,
            "vision_head_width": 8,
        },
    ],
)
def test_gradient_checkpointing_gives_the_same_gradients(config):
    torch.manual_seed(0)
    model = create_model(config)
    checkpointed = copy.deepcopy(model)
    checkpointed.set_grad_checkpointing(True)
    images, text = torch.randn(4, 3, 32, 32), random_text(model.config, 4)
    for m in (model, checkpointed):
        image_features, text_features, scale = m(images, text)
        (scale * image_features @ text_features.T).logsumexp(dim=1).sum().backward()
    for (name, a), b in zip(model.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_bf16_autocast_on_cpu_runs_forward_and_backward_close_to_fp32():
    torch.manual_seed(0)
    model = create_model(SMALL)
    images, text = torch.randn(4, 3, 32, 32), random_text(model.config, 4)
    with torch.no_grad():
        reference = model(images, text)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        image_features, text_features, scale = model(images, text)
    (image_features.float() * text_features.float()).sum().backward()
    assert model.visual.conv1.weight.grad is not None
    assert model.visual.conv1.weight.grad.dtype == torch.float32  # fp32 master weights
    torch.testing.assert_close(image_features.float(), reference[0], atol=3e-2, rtol=0)
    torch.testing.assert_close(text_features.float(), reference[1], atol=3e-2, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_cpu_bf16_training_attention_path_matches_sdpa(causal):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 16, generator=g) for _ in range(3))
    reference = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    q16, k16, v16 = (t.bfloat16().requires_grad_() for t in (q, k, v))
    out = attention(q16, k16, v16, causal)  # the explicit-matmul path (CPU, bf16, grad)
    torch.testing.assert_close(out.float(), reference, atol=2e-2, rtol=0)
    out.float().sum().backward()
    assert q16.grad is not None and torch.isfinite(q16.grad).all()


def test_bad_inputs_to_the_encoders_raise_clear_errors():
    model = create_model(SMALL)
    with pytest.raises(ValueError, match=r"expected shape \[N, 3, 32, 32\].*got \[2, 1, 32, 32\]"):
        model.encode_image(torch.zeros(2, 1, 32, 32))
    with pytest.raises(TypeError, match="float tensor"):
        model.encode_image(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"must lie in \[0, 300\), got 320..49407"):
        model.encode_text(torch.tensor([[49406, 320, 49407]]))
    with pytest.raises(ValueError, match=r"\[N, <= 16\]"):
        model.encode_text(torch.zeros(1, 77, dtype=torch.long))
