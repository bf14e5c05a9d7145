"""The one embedder (clip_model.embedder): every stage that embeds gets the same vectors for the
same image or text, one device and precision policy, and a progress bar only on a terminal.

The model: a small random CLIP with OpenAI's tokenizer (random weights change nothing checked
here: the paths must agree with each other, whatever the vectors are).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from clip_model import ModelConfig, create_model, get_tokenizer, to_state_dict
from clip_model.embedder import Embedder, resolve_device

ROOT = Path(__file__).resolve().parent.parent
SMALL = {
    "image_size": 32,
    "embed_dim": 32,
    "vision_layers": 1,
    "vision_width": 64,
    "vision_head_width": 32,
    "text_width": 64,
    "text_heads": 2,
    "text_layers": 1,
    "context_length": 16,
    "vocab_size": 49408,
    "tokenizer": "openai",
}
CAPTIONS = ["a red square", "a blue circle", "a green triangle", "two yellow stars"]


def small_model(seed: int = 0):
    torch.manual_seed(seed)
    return create_model(ModelConfig.load("tiny").model_copy(update=SMALL))


def jpegs(n: int = 4) -> list[bytes]:
    rng = np.random.default_rng(3)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(buf, "JPEG")
        out.append(buf.getvalue())
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    model = small_model()
    path = tmp_path_factory.mktemp("model") / "model.pt"
    torch.save(
        {"state_dict": to_state_dict(model), "model_config": model.config.model_dump()}, path
    )
    return path


@pytest.fixture(scope="module")
def embedder(checkpoint) -> Embedder:
    from clip_model.checkpoint import load_clip

    return Embedder.of(load_clip(checkpoint), device="cpu", batch_size=3)


def test_files_bytes_and_pil_images_embed_alike_in_unit_vectors(embedder, tmp_path):
    data = jpegs()
    paths = []
    for i, d in enumerate(data):
        paths.append(tmp_path / f"{i}.jpg")
        paths[-1].write_bytes(d)
    pil = [Image.open(io.BytesIO(d)) for d in data]
    from_bytes = embedder.images(data)
    assert from_bytes.shape == (4, 32) and from_bytes.dtype == torch.float32
    torch.testing.assert_close(from_bytes.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(embedder.images(paths), from_bytes, rtol=0, atol=0)
    torch.testing.assert_close(embedder.images(pil), from_bytes, rtol=0, atol=0)
    assert embedder.images([]).shape == (0, 32) and embedder.texts([]).shape == (0, 32)


def test_pairs_are_the_cosines_of_image_and_text_embeddings(embedder):
    pixels = torch.stack([embedder.transform(Image.open(io.BytesIO(d))) for d in jpegs()])
    expected = (embedder.images(jpegs()) * embedder.texts(CAPTIONS)).sum(-1).numpy()
    np.testing.assert_allclose(embedder.pairs(pixels, CAPTIONS), expected, atol=1e-6)
    with pytest.raises(ValueError, match="4 images but 3 captions"):
        embedder.pairs(pixels, CAPTIONS[:3])


def test_curation_search_and_pyfunc_embed_with_it(embedder, checkpoint, tmp_path):
    """Curation's CLIP score, a search query and the pyfunc model give the embedder's numbers."""
    from clip_model.pyfunc import ClipEmbedder
    from tasks.curation.images import ClipScorer
    from tasks.curation.spec import ClipScore

    images, texts = embedder.images(jpegs()), embedder.texts(CAPTIONS)
    spec = ClipScore(name="clip_score", checkpoint=str(checkpoint), device="cpu", precision="fp32")
    scorer = ClipScorer(spec)
    pixels = torch.stack([scorer.transform(Image.open(io.BytesIO(d))) for d in jpegs()])
    scores = scorer.score(pixels, CAPTIONS)
    np.testing.assert_allclose(scores, (images * texts).sum(-1).numpy(), atol=1e-6)
    pyfunc = ClipEmbedder()
    pyfunc.load_context(SimpleNamespace(artifacts={"weights": str(checkpoint)}))
    out = pyfunc.predict(None, pd.DataFrame({"image": jpegs(), "text": CAPTIONS}))
    np.testing.assert_allclose(np.array(out["image_embedding"].tolist()), images, atol=1e-6)
    np.testing.assert_allclose(np.array(out["text_embedding"].tolist()), texts, atol=1e-6)


def test_a_model_given_a_device_is_moved_and_cast_one_given_none_is_left_as_it_is():
    model = small_model()
    model.train()
    owned = Embedder(model, get_tokenizer("openai", 16), device="cpu", precision="pure_bf16")
    assert next(model.parameters()).dtype == torch.bfloat16  # cast in place: the embedder's now
    assert owned.texts(CAPTIONS).dtype == torch.float32
    assert model.training  # embedding gives the model back in the mode it was in
    trained = small_model()
    with pytest.raises(ValueError, match="call parse_precision"):
        Embedder(trained, device=None, precision="pure_fp16")  # would compute in fp32 silently
    kept = Embedder(trained, device=None, precision="bf16")
    assert kept.device == torch.device("cpu") and next(trained.parameters()).dtype == torch.float32


def test_device_auto_is_the_gpu_when_there_is_one_and_a_bad_device_is_named():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device 'gpu0' is not one torch knows"):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match="precision 'half' is not one of"):
        Embedder(small_model(), device="cpu", precision="half")


PROGRESS = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from clip_model.embedder import Embedder
from functools import partialmethod
import tqdm
from tests.test_embedder import jpegs, small_model
# tqdm redraws at most every 0.1 s: draw on every update so each batch is seen, however fast
tqdm.tqdm.__init__ = partialmethod(tqdm.tqdm.__init__, mininterval=0, miniters=1)
Embedder(small_model(), device="cpu", batch_size=2).images(jpegs(), desc="embed test images")
"""


def _stderr_of_embedding(on_terminal: bool) -> str:
    """Run an embedding in a child whose stderr is a pseudo-terminal, or a pipe."""
    env = {k: v for k, v in os.environ.items() if k != "CLIP_PIPELINE_PROGRESS"}  # no override
    if not on_terminal:
        done = subprocess.run(
            [sys.executable, "-c", PROGRESS], capture_output=True, text=True, timeout=300, env=env
        )
        assert done.returncode == 0, done.stderr
        return done.stderr
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
    proc = subprocess.Popen(
        [sys.executable, "-c", PROGRESS], stderr=follower, stdout=subprocess.DEVNULL, env=env
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed its end
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert proc.wait(timeout=300) == 0
    os.close(leader)
    return b"".join(chunks).decode(errors="replace")


def test_progress_is_a_bar_per_batch_on_a_terminal_and_silent_in_a_log():
    shown = _stderr_of_embedding(on_terminal=True)
    assert "embed test images" in shown and "4/4" in shown and "2/4" in shown
    assert "embed test images" not in _stderr_of_embedding(on_terminal=False)
