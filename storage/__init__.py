"""Datasets (WebDataset shards + Parquet + manifest), fsspec paths, atomic writes, and stage
outputs as transactions (storage.output: staging, swap, aliasing checks, a lock per output)."""

from storage.dataset import (
    Dataset,
    DatasetError,
    DatasetWriter,
    Sample,
    describe_shard,
    open_dataset,
    read_shard,
    shard_name,
    write_manifest,
)
from storage.lock import LockError
from storage.manifest import MANIFEST_NAME, Manifest, ShardEntry
from storage.output import OutputError, StageOutput, stage_output

__all__ = [
    "MANIFEST_NAME",
    "Dataset",
    "DatasetError",
    "DatasetWriter",
    "LockError",
    "Manifest",
    "OutputError",
    "Sample",
    "ShardEntry",
    "StageOutput",
    "describe_shard",
    "open_dataset",
    "read_shard",
    "shard_name",
    "stage_output",
    "write_manifest",
]
