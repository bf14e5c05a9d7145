"""Tasks of the `evaluate` flow: load a CLIP and a suite, run it, write results and plots.

    load_model          a checkpoint (ours, OpenAI's, OpenCLIP's) and its tokenizer
    load_eval_suite     the suite YAML, cut to the asked tasks, every dataset checked up front
    find_previous       the result of an earlier run with the same inputs, if OUTPUT holds one
    run_evaluation      every task of the suite (clip_model.evaluate.run_suite), with progress
    write_results       OUTPUT/<key>/results.json, a confusion matrix PNG per classification task
                        and a PNG grid of retrieval examples per retrieval task
    record_result       OUTPUT/results.json: every run's metrics, keyed by its inputs
    publish_table       the metrics as a Prefect table artifact (task, metric, value)

A run is keyed by the sha256 of the checkpoint file, of the suite file and of the tokenizer file,
the root, the tasks and the precision: the same key finds the earlier result in
OUTPUT/results.json instead of recomputing it.

OUTPUT collects many evaluations (docs/stage-outputs.md, "Evaluation"): `claim_output` binds it
to this stage before any work (aliasing and foreign folders refused); each run's folder
OUTPUT/<key[:12]>/ is staged and swapped in whole; OUTPUT/results.json is changed under OUTPUT's
lock (tasks/eval_results.py), so concurrent evaluations never lose each other's entries.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from pydantic import BaseModel
from tqdm import tqdm

from clip_model.checkpoint import (
    CheckpointError,
    LoadedClip,
    ModelUnknown,
    TorchScriptRefused,
    load_clip,
)
from clip_model.embedder import Embedder
from clip_model.eval_callback import loggable_metrics, quick_suite
from clip_model.eval_suite import EvalSuite, load_suite
from clip_model.evaluate import (
    TaskResult,
    plot_confusion_matrix,
    plot_retrieval_examples,
    run_suite,
)
from storage.fs import atomic_write_bytes, exists, join, local_output, sha256_file
from storage.output import stage_output
from tasks.eval_results import INDEX_NAME, STAGE, add_entry, claim, read_index
from tasks.params.evaluate import check_task_data

__all__ = [
    "EvaluateResult",
    "INDEX_NAME",
    "claim_output",
    "default_output",
    "evaluation_key",
    "find_previous",
    "format_results_table",
    "load_eval_suite",
    "load_model",
    "metrics_of",
    "mlflow_metrics",
    "publish_table",
    "record_result",
    "run_evaluation",
    "write_results",
]


class EvaluateResult(BaseModel):
    """What an evaluation produced; `metrics[task][metric]`, e.g. metrics["digits"]["acc1"]."""

    metrics: dict[str, dict[str, float]]
    results_json: str  # this run's full results: OUTPUT/<key[:12]>/results.json
    output: str
    plots: list[str] = []
    mlflow_run_id: str | None = None
    skipped: bool = False  # True: an earlier run's result, nothing recomputed
    key: str
    checkpoint: str
    suite: str
    model_id: str = ""


# ---- inputs -------------------------------------------------------------------------------


@task(name="load-model", cache_policy=NONE)
def load_model(
    checkpoint: str,
    tokenizer: str | None = None,
    allow_torchscript: bool = False,
    model: str | None = None,
) -> LoadedClip:
    """The CLIP in `checkpoint` with its tokenizer; CheckpointError naming the file if it is not
    a CLIP checkpoint (this project's step-N.ckpt or export, OpenAI's or OpenCLIP's weights).
    `model`: the architecture (preset or config file) of weights that do not say it. A
    TorchScript archive loads only with `allow_torchscript` (it runs code as it loads)."""
    if not exists(checkpoint):
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    try:
        return load_clip(
            checkpoint, tokenizer=tokenizer, model=model, allow_torchscript=allow_torchscript
        )
    except (FileNotFoundError, TorchScriptRefused, ModelUnknown):
        raise  # the message names the file and the way out (a tokenizer, a flag, --model)
    except ValueError as error:
        if not isinstance(error, CheckpointError):
            raise  # e.g. a tokenizer with more ids than the model: the message says so
        reason = str(error)
    except Exception as error:  # noqa: BLE001 - any unreadable file: name it and say why
        reason = f"{type(error).__name__}: {error}"
    raise CheckpointError(
        f"{checkpoint}: not a CLIP checkpoint ({reason}). Expected a training run's step-N.ckpt, "
        'an exported {"state_dict", "model_config"} file, or OpenAI/OpenCLIP CLIP weights'
    ) from None


@task(name="load-eval-suite", cache_policy=NONE)
def load_eval_suite(
    suite: str, root: str | None = None, tasks: Sequence[str] | None = None
) -> EvalSuite:
    """The suite YAML with "{root}" resolved, cut to `tasks`, every dataset's files checked."""
    logger = get_run_logger()
    loaded = quick_suite(load_suite(suite, root=root), tasks=tasks)
    for t in loaded.tasks:
        n = check_task_data(t)
        limit = f" (first {t.max_images} used)" if t.max_images and t.max_images < n else ""
        logger.info("task %s: %s, %d images in %s%s", t.name, t.type, n, t.dataset, limit)
    return loaded


def evaluation_key(
    *,
    checkpoint_sha256: str,
    suite_sha256: str,
    root: str | None,
    tasks: Sequence[str],
    precision: str,
    tokenizer_sha256: str | None,
    model_id: str = "",
) -> str:
    """sha256 of everything that decides the metrics (not batch size, device or workers);
    `model_id` (clip_model.checkpoint.model_digest) covers the architecture --model chose."""
    fields = {
        "checkpoint_sha256": checkpoint_sha256,
        "suite_sha256": suite_sha256,
        "root": None if root is None else str(Path(root).expanduser().absolute()),
        "tasks": sorted(tasks),
        "precision": precision,
        "tokenizer_sha256": tokenizer_sha256,
    }
    if model_id:
        fields["model_id"] = model_id
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def file_sha256(path: str | Path | None) -> str | None:
    return None if path is None else sha256_file(str(path))[0]


def default_output(suite: EvalSuite) -> str:
    return f"data/eval/{suite.name}"


# ---- the results index --------------------------------------------------------------------


@task(name="find-previous-evaluation", cache_policy=NONE)
def find_previous(output: str, key: str) -> EvaluateResult | None:
    """The earlier result with this key in OUTPUT/results.json, if its files are still there."""
    entry = read_index(output)["runs"].get(key)
    if entry is None:
        return None
    result = EvaluateResult.model_validate(
        {
            **entry,
            "output": output,
            "results_json": join(output, entry["results_json"]),
            "plots": [join(output, p) for p in entry.get("plots", [])],
            "skipped": True,
        }
    )
    if not all(exists(p) for p in [result.results_json, *result.plots]):
        get_run_logger().warning("%s: files of run %s are missing; recomputing", output, key[:12])
        return None
    return result


@task(name="claim-evaluation-output", cache_policy=NONE)
def claim_output(output: str, inputs: Sequence[str | None], force: bool = False) -> None:
    """Bind OUTPUT to this stage before any work (tasks/eval_results.py); `force` replaces a
    folder that holds anything but evaluations."""
    claim(output, inputs, force)


@task(name="record-evaluation", cache_policy=NONE)
def record_result(result: EvaluateResult) -> str:
    """Add `result` to OUTPUT/results.json under its key (paths relative to OUTPUT), under
    OUTPUT's lock (tasks/eval_results.py)."""
    output = result.output  # a folder or a URL: the files' names were joined onto it
    entry = result.model_dump(exclude={"output", "skipped"})
    entry["results_json"] = posixpath.relpath(result.results_json, output)
    entry["plots"] = [posixpath.relpath(p, output) for p in result.plots]
    return add_entry(result.output, result.key, entry)


# ---- the work -----------------------------------------------------------------------------


@task(name="run-evaluation", cache_policy=NONE)
def run_evaluation(
    clip: LoadedClip,
    suite: EvalSuite,
    *,
    precision: str = "fp32",
    device: str = "auto",
    batch_size: int = 128,
    num_workers: int = 0,
) -> dict[str, TaskResult]:
    """Every task of `suite`, one after the other, each logged with its time and metrics.
    The embedder takes `clip.model` (a pure_* precision casts it in place: clip_model.embedder)."""
    logger = get_run_logger()
    embedder = Embedder.of(
        clip, device=device, precision=precision, batch_size=batch_size, num_workers=num_workers
    )
    results: dict[str, TaskResult] = {}
    with tqdm(suite.tasks, desc=f"evaluate {suite.name}", unit="task") as bar:
        for t in bar:
            bar.set_postfix_str(t.name)
            started = time.perf_counter()
            results.update(run_suite(embedder, suite, tasks=[t.name]))
            seconds = time.perf_counter() - started
            r = results[t.name]
            logger.info(
                "%s (%s): %d images in %.1f s (%.0f images/s): %s",
                t.name,
                t.type,
                r.num_images,
                seconds,
                r.num_images / max(seconds, 1e-9),
                ", ".join(f"{k}={v:.4f}" for k, v in r.metrics.items()),
            )
    return results


def metrics_of(results: dict[str, TaskResult]) -> dict[str, dict[str, float]]:
    return {name: {k: float(v) for k, v in r.metrics.items()} for name, r in results.items()}


def mlflow_metrics(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """`{"<task>/<metric>": value}` as MLflow accepts them: `digits/acc1`,
    `retrieval/image_retrieval_recall_at_1` (MLflow refuses "@" in a metric name)."""
    flat = {
        f"{name}/{metric}": v for name, values in metrics.items() for metric, v in values.items()
    }
    return loggable_metrics(flat)


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


@task(name="write-evaluation-results", cache_policy=NONE)
def write_results(
    results: dict[str, TaskResult], run_dir: str, header: dict[str, Any]
) -> tuple[str, list[str]]:
    """RUN_DIR/results.json (header + every task's full result) and the plots; their paths.

    Written into a staging folder swapped in whole (the results.json seals it), so a killed run
    never leaves a RUN_DIR that looks complete; a rerun replaces an earlier RUN_DIR of its key."""
    identity = {k: v for k, v in header.items() if k != "mlflow_run_id"}
    with stage_output(
        run_dir, stage=STAGE, identity=identity, force=True, seal="results.json"
    ) as out:
        names = _write_run(results, out.staging, header)
        out.commit()
    return join(run_dir, "results.json"), [join(run_dir, name) for name in names]


def _write_run(results: dict[str, TaskResult], out: str, header: dict[str, Any]) -> list[str]:
    """The plots and results.json into the folder or URL `out`; the plots' file names."""
    plots = []
    for name, r in results.items():
        if r.confusion is not None and r.classnames:
            title = f"{name}: zero-shot acc1 {r.metrics.get('acc1', float('nan')):.3f}"
            plots.append(f"confusion_{_file_name(name)}.png")
            with local_output(join(out, plots[-1])) as path:  # matplotlib writes local files
                plot_confusion_matrix(r.confusion, r.classnames, Path(path), title=title)
        if r.examples:
            recall = r.metrics.get("text_retrieval_recall@5", float("nan"))
            title = f"{name}: top-5 captions per image (text_retrieval_recall@5 {recall:.3f})"
            plots.append(f"retrieval_{_file_name(name)}.png")
            with local_output(join(out, plots[-1])) as path:
                plot_retrieval_examples(r.examples, Path(path), title=title)
    document = {**header, "tasks": {name: r.to_dict() for name, r in results.items()}}
    atomic_write_bytes(join(out, "results.json"), json.dumps(document, indent=2).encode())
    return plots


# ---- reporting ----------------------------------------------------------------------------


def table_rows(metrics: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """One row per (task, metric), in the suite's order."""
    return [
        {"task": name, "metric": metric, "value": round(float(value), 6)}
        for name, values in metrics.items()
        for metric, value in values.items()
    ]


@task(name="publish-evaluation-table", cache_policy=NONE)
def publish_table(metrics: dict[str, dict[str, float]], suite: str, checkpoint: str) -> None:
    """The metrics as a Prefect table artifact: task, metric, value."""
    from prefect.artifacts import create_table_artifact

    key = re.sub(r"[^a-z0-9-]+", "-", f"evaluate-{suite}".lower()).strip("-")
    create_table_artifact(
        key=key, table=table_rows(metrics), description=f"Suite {suite} on {checkpoint}"
    )


def _format_value(value: float) -> str:
    # accuracies and recalls with 4 decimals; anything else (a probe's C) as it is
    return f"{value:.4f}" if value == 0 or 1e-3 <= abs(value) <= 1 else f"{value:g}"


def format_results_table(metrics: dict[str, dict[str, float]]) -> str:
    """The metrics as a plain-text table: task, metric, value (one row per metric)."""
    rows = [(r["task"], r["metric"], _format_value(r["value"])) for r in table_rows(metrics)]
    if not rows:
        return "(no metrics)"
    header = ("task", "metric", "value")
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(3)]
    lines = [f"{header[0]:<{widths[0]}}  {header[1]:<{widths[1]}}  {header[2]:>{widths[2]}}"]
    lines.append("  ".join("-" * w for w in widths))
    previous = None
    for name, metric, value in rows:
        shown = name if name != previous else ""
        previous = name
        lines.append(f"{shown:<{widths[0]}}  {metric:<{widths[1]}}  {value:>{widths[2]}}")
    return "\n".join(lines)
