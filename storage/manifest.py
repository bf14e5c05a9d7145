"""`manifest.json`: what a dataset holds, what produced it, and a digest of both.

The digest covers the shard contents (their sha256) and the producer (stage, parameters, input
digest), not wall-clock times, so the same inputs and parameters give the same digest: lineage is
a chain of these digests, and the pipeline keys its caching on them.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


class ShardEntry(BaseModel):
    """One committed shard: `NAME.tar` (WebDataset) and `NAME.parquet` (a row per input row)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    num_samples: int = Field(
        ge=0, description="samples in the tar (parquet rows with status success)"
    )
    num_rows: int = Field(ge=0, description="rows in the parquet, failures included")
    tar_sha256: str
    tar_bytes: int = Field(ge=0)
    parquet_sha256: str


class Producer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    input_digest: str | None = None


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    shards: list[ShardEntry]
    total_samples: int
    total_rows: int
    producer: Producer
    stats: dict[str, Any] = Field(default_factory=dict, description="stage-specific counts")
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())
    digest: str = ""

    def compute_digest(self) -> str:
        content = {
            "format_version": self.format_version,
            "shards": [
                [s.name, s.num_samples, s.num_rows, s.tar_sha256, s.parquet_sha256]
                for s in self.shards
            ],
            "producer": self.producer.model_dump(mode="json"),
        }
        blob = json.dumps(content, sort_keys=True, separators=(",", ":"), default=str)
        return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()

    def sealed(self) -> Manifest:
        """A copy whose totals and digest agree with its shards."""
        m = self.model_copy(
            update={
                "total_samples": sum(s.num_samples for s in self.shards),
                "total_rows": sum(s.num_rows for s in self.shards),
            }
        )
        m.digest = m.compute_digest()
        return m

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"
