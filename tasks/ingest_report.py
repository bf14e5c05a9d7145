"""What a crawl produced, per input row: failure reasons counted, the table, the MLflow report.

img2dataset records an outcome per input row in each shard's Parquet (`status`, and a free-text
`error_message`); these tasks turn those into countable reasons that add up to the input rows.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import pyarrow.parquet as pq
from prefect import task
from pydantic import BaseModel

from storage import ShardEntry
from storage.fs import filesystem, join

__all__ = [
    "FAILURE_REASONS",
    "IngestResult",
    "count_outcomes",
    "failure_reason",
    "publish_report",
    "reason_table",
]

# img2dataset reports failures as free text; these patterns name the reasons people count.
FAILURE_REASONS = [
    (re.compile(r"HTTP Error (\d+)"), lambda m: f"http_{m.group(1)}"),
    (re.compile(r"timed out|timeout", re.I), lambda m: "timeout"),
    (re.compile(r"X-Robots-Tag", re.I), lambda m: "robots_disallowed"),
    (re.compile(r"image too small", re.I), lambda m: "too_small"),
    (re.compile(r"aspect ratio too large", re.I), lambda m: "aspect_ratio"),
    (re.compile(r"image too large|CV_IO_MAX_IMAGE_PIXELS", re.I), lambda m: "too_large"),
    (re.compile(r"decod|truncated|cannot identify|broken data", re.I), lambda m: "undecodable"),
    (re.compile(r"Connection refused|Name or service|resolve", re.I), lambda m: "unreachable"),
    (re.compile(r"unknown url type|no host given|Invalid URL", re.I), lambda m: "invalid_url"),
]


def failure_reason(error_message: str | None) -> str:
    """A short, countable reason for one of img2dataset's error messages."""
    text = error_message or ""
    for pattern, name in FAILURE_REASONS:
        if m := pattern.search(text):
            return name(m)
    return "other"


@task(name="count-outcomes")
def count_outcomes(output: str, shards: list[ShardEntry]) -> dict[str, Any]:
    """Per-reason counts over every input row (successes plus each failure reason = rows)."""
    reasons: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for entry in shards:
        fs, path = filesystem(join(output, f"{entry.name}.parquet"))
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=["status", "error_message"])
        for status, message in zip(
            table.column("status").to_pylist(),
            table.column("error_message").to_pylist(),
            strict=True,
        ):
            reason = "success" if status == "success" else failure_reason(message)
            reasons[reason] += 1
            if message and reason not in examples:
                examples[reason] = message[:200]
    return {"reasons": dict(sorted(reasons.items())), "examples": examples}


class IngestResult(BaseModel):
    dataset: str
    digest: str
    rows: int
    samples: int
    reasons: dict[str, int]
    images_per_s: float | None = None
    mlflow_run_id: str | None = None
    skipped: bool = False


def reason_table(reasons: dict[str, int], examples: dict[str, str] | None = None) -> list[dict]:
    """Rows for a Prefect table artifact and for the printed summary, success first."""
    total = sum(reasons.values()) or 1
    ordered = sorted(reasons.items(), key=lambda kv: (kv[0] != "success", -kv[1], kv[0]))
    return [
        {
            "reason": reason,
            "count": count,
            "fraction": round(count / total, 4),
            "example": (examples or {}).get(reason, ""),
        }
        for reason, count in ordered
    ]


@task(name="publish-ingest-report")
def publish_report(dataset, stats: dict[str, Any]) -> None:
    """The per-reason table as a Prefect artifact and the crawl's figures as MLflow metrics."""
    import mlflow
    from prefect.artifacts import create_table_artifact

    from storage.tracking import log_dataset

    rows = reason_table(stats["reasons"], stats.get("examples"))
    create_table_artifact(
        key="ingest-outcomes",
        table=rows,
        description=f"Crawl of {stats['rows']} URLs into {dataset.url}: outcome per input row",
    )
    metrics = {
        "rows": stats["rows"],
        "samples": stats["samples"],
        "success_rate": stats["samples"] / stats["rows"],
        "images_per_s": stats["images_per_s"],
        "crawl_seconds": stats["crawl_seconds"],
    }
    metrics.update({f"count_{r}": n for r, n in stats["reasons"].items()})
    mlflow.log_metrics(metrics)
    mlflow.log_dict(stats, "ingest_stats.json")
    log_dataset(dataset, context="output")
