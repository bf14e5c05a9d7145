"""The sample web: generate the seeded internet the crawler is tested against (and serve it).

    python -m flows.sample --out data/sample                  # generate (about 10 s)
    python -m flows.sample --out data/sample --serve          # generate, then serve on :8765
    python -m flows.sample --out data/sample --seed 1 --port 9000 --serve

It writes DIR/www (the served files), DIR/urls.parquet (url, caption, expected defect label),
DIR/expected.json (rows per label and the crawl outcome of each) and DIR/eval (the held-out
evaluation set, never crawled). See tasks/sample_web/ for the URL scheme and the defects.
"""

from __future__ import annotations

if __name__ == "__main__":  # parse and check the command line before the imports below
    from flows.cli import main

    raise SystemExit(main("sample"))

import time

from prefect import flow, task
from prefect.artifacts import create_table_artifact

from flows import cli
from tasks.params.sample import SampleParams
from tasks.sample_web import (
    DEFAULT_PORT,
    OUTCOMES,
    generate_sample_web,
    serve_sample_web,
    summary_dict,
)


@task(name="generate-sample-web")
def generate(out: str, seed: int, port: int) -> dict:
    """Write the sample web into `out`; returns its summary."""
    return summary_dict(generate_sample_web(out, seed=seed, port=port))


@flow(name="sample_web")
def sample_web(out: str, seed: int = 0, port: int = DEFAULT_PORT) -> dict:
    """Generate the sample web into `out` and publish its per-defect counts as a table."""
    summary = generate(out, seed, port)
    create_table_artifact(
        key="sample-web-labels",
        table=[
            {
                "label": label,
                "rows": n,
                "expected status": OUTCOMES[label][0],
                "expected error": OUTCOMES[label][1] or "",
            }
            for label, n in summary["labels"].items()
        ],
        description=f"Sample web at {out}: {summary['rows']} URL rows, seed {seed}.",
    )
    return summary


def run(args: SampleParams) -> int:
    """The command line's work, after flows/cli.py parsed and checked it."""
    summary = sample_web(args.out, seed=args.seed, port=args.port)
    print(f"{summary['rows']} URL rows in {summary['url_list']}")
    for label, n in summary["labels"].items():
        print(f"  {label:<20} {n:>5}")
    print(f"evaluation set in {summary['eval_dir']}: {summary['eval_images']}")
    if args.serve:
        with serve_sample_web(args.out, port=args.port) as base_url:
            print(f"serving {args.out}/www at {base_url} (Ctrl-C stops)", flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                print("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.main("sample", argv)
