"""A sweep's config: a search space over training (and model) settings, its objective and sampler.

`configs/sweep/<name>.yaml` is a `SweepConfig`:

    name: tiny                        # the Optuna study and the MLflow parent run
    train: configs/train/tiny.yaml    # the base training config every trial starts from
    data: data/curate/tiny            # optional: the base config's `data` otherwise
    settings: {max_steps: 300}        # fixed TrainConfig overrides (nested or dotted keys)
    space:                            # dotted TrainConfig keys; model_overrides.* reach the model
      lr: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}
      warmup_steps: {type: int, low: 0, high: 100, step: 25}
      batch_size: [32, 64, 128]       # a list is a categorical choice
    objective: {metric: val/loss, direction: minimize}
    sampler: tpe                      # tpe | random | grid (grid: every parameter a list)
    pruner: {name: median, args: {n_startup_trials: 3, n_warmup_steps: 100}}
    trials: 20
    concurrency: 2                    # trials at a time; torch threads split between them

Everything is checked before the first trial starts (`validate_sweep`): unknown keys anywhere are
refused by name, and every value the space can take (range ends, every choice) is applied to the
base training config and validated by `TrainConfig` and `ModelConfig`, so a typo in a key or an
impossible value fails in a second, not an hour into the sweep. Keys the sweep sets itself
(out_dir, mlflow.*, optuna.*, cpu_threads, resume) may not be swept or set.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

import configs
from clip_model.study import metric_names, objective_name
from clip_model.train_config import ConfigError, TrainConfig, load_config
from configs.overrides import Override, load, parse_overrides

__all__ = [
    "SweepConfig",
    "SweepConfigError",
    "dotted",
    "load_sweep",
    "trial_train_config",
    "validate_sweep",
]

# set by the sweep for every trial: never swept, never in `settings`
RESERVED = ("out_dir", "checkpoint_dir", "resume", "cpu_threads", "mlflow", "optuna")
Scalar = None | bool | int | float | str


class SweepConfigError(ConfigError):
    """A sweep config that cannot run; the message names the file and the field at fault."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FloatParam(_Strict):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _range(self) -> FloatParam:
        if self.low > self.high:
            raise ValueError(f"low={self.low} is above high={self.high}")
        if self.log and (self.low <= 0 or self.step is not None):
            raise ValueError("log: true needs low > 0 and no step")
        return self

    def values(self) -> list[Any]:
        return [self.low, self.high]


class IntParam(_Strict):
    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = Field(1, gt=0)

    @model_validator(mode="after")
    def _range(self) -> IntParam:
        if self.low > self.high:
            raise ValueError(f"low={self.low} is above high={self.high}")
        if self.log and (self.low <= 0 or self.step != 1):
            raise ValueError("log: true needs low > 0 and step 1")
        return self

    def values(self) -> list[Any]:
        return [self.low, self.high]


class CategoricalParam(_Strict):
    type: Literal["categorical"]
    choices: list[Scalar] = Field(min_length=1)

    def values(self) -> list[Any]:
        return list(self.choices)


Param = Annotated[FloatParam | IntParam | CategoricalParam, Field(discriminator="type")]


class Objective(_Strict):
    """What the sweep optimises: a metric of the trial's final metrics (also its pruning signal).

    `val/...`: the held-out contrastive loss or retrieval recall (reported after each in-training
    validation, every `val_every_n_steps`); `<task>/<metric>` (e.g. `digits/acc1`): the zero-shot
    evaluation during training (the training config's `eval:` section).
    """

    metric: str | list[str] = "val/loss"  # a list: their mean (digits/acc1, shapes/acc1)
    direction: Literal["minimize", "maximize"] | None = None  # None: minimize a *loss* metric

    @model_validator(mode="after")
    def _direction(self) -> Objective:
        names = metric_names(self.metric)
        if len({n.startswith("val/") for n in names}) > 1:
            raise ValueError(
                f"metric {names}: mixes val/ and zero-shot metrics, measured at different steps"
            )
        if self.direction is None:
            if not all("loss" in n for n in names):
                raise ValueError(
                    f"direction: say minimize or maximize for metric {self.metric!r} (only a "
                    "loss is minimised by default)"
                )
            self.direction = "minimize"
        return self

    @property
    def name(self) -> str:
        return objective_name(self.metric)

    @property
    def names(self) -> list[str]:
        return metric_names(self.metric)


class PrunerConfig(_Strict):
    name: str = "median"  # clip_model.study.PRUNERS: none, median, percentile, threshold, ...
    args: dict[str, Any] = Field(default_factory=dict)


class SweepConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    train: str  # the base training config YAML
    data: str | None = None  # over the base config's `data`
    settings: dict[str, Any] = Field(default_factory=dict)  # fixed TrainConfig overrides
    space: dict[str, Param] = Field(min_length=1)
    objective: Objective = Field(default_factory=Objective)
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    sampler_args: dict[str, Any] = Field(default_factory=dict)  # e.g. tpe: n_startup_trials
    pruner: PrunerConfig = Field(default_factory=PrunerConfig)
    seed: int = 0
    trials: int | None = Field(None, gt=0)  # default (grid only): the grid's size
    concurrency: int = Field(1, gt=0)  # trials at a time
    threads_per_trial: int | None = Field(None, gt=0)  # default: the CPUs / concurrency
    max_failures: int = Field(3, ge=0)  # failed trials tolerated before the sweep stops
    out_dir: str | None = None  # default: data/sweep/<name>
    storage: str | None = None  # Optuna storage; default: a journal file in out_dir
    registered_model: str | None = None  # default: the base config's, else clip-<name>
    alias: str = Field("candidate", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")
    _source: str = PrivateAttr("sweep config")  # the file it was read from, for messages
    _origins: dict[str, str] = PrivateAttr(default_factory=dict)  # override key -> its origin

    @field_validator("space", mode="before")
    @classmethod
    def _lists_are_choices(cls, space: Any) -> Any:
        """A list is a categorical choice; a mapping without `type` is a section whose keys are
        dotted below it (`model_overrides: {vision_width: [128, 256]}`, which is what
        `--set space.model_overrides.vision_width=[128,256]` gives)."""
        if not isinstance(space, dict):
            return space
        flat: dict[str, Any] = {}
        for key, value in space.items():
            if isinstance(value, list):
                flat[key] = {"type": "categorical", "choices": value}
            elif isinstance(value, dict) and value and "type" not in value:
                for inner, param in cls._lists_are_choices(value).items():
                    flat[f"{key}.{inner}"] = param
            else:
                flat[key] = value
        return flat

    @model_validator(mode="after")
    def _consistent(self) -> SweepConfig:
        for where, keys in (("space", self.space), ("settings", dotted(self.settings))):
            for key in keys:
                if key.split(".")[0] in RESERVED:
                    raise ValueError(
                        f"{where}.{key}: set by the sweep for every trial ({', '.join(RESERVED)} "
                        "are); use threads_per_trial for cpu_threads"
                    )
        if self.sampler == "grid":
            ranges = [k for k, p in self.space.items() if not isinstance(p, CategoricalParam)]
            if ranges:
                raise ValueError(
                    f"sampler grid needs a list of values for every parameter; {', '.join(ranges)} "
                    "are ranges (write e.g. lr: [1.0e-4, 3.0e-4])"
                )
            if self.trials is None or self.trials > self.grid_size:
                self.trials = self.grid_size
        elif self.trials is None:
            raise ValueError(f"trials: how many trials the {self.sampler} sampler runs")
        if self.storage is None and "://" in self.output:
            raise ValueError(
                f"out_dir {self.output} is not a local folder: give `storage` (an Optuna RDB URL)"
            )
        return self

    @property
    def grid_size(self) -> int:
        size = 1
        for param in self.space.values():
            size *= len(param.values())
        return size

    @property
    def output(self) -> str:
        return self.out_dir or f"data/sweep/{self.name}"

    @property
    def storage_url(self) -> str:
        return self.storage or str(Path(self.output) / "study.journal")

    def threads(self) -> int:
        """Torch threads per trial: the CPUs this process may use, split between the trials."""
        if self.threads_per_trial:
            return self.threads_per_trial
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return max(1, (cpus or 1) // self.concurrency)

    def trial_dir(self, number: int) -> str:
        return str(Path(self.output) / "trials" / f"{number:04d}")


def dotted(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys: {"checkpoint": {"keep_last": 1}} -> {"checkpoint.keep_last"}.

    `model_overrides` stays whole below its own key (`model_overrides.vision_width`).
    """
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _resolve(path: str, kind: str) -> str:
    """A config named relative to the project (`configs/...`) or by preset name, found from any
    folder, installed or not (configs.locate); other paths are left to their loader to refuse."""
    if Path(path).is_absolute() or Path(path).exists():
        return path
    try:
        return str(configs.locate(path, kind))
    except FileNotFoundError:
        return path


def load_sweep(config: str, overrides: Sequence[str | Override] = ()) -> SweepConfig:
    """A sweep config (a name in configs/sweep/ or a YAML path) with `key=value` overrides of its
    fields (`trials=30`, `settings.max_steps=50`), validated; SweepConfigError is one line naming
    the field and the file or override it came from."""
    items = parse_overrides(overrides, flag="--set")
    try:
        spec = load(SweepConfig, config, kind="sweep", overrides=items)
    except ConfigError as error:
        raise SweepConfigError(str(error)) from None
    settings = spec.settings
    if isinstance(settings.get("eval"), dict) and "suite" in settings["eval"]:
        suite = _resolve(settings["eval"]["suite"], "eval")
        settings = {**settings, "eval": {**settings["eval"], "suite": suite}}
    spec = spec.model_copy(update={"train": _resolve(spec.train, "train"), "settings": settings})
    spec._source = str(config)
    spec._origins = {o.key: o.origin for o in items}
    return spec


def _origin(spec: SweepConfig, key: str) -> str:
    """What to blame for the sweep config's field `key` (dotted): the override that set it (or a
    section above it), else the config file."""
    touching = [k for k in spec._origins if key == k or key.startswith(k + ".")]
    if touching:
        return spec._origins[max(touching, key=len)]
    return f"{spec._source}: {key}"


def _base_items(spec: SweepConfig) -> list[Override]:
    """The base training config's overrides every trial shares: data, then `settings`."""
    items = [Override("data", spec.data, _origin(spec, "data"))] if spec.data else []
    for key, value in dotted(spec.settings).items():
        items.append(Override(key, value, _origin(spec, f"settings.{key}")))
    return items


def _check_model(cfg: TrainConfig) -> None:
    """The model the trial would build (preset + model_overrides), as clip_model.train builds it."""
    from clip_model.config import ModelConfig

    base = ModelConfig.load(cfg.model)
    ModelConfig(**{**base.model_dump(), **cfg.model_overrides})


def _train_config(spec: SweepConfig, items: Sequence[Override], blame: str) -> TrainConfig:
    """The base config with the shared items and `items`, validated with its model; a failure
    is one SweepConfigError line (a model problem blamed on `blame`)."""
    try:
        own = {o.key for o in items}  # a swept key replaces a setting of the same key
        shared = [o for o in _base_items(spec) if o.key not in own]
        cfg = load_config(spec.train, [*shared, *items])
    except ConfigError as error:
        raise SweepConfigError(str(error)) from None
    try:
        _check_model(cfg)
    except (ValidationError, ValueError) as error:
        if isinstance(error, ValidationError):
            text = "; ".join(e["msg"].removeprefix("Value error, ") for e in error.errors())
        else:
            text = str(error)
        raise SweepConfigError(
            f"{blame}: model {cfg.model} with model_overrides {cfg.model_overrides}: {text}"
        ) from None
    return cfg


def validate_sweep(spec: SweepConfig) -> TrainConfig:
    """Check every setting the sweep can give a trial; returns the base training config.

    Each value a parameter can take (range ends, every choice) is applied alone to the base config
    and validated; a grid small enough is validated combination by combination.
    """
    from clip_model.study import make_pruner

    source = spec._source
    base = _train_config(spec, [], f"{source}: settings")
    for key, param in spec.space.items():
        for value in param.values():
            where = _origin(spec, f"space.{key}")
            blame = (
                f"{where}={value!r}" if where.endswith(f"space.{key}") else f"{where}: {value!r}"
            )
            _train_config(spec, [Override(key, value, blame)], blame)
    try:
        make_pruner(spec.pruner.name, spec.pruner.args)
        make_sampler(spec, n_existing=0)
    except ValueError as error:
        raise SweepConfigError(f"{source}: {error}") from None
    metric = spec.objective.name
    evaluated: list[str] = []
    if base.eval is not None:  # the suite the trials evaluate during training: it must load
        from clip_model.eval_suite import EvalSuiteError, load_suite, quick_suite

        try:
            suite = load_suite(base.eval.suite, root=base.eval.root)
            evaluated = [t.name for t in quick_suite(suite, tasks=base.eval.tasks).tasks]
        except (EvalSuiteError, ValueError) as error:
            raise SweepConfigError(f"{_origin(spec, 'settings.eval')}: {error}") from None
    if spec.objective.names[0].startswith("val/"):
        if spec.pruner.name != "none" and base.val_every_n_steps is None:
            raise SweepConfigError(
                f"{source}: pruning on {metric} needs validation during training: set "
                "settings.val_every_n_steps (or pruner: {name: none})"
            )
        return base
    if base.eval is None:
        raise SweepConfigError(
            f"{source}: objective.metric {metric!r} is not a val/ metric, so it comes from the "
            "zero-shot evaluation during training: set settings.eval (suite, root, every_n_steps, "
            "tasks)"
        )
    for name in spec.objective.names:
        task = name.split("/")[0]
        if task not in evaluated:
            raise SweepConfigError(
                f"{source}: objective.metric {name!r}: task {task!r} is not evaluated during "
                f"training (settings.eval evaluates {', '.join(evaluated)})"
            )
    return base


def make_sampler(spec: SweepConfig, *, n_existing: int) -> Any:
    """The Optuna sampler. A resumed TPE or random sampler is seeded past the trials it has
    (seed + trials so far), so it does not replay the first run's random draws."""
    import optuna

    args = dict(spec.sampler_args)
    try:
        if spec.sampler == "grid":
            space = {k: p.values() for k, p in spec.space.items()}
            return optuna.samplers.GridSampler(space, seed=spec.seed, **args)
        cls = optuna.samplers.TPESampler if spec.sampler == "tpe" else optuna.samplers.RandomSampler
        return cls(seed=spec.seed + n_existing, **args)
    except TypeError as error:
        raise ValueError(f"sampler_args {args} for the {spec.sampler} sampler: {error}") from None


def distributions(spec: SweepConfig) -> dict[str, Any]:
    """The space as Optuna distributions, keyed by the dotted TrainConfig key."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    out: dict[str, Any] = {}
    for key, p in spec.space.items():
        if isinstance(p, FloatParam):
            out[key] = FloatDistribution(p.low, p.high, log=p.log, step=p.step)
        elif isinstance(p, IntParam):
            out[key] = IntDistribution(p.low, p.high, log=p.log, step=p.step)
        else:
            out[key] = CategoricalDistribution(p.choices)
    return out


def trial_train_config(
    spec: SweepConfig,
    *,
    number: int,
    params: dict[str, Any],
    parent_run_id: str,
    tracking_uri: str,
    threads: int,
) -> TrainConfig:
    """Trial `number`'s training config: the base, `settings`, its sampled `params`, and what the
    sweep sets (its folder, MLflow child run, Optuna reporting, torch threads)."""
    sampled = [Override(k, v, f"trial {number}: {k}={v!r}") for k, v in params.items()]
    own = {
        "out_dir": spec.trial_dir(number),
        "cpu_threads": threads,
        "resume": None,
        "mlflow.enabled": True,
        "mlflow.tracking_uri": tracking_uri,
        "mlflow.parent_run_id": parent_run_id,
        "mlflow.run_name": f"trial-{number}",
        "mlflow.log_model": True,  # the best trial's model is registered from its run
        "mlflow.registered_model": None,
        "optuna.storage": spec.storage_url,
        "optuna.study": spec.name,
        "optuna.trial": number,
        "optuna.metric": spec.objective.metric,
        "optuna.pruner": spec.pruner.name,
        "optuna.pruner_args": spec.pruner.args,
    }
    items = [*sampled, *(Override(k, v, "the sweep") for k, v in own.items())]
    return _train_config(spec, items, f"trial {number} {params}")
