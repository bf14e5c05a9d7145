"""The trained model as an MLflow pyfunc: a DataFrame of images and/or texts in, embeddings out.

    model = mlflow.pyfunc.load_model("models:/clip/1")
    out = model.predict(pd.DataFrame({"image": [jpeg_bytes, None], "text": [None, "a red circle"]}))
    out["image_embedding"][0], out["text_embedding"][1]   # L2-normalised lists of floats

`image` holds encoded image bytes (JPEG, PNG, ...) or their base64 text (what JSON serving sends),
decoded by clip_model.images (an image it refuses is a ValueError naming its row, with the
`reason`); `text` holds strings. Either column may be absent; a missing value gives a None
embedding. The logged model carries this as its signature (both columns optional, the
embeddings arrays of floats) and an input example (one small PNG and one caption). The package's `clip_model` source travels with the model (`code_paths`), so loading
it needs neither this repository nor the training run, only torch, Pillow and OpenCV.
"""

from __future__ import annotations

import base64
import binascii
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch

__all__ = ["ClipEmbedder", "input_example", "log_pyfunc_model", "model_signature"]

_PACKAGE = Path(__file__).resolve().parent


def _image_bytes(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as error:
            raise ValueError(
                f"image: a string must be base64 of the image bytes ({error})"
            ) from None
    raise TypeError(f"image: expected bytes or base64 text, got {type(value).__name__}")


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)  # None or NaN


class ClipEmbedder(mlflow.pyfunc.PythonModel):
    """Embeds the `image` and `text` columns of a DataFrame with a clip_model CLIP."""

    batch_size = 64

    def load_context(self, context: Any) -> None:
        from clip_model.checkpoint import from_state_dict
        from clip_model.embedder import Embedder
        from clip_model.tokenizer import get_tokenizer

        model = from_state_dict(context.artifacts["weights"])  # fp32
        tokenizer = get_tokenizer(
            context.artifacts.get("tokenizer", "openai"), model.config.context_length
        )
        # a served model answers one request after another: no progress bars
        self.embedder = Embedder(model, tokenizer, device="auto", progress=False)

    def _embed(self, values: list, encode) -> list[list[float] | None]:
        rows = [i for i, v in enumerate(values) if not _missing(v)]
        result: list[list[float] | None] = [None] * len(values)
        for start in range(0, len(rows), self.batch_size):  # decoded a batch at a time
            chunk = rows[start : start + self.batch_size]
            features = encode(chunk, [values[i] for i in chunk])
            for i, row in zip(chunk, features.tolist(), strict=True):
                result[i] = row
        return result

    def _encode_images(self, rows: list[int], values: list) -> torch.Tensor:
        from clip_model.images import decode_image

        pictures = [
            decode_image(_image_bytes(v), f"image row {row}")
            for row, v in zip(rows, values, strict=True)
        ]
        return self.embedder.images(pictures)

    def _encode_texts(self, rows: list[int], values: list) -> torch.Tensor:
        return self.embedder.texts([str(v) for v in values])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None):
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        if "image" not in model_input and "text" not in model_input:
            raise ValueError(
                f"expected an 'image' and/or a 'text' column, got {list(model_input.columns)}"
            )
        out = pd.DataFrame(index=model_input.index)
        if "image" in model_input:
            out["image_embedding"] = self._embed(list(model_input["image"]), self._encode_images)
        if "text" in model_input:
            out["text_embedding"] = self._embed(list(model_input["text"]), self._encode_texts)
        return out


def model_signature():
    """The pyfunc's contract: optional `image` (bytes) and `text` columns in, optional
    `image_embedding` and `text_embedding` (arrays of floats) out."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Schema

    inputs = Schema(
        [
            ColSpec(DataType.binary, "image", required=False),
            ColSpec(DataType.string, "text", required=False),
        ]
    )
    outputs = Schema(
        [
            ColSpec(Array(DataType.float), "image_embedding", required=False),
            ColSpec(Array(DataType.float), "text_embedding", required=False),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs)


def input_example() -> pd.DataFrame:
    """One request as a client would send it: a 32x32 PNG (a red disc) and its caption."""
    import io

    from PIL import Image, ImageDraw

    image = Image.new("RGB", (32, 32), (255, 255, 255))
    ImageDraw.Draw(image).ellipse((6, 6, 26, 26), fill=(220, 20, 20))
    png = io.BytesIO()
    image.save(png, format="PNG")
    return pd.DataFrame({"image": [png.getvalue()], "text": ["a red circle"]})


def log_pyfunc_model(
    model: torch.nn.Module,
    *,
    tokenizer: str = "openai",
    name: str = "model",
    registered_model_name: str | None = None,
) -> Any:
    """Log `model` (a clip_model CLIP) to the active MLflow run as a pyfunc; returns ModelInfo.

    `tokenizer`: "openai" or the path of the tokenizer JSON the model was trained with. With a
    `registered_model_name`, the new version gets the alias `@candidate` (storage.tracking).
    """
    from importlib.metadata import version

    from clip_model.checkpoint import to_state_dict

    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights.pt"
        torch.save(
            {"state_dict": to_state_dict(model), "model_config": model.config.model_dump()},
            weights,
        )
        artifacts = {"weights": str(weights)}
        if tokenizer != "openai":
            artifacts["tokenizer"] = str(tokenizer)
        torch_version = torch.__version__.split("+")[0]
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=ClipEmbedder(),
            artifacts=artifacts,
            code_paths=[str(_PACKAGE)],
            pip_requirements=[
                f"torch=={torch_version}",
                "pillow",
                f"opencv-python-headless=={version('opencv-python-headless')}",
                "numpy",
                "pandas",
                "pydantic>=2",
                "pyyaml",
                "regex",
                "tokenizers",
                "tqdm",
            ],
            signature=model_signature(),
            input_example=input_example(),
            registered_model_name=registered_model_name,
        )
    if registered_model_name and info.registered_model_version is not None:
        from storage.tracking import set_candidate

        set_candidate(registered_model_name, info.registered_model_version)
    return info
