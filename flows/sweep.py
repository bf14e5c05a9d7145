"""The `sweep` flow: an Optuna search over training (and model) settings, compared in MLflow.

    python -m flows.sweep --config configs/sweep/tiny.yaml
    python -m flows.sweep --config tiny --data data/curate/tiny --trials 30 --concurrency 2 \\
        --set settings.max_steps=300 --set pruner.name=none

The config (tasks/sweep_config.py) names a base training config, a search space over its keys,
the objective (a val/ metric or an in-training zero-shot metric), the sampler (TPE, random or a
grid) and the pruner. Every trial is `python -m clip_model.train` in a subprocess (a task on the
flow's thread pool: `concurrency` at a time, torch threads split between them) whose MLflow run
is a child of the sweep's parent run, and which reports the objective to the study as it trains so
the pruner can stop it. When the trials are done, the leaderboard becomes a Prefect table artifact
and artifacts of the parent run, and the best trial's model is registered with the alias
`@candidate`. The study lives in the sweep's folder: run the same command again after a crash and
the study continues, finished trials kept, interrupted ones run again.
"""

from __future__ import annotations

if __name__ == "__main__":  # parse and check the command line before the imports below
    from flows.cli import main

    raise SystemExit(main("sweep"))

from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from flows import cli
from storage import open_dataset
from tasks.params.sweep import SweepParams
from tasks.sweep import (
    SweepResult,
    TrialOutcome,
    leaderboard,
    open_study,
    publish_leaderboard,
    record_trial,
    recover_interrupted,
    register_best,
    run_trial,
    sweep_key,
    sweep_lock,
    sweep_parent_run,
    trials_left,
)
from tasks.sweep_config import SweepConfig, distributions, validate_sweep


def run_trials(spec: SweepConfig, study: Any, parent_run_id: str) -> int:
    """Ask, train, tell until the study has its trials; at most `concurrency` at a time.

    Returns how many trials failed in this run. Stops asking when more than `max_failures` failed.
    """
    logger = get_run_logger()
    space = distributions(spec)
    threads = spec.threads()
    running: dict[Any, int] = {}
    failures = 0
    while True:
        while len(running) < spec.concurrency and failures <= spec.max_failures:
            left, waiting = trials_left(spec, study)
            if left <= 0 and not waiting:
                break
            trial = study.ask(space)  # a queued retry first, else the sampler's next point
            future = run_trial.submit(spec, trial.number, trial.params, parent_run_id, threads)
            running[future] = trial.number
        if not running:
            return failures
        future = next(as_completed(list(running)))
        number = running.pop(future)
        try:
            outcome = future.result()
        except Exception as error:  # noqa: BLE001 - a bug in one trial's task: that trial fails
            outcome = TrialOutcome(number=number, state="FAIL", error=repr(error))
        record_trial(spec, study, number, outcome, parent_run_id)
        if outcome.state == "FAIL":
            failures += 1
            logger.warning("trial %d failed: %s", number, (outcome.error or "")[-2000:])


@flow(name="sweep", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=32))
def sweep(
    config: str = "tiny",
    data: str | None = None,
    out_dir: str | None = None,
    trials: int | None = None,
    concurrency: int | None = None,
    settings: list[str] | None = None,
) -> SweepResult:
    """Run (or continue) the sweep `config` (a name in configs/sweep/ or a YAML path) with these
    options and `settings` (`key=value` items over the sweep config's fields)."""
    params = SweepParams(
        config=config,
        data=data,
        out_dir=out_dir,
        trials=trials,
        concurrency=concurrency,
        settings=settings,
    )
    spec = params.spec()
    base = validate_sweep(spec)
    dataset = open_dataset(base.data)
    with sweep_lock(spec.output):
        study = open_study(spec, sweep_key(spec, base, dataset.digest))
        with sweep_parent_run(spec, study, dataset) as parent_run_id:
            recover_interrupted(spec, study, parent_run_id)
            failures = run_trials(spec, study, parent_run_id)
            rows = leaderboard(spec, study)
            best = publish_leaderboard(spec, study, rows, parent_run_id)
            if failures > spec.max_failures:
                raise RuntimeError(
                    f"sweep {spec.name} stopped: {failures} trials failed (max_failures="
                    f"{spec.max_failures}); their errors are in the leaderboard and the log"
                )
            if best is None:
                raise RuntimeError(f"sweep {spec.name}: no trial completed; see the leaderboard")
            registered = register_best(spec, base, best)
    states: dict[str, int] = {}
    for row in rows:
        states[row["state"]] = states.get(row["state"], 0) + 1
    print(
        f"sweep {spec.name}: {states}; best trial {best['trial']} "
        f"{spec.objective.name}={best['value']:.4g} {best['params']}; registered "
        f"{registered['name']} v{registered['version']} @{registered['alias']}"
    )
    return SweepResult(
        name=spec.name,
        out_dir=spec.output,
        storage=spec.storage_url,
        mlflow_parent_run_id=parent_run_id,
        trials=states,
        best=best,
        registered=registered,
        leaderboard=rows,
    )


def format_leaderboard(rows: list[dict[str, Any]]) -> str:
    """The leaderboard as aligned text (the MLflow run ids and notes are in the artifacts)."""
    columns = [c for c in rows[0] if c not in ("mlflow_run_id", "note")] if rows else []

    def cell(value: Any) -> str:
        return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)

    table = [columns, *([cell(row[c]) for c in columns] for row in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)) for line in table
    )


def run(params: SweepParams) -> int:
    """The command line's work, after flows/cli.py parsed and checked it."""
    result = sweep(**params.model_dump())
    print(f"\nsweep {result.name}, MLflow parent run {result.mlflow_parent_run_id}:")
    print(format_leaderboard(result.leaderboard))
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.main("sweep", argv)
