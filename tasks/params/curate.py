"""Parameters of the `curate` stage: a crawled dataset filtered into a training one."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.params import cli

__all__ = ["CurateParams"]


class CurateParams(BaseModel):
    """The `curate` command line; the flow's parameters, one for one."""

    model_config = ConfigDict(extra="forbid")

    input: str = Field(description="crawled dataset (folder or fsspec URL)")
    output: str = Field(description="curated dataset to write (folder or URL)")
    filters: str = Field(
        description="filter spec: a YAML path or a preset of configs/filters/ (sample, "
        "datacomp_basic)"
    )
    eval_dirs: list[str] | None = Field(
        None,
        description="evaluation images to decontaminate against (repeatable; replaces the "
        "spec's near_duplicates.eval_dirs)",
        json_schema_extra=cli("--eval-dir", repeat=True, metavar="DIR"),
    )
    num_shards: int | None = Field(None, gt=0, description="output shards (default: the spec's)")
    workers: int = Field(
        0,
        ge=0,
        description="processes for the per-shard work (scan: filters, decode, hashes, CLIP "
        "score; write: resharding), 0: in this process; with --engine ray, the most shards in "
        "flight (0: every shard at once)",
    )
    engine: Literal["local", "ray"] = Field(
        "local",
        description="where the per-shard work runs: local (this machine) or ray (a Ray cluster)",
    )
    ray_address: str | None = Field(
        None,
        description="with --engine ray: the cluster to join (auto, ray://HOST:10001); default: "
        "the Ray this process already runs, else a new local one",
    )
    force: bool = Field(
        False, description="redo even if the output is up to date, replacing whatever OUTPUT holds"
    )

    @model_validator(mode="after")
    def _address_needs_ray(self) -> CurateParams:
        if self.ray_address is not None and self.engine != "ray":
            raise ValueError(f"--ray-address {self.ray_address} needs --engine ray")
        return self

    def check(self) -> None:
        """The input is a dataset (damaged shards are the flow's to report), the filter spec
        validates, the evaluation folders exist, and the output is not the input."""
        from storage.fs import exists, filesystem, join
        from tasks.curation.spec import load_filter_spec

        fs, root = filesystem(self.input)
        if not fs.exists(root):
            raise FileNotFoundError(f"--input {self.input}: no such dataset folder")
        if not exists(join(self.input, "manifest.json")):
            raise ValueError(
                f"--input {self.input}: not a dataset (no manifest.json; a crawl writes it last, "
                "so an interrupted one has none)"
            )
        load_filter_spec(self.filters)
        for folder in self.eval_dirs or []:
            if "://" not in folder and not Path(folder).is_dir():
                raise FileNotFoundError(f"--eval-dir {folder}: no such folder")
        if self.output.rstrip("/") == self.input.rstrip("/"):
            raise ValueError(f"--output {self.output}: is the input; give another folder")
