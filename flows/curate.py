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

import argparse
import sys
from typing import Any

from prefect import flow, get_run_logger

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


@flow(name="curate", flow_run_name="curate-{output}")
def curate(
    input: str,  # noqa: A002  (the CLI's --input)
    output: str,
    filters: str | dict[str, Any] | FilterSpec,
    eval_dirs: list[str] | None = None,
    num_shards: int | None = None,
    workers: int = 0,
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
            kept=done.total_samples,
            removed=done.stats["removed"],
            rejected=f"{output.rstrip('/')}/{REJECTED_NAME}",
            skipped=True,
        )
    with stage_run("curate", params={"input": input, "output": output, **parameters}) as run:
        log_dataset(ds, context="input")
        sel = select(ds, spec, bad_shards, workers, progress)
        manifest = write(ds, sel, output, spec, parameters, bad_shards, progress, force)
        out = open_dataset(output)
        log_dataset(out, context="output")
        publish_report(sel, out)
    return CurateResult(
        dataset=out.url,
        digest=manifest.digest,
        input_samples=sel.samples.num_rows,
        kept=manifest.total_samples,
        removed=sel.removed,
        rejected=f"{out.url}/{REJECTED_NAME}",
        mlflow_run_id=run.info.run_id,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m flows.curate", description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, help="crawled dataset (folder or fsspec URL)")
    p.add_argument("--output", required=True, help="curated dataset to write (folder or URL)")
    p.add_argument("--filters", required=True, help="filter spec YAML (configs/filters/*.yaml)")
    p.add_argument(
        "--eval-dir",
        action="append",
        dest="eval_dirs",
        metavar="DIR",
        help="evaluation images to decontaminate against (repeatable; replaces the spec's "
        "near_duplicates.eval_dirs)",
    )
    p.add_argument("--num-shards", type=int, help="output shards (default: the spec's)")
    p.add_argument("--workers", type=int, default=0, help="image decoding processes (0: inline)")
    p.add_argument(
        "--force",
        action="store_true",
        help="redo even if the output is up to date, replacing whatever OUTPUT holds",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = curate(
        input=args.input,
        output=args.output,
        filters=args.filters,
        eval_dirs=args.eval_dirs,
        num_shards=args.num_shards,
        workers=args.workers,
        force=args.force,
    )
    word = "already curated" if result.skipped else "curated"
    print(f"\n{result.dataset}: {word}, {result.kept} of {result.input_samples} samples kept")
    print(f"{'filter':<18}{'removed':>9}")
    for name, n in result.removed.items():
        print(f"{name:<18}{n:>9}")
    print(f"rejected samples: {result.rejected}")
    return 0


__all__ = ["curate", "filter_table", "main"]

if __name__ == "__main__":
    sys.exit(main())
