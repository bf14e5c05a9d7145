"""Parameters of `flows.sample`: generate the sample web (and serve it)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["DEFAULT_PORT", "SampleParams"]

DEFAULT_PORT = 8765  # tasks.sample_web.DEFAULT_PORT (that module loads numpy and PIL)


class SampleParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out: str = Field(description="folder to write the sample web into")
    seed: int = Field(0, description="generator seed")
    port: int = Field(
        DEFAULT_PORT, ge=1, le=65535, description="port the URL list points at and --serve uses"
    )
    serve: bool = Field(False, description="then serve it on 127.0.0.1 until Ctrl-C")
