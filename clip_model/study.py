"""Optuna access shared by both sides of a sweep: the flow that asks and tells (tasks/sweep.py) and
the training process that reports (clip_model/pruning.py). Both build the storage from the same
URL and the pruner from the same name and arguments (a pruner is not part of a study's storage).

Optuna is imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "PRUNED_FILE",
    "PRUNERS",
    "make_pruner",
    "metric_names",
    "objective_name",
    "objective_value",
    "open_storage",
]

PRUNED_FILE = "pruned.json"  # written in a trial's out_dir when it is pruned

# the pruners a config may name (optuna.pruners classes whose arguments are plain values)
PRUNERS = {
    "none": "NopPruner",
    "median": "MedianPruner",
    "percentile": "PercentilePruner",
    "threshold": "ThresholdPruner",
    "successive_halving": "SuccessiveHalvingPruner",
    "hyperband": "HyperbandPruner",
}


def make_pruner(name: str, args: dict[str, Any] | None = None) -> Any:
    """An Optuna pruner from its config name (`median`, `threshold`, ...) and keyword arguments.

    Raises ValueError naming the pruner and what is wrong with its arguments.
    """
    import optuna

    if name not in PRUNERS:
        raise ValueError(f"pruner {name!r}: expected one of {', '.join(PRUNERS)}")
    cls = getattr(optuna.pruners, PRUNERS[name])
    try:
        return cls(**(args or {}))
    except (TypeError, ValueError) as error:
        raise ValueError(f"pruner {name} ({cls.__name__}) with args {args}: {error}") from None


def open_storage(url: str) -> Any:
    """An Optuna storage: an RDB URL (`sqlite:///study.db`, `postgresql://...`) or the path of a
    journal file (`JournalFileBackend`: safe for several processes on one machine, no server)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if "://" in url and not url.startswith("file://"):
        return optuna.storages.RDBStorage(url)
    return optuna.storages.JournalStorage(JournalFileBackend(url.removeprefix("file://")))


def metric_names(metric: str | list[str]) -> list[str]:
    """An objective's metrics: one name, or several whose mean is the objective."""
    names = [metric] if isinstance(metric, str) else list(metric)
    if not names:
        raise ValueError("objective metric: give a metric name or a list of them")
    return names


def objective_name(metric: str | list[str]) -> str:
    names = metric_names(metric)
    return names[0] if len(names) == 1 else f"mean({','.join(names)})"


def objective_value(metrics: Any, metric: str | list[str]) -> float | None:
    """The objective from a run's metrics (a mapping of name -> number or tensor): the metric, or
    the mean of the metrics; None when one of them is missing."""
    names = metric_names(metric)
    values = [metrics.get(name) for name in names]
    if any(v is None for v in values):
        return None
    return sum(float(v) for v in values) / len(values)
