"""MLflow helpers: one place that knows the tracking URI, run nesting and dataset lineage.

Local runs need no server: the tracking URI defaults to a SQLite file (docs/design.md, trap 6). A stage
opened inside another run (the pipeline's parent run) becomes its nested child run.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import mlflow
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.meta_dataset import MetaDataset

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "clip-pipeline"

__all__ = ["flatten_params", "log_dataset", "stage_run", "tracking_uri"]


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def prefect_tags() -> dict[str, str]:
    """The enclosing Prefect flow run's id, name and UI link, when there is one."""
    try:
        from prefect.runtime import flow_run
    except ImportError:  # the library used without the orchestrator
        return {}
    run_id = flow_run.id
    if not run_id:
        return {}
    tags = {"prefect.flow_run_id": str(run_id), "prefect.flow_run_name": str(flow_run.name)}
    if url := flow_run.ui_url:
        tags["prefect.flow_run_url"] = str(url)
    return tags


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested parameters as MLflow's flat `a.b.c` keys (values cut to MLflow's 6000 chars)."""
    flat: dict[str, str] = {}
    for k, v in params.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            flat.update(flatten_params(v, f"{name}."))
        else:
            text = v if isinstance(v, str) else json.dumps(v, default=str)
            flat[name] = text[:6000]
    return flat


@contextlib.contextmanager
def stage_run(
    stage: str,
    *,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
    experiment: str | None = None,
    run_name: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run for one stage; nested under the active run when there is one."""
    mlflow.set_tracking_uri(tracking_uri())
    parent = mlflow.active_run()
    if parent is None:
        mlflow.set_experiment(
            experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT)
        )
    with mlflow.start_run(
        run_name=run_name or stage,
        nested=parent is not None,
        tags={"stage": stage, **prefect_tags(), **(tags or {})},
    ) as run:
        if params:
            mlflow.log_params(flatten_params(params))
        yield run


class ManifestSource(DatasetSource):
    """An MLflow dataset source for a dataset of this project: its URL, local or fsspec."""

    def __init__(self, url: str):
        self.url = url

    @staticmethod
    def _get_source_type() -> str:
        return "clip_dataset"

    def load(self) -> str:
        return self.url

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return False

    @classmethod
    def _resolve(cls, raw_source: Any) -> ManifestSource:
        return cls(str(raw_source))

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url}

    @classmethod
    def from_dict(cls, source_dict: dict[Any, Any]) -> ManifestSource:
        return cls(source_dict["url"])


def log_dataset(dataset: Any, *, context: str, name: str | None = None) -> None:
    """Log a `storage.Dataset` as an MLflow dataset input of the active run (lineage by digest).

    `context` is MLflow's input context: "input" for what a stage read, "output" for what it wrote.
    """
    meta = MetaDataset(
        source=ManifestSource(dataset.url),
        name=name or dataset.url.rstrip("/").rsplit("/", 1)[-1],
        digest=dataset.digest.removeprefix("sha256:")[:16],
    )
    tags = {
        "manifest_digest": dataset.digest,
        "samples": str(dataset.manifest.total_samples),
        "producer_stage": dataset.manifest.producer.stage,
    }
    mlflow.log_input(meta, context=context, tags=tags)
