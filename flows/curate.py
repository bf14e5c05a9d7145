"""The `curate` flow: filter, deduplicate and decontaminate a crawled dataset into a training one.

    python -m flows.curate --input data/crawl --output data/curated \
        --filters configs/filters/sample.yaml --eval-dir data/sample_web/eval

Filters (configs/filters/*.yaml) run in order; every input sample (a crawl row with status
success) is either in the output, resharded into evenly sized shards, or in its
`rejected.parquet` with the filter that dropped it: kept + rejected = input. Counts go to a Prefect
table artifact and MLflow; histograms of image sizes and CLIP scores to MLflow. Re-running with the
same input and spec finds the finished output and does nothing; a killed run leaves no manifest.
"""

from __future__ import annotations

if __name__ == "__main__":  # parse and check the command line before the imports below
    from flows.cli import main

    raise SystemExit(main("curate"))

from typing import Any

from prefect import flow, get_run_logger

from flows import cli
from storage import open_dataset
from storage.output import preflight
from storage.tracking import log_dataset, stage_run
from tasks.curate import (
    CurateResult,
    curation_inputs,
    curation_parameters,
    existing_output,
    filter_table,
    load_input,
    publish_report,
    select,
    write,
)
from tasks.curation.run import REJECTED_NAME, curation_identity
from tasks.curation.spec import FilterSpec, load_filter_spec, parse_filter_spec
from tasks.curation.write import VAL_NAME
from tasks.engine import Engine
from tasks.params.curate import CurateParams


@flow(name="curate", flow_run_name="curate-{output}")
def curate(
    input: str,  # noqa: A002  (the CLI's --input)
    output: str,
    filters: str | dict[str, Any] | FilterSpec,
    eval_dirs: list[str] | None = None,
    num_shards: int | None = None,
    workers: int = 0,
    engine: str = "local",
    ray_address: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> CurateResult:
    """Curate the dataset `input` into `output` with the filter spec `filters` (a YAML path)."""
    logger = get_run_logger()
    if isinstance(filters, FilterSpec):
        spec = filters
    elif isinstance(filters, dict):
        spec = parse_filter_spec(filters)
    else:
        spec = load_filter_spec(filters)
    if eval_dirs:
        spec = spec.with_eval_dirs(eval_dirs)
    if num_shards is not None:
        spec = FilterSpec.model_validate({**spec.model_dump(), "num_shards": num_shards})
    runner = Engine(kind=engine, workers=workers, address=ray_address)
    ds, bad_shards = load_input(input)
    parameters = curation_parameters(spec)
    # an output aliasing an input, or holding anything but this curation, fails now, not after
    # the selection (docs/stage-outputs.md)
    preflight(
        output,
        stage="curate",
        inputs=curation_inputs(ds.url, spec),
        identity=curation_identity(ds.digest, parameters),
        force=force,
    )
    done = None if force else existing_output(output, ds.digest, parameters)
    if done is not None:
        logger.info("%s already holds this curation (%s); nothing to do", output, done.digest)
        return CurateResult(
            dataset=output,
            digest=done.digest,
            input_samples=done.stats["input_samples"],
            kept=done.stats["kept"],
            val_samples=done.stats.get("val", {}).get("samples", 0),
            val_dataset=f"{output.rstrip('/')}/{VAL_NAME}" if done.stats.get("val") else None,
            removed=done.stats["removed"],
            rejected=f"{output.rstrip('/')}/{REJECTED_NAME}",
            skipped=True,
        )
    with stage_run("curate", params={"input": input, "output": output, **parameters}) as run:
        log_dataset(ds, context="input")
        with runner:  # one local pool (when --workers) for the scan and the write
            sel = select(ds, spec, bad_shards, runner, progress)
            manifest = write(ds, sel, output, spec, parameters, runner, progress, force)
        out = open_dataset(output)
        val = manifest.stats.get("val", {}).get("samples", 0)
        log_dataset(out, context="output")
        publish_report(sel, out)
    return CurateResult(
        dataset=out.url,
        digest=manifest.digest,
        input_samples=sel.samples.num_rows,
        kept=int(sel.kept.sum()),
        val_samples=val,
        val_dataset=f"{out.url}/{VAL_NAME}" if val else None,
        removed=sel.removed,
        rejected=f"{out.url}/{REJECTED_NAME}",
        mlflow_run_id=run.info.run_id,
    )


def run(params: CurateParams) -> int:
    """The command line's work, after flows/cli.py parsed and checked it."""
    result = curate(**params.model_dump())
    word = "already curated" if result.skipped else "curated"
    print(f"\n{result.dataset}: {word}, {result.kept} of {result.input_samples} samples kept")
    if result.val_dataset:
        print(f"validation split: {result.val_samples} of them in {result.val_dataset}")
    print(f"{'filter':<18}{'removed':>9}")
    for name, n in result.removed.items():
        print(f"{name:<18}{n:>9}")
    print(f"rejected samples: {result.rejected}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.main("curate", argv)


__all__ = ["curate", "filter_table", "main", "run"]
