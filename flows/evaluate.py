"""The `evaluate` flow: zero-shot classification, retrieval and linear probes of a CLIP checkpoint.

    python -m flows.evaluate --checkpoint data/runs/tiny/checkpoints/step-00000500.ckpt \\
        --suite configs/eval/sample.yaml --root data/sample
    python -m flows.evaluate --checkpoint laion2b.safetensors --model ViT-B-32 \\
        --suite my_suite.yaml --tasks digits,retrieval --precision amp_bf16 --output data/eval/b32

The checkpoint is this project's (a training run's step-N.ckpt, its tokenizer.json found in the
run folder, or an exported {"state_dict", "model_config"} file) or OpenAI's / OpenCLIP's weights
(a file or OpenCLIP's hub folder) or a registered version, `models:/clip-tiny@champion` or
`models:/clip-tiny/3` (fetched once into ~/.cache/clip-pipeline; the evaluation run is linked to
the version: its tags and model input, the metrics on the version's page); --model names the architecture of weights that do not say it
(a preset as OpenCLIP names it, or a config file: docs/checkpoints.md).
The suite (configs/eval/*.yaml, see clip_model/eval_suite.py) lists the tasks; --root replaces
"{root}" in its dataset paths. Results: MLflow (stage "evaluate": `<task>/<metric>` metrics, the
results JSON, a confusion matrix per classification task, a grid of retrieval examples), a Prefect
table artifact, OUTPUT/<key>/ (the same files) and a printed table. A rerun with the same
model, suite, root, tasks and precision returns the recorded result (--force recomputes). OUTPUT
holding anything but evaluations is refused; --force replaces it.
"""

from __future__ import annotations

if __name__ == "__main__":  # parse and check the command line before the imports below
    from flows.cli import main

    raise SystemExit(main("evaluate"))

from pathlib import Path

import mlflow
from prefect import flow, get_run_logger

import configs
from clip_model.checkpoint import resolve_weights
from clip_model.precision import parse_precision
from flows import cli
from storage.fs import join, local_path
from storage.tracking import fetch_registered_model, is_model_uri, link_evaluation, stage_run
from tasks.evaluate import (
    EvaluateResult,
    claim_output,
    default_output,
    evaluation_key,
    file_sha256,
    find_previous,
    format_results_table,
    load_eval_suite,
    load_model,
    metrics_of,
    mlflow_metrics,
    publish_table,
    record_result,
    run_evaluation,
    write_results,
)
from tasks.params.evaluate import EvaluateParams


def _run_name() -> str:
    from prefect.runtime import flow_run

    parameters = flow_run.parameters
    return f"evaluate-{Path(parameters['checkpoint']).stem}-{Path(parameters['suite']).stem}"


@flow(name="evaluate", flow_run_name=_run_name, log_prints=True)
def evaluate(
    checkpoint: str,
    suite: str,
    root: str | None = None,
    output: str | None = None,
    tasks: list[str] | None = None,
    precision: str = "fp32",
    tokenizer: str | None = None,
    force: bool = False,
    batch_size: int = 128,
    device: str = "auto",
    num_workers: int = 0,
    allow_torchscript: bool = False,
    model: str | None = None,
) -> EvaluateResult:
    """Evaluate the CLIP in `checkpoint` on the suite YAML `suite` (its "{root}" = `root`)."""
    logger = get_run_logger()
    precision = parse_precision(precision).name  # one name per behaviour: amp_bf16 is bf16
    eval_suite = load_eval_suite(suite, root, tasks)  # bad suite or data: fails before any work
    suite = str(configs.locate(suite, "eval"))  # a preset name is its shipped file from here on
    # models:/name@alias or models:/name/version: the registered weights, fetched once
    registered = fetch_registered_model(checkpoint) if is_model_uri(checkpoint) else None
    weights = registered.weights if registered else checkpoint
    clip = load_model(weights, tokenizer, allow_torchscript, model)
    checkpoint_sha256 = file_sha256(resolve_weights(local_path(weights))[0])
    tokenizer_file = getattr(clip.tokenizer, "path", None)
    identity = {
        "checkpoint": checkpoint,
        "checkpoint_sha256": checkpoint_sha256,
        "suite": suite,
        "suite_name": eval_suite.name,
        "suite_sha256": file_sha256(suite),
        "root": root,
        "tasks": [t.name for t in eval_suite.tasks],
        "precision": precision,
        "tokenizer": str(tokenizer_file) if tokenizer_file else "openai",
        "tokenizer_sha256": file_sha256(tokenizer_file),
    }
    key = evaluation_key(
        checkpoint_sha256=checkpoint_sha256,
        suite_sha256=identity["suite_sha256"],
        root=root,
        tasks=identity["tasks"],
        precision=precision,
        tokenizer_sha256=identity["tokenizer_sha256"],
        model_id=clip.model_id,
    )
    output = output or default_output(eval_suite)
    # weights: a local file, registry URIs resolved; --force also replaces a foreign OUTPUT
    claim_output(output, [weights, suite, root], force)

    previous = None if force else find_previous(output, key)
    if previous is not None:
        logger.info(
            "%s already holds this evaluation (run %s, MLflow run %s): nothing recomputed",
            output,
            key[:12],
            previous.mlflow_run_id,
        )
        publish_table(previous.metrics, eval_suite.name, checkpoint)
        return previous

    params = {**identity, "model_id": clip.model_id, "model": clip.model.config.name}
    with stage_run("evaluate", params={**params, "output": output}) as run:
        results = run_evaluation(
            clip,
            eval_suite,
            precision=precision,
            device=device,
            batch_size=batch_size,
            num_workers=num_workers,
        )
        metrics = metrics_of(results)
        header = {**params, "key": key, "mlflow_run_id": run.info.run_id}
        results_json, plots = write_results(results, join(output, key[:12]), header)
        mlflow.log_metrics(mlflow_metrics(metrics))
        mlflow.log_artifact(
            local_path(results_json)
        )  # MLflow logs local files; OUTPUT may be s3://
        for plot in plots:
            mlflow.log_artifact(local_path(plot), artifact_path="plots")
        mlflow.set_tags({"eval.suite": eval_suite.name, "eval.key": key})
        if registered is not None:  # the version's page lists this run and its metrics
            link_evaluation(registered, run.info.run_id, mlflow_metrics(metrics), eval_suite.name)
    result = EvaluateResult(
        metrics=metrics,
        results_json=results_json,
        output=output,
        plots=plots,
        mlflow_run_id=run.info.run_id,
        key=key,
        checkpoint=checkpoint,
        suite=suite,
        model_id=clip.model_id,
    )
    record_result(result)
    publish_table(metrics, eval_suite.name, checkpoint)
    logger.info("evaluated %s on %s: results in %s", checkpoint, eval_suite.name, results_json)
    return result


def run(params: EvaluateParams) -> int:
    """The command line's work, after flows/cli.py parsed and checked it."""
    result = evaluate(**params.model_dump())
    word = "already evaluated" if result.skipped else "evaluated"
    print(f"\n{result.checkpoint}: {word} on {result.suite}")
    print(format_results_table(result.metrics))
    print(f"results: {result.results_json}; MLflow run {result.mlflow_run_id}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.main("evaluate", argv)
