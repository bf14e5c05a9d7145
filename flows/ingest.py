"""The `ingest` flow: crawl a URL list with img2dataset into a dataset (shards + Parquet + manifest).

    python -m flows.ingest --url-list urls.parquet --output data/crawl --image-size 64
    python -m flows.ingest --url-list 's3://bucket/laion/*.parquet' --output s3://bucket/crawl \
        --distributor ray --number-sample-per-shard 10000

The URL list is a file, a folder or a glob of Parquet/CSV/TSV/JSONL files, read in batches. Every
other flag is an argument of img2dataset.download, under its own name and with its own default.

Every input row is accounted for: successes plus each failure reason equal the input rows, shown
as a table (printed, and as a Prefect artifact), logged to MLflow, and kept per row in the shards'
Parquet. Re-running the same command skips finished shards; a finished crawl is not redone. An
OUTPUT holding anything else (another crawl, another list) is refused unless --force.
"""

from __future__ import annotations

if __name__ == "__main__":  # parse and check the command line before the imports below
    from flows.cli import main

    raise SystemExit(main("ingest"))

from prefect import flow, get_run_logger

from flows import cli
from storage import MANIFEST_NAME, DatasetError, open_dataset, stage_output
from storage.tracking import stage_run
from tasks.ingest import (
    IngestResult,
    commit_shards,
    count_outcomes,
    crawl,
    crawl_identity,
    drop_crawl_state,
    publish_report,
    read_url_list,
    reason_table,
    seal_dataset,
    url_list_digest,
)
from tasks.params.ingest import CrawlParams, IngestParams


@flow(name="ingest", flow_run_name="ingest-{output}", log_prints=True)
def ingest(
    url_list: str, output: str, params: CrawlParams | None = None, force: bool = False
) -> IngestResult:
    """Crawl `url_list` into the dataset `output` (`force`: replace what `output` holds)."""
    logger = get_run_logger()
    params = params or CrawlParams()
    digest = url_list_digest(url_list)
    with stage_output(
        output,
        stage="ingest",
        inputs=[url_list],
        identity=crawl_identity(digest, params),
        force=force,
        resume=True,  # a killed crawl of this very list and parameters continues where it was
        seal=MANIFEST_NAME,
        info=logger.info,
    ) as out:
        if out.done:
            done = open_dataset(output)
            logger.info("%s already holds this crawl (%s); nothing to do", output, done.digest)
            stats = done.manifest.stats
            return IngestResult(
                dataset=output,
                digest=done.digest,
                rows=stats["rows"],
                samples=done.manifest.total_samples,
                reasons=stats["reasons"],
                skipped=True,
            )
        run_params = {"url_list": url_list, "output": output, **params.model_dump()}
        with stage_run("ingest", params=run_params) as run:
            stats = _sealed_stats(out.staging)
            if stats is None:
                stats = _crawl_and_seal(url_list, out.staging, params, digest)
            drop_crawl_state(out.staging)
            out.commit()
            dataset = open_dataset(output)
            publish_report(dataset, stats)
    return IngestResult(
        dataset=output,
        digest=dataset.digest,
        rows=stats["rows"],
        samples=dataset.manifest.total_samples,
        reasons=stats["reasons"],
        images_per_s=stats["images_per_s"],
        mlflow_run_id=run.info.run_id,
    )


def _sealed_stats(staging: str) -> dict | None:
    """A staging this crawl had sealed before it was killed: its stats; else None."""
    try:
        return open_dataset(staging).manifest.stats
    except DatasetError:
        return None


def _crawl_and_seal(url_list: str, staging: str, params: CrawlParams, digest: str) -> dict:
    urls = read_url_list(url_list, staging, params, digest)
    seconds = crawl(urls, staging, params)
    shards = commit_shards(urls, staging, params)
    outcome = count_outcomes(staging, shards)
    counted = sum(outcome["reasons"].values())
    if counted != urls.rows:
        raise RuntimeError(
            f"{url_list}: {counted} rows accounted for, the URL list has {urls.rows}"
        )
    samples = sum(s.num_samples for s in shards)
    stats = {
        "rows": urls.rows,
        "samples": samples,
        "crawl_seconds": round(seconds, 3),
        "images_per_s": round(samples / seconds, 2),
        **outcome,
    }
    seal_dataset(staging, shards, urls, params, stats)
    return stats


def print_summary(result: IngestResult) -> None:
    print(
        f"\n{result.dataset}: {result.samples} of {result.rows} URLs crawled ({result.digest[:19]})"
    )
    print(f"{'reason':<22}{'count':>8}{'fraction':>10}")
    for row in reason_table(result.reasons):
        print(f"{row['reason']:<22}{row['count']:>8}{row['fraction']:>10.1%}")
    if result.images_per_s:
        print(f"{result.images_per_s:.1f} images/s")


def run(params: IngestParams) -> int:
    """The command line's work, after flows/cli.py parsed and checked it."""
    result = ingest(
        url_list=params.url_list, output=params.output, params=params.crawl(), force=params.force
    )
    print_summary(result)
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.main("ingest", argv)
