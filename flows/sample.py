# The sample web: generate the small, seeded internet the crawler is tested against, and
# optionally serve it on 127.0.0.1 until Ctrl-C.
#
#   python -m flows.sample --out data/sample                  # generate (about 10 s)
#   python -m flows.sample --out data/sample --serve          # generate, then serve on :8765
#   python -m flows.sample --out data/sample --seed 1 --port 9000 --serve
#
# It writes DIR/www (the served files), DIR/urls.parquet (url, caption, expected defect label),
# DIR/expected.json (rows per label and the crawl outcome of each) and DIR/eval (the held-out
# evaluation set, never crawled). See tasks/sample_web/ for the URL scheme and the defects.
from __future__ import annotations

import argparse
import time

from prefect import flow, task
from prefect.artifacts import create_table_artifact

# The environment defaults live in flows/__init__.py, which Python runs before this module as its
# parent package, so they are set before the prefect import above.
import flows  # noqa: F401
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flows.sample",
        description="Generate the sample web; --serve then serves it until Ctrl-C.",
    )
    parser.add_argument("--out", required=True, help="folder to write the sample web into")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"port the URL list points at and --serve listens on (default {DEFAULT_PORT})",
    )
    parser.add_argument("--serve", action="store_true", help="then serve it until Ctrl-C")
    args = parser.parse_args(argv)

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


if __name__ == "__main__":
    main()
