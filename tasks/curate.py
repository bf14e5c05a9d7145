"""Prefect tasks of the `curate` flow; the work itself lives in `tasks.curation` (no Prefect).

load_input -> select -> write -> publish_report
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from pydantic import BaseModel

from storage import Dataset, Manifest
from tasks.curation.near_dup import eval_sets_digest
from tasks.curation.run import Selection, existing_output, open_input, select_samples
from tasks.curation.spec import FilterSpec
from tasks.curation.write import write_curated
from tasks.engine import Engine

__all__ = [
    "CurateResult",
    "curation_inputs",
    "curation_parameters",
    "existing_output",
    "filter_table",
    "load_input",
    "publish_report",
    "select",
    "write",
]


class CurateResult(BaseModel):
    dataset: str
    digest: str
    input_samples: int
    kept: int  # training samples + validation samples
    val_samples: int = 0
    val_dataset: str | None = None  # <dataset>/val, when any sample is held out
    removed: dict[str, int]
    rejected: str
    mlflow_run_id: str | None = None
    skipped: bool = False


def curation_inputs(input_url: str, spec: FilterSpec) -> list[str]:
    """Everything curation reads: the input dataset and the evaluation folders it decontaminates
    against (the output may alias none of them, docs/stage-outputs.md)."""
    near = spec.get("near_duplicates")
    return [input_url, *(near.eval_dirs if near is not None else [])]


def curation_parameters(spec: FilterSpec) -> dict[str, Any]:
    """What the output manifest records as its producer's parameters (and the skip check compares):
    the spec, and a content digest of every evaluation folder it decontaminates against."""
    near = spec.get("near_duplicates")
    return {
        "spec": spec.model_dump(mode="json"),
        "eval_sets": eval_sets_digest(near.eval_dirs) if near is not None else [],
    }


@task(name="open-curation-input", cache_policy=NONE)
def load_input(url: str) -> tuple[Dataset, dict[str, str]]:
    """Open the input dataset (damaged tars are reported, not fatal)."""
    return open_input(url, log=get_run_logger().warning)


@task(name="select-samples", cache_policy=NONE)
def select(
    ds: Dataset, spec: FilterSpec, bad_shards: dict[str, str], engine: Engine, progress: bool
) -> Selection:
    """Apply the spec's filters in order; every input sample is kept or dropped with a reason.
    The per-shard work is one task per input shard on `engine`."""
    get_run_logger().info("curate: per-shard work %s", engine.describe())
    return select_samples(
        ds,
        spec,
        bad_shards=bad_shards,
        engine=engine,
        progress=progress,
        log=get_run_logger().info,
    )


@task(name="write-curated", cache_policy=NONE)
def write(
    ds: Dataset,
    sel: Selection,
    output: str,
    spec: FilterSpec,
    parameters: dict[str, Any],
    engine: Engine,
    progress: bool,
    force: bool = False,
) -> Manifest:
    """Reshard the kept samples into `spec.num_shards` even shards (one task per shard on
    `engine`), hold out `spec.val_fraction` as <output>/val; write rejected.parquet."""
    return write_curated(
        ds,
        sel,
        output,
        num_shards=spec.num_shards,
        parameters=parameters,
        val_fraction=spec.val_fraction,
        engine=engine,
        progress=progress,
        log=get_run_logger().info,
        force=force,
        inputs=curation_inputs(ds.url, spec)[1:],
    )


def filter_table(sel: Selection) -> list[dict[str, Any]]:
    """One row per step in order (removed, remaining), then the totals: the artifact's table."""
    n = sel.samples.num_rows
    rows = [{"step": "input samples", "removed": 0, "remaining": n}]
    rows += [
        {"step": s["filter"], "removed": s["removed"], "remaining": s["remaining"]}
        for s in sel.steps
    ]
    rows.append(
        {"step": "kept", "removed": n - int(sel.kept.sum()), "remaining": int(sel.kept.sum())}
    )
    return rows


def plot_histograms(sel: Selection, folder: Path) -> list[Path]:
    """PNG histograms: shorter original side (input vs kept), CLIP score (scored vs kept)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    t, kept = sel.samples, sel.kept
    if sel.short_side is not None:
        short = sel.short_side.astype(float)
        fig, ax = plt.subplots(figsize=(6, 4))
        finite = np.isfinite(short) & (short > 0)
        if finite.any():
            bins = np.geomspace(max(short[finite].min(), 1), short[finite].max() + 1, 40)
            ax.hist(short[finite], bins=bins, alpha=0.6, label=f"input ({finite.sum()})")
            ax.hist(
                short[finite & kept], bins=bins, alpha=0.6, label=f"kept ({(finite & kept).sum()})"
            )
            ax.set_xscale("log")
        ax.set_xlabel("shorter side of the original image (px)")
        ax.set_ylabel("samples")
        ax.legend()
        fig.tight_layout()
        paths.append(folder / "image_sizes.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    if sel.scored:
        s = t.column("clip_score").to_numpy(zero_copy_only=False).astype(float)
        scored = np.isfinite(s)
        fig, ax = plt.subplots(figsize=(6, 4))
        if scored.any():
            bins = np.linspace(s[scored].min(), s[scored].max() + 1e-6, 40)
            ax.hist(s[scored], bins=bins, alpha=0.6, label=f"scored ({scored.sum()})")
            ax.hist(s[scored & kept], bins=bins, alpha=0.6, label=f"kept ({(scored & kept).sum()})")
        ax.set_xlabel("CLIP score (cosine of image and caption)")
        ax.set_ylabel("samples")
        ax.legend()
        fig.tight_layout()
        paths.append(folder / "clip_scores.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


@task(name="publish-curation-report", cache_policy=NONE)
def publish_report(sel: Selection, output: Dataset) -> None:
    """Per-filter counts as a Prefect table artifact and MLflow metrics; histograms as artifacts."""
    import mlflow
    from prefect.artifacts import create_table_artifact

    rows = filter_table(sel)
    create_table_artifact(
        key="curate-filter-counts",
        table=rows,
        description=f"Curation into {output.url}: samples each filter removed, in order",
    )
    stats = sel.stats()
    metrics = {
        "input_rows": stats["input_rows"],
        "input_samples": stats["input_samples"],
        "kept": stats["kept"],
        "rejected": stats["rejected"],
        "kept_fraction": stats["kept"] / max(stats["input_samples"], 1),
    }
    metrics.update({f"removed_{name}": n for name, n in stats["removed"].items()})
    mlflow.log_metrics(metrics)
    mlflow.log_dict(stats, "curate_stats.json")
    with tempfile.TemporaryDirectory() as tmp:
        for path in plot_histograms(sel, Path(tmp)):
            mlflow.log_artifact(str(path), artifact_path="plots")
