"""Datasets (WebDataset shards + Parquet + manifest), fsspec paths and atomic writes."""

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
from storage.manifest import MANIFEST_NAME, Manifest, ShardEntry

__all__ = [
    "MANIFEST_NAME",
    "Dataset",
    "DatasetError",
    "DatasetWriter",
    "Manifest",
    "Sample",
    "ShardEntry",
    "describe_shard",
    "open_dataset",
    "read_shard",
    "shard_name",
    "write_manifest",
]
