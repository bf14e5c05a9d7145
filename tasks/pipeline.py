"""The pipeline's one parameter model, its profiles, and the tasks around the stage flows.

A profile (configs/pipeline/NAME.yaml) is a `PipelineConfig`: one section per stage, each holding
that stage's own parameters. It is validated whole (the sections' filter spec, training config
and evaluation suite included) before any stage runs, so a typo fails in a second, naming the
field, not an hour into training.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from prefect import task
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from clip_model.precision import accepted_spellings, parse_precision
from tasks.ingest import CrawlParams

PROJECT = Path(__file__).resolve().parents[1]
PROFILES = PROJECT / "configs" / "pipeline"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SampleWebSection(_Section):
    """Generate the sample web and serve it on 127.0.0.1 while the crawl runs."""

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

    @model_validator(mode="after")
    def _has_urls(self) -> PipelineConfig:
        if self.sample_web is None and self.ingest.url_list is None:
            raise ValueError("ingest.url_list is required when there is no sample_web section")
        return self

    def path(self, stage: str) -> str:
        """The output folder of a stage: data_root/<stage>/<profile name>."""
        return str(Path(self.data_root) / stage / self.name)

    @property
    def sample_dir(self) -> str:
        return str(Path(self.data_root) / "sample_web")

    def train_items(self, data: str, data_digest: str = "") -> list[str]:
        """The training config overrides as `key=value` strings, data and out_dir included.

        Each (training section, input dataset) pair trains into its own folder, so a changed
        parameter never overwrites or prunes the checkpoints of an earlier run.
        """
        section = json.dumps([self.train.model_dump(mode="json"), data_digest], sort_keys=True)
        run = "run-" + hashlib.sha256(section.encode()).hexdigest()[:12]
        items = {
            "data": data,
            "out_dir": f"{self.path('train')}/{run}",
            **_dotted(self.train.settings),
        }
        if "eval.suite" in items and "eval.root" not in items:  # evaluate on the sample web
            items["eval.root"] = self.evaluate.root or self.sample_dir
        return [f"{k}={json.dumps(v)}" for k, v in items.items()]


def _dotted(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_dotted(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class ProfileError(ValueError):
    """A pipeline profile that does not validate; the message names the field."""


def profile_path(profile: str) -> Path:
    """A profile name (`tiny`) or a YAML path."""
    path = Path(profile)
    if path.suffix in (".yaml", ".yml"):
        return path
    named = PROFILES / f"{profile}.yaml"
    if not named.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILES.glob("*.yaml")))
        raise ProfileError(f"no pipeline profile {profile!r}; known: {known}, or a YAML path")
    return named


def load_profile(profile: str, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Read a profile and apply dotted overrides (`train.settings.max_steps`: 50)."""
    path = profile_path(profile)
    if not path.is_file():
        raise ProfileError(f"{path}: no such pipeline profile")
    data = yaml.safe_load(path.read_text()) or {}
    for key, value in (overrides or {}).items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        return with_project_paths(PipelineConfig.model_validate(data))
    except ValidationError as e:
        problems = "\n".join(
            f"  {'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()
        )
        raise ProfileError(f"{path}: invalid pipeline profile\n{problems}") from None


def with_project_paths(cfg: PipelineConfig) -> PipelineConfig:
    """Config files named relative to the project folder (`configs/...`) are found from anywhere."""

    def resolve(path: str | None) -> str | None:
        if path is None or Path(path).is_absolute() or Path(path).exists():
            return path
        in_project = PROJECT / path
        return str(in_project) if in_project.exists() else path

    cfg = cfg.model_copy(deep=True)
    cfg.curate.filters = resolve(cfg.curate.filters)
    cfg.train.config = resolve(cfg.train.config)
    cfg.evaluate.suite = resolve(cfg.evaluate.suite)
    if isinstance(cfg.train.settings.get("eval"), dict) and "suite" in cfg.train.settings["eval"]:
        cfg.train.settings["eval"]["suite"] = resolve(cfg.train.settings["eval"]["suite"])
    return cfg


@task(name="validate-stage-configs")
def validate_stage_configs(cfg: PipelineConfig) -> None:
    """Load every stage's own config now, so a bad one fails before any stage runs."""
    from clip_model.eval_suite import load_suite
    from clip_model.train import load_config
    from tasks.curation.spec import load_filter_spec

    load_filter_spec(cfg.curate.filters)
    load_config(cfg.train.config, cfg.train_items(data=cfg.path("curate")))
    load_suite(cfg.evaluate.suite, root=cfg.evaluate.root or cfg.sample_dir)


@task(name="prepare-sample-web")
def prepare_sample_web(section: SampleWebSection, out_dir: str) -> str:
    """Generate the sample web unless `out_dir` already holds it with these settings."""
    from tasks.sample_web import generate_sample_web

    marker = Path(out_dir) / ".settings.json"
    wanted = section.model_dump_json()
    if (
        marker.is_file()
        and marker.read_text() == wanted
        and (Path(out_dir) / "urls.parquet").is_file()
    ):
        return out_dir
    marker.unlink(missing_ok=True)
    generate_sample_web(
        out_dir,
        seed=section.seed,
        port=section.port,
        n_scenes=section.n_scenes,
        n_digits=section.n_digits,
        n_eval_per_class=section.n_eval_per_class,
        n_retrieval=section.n_retrieval,
    )
    marker.write_text(wanted)
    return out_dir


@contextlib.contextmanager
def url_list_for(cfg: PipelineConfig) -> Iterator[str]:
    """The URL list to crawl; with a sample web, served on its port for the duration."""
    if cfg.sample_web is None:
        yield cfg.ingest.url_list
        return
    from tasks.sample_web import serve_sample_web, write_url_list

    with serve_sample_web(cfg.sample_dir, port=cfg.sample_web.port) as base_url:
        if cfg.sample_web.port == 0:  # a free port: the list must name it
            yield str(
                write_url_list(
                    cfg.sample_dir, base_url, Path(cfg.sample_dir) / "urls_served.parquet"
                )
            )
        else:
            yield str(Path(cfg.sample_dir) / "urls.parquet")


def summary_markdown(
    cfg: PipelineConfig, stages: dict[str, Any], headline: dict[str, float], run_url: str
) -> str:
    lines = [
        f"# CLIP pipeline `{cfg.name}`",
        "",
        f"MLflow run: {run_url}",
        "",
        "| stage | output | done |",
        "|---|---|---|",
    ]
    for stage, result in stages.items():
        skipped = getattr(result, "skipped", False)
        where = (
            getattr(result, "dataset", None)
            or getattr(result, "checkpoint", None)
            or getattr(result, "output", "")
        )
        lines.append(f"| {stage} | `{where}` | {'reused' if skipped else 'ran'} |")
    lines += ["", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" for k, v in headline.items()]
    return "\n".join(lines)
