"""Parameters of `flows.search`: query an index built by `flows.index`, or serve its web page."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.params import cli

__all__ = ["INDEX_MANIFEST", "SearchParams", "check_index"]

INDEX_MANIFEST = "index.json"  # storage.embeddings.INDEX_MANIFEST (that module loads faiss)


class SearchParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: str = Field(description="index folder written by flows.index")
    text: str | None = Field(None, description="text query")
    image: str | None = Field(None, description="image query: a JPEG/PNG/WebP file")
    weight: float = Field(0.5, ge=0, le=1, description="text's share when both are given (0..1)")
    k: int = Field(
        10,
        gt=0,
        description="results (more than the index: all of them)",
        json_schema_extra=cli("-k"),
    )
    checkpoint: str | None = Field(
        None, description="the index's model, if not at the path it recorded"
    )
    data: str | None = Field(None, description="the dataset, if it moved since the index was built")
    model: str | None = Field(
        None,
        description="the checkpoint's architecture when its weights do not say it and the index "
        "did not record it: a preset as OpenCLIP names it, or a config YAML/JSON",
    )
    allow_torchscript: bool = Field(
        False,
        description="load a TorchScript checkpoint (OpenAI's .pt releases): it runs the file's code",
    )
    serve: bool = Field(False, description="serve the search page instead")
    host: str = Field("127.0.0.1", description="--serve: the address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="--serve: the port to listen on")

    @model_validator(mode="after")
    def _a_query(self) -> SearchParams:
        if not self.serve and self.text is None and self.image is None:
            raise ValueError("give --text and/or --image, or --serve")
        return self

    def check(self) -> None:
        check_index(self.index)
        for flag, path in (("--image", self.image), ("--checkpoint", self.checkpoint)):
            if path is not None and "://" not in path and not Path(path).is_file():
                raise FileNotFoundError(f"{flag} {path}: no such file")


def check_index(url: str) -> None:
    """FileNotFoundError unless `url` holds an index's manifest (the rest is checked on open)."""
    from storage.fs import exists, join

    if not exists(join(url, INDEX_MANIFEST)):
        raise FileNotFoundError(
            f"{url}: not an index (no {INDEX_MANIFEST}); build one with python -m flows.index"
        )
