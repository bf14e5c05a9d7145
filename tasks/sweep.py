"""Tasks of the `sweep` flow: the Optuna study, one trial as a training subprocess, the record of
each trial in MLflow, the leaderboard and the registered best model.

Where things live (out_dir = the sweep's folder, data/sweep/<name> by default):

- `out_dir/study.journal`: the Optuna study (a JournalFileBackend file; or `storage:` an RDB URL).
  It is the sweep's memory: a rerun continues the study, never reruns a finished trial;
- `out_dir/trials/NNNN/`: trial NNNN's training folder (config, checkpoints, metrics.jsonl) and
  `outcome.json`, written when the trial ends: its state, objective, MLflow run and model;
- MLflow: one parent run per sweep (reopened on resume), one child run per trial (the training's
  own run: every config value as a parameter, per-step metrics, the objective as
  `sweep/objective`, tags `sweep.trial` and `sweep.state`), so selecting the children in the UI and
  choosing "Compare" gives the parallel-coordinates plot of parameters against the objective.

A trial killed with the sweep (RUNNING in the study with no outcome.json) is marked FAIL and its
parameters are queued again as a new trial; one that finished but was not yet told to the study
(outcome.json written) is told from its outcome.json.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import io
import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from pydantic import BaseModel

from clip_model.study import PRUNED_FILE, make_pruner, objective_value, open_storage
from clip_model.train import TrainConfig
from storage.fs import atomic_write_bytes
from storage.tracking import tracking_uri
from tasks.sweep_config import SweepConfig, make_sampler, trial_train_config

__all__ = [
    "SweepResult",
    "TrialOutcome",
    "leaderboard",
    "open_study",
    "publish_leaderboard",
    "record_trial",
    "recover_interrupted",
    "register_best",
    "run_trial",
    "sweep_key",
    "sweep_lock",
    "sweep_parent_run",
    "trials_left",
]

OUTCOME_FILE = "outcome.json"


class TrialOutcome(BaseModel):
    """How a trial ended; written to its folder as outcome.json, then told to the study."""

    number: int
    state: Literal["COMPLETE", "PRUNED", "FAIL"]
    value: float | None = None  # the objective (final, or the last reported when pruned)
    step: int | None = None  # the optimizer steps it trained
    seconds: float = 0.0
    mlflow_run_id: str | None = None
    model_uri: str | None = None
    checkpoint: str | None = None
    error: str | None = None


class SweepResult(BaseModel):
    name: str
    out_dir: str
    storage: str
    mlflow_parent_run_id: str
    trials: dict[str, int]  # by state
    best: dict[str, Any] | None
    registered: dict[str, Any] | None
    leaderboard: list[dict[str, Any]]


# ---- the sweep's folder and study ------------------------------------------------------------


@contextlib.contextmanager
def sweep_lock(out_dir: str) -> Iterator[None]:
    """Hold `out_dir/.sweep.lock`: one sweep at a time in a folder (the lock goes with the
    process, so a killed sweep never leaves a stale one). The resume logic relies on it: every
    RUNNING trial it finds belongs to a sweep that is gone."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    path = Path(out_dir) / ".sweep.lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise RuntimeError(f"{out_dir}: a sweep is already running there ({holder})") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def sweep_key(spec: SweepConfig, base: TrainConfig, data_digest: str) -> str:
    """What makes two runs the same study: the space, objective, sampler, pruner, seed, the base
    training config and the data. Not the trial count, concurrency or threads: those may change
    when a sweep is resumed or extended."""
    what = {
        "space": {k: p.model_dump() for k, p in spec.space.items()},
        "objective": spec.objective.model_dump(),
        "sampler": [spec.sampler, spec.sampler_args, spec.seed],
        "pruner": spec.pruner.model_dump(),
        "base": base.model_dump(mode="json", exclude={"out_dir", "mlflow", "cpu_threads"}),
        "data": data_digest,
    }
    blob = json.dumps(what, sort_keys=True, default=str)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


@task(name="open-study", cache_policy=NONE)
def open_study(spec: SweepConfig, key: str) -> Any:
    """Create the study, or load it to continue; refuses a study made by a different sweep."""
    import optuna

    storage = open_storage(spec.storage_url)
    try:
        study_id = storage.get_study_id_from_name(spec.name)
        existing = len(storage.get_all_trials(study_id, deepcopy=False))
    except KeyError:
        existing = None
    study = optuna.create_study(
        study_name=spec.name,
        storage=storage,
        sampler=make_sampler(spec, n_existing=existing or 0),
        pruner=make_pruner(spec.pruner.name, spec.pruner.args),
        direction=spec.objective.direction,
        load_if_exists=True,
    )
    if existing is None:
        study.set_user_attr("sweep_key", key)
        study.set_user_attr("metric", spec.objective.name)
        return study
    found = study.user_attrs.get("sweep_key")
    if found != key or study.direction.name.lower() != spec.objective.direction:
        raise RuntimeError(
            f"study {spec.name!r} in {spec.storage_url} was made by a different sweep (its space, "
            "objective, sampler, pruner, seed, base training config or data differ from this "
            "config's): give this sweep another name or out_dir, or remove that study to start over"
        )
    get_run_logger().info("continuing study %s: %d trials so far", spec.name, existing)
    return study


def _superseded(trials: list[Any]) -> set[int]:
    return {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}


def trials_left(spec: SweepConfig, study: Any) -> tuple[int, int]:
    """(new trials still to ask for, queued retries waiting). A trial that was interrupted and
    queued again counts once, as its retry."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = _superseded(trials)
    counted = sum(1 for t in trials if t.number not in retried)
    waiting = sum(1 for t in trials if t.state == TrialState.WAITING)
    return spec.trials - counted, waiting


def read_outcome(spec: SweepConfig, number: int) -> TrialOutcome | None:
    path = Path(spec.trial_dir(number)) / OUTCOME_FILE
    if not path.is_file():
        return None
    return TrialOutcome.model_validate_json(path.read_text())


@task(name="recover-interrupted-trials", cache_policy=NONE)
def recover_interrupted(spec: SweepConfig, study: Any, parent_run_id: str) -> list[int]:
    """Trials left RUNNING by a sweep that was killed: told from their outcome.json when they had
    finished, else marked FAIL and their parameters queued again. Returns the requeued numbers."""
    from optuna.trial import TrialState

    logger = get_run_logger()
    requeued = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        outcome = read_outcome(spec, trial.number)
        if outcome is None:
            outcome = TrialOutcome(
                number=trial.number,
                state="FAIL",
                error="interrupted: the sweep stopped while this trial ran; queued again",
            )
            atomic_write_bytes(
                str(Path(spec.trial_dir(trial.number)) / OUTCOME_FILE),
                outcome.model_dump_json(indent=2).encode(),
            )
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            requeued.append(trial.number)
            logger.warning(
                "trial %d was interrupted; its parameters are queued again", trial.number
            )
        record_trial.fn(spec, study, trial.number, outcome, parent_run_id, interrupted=True)
    return requeued


@contextlib.contextmanager
def sweep_parent_run(spec: SweepConfig, study: Any, dataset: Any) -> Iterator[str]:
    """The sweep's MLflow parent run: created with the study, reopened when the sweep resumes."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from storage.tracking import ensure_tracking_store, log_dataset, stage_run

    mlflow.set_tracking_uri(ensure_tracking_store(tracking_uri()))
    earlier = study.user_attrs.get("mlflow_parent_run_id")
    if earlier:
        try:
            alive = mlflow.MlflowClient().get_run(earlier).info.lifecycle_stage == "active"
        except MlflowException:
            alive = False
        if alive:
            nested = mlflow.active_run() is not None
            with mlflow.start_run(run_id=earlier, nested=nested):
                yield earlier
            return
    params = {
        "study": spec.name,
        "train": spec.train,
        "objective": spec.objective.model_dump(),
        "sampler": spec.sampler,
        "pruner": spec.pruner.model_dump(),
        "seed": spec.seed,
        "space": {k: p.model_dump() for k, p in spec.space.items()},
        "settings": spec.settings,
    }
    tags = {"sweep.study": spec.name, "sweep.storage": spec.storage_url}
    with stage_run("sweep", params=params, tags=tags, run_name=f"sweep-{spec.name}") as run:
        study.set_user_attr("mlflow_parent_run_id", run.info.run_id)
        log_dataset(dataset, context="input")
        yield run.info.run_id


# ---- one trial ----------------------------------------------------------------------------------


@task(name="run-trial", task_run_name="trial-{number}", cache_policy=NONE)
def run_trial(
    spec: SweepConfig, number: int, params: dict[str, Any], parent_run_id: str, threads: int
) -> TrialOutcome:
    """Train trial `number` in a subprocess (tasks.train.run_training); never raises for a trial
    that fails or is pruned: the outcome says so, and is written to the trial's folder."""
    from tasks.train import run_training, write_train_config

    logger = get_run_logger()
    folder = Path(spec.trial_dir(number))
    if folder.exists():  # a new trial number: what is there is left from a study since removed
        shutil.rmtree(folder)
    started = time.monotonic()
    outcome: TrialOutcome
    try:
        cfg = trial_train_config(
            spec,
            number=number,
            params=params,
            parent_run_id=parent_run_id,
            tracking_uri=tracking_uri(),
            threads=threads,
        )
        logger.info("trial %d: %s", number, json.dumps(params))
        result = run_training.fn(cfg, write_train_config.fn(cfg))
        value = objective_value(result.metrics, spec.objective.metric)
        common = {
            "step": result.global_step,
            "mlflow_run_id": result.mlflow_run_id,
            "model_uri": result.model_uri,
            "checkpoint": result.checkpoint,
        }
        if value is None or math.isnan(value):
            known = ", ".join(sorted(result.metrics))
            error = f"objective {spec.objective.name} is {value} in its final metrics ({known})"
            outcome = TrialOutcome(number=number, state="FAIL", error=error, **common)
        else:
            outcome = TrialOutcome(number=number, state="COMPLETE", value=value, **common)
    except Exception as error:  # noqa: BLE001 - a trial's failure is its outcome, not the sweep's
        marker = folder / PRUNED_FILE
        if marker.is_file():
            pruned = json.loads(marker.read_text())
            outcome = TrialOutcome(
                number=number,
                state="PRUNED",
                value=pruned["value"],
                step=pruned["step"],
                mlflow_run_id=pruned.get("mlflow_run_id"),
            )
        else:
            outcome = TrialOutcome(number=number, state="FAIL", error=str(error)[-4000:])
    outcome.seconds = round(time.monotonic() - started, 1)
    atomic_write_bytes(str(folder / OUTCOME_FILE), outcome.model_dump_json(indent=2).encode())
    shown = "" if outcome.value is None else f" {spec.objective.name}={outcome.value:.4g}"
    logger.info("trial %d %s%s in %.0f s", number, outcome.state, shown, outcome.seconds)
    return outcome


def _child_run(client: Any, parent_run_id: str, number: int) -> str | None:
    """The MLflow run trial `number` created under the parent (for a trial that died early)."""
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=(
            f"tags.`mlflow.parentRunId` = '{parent_run_id}' and "
            f"attributes.run_name = 'trial-{number}'"
        ),
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


@task(name="record-trial", cache_policy=NONE)
def record_trial(
    spec: SweepConfig,
    study: Any,
    number: int,
    outcome: TrialOutcome,
    parent_run_id: str,
    *,
    interrupted: bool = False,
) -> None:
    """Tell the study how the trial ended and mark its MLflow child run (state, objective)."""
    import mlflow
    from optuna.trial import TrialState

    state = TrialState[outcome.state]
    if state == TrialState.COMPLETE:
        study.tell(number, outcome.value, skip_if_finished=True)
    else:  # PRUNED takes its last reported value; FAIL none
        study.tell(number, state=state, skip_if_finished=True)
    client = mlflow.MlflowClient(tracking_uri())
    run_id = outcome.mlflow_run_id or _child_run(client, parent_run_id, number)
    label = "INTERRUPTED" if interrupted and outcome.state == "FAIL" else outcome.state
    if run_id:
        client.set_tag(run_id, "sweep.study", spec.name)
        client.set_tag(run_id, "sweep.trial", str(number))
        client.set_tag(run_id, "sweep.state", label)
        if outcome.value is not None:
            client.log_metric(run_id, "sweep/objective", outcome.value, step=outcome.step or 0)
        if outcome.state != "COMPLETE":  # Lightning left it FAILED (pruned) or RUNNING (killed)
            client.set_terminated(run_id, status="KILLED" if label != "FAIL" else "FAILED")
    if outcome.value is not None:
        client.log_metric(parent_run_id, "trial/objective", outcome.value, step=number)


# ---- the comparison ------------------------------------------------------------------------------


def leaderboard(spec: SweepConfig, study: Any) -> list[dict[str, Any]]:
    """Every trial, best first: completed by objective, then pruned, then failed."""
    from optuna.trial import TrialState

    sign = 1 if spec.objective.direction == "minimize" else -1
    order = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1, TrialState.FAIL: 2}
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state not in order:
            continue
        outcome = read_outcome(spec, t.number)
        value = t.value if t.state == TrialState.COMPLETE else None
        if t.state == TrialState.PRUNED and t.intermediate_values:
            value = t.intermediate_values[max(t.intermediate_values)]
        row = {
            "trial": t.number,
            "state": t.state.name,
            spec.objective.name: value,
            "step": outcome.step if outcome else None,
            "seconds": outcome.seconds if outcome else None,
            **{k: t.params.get(k) for k in spec.space},
            "mlflow_run_id": outcome.mlflow_run_id if outcome else None,
            "note": (outcome.error or "")[:200] if outcome else "",
        }
        if "retry_of" in t.user_attrs:
            row["note"] = f"retry of trial {t.user_attrs['retry_of']}. {row['note']}".strip()
        key = (order[t.state], sign * value if value is not None else math.inf, t.number)
        rows.append((key, row))
    rows.sort(key=lambda kv: kv[0])
    return [{"rank": i + 1, **row} for i, (_, row) in enumerate(rows)]


@task(name="publish-leaderboard", cache_policy=NONE)
def publish_leaderboard(
    spec: SweepConfig, study: Any, rows: list[dict[str, Any]], parent_run_id: str
) -> dict[str, Any] | None:
    """The leaderboard as a Prefect table artifact and on the MLflow parent run (CSV and JSON
    artifacts, the best objective and trial as metrics, the best parameters as tags)."""
    import mlflow
    from optuna.trial import TrialState
    from prefect.artifacts import create_table_artifact

    key = "sweep-" + "".join(c if c.isalnum() else "-" for c in spec.name.lower())
    create_table_artifact(
        key=f"{key}-leaderboard",
        table=rows,
        description=(
            f"Sweep {spec.name}: {len(rows)} trials, best first by {spec.objective.name} "
            f"({spec.objective.direction}); MLflow parent run {parent_run_id}"
        ),
    )
    client = mlflow.MlflowClient(tracking_uri())
    text = io.StringIO()
    if rows:
        writer = csv.DictWriter(text, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    client.log_text(parent_run_id, text.getvalue(), "leaderboard.csv")
    client.log_dict(
        parent_run_id, {"metric": spec.objective.name, "rows": rows}, "leaderboard.json"
    )
    states = {s.name: 0 for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    for row in rows:
        states[row["state"]] += 1
    for state, n in states.items():
        client.log_metric(parent_run_id, f"trials/{state.lower()}", n)
    if not states["COMPLETE"]:
        return None
    best = study.best_trial
    client.log_metric(parent_run_id, "best/objective", best.value)
    client.log_metric(parent_run_id, "best/trial", best.number)
    client.set_tag(parent_run_id, "sweep.best_trial", str(best.number))
    client.set_tag(parent_run_id, "sweep.best_params", json.dumps(best.params))
    outcome = read_outcome(spec, best.number)
    return {
        "trial": best.number,
        "value": best.value,
        "params": best.params,
        "mlflow_run_id": outcome.mlflow_run_id if outcome else None,
        "model_uri": outcome.model_uri if outcome else None,
    }


@task(name="register-best", cache_policy=NONE)
def register_best(spec: SweepConfig, base: TrainConfig, best: dict[str, Any]) -> dict[str, Any]:
    """Register the best trial's model and point the alias (`@candidate`) at it; a rerun that finds
    the alias already on this trial's model registers nothing new."""
    import mlflow
    from mlflow.exceptions import MlflowException

    name = spec.registered_model or base.mlflow.registered_model or f"clip-{spec.name}"
    if not best.get("model_uri"):
        raise RuntimeError(
            f"best trial {best['trial']} logged no model (its outcome.json has no model_uri)"
        )
    client = mlflow.MlflowClient(tracking_uri())
    try:
        current = client.get_model_version_by_alias(name, spec.alias)
    except MlflowException:
        current = None
    if current is not None and current.tags.get("sweep.run_id") == best["mlflow_run_id"]:
        version = current
    else:
        mlflow.set_tracking_uri(tracking_uri())
        version = mlflow.register_model(
            best["model_uri"],
            name,
            tags={
                "sweep.study": spec.name,
                "sweep.trial": str(best["trial"]),
                "sweep.run_id": str(best["mlflow_run_id"]),
                "sweep.objective": f"{spec.objective.name}={best['value']:.6g}",
            },
        )
        client.set_registered_model_alias(name, spec.alias, version.version)
    get_run_logger().info(
        "registered %s version %s (trial %d) as @%s",
        name,
        version.version,
        best["trial"],
        spec.alias,
    )
    return {"name": name, "version": int(version.version), "alias": spec.alias}
