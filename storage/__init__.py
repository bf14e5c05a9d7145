"""Datasets (WebDataset shards + Parquet + manifest), fsspec paths, atomic writes, and stage
outputs as transactions (storage.output: staging, swap, aliasing checks, a lock per output).

The names below are imported on first use (PEP 562), so `import storage.<module>` stays cheap for
the command lines, which validate their input before anything heavy is loaded.
"""

import importlib

import storage.environment  # noqa: F401  (safe defaults before prefect/mlflow are imported)

_EXPORTS = {
    "Dataset": "storage.dataset",
    "DatasetError": "storage.dataset",
    "DatasetWriter": "storage.dataset",
    "Sample": "storage.dataset",
    "SampleError": "storage.dataset",
    "ShardReadError": "storage.dataset",
    "describe_shard": "storage.dataset",
    "open_dataset": "storage.dataset",
    "read_shard": "storage.dataset",
    "shard_name": "storage.dataset",
    "write_manifest": "storage.dataset",
    "LockError": "storage.lock",
    "MANIFEST_NAME": "storage.manifest",
    "Manifest": "storage.manifest",
    "ShardEntry": "storage.manifest",
    "OutputError": "storage.output",
    "StageOutput": "storage.output",
    "stage_output": "storage.output",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
