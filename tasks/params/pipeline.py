"""The pipeline's one parameter model (`PipelineConfig`), its profiles, and the command line's.

A profile (configs/pipeline/NAME.yaml) is a `PipelineConfig`: one section per stage, each holding
that stage's own parameters. It is validated whole (the sections' filter spec, training config
and evaluation suite included, `check_stage_configs`) before any stage runs, so a typo fails in
a second, naming the field and the file or `--set` item it came from, not an hour into training.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

import configs
from clip_model.precision import accepted_spellings, parse_precision
from configs import ConfigError
from configs.overrides import Override, apply_overrides, parse_overrides, validate
from storage.fs import is_local, join
from tasks.params import cli
from tasks.params.ingest import CrawlParams

__all__ = [
    "GoalsSection",
    "PipelineConfig",
    "PipelineParams",
    "ProfileError",
    "check_stage_configs",
    "load_profile",
    "profile_path",
    "with_project_paths",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SampleWebSection(_Section):
    """Generate the sample web and serve it on 127.0.0.1 while the crawl runs."""

    dir: str | None = Field(
        None,
        description="a local folder for it (it is served from disk); default: data_root/sample_web",
    )
    seed: int = 0
    port: int = Field(8765, ge=0, le=65535, description="fixed, so the URL list is stable")
    n_scenes: int = Field(1800, gt=0)
    n_digits: int = Field(1200, gt=0)
    n_eval_per_class: int = Field(50, gt=0)
    n_retrieval: int = Field(100, gt=0)


class IngestSection(_Section):
    url_list: str | None = Field(None, description="required unless sample_web is set")
    crawl: CrawlParams = Field(default_factory=CrawlParams)


class CurateSection(_Section):
    filters: str = Field(description="a filter spec YAML (configs/filters/)")
    eval_dirs: list[str] = Field(default_factory=list, description="decontaminate against these")
    num_shards: int | None = Field(None, gt=0)
    workers: int = Field(0, ge=0, description="processes for curation's per-shard work (0: inline)")
    engine: Literal["local", "ray"] = Field(
        "local", description="where curation's per-shard work runs (ray: a Ray cluster)"
    )
    ray_address: str | None = Field(
        None, description="engine ray: the cluster to join (auto, ray://HOST:10001)"
    )

    @model_validator(mode="after")
    def _address_needs_ray(self) -> CurateSection:
        if self.ray_address is not None and self.engine != "ray":
            raise ValueError(f"ray_address {self.ray_address} needs engine: ray")
        return self


class TrainSection(_Section):
    config: str | None = Field(None, description="a training config YAML (configs/train/)")
    settings: dict[str, Any] = Field(
        default_factory=dict, description="TrainConfig fields over the config (dotted keys ok)"
    )


class EvaluateSection(_Section):
    suite: str = Field(description="an evaluation suite YAML (configs/eval/)")
    root: str | None = Field(None, description="the suite's {root}; default: the sample web")
    tasks: list[str] | None = None
    precision: str = Field("fp32", description=f"one of {accepted_spellings()}")

    @field_validator("precision", mode="before")
    @classmethod
    def _precision(cls, value: Any) -> str:
        return parse_precision(value).name  # one name per behaviour (clip_model.precision)


class GoalsSection(_Section):
    """What a run of the profile should reach; `make sample` prints one line comparing them."""

    metrics: dict[str, float] = Field(
        default_factory=dict,
        description="'<task>/<metric>' of the evaluation (digits/acc1, "
        "retrieval/image_retrieval_recall@5) -> its minimum",
    )
    wall_minutes: float | None = Field(None, gt=0, description="the whole run's wall time, at most")

    @field_validator("metrics")
    @classmethod
    def _task_slash_metric(cls, value: dict[str, float]) -> dict[str, float]:
        for key in value:
            task, _, metric = key.partition("/")
            if not task or not metric:
                raise ValueError(f"{key!r}: expected '<task>/<metric>', e.g. 'digits/acc1'")
        return value


class PipelineConfig(_Section):
    """ingest -> curate -> train -> evaluate, each section that stage's parameters."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    data_root: str = Field("data", description="where every stage's output goes")
    sample_web: SampleWebSection | None = None
    ingest: IngestSection = Field(default_factory=IngestSection)
    curate: CurateSection
    train: TrainSection = Field(default_factory=TrainSection)
    evaluate: EvaluateSection
    goals: GoalsSection | None = None

    @model_validator(mode="after")
    def _has_urls(self) -> PipelineConfig:
        if self.sample_web is None and self.ingest.url_list is None:
            raise ValueError("ingest.url_list is required when there is no sample_web section")
        return self

    @model_validator(mode="after")
    def _sample_web_is_local(self) -> PipelineConfig:
        if self.sample_web is not None and not is_local(self.sample_dir):
            where = (
                f"it is {self.sample_web.dir}"
                if self.sample_web.dir
                else f"data_root is {self.data_root}"
            )
            raise ValueError(
                f"sample_web.dir: the sample web is generated and served from a local folder, and "
                f"{where}; set sample_web.dir to a local path"
            )
        return self

    def path(self, stage: str) -> str:
        """The output folder of a stage: data_root/<stage>/<profile name>, a local path or a URL
        (joined by storage.fs: `Path` would turn `s3://b` into `s3:/b`)."""
        return join(self.data_root, stage, self.name)

    @property
    def sample_dir(self) -> str:
        """The sample web's local folder (it is served over HTTP from disk)."""
        if self.sample_web is not None and self.sample_web.dir:
            return self.sample_web.dir
        return join(self.data_root, "sample_web")

    def train_items(self, data: str, data_digest: str = "") -> list[str]:
        """The training config overrides as `key=value` strings, data and out_dir included.

        Each (training section, input dataset) pair trains into its own folder, so a changed
        parameter never overwrites or prunes the checkpoints of an earlier run.
        """
        return [f"{o.key}={json.dumps(o.value)}" for o in self.train_overrides(data, data_digest)]

    def train_overrides(
        self, data: str, data_digest: str = "", origins: dict[str, str] | None = None
    ) -> list[Override]:
        """`train_items` as Overrides; `origins` maps a settings key to what to blame for it (the
        `--set` item that gave it), else the profile's `train.settings` is named."""
        # `resume` says how to continue a run, not which run it is: not part of the folder's name
        identity = self.train.model_dump(mode="json")
        identity["settings"] = {k: v for k, v in identity["settings"].items() if k != "resume"}
        section = json.dumps([identity, data_digest], sort_keys=True)
        run = "run-" + hashlib.sha256(section.encode()).hexdigest()[:12]
        origins = origins or {}
        items = [
            Override("data", data, "pipeline: the curated dataset"),
            Override("out_dir", f"{self.path('train')}/{run}", "pipeline: the training folder"),
        ]
        for key, value in _dotted(self.train.settings).items():
            origin = origins.get(key, f"profile {self.name}: train.settings.{key}")
            items.append(Override(key, value, origin))
        if "eval.suite" in {o.key for o in items} and "eval.root" not in {o.key for o in items}:
            items.append(  # evaluate on the sample web
                Override("eval.root", self.evaluate.root or self.sample_dir, "pipeline")
            )
        return items


def _dotted(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_dotted(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class ProfileError(ConfigError):
    """A pipeline profile that does not validate; the message names the field."""


def profile_path(profile: str) -> Path:
    """A profile name (`tiny`) or a YAML path."""
    try:
        return configs.locate(profile, "pipeline")
    except FileNotFoundError:
        if Path(profile).suffix in (".yaml", ".yml"):
            raise ProfileError(f"{profile}: no such pipeline profile file") from None
        known = ", ".join(configs.names("pipeline"))
        raise ProfileError(
            f"no pipeline profile {profile!r}; known: {known}, or a YAML path"
        ) from None


def load_profile(
    profile: str, overrides: dict[str, Any] | list[str | Override] | None = None
) -> PipelineConfig:
    """Read a profile and apply dotted overrides: a dict (`{"train.settings.max_steps": 50}`)
    or `--set` items (`["train.settings.max_steps=50"]`); an error blames the item at fault."""
    path = profile_path(profile)
    if isinstance(overrides, dict):
        items = [Override(k, v, f"{k}={v!r}") for k, v in overrides.items()]
    else:
        items = parse_overrides(overrides or [], flag="--set")
    try:
        data = yaml.safe_load(path.read_text("utf-8")) or {}
        cfg = validate(
            PipelineConfig, apply_overrides(data, items), source=profile, overrides=items
        )
    except yaml.YAMLError as e:
        raise ProfileError(f"{profile}: not valid YAML ({str(e).splitlines()[0]})") from None
    except ConfigError as e:
        raise ProfileError(str(e)) from None
    return with_project_paths(cfg)


def with_project_paths(cfg: PipelineConfig) -> PipelineConfig:
    """Config files named relative to the project (`configs/...`) or by preset name are found
    from anywhere, installed or not (configs.locate); other paths are left as they are."""

    def resolve(path: str | None, kind: str) -> str | None:
        if path is None or Path(path).is_absolute() or Path(path).exists():
            return path
        try:
            return str(configs.locate(path, kind))
        except FileNotFoundError:
            return path  # the stage's own loader names it

    cfg = cfg.model_copy(deep=True)
    cfg.curate.filters = resolve(cfg.curate.filters, "filters")
    cfg.train.config = resolve(cfg.train.config, "train")
    cfg.evaluate.suite = resolve(cfg.evaluate.suite, "eval")
    if isinstance(cfg.train.settings.get("eval"), dict) and "suite" in cfg.train.settings["eval"]:
        cfg.train.settings["eval"]["suite"] = resolve(cfg.train.settings["eval"]["suite"], "eval")
    return cfg


def check_stage_configs(cfg: PipelineConfig, overrides: list[Override] = ()) -> None:
    """Load every stage's own config now (filter spec, training config, eval suite, URL list
    columns), so a bad one fails before any stage runs. `overrides`: the `--set` items the
    profile was loaded with, so a training setting is blamed on the item that gave it."""
    from clip_model.eval_suite import load_suite
    from clip_model.train_config import load_config
    from tasks.curation.spec import load_filter_spec
    from tasks.params.ingest import check_columns, url_list_columns

    load_filter_spec(cfg.curate.filters)
    origins = {}
    for o in overrides:
        if o.key == "train.settings":
            origins.update(
                {k: o.origin for k in _dotted(o.value if isinstance(o.value, dict) else {})}
            )
        elif (inner := o.under("train.settings")) is not None:
            origins.update({k: o.origin for k in _dotted({inner.key: inner.value})})
    load_config(cfg.train.config, cfg.train_overrides(cfg.path("curate"), origins=origins))
    load_suite(cfg.evaluate.suite, root=cfg.evaluate.root or cfg.sample_dir)
    if cfg.sample_web is None and cfg.ingest.url_list is not None:
        url_list = cfg.ingest.url_list
        check_columns(url_list, url_list_columns(url_list), cfg.ingest.crawl)


class PipelineParams(BaseModel):
    """The `pipeline` command line: a profile and `--set` overrides of its fields."""

    model_config = ConfigDict(extra="forbid")

    profile: str = Field(
        "tiny",
        description=f"a profile in configs/pipeline/ ({', '.join(configs.names('pipeline'))}) "
        "or a YAML path",
    )
    overrides: list[str] = Field(
        default_factory=list,
        description="override a profile field, e.g. train.settings.max_steps=50 (a YAML value; "
        "repeatable)",
        json_schema_extra=cli("--set", repeat=True, metavar="KEY=VALUE"),
    )
    _config: PipelineConfig | None = PrivateAttr(None)

    def config(self) -> PipelineConfig:
        """The profile with the overrides applied, validated (ProfileError names the field)."""
        if self._config is None:
            self._config = load_profile(self.profile, self.overrides)
        return self._config

    def check(self) -> None:
        items = parse_overrides(self.overrides, flag="--set")
        check_stage_configs(self.config(), items)
