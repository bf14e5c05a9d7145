"""The Prefect tasks around the pipeline's stage flows: check the stage configs, the sample web.

The pipeline's parameter model (`PipelineConfig`) and its profiles live in tasks/params/pipeline.py,
a light module the command line validates with before anything starts; the names are importable
from here too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import task

from tasks.params.pipeline import (  # noqa: F401  (importable from here, as before)
    CurateSection,
    EvaluateSection,
    GoalsSection,
    IngestSection,
    PipelineConfig,
    ProfileError,
    SampleWebSection,
    TrainSection,
    check_stage_configs,
    load_profile,
    profile_path,
    with_project_paths,
)


@task(name="validate-stage-configs")
def validate_stage_configs(cfg: PipelineConfig) -> None:
    """Load every stage's own config now, so a bad one fails before any stage runs."""
    check_stage_configs(cfg)


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


def goal_line(
    goals: GoalsSection, metrics: dict[str, dict[str, float]], wall_seconds: float
) -> str:
    """One line: each goal of the profile, the run's figure beside it, met or MISSED."""
    parts, met = [], 0
    for key, floor in goals.metrics.items():
        task, _, metric = key.partition("/")
        value = metrics.get(task, {}).get(metric)
        if value is None:
            parts.append(f"{key} not measured (goal >= {floor:g}) MISSED")
            continue
        ok = value >= floor
        met += ok
        parts.append(
            f"{key} {value:.3f} {'>=' if ok else '<'} {floor:g} {'ok' if ok else 'MISSED'}"
        )
    if goals.wall_minutes is not None:
        ok = wall_seconds <= goals.wall_minutes * 60
        met += ok
        minutes, seconds = divmod(round(wall_seconds), 60)
        parts.append(
            f"wall {minutes}m{seconds:02d}s {'<=' if ok else '>'} {goals.wall_minutes:g} min "
            f"{'ok' if ok else 'MISSED'}"
        )
    total = len(goals.metrics) + (goals.wall_minutes is not None)
    return f"Goals: {met} of {total} met: " + "; ".join(parts)
