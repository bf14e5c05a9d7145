"""MLflow helpers: one place that knows the tracking URI, run nesting and dataset lineage.

Local runs need no server: the tracking URI defaults to a SQLite file (docs/design.md, trap 6). A stage
opened inside another run (the pipeline's parent run) becomes its nested child run. A fresh SQLite
database is created once, under a file lock, before any run opens (`ensure_tracking_store`,
docs/design.md trap 14), so stages started at the same moment all start.

MLflow 3 (docs/mlflow.md): experiments are created as model-training experiments (the UI opens
their runs table, not the GenAI view); a registered version gets the alias `@candidate`, and
`promote` moves `@champion` to it; `models:/name@alias` URIs resolve to a local weights file
(`fetch_registered_model`); training runs log system metrics (`system_metrics`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import mlflow
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.meta_dataset import MetaDataset

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "clip-pipeline"

__all__ = [
    "CANDIDATE",
    "CHAMPION",
    "EXPERIMENT_KIND_TAG",
    "RegisteredModel",
    "ensure_experiment",
    "ensure_tracking_store",
    "fetch_registered_model",
    "flatten_params",
    "is_model_uri",
    "link_evaluation",
    "registered_uri",
    "log_dataset",
    "promote",
    "set_candidate",
    "share_runs_view",
    "log_model_output",
    "stage_run",
    "system_metrics",
    "tracking_uri",
]

# MLflow 3's experiment kind: the UI opens a "custom_model_development" experiment in its
# model-training view (runs table, charts, registry); without the tag it may infer GenAI.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
CANDIDATE = "candidate"  # every newly registered version
CHAMPION = "champion"  # the version to serve: moved by `promote`
_READY: set[str] = set()  # tracking URIs whose database this process has made sure of


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _sqlite_file(uri: str) -> str | None:
    """The database file of a `sqlite:///` URI, or None (a server, another database, memory)."""
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    return None if database in (None, "", ":memory:") else os.path.abspath(database)


def ensure_tracking_store(uri: str | None = None) -> str:
    """Create the tracking database's schema once, before any stage opens a run; returns the URI.

    MLflow creates a fresh SQLite database's schema on first use, and several processes doing
    that at once fail (docs/design.md, trap 14): here the first one creates it while holding an
    exclusive lock on `DB.init-lock`, the others wait and find it made. A tracking server, or
    another database, makes its own schema: nothing to do."""
    uri = uri or tracking_uri()
    path = _sqlite_file(uri)
    if path is None or uri in _READY:
        return uri
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(f"{path}.init-lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)  # creates it
    _READY.add(uri)
    return uri


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


# MLflow's parameter names: alphanumerics, '_', '-', '.', ' ', ':' and '/'; a metric name such as
# `recall@5` in a profile's goals becomes `recall_5`.
_NOT_IN_A_PARAM_NAME = re.compile(r"[^\w\-. :/]")


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested parameters as MLflow's flat `a.b.c` keys (values cut to MLflow's 6000 chars)."""
    flat: dict[str, str] = {}
    for k, v in params.items():
        name = _NOT_IN_A_PARAM_NAME.sub("_", f"{prefix}{k}")
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
    mlflow.set_tracking_uri(ensure_tracking_store(tracking_uri()))
    parent = mlflow.active_run()
    if parent is None:
        name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT)
        mlflow.set_experiment(experiment_id=ensure_experiment(name))
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


# ---- MLflow 3: experiment kind, registry aliases, models:/ URIs, system metrics ------------------


def ensure_experiment(name: str, uri: str | None = None) -> str:
    """The id of experiment `name`, created as a model-training experiment (MLflow 3's
    `mlflow.experimentKind` tag) if new; an existing one without a kind gets the tag too (a kind
    someone chose in the UI is kept). MLflow 3.1-3.9's UI opens an experiment in the view its
    kind says; 3.17's follows its GenAI / Model training switch (`share_runs_view`'s link sets
    it)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri or tracking_uri())
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
        except MlflowException:  # another process created it first
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    return experiment.experiment_id


def set_candidate(name: str, version: str | int, uri: str | None = None) -> None:
    """Point `@candidate` at a newly registered version (what the next evaluation looks at)."""
    from mlflow.tracking import MlflowClient

    MlflowClient(uri or tracking_uri()).set_registered_model_alias(name, CANDIDATE, str(version))


def promote(
    name: str,
    version: str | int,
    *,
    metric: str | None = None,
    value: float | None = None,
    goal: str = "minimize",
    force: bool = False,
    uri: str | None = None,
) -> bool:
    """Move `@champion` to `version` when `force` (an explicit flag) or when its `metric` (`value`)
    beats the current champion's (recorded as the version tag `champion_metric.<metric>`); a
    model without a champion takes this version. Returns whether the alias moved."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if goal not in ("minimize", "maximize"):
        raise ValueError(f"goal={goal!r}: expected 'minimize' or 'maximize'")
    client = MlflowClient(uri or tracking_uri())
    version = str(version)
    tag = f"champion_metric.{metric}" if metric else None
    if tag and value is not None:
        client.set_model_version_tag(name, version, tag, str(value))
    if not force:
        if tag is None or value is None:
            return False  # nothing to compare: only the explicit flag promotes
        try:
            current = client.get_model_version_by_alias(name, CHAMPION)
        except MlflowException:
            current = None  # no champion yet
        if current is not None:
            if str(current.version) == version:
                return False
            held = current.tags.get(tag)
            if held is not None:
                better = value < float(held) if goal == "minimize" else value > float(held)
                if not better:
                    return False
    client.set_registered_model_alias(name, CHAMPION, version)
    return True


def is_model_uri(checkpoint: str) -> bool:
    return str(checkpoint).startswith("models:/")


class RegisteredModel(NamedTuple):
    """A registry model version fetched to local disk: `weights` is what `load_clip` reads (the
    pyfunc's {"state_dict", "model_config"} file, its tokenizer.json beside it when trained)."""

    uri: str
    name: str
    version: str
    weights: str
    run_id: str | None
    model_id: str | None


def fetch_registered_model(uri: str, cache: str | os.PathLike | None = None) -> RegisteredModel:
    """`models:/name@alias` or `models:/name/version` as a local weights file. Versions never
    change, so each is downloaded once into the cache (`CLIP_PIPELINE_CACHE`, default
    ~/.cache/clip-pipeline) under registry/<name>/<version>-<logged model id>/."""
    import shutil
    import tempfile
    from pathlib import Path

    import mlflow.artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    spec = uri.removeprefix("models:/")
    name, sep, ref = spec.partition("@") if "@" in spec else spec.partition("/")
    if not name or not sep or not ref or "/" in ref:
        raise ValueError(
            f"{uri}: expected models:/NAME@ALIAS (e.g. models:/clip-tiny@champion) "
            "or models:/NAME/VERSION"
        )
    client = MlflowClient(tracking_uri())
    try:
        if sep == "@":
            mv = client.get_model_version_by_alias(name, ref)
        else:
            mv = client.get_model_version(name, ref)
    except MlflowException as error:
        raise ValueError(
            f"{uri}: not in the registry at {tracking_uri()} ({error.message})"
        ) from None
    root = Path(
        cache or os.environ.get("CLIP_PIPELINE_CACHE") or Path.home() / ".cache/clip-pipeline"
    )
    # a version number is only unique within one tracking store: the logged model's (or run's)
    # id keeps two stores' "clip/1" apart
    folder = root / "registry" / name / f"{mv.version}-{_logged_model_id(mv) or mv.run_id}"
    weights = folder / "artifacts" / "weights.pt"
    if not weights.is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=folder.parent))
        try:
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{name}/{mv.version}",
                dst_path=str(staging),
                tracking_uri=tracking_uri(),
            )
            if not (staging / "artifacts" / "weights.pt").is_file():
                raise ValueError(f"{uri}: version {mv.version} is not a clip_model pyfunc model")
            shutil.rmtree(folder, ignore_errors=True)
            staging.rename(folder)  # whole or not at all
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return RegisteredModel(
        uri=uri,
        name=name,
        version=str(mv.version),
        weights=str(weights),
        run_id=mv.run_id,
        model_id=_logged_model_id(mv),
    )


def _logged_model_id(mv: Any) -> str | None:
    """The MLflow 3 logged model (`m-...`) a registry version was made from: the version's
    `model_id`, which a SQLite store leaves empty, else its `models:/m-...` source."""
    if getattr(mv, "model_id", None):
        return mv.model_id
    source = str(mv.source or "")
    if source.startswith("models:/m-"):
        return source.removeprefix("models:/").split("/", 1)[0]
    return None


@contextlib.contextmanager
def system_metrics(run_id: str | None, uri: str | None = None, interval: float = 10.0):
    """CPU, memory, disk, network (and GPU when pynvml is there) sampled every `interval` s into
    the run's `system/...` metrics while the block runs (MLflow's SystemMetricsMonitor; the
    training run is not started with mlflow.start_run, so its switch does not apply)."""
    if run_id is None:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(
        run_id, sampling_interval=interval, tracking_uri=uri or tracking_uri()
    )
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
        # the monitor logs once per interval and stops when the run ends: a run shorter than one
        # interval would show no system metrics at all, so one closing sample is always logged
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()


def registered_uri(name: str | None, version: str | int | None) -> str | None:
    """`models:/name/version` when that version is in the registry (a reused training's version
    may predate this tracking store), else None."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if not name or version is None:
        return None
    try:
        MlflowClient(tracking_uri()).get_model_version(name, str(version))
    except MlflowException:
        return None
    return f"models:/{name}/{version}"


def link_evaluation(
    registered: RegisteredModel, run_id: str, metrics: Mapping[str, float], label: str
) -> None:
    """Tie an evaluation run to the model version it scored, both ways: the run's tags and its
    model input (MLflow 3's LoggedModelInput), the metrics on the logged model (shown on the
    version's page), and the tag `evaluation.<label>` = the run id on the version."""
    from mlflow.entities import LoggedModelInput
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri())
    client.set_tag(run_id, "registered_model.name", registered.name)
    client.set_tag(run_id, "registered_model.version", registered.version)
    client.set_tag(run_id, "registered_model.uri", registered.uri)
    if registered.model_id:
        client.log_inputs(run_id, models=[LoggedModelInput(registered.model_id)])
        mlflow.log_metrics(dict(metrics), run_id=run_id, model_id=registered.model_id)
    client.set_model_version_tag(registered.name, registered.version, f"evaluation.{label}", run_id)


def log_model_output(run_id: str, model_id: str | None) -> None:
    """Show a logged model (`m-...`) in a run's Models column: the pipeline's run, whose model
    its training child logged."""
    from mlflow.entities import LoggedModelOutput
    from mlflow.tracking import MlflowClient

    if model_id:
        MlflowClient(tracking_uri()).log_outputs(run_id, [LoggedModelOutput(model_id, step=0)])


SHARED_VIEW_TAG = "mlflow.sharedViewState."  # the UI's "Share" button stores views this way


def share_runs_view(experiment_id: str, key: str, metrics: Sequence[str]) -> str:
    """A saved runs-table view of the experiment with the columns Dataset, Models and `metrics`,
    stored as the UI's own share button does (an experiment tag); returns the URL fragment that
    opens it in the model-training view. MLflow's default table shows no metric column at all."""
    from mlflow.tracking import MlflowClient

    columns = ["attributes.`Dataset`", "attributes.`Models`"]
    columns += [f"metrics.`{m}`" for m in metrics]
    state = {"selectedColumns": columns, "orderByKey": "attributes.start_time", "orderByAsc": False}
    MlflowClient(tracking_uri()).set_experiment_tag(
        experiment_id, SHARED_VIEW_TAG + key, json.dumps(state)
    )
    # MLflow 3.17's UI takes GenAI vs model training from its switch (this URL parameter, else
    # the browser's last choice) rather than the experiment's kind tag: the link says it
    return (
        f"#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={key}"
    )
