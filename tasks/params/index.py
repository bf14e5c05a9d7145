"""Parameters of the `index` stage: a dataset embedded with a CLIP into a FAISS index."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.params import MODEL_HELP, check_dataset, check_file, check_precision, precision_help

__all__ = ["IndexParams"]


class IndexParams(BaseModel):
    """The `index` command line; the flow's parameters, one for one."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str = Field(
        description="model weights (ours, OpenAI, OpenCLIP) or a registered version "
        "(models:/clip-tiny@champion, models:/clip-tiny/3)"
    )
    data: str = Field(description="dataset folder or fsspec URL")
    output: str = Field(description="index folder or fsspec URL")
    kind: Literal["auto", "flat", "ivf", "hnsw"] = Field(
        "auto", description="FAISS index kind (auto: exact up to 100k vectors, IVF above)"
    )
    batch_size: int = Field(64, gt=0, description="images per embedding batch")
    dtype: Literal["float32", "float16"] = Field(
        "float32",
        description="embedding files on disk (float16: half the size, scores rounded to ~1e-3)",
    )
    model: str | None = Field(None, description=MODEL_HELP)
    precision: str = Field("fp32", description=precision_help())
    device: str = Field("auto", description="auto (cuda if available), cpu, cuda:0, ...")
    allow_torchscript: bool = Field(
        False,
        description="load a TorchScript checkpoint (OpenAI's .pt releases): it runs the file's code",
    )

    force: bool = Field(
        False,
        description="replace whatever OUTPUT holds (files no index run recorded writing)",
    )

    _precision = field_validator("precision")(check_precision)

    def check(self) -> None:
        """The checkpoint exists and the dataset opens; the index is neither the dataset, inside
        it, nor holding it or the checkpoint (after resolving `.`, `..` and symlinks)."""
        from storage.output import check_not_aliased

        check_file(self.checkpoint, "--checkpoint")
        check_dataset(self.data, "--data")
        try:
            local = [] if self.checkpoint.startswith("models:/") else [self.checkpoint]
            check_not_aliased(self.output, [self.data, *local])
        except ValueError as e:
            raise ValueError(f"--output {e}") from None
