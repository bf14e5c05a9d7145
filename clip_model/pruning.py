"""Optuna pruning from inside a training run: report the objective as it evolves, stop when pruned.

A hyper-parameter sweep (flows/sweep.py) runs each trial as its own `python -m clip_model.train`
process, so the trial's intermediate values must reach the study through its storage, not through
an in-process `optuna.Trial`. The training config's `optuna:` section names the study (storage URL
or journal file, study name), the trial number, the metric, and the pruner; `OptunaPruning` then

- after every in-training validation (`val/...` metrics, every `val_every_n_steps`) or every
  zero-shot evaluation of `ZeroShotEvalCallback` (`<task>/<metric>`, every `eval.every_n_steps`),
  reports the metric at the current optimizer step (rank 0 only);
- asks the pruner (built here from its name and arguments: the pruner is not part of the
  study's storage, so each process must build the same one) whether to stop;
- when pruned, writes `out_dir/pruned.json` (step, value, MLflow run id) and raises
  `optuna.TrialPruned` on every rank: the process exits non-zero without logging a model, and the
  sweep, finding `pruned.json`, records the trial as PRUNED.

Optuna is imported lazily: a training without an `optuna:` section never needs it. The storage
and pruner are built by clip_model/study.py, which the sweep's side shares.
"""

from __future__ import annotations

import json
import math
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from clip_model.study import (
    PRUNED_FILE,
    make_pruner,
    metric_names,
    objective_name,
    objective_value,
    open_storage,
)
from storage.fs import atomic_write_bytes

__all__ = ["PRUNED_FILE", "OptunaPruning"]


class OptunaPruning(Callback):
    """Report `metric` to trial `trial` of study `study` after each evaluation; stop when pruned.

    `metric` is a validation metric (`val/loss`, reported after each in-training validation) or a
    zero-shot metric of a `ZeroShotEvalCallback` registered before this callback (reported after
    each of its evaluations); a list of them reports their mean. `marker` is the file written when
    the trial is pruned.
    """

    def __init__(
        self,
        *,
        storage: str,
        study: str,
        trial: int,
        metric: str | list[str],
        pruner: str = "none",
        pruner_args: dict[str, Any] | None = None,
        marker: str,
    ):
        make_pruner(pruner, pruner_args)  # a bad pruner fails before training, on every rank
        self.storage, self.study_name, self.number = storage, study, trial
        self.metric, self.pruner, self.pruner_args = metric, pruner, dict(pruner_args or {})
        self.name = objective_name(metric)
        self.marker = marker
        sources = {name.startswith("val/") for name in metric_names(metric)}
        if len(sources) > 1:
            raise ValueError(
                f"optuna.metric={metric}: mixes val/ metrics and zero-shot metrics, which are "
                "measured at different steps; take them from one source"
            )
        self.from_validation = sources == {True}
        self.reported: list[tuple[int, float]] = []  # (step, value), rank 0
        self._checked_step = -1  # every rank: with gradient accumulation a step spans batches
        self._trial: Any = None

    # ---- the trial, on rank 0 -------------------------------------------------------------

    def _open_trial(self) -> Any:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = open_storage(self.storage)
        try:
            study_id = storage.get_study_id_from_name(self.study_name)
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, self.number)
        except KeyError as error:
            raise ValueError(
                f"optuna: no trial {self.number} of study {self.study_name!r} in {self.storage} "
                f"({error})"
            ) from None
        state = storage.get_trial(trial_id).state
        if state != optuna.trial.TrialState.RUNNING:
            raise ValueError(
                f"optuna: trial {self.number} of study {self.study_name!r} is {state.name}, not "
                "RUNNING: it cannot take reports (was the sweep restarted meanwhile?)"
            )
        study = optuna.load_study(
            study_name=self.study_name,
            storage=storage,
            sampler=optuna.samplers.RandomSampler(),  # never samples here; only the pruner acts
            pruner=make_pruner(self.pruner, self.pruner_args),
        )
        return optuna.trial.Trial(study, trial_id)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not self.from_validation and self._eval_callback(trainer) is None:
            raise ValueError(
                f"optuna.metric={self.name!r} is not a val/ metric, so it must come from the "
                "zero-shot evaluation during training: set the config's eval: section"
            )
        if trainer.is_global_zero:  # a wrong study or trial fails now, not at the first report
            self._trial = self._open_trial()

    @staticmethod
    def _eval_callback(trainer: L.Trainer) -> Any:
        from clip_model.eval_callback import ZeroShotEvalCallback

        for callback in trainer.callbacks:
            if isinstance(callback, ZeroShotEvalCallback):
                return callback
        return None

    # ---- when: after each evaluation while fitting ------------------------------------------

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the validation after fit (trainer.validate) is no longer prunable
        if self.from_validation and trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._check(trainer, lambda: objective_value(trainer.callback_metrics, self.metric))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if self.from_validation:
            return
        evaluator = self._eval_callback(trainer)
        step = trainer.global_step
        # the evaluator runs first (it is registered first) and marks the step it evaluated on
        # every rank; its metrics live on rank 0 only
        if evaluator.last_step != step or self._checked_step >= step:
            return

        def value() -> Any:
            history = evaluator.history
            if not history or history[-1][0] != step:
                return None
            return objective_value(history[-1][1], self.metric)

        self._check(trainer, value)

    # ---- report, decide on rank 0, stop on every rank ---------------------------------------

    def _check(self, trainer: L.Trainer, read) -> None:
        step = self._checked_step = trainer.global_step
        pruned = False
        if trainer.is_global_zero:
            value = read()
            if value is None:
                known = sorted(trainer.callback_metrics) if self.from_validation else []
                raise ValueError(
                    f"optuna.metric={self.name!r} was not among the metrics of the evaluation "
                    f"at step {step}" + (f" (it had {', '.join(known)})" if known else "")
                )
            value = float(value)
            self._trial.report(value, step)
            self.reported.append((step, value))
            pruned = math.isnan(value) or self._trial.should_prune()
            if pruned:
                run_id = next((getattr(lg, "run_id", None) for lg in trainer.loggers), None)
                record = {
                    "trial": self.number,
                    "step": step,
                    "metric": self.name,
                    "value": value,
                    "mlflow_run_id": run_id,
                }
                atomic_write_bytes(self.marker, json.dumps(record, indent=2).encode())
                print(
                    f"step {step} optuna: trial {self.number} pruned ({self.name}={value:.4g})",
                    flush=True,
                )
        if trainer.world_size > 1:  # every rank stops together, or the others hang in a collective
            pruned = trainer.strategy.broadcast(pruned, src=0)
        if pruned:
            import optuna

            raise optuna.TrialPruned(f"trial {self.number} pruned at step {step}")
