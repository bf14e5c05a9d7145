"""Ingest overhead: the `ingest` flow against a direct `img2dataset.download` on the same URLs.

    .venv/bin/python bench/ingest.py [--rows 2940] [--rounds 2]

Serves the sample web from its own process on 127.0.0.1, crawls its good URLs (>= 2,000) both ways
with the same img2dataset settings, alternating the order, and prints images/s for each and their
ratio. Goal: the flow keeps >= 0.9 of img2dataset's own rate. The flow is timed end to end (URL
list validation, crawl subprocess, shard commits, hashing, manifest, MLflow), with Prefect's
ephemeral server already started, as it is under a deployment.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flows  # noqa: E402,F401  (environment defaults)


def serve(root: str, port: int) -> None:
    from tasks.sample_web import serve_sample_web

    with serve_sample_web(root, port=port):
        while True:
            time.sleep(3600)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=2940, help="good URLs to crawl (>= 2000)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=32)
    args = p.parse_args()

    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from img2dataset import download

    from flows.ingest import ingest
    from tasks.ingest import CrawlParams, UrlList, _img2dataset_kwargs
    from tasks.sample_web import CRAWL_SETTINGS, generate_sample_web, write_url_list

    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    web = generate_sample_web(work / "web")
    port = free_port()
    server = multiprocessing.get_context("spawn").Process(
        target=serve, args=(str(web.out_dir), port), daemon=True
    )
    server.start()
    time.sleep(2)
    full = pq.read_table(
        write_url_list(web.out_dir, f"http://127.0.0.1:{port}", work / "all.parquet")
    )
    good = full.filter(pc.equal(full["expected"], "ok")).slice(0, args.rows)
    url_list = work / "urls.parquet"
    pq.write_table(good.select(["url", "caption"]), url_list)
    settings = {k: v for k, v in CRAWL_SETTINGS.items() if v is not None}
    params = CrawlParams(
        **settings,
        processes_count=args.processes,
        thread_count=args.threads,
        number_sample_per_shard=500,
    )
    print(
        f"{good.num_rows} URLs, {args.processes} processes x {args.threads} threads, {os.cpu_count()} cores"
    )

    # Start Prefect's ephemeral server and create the MLflow database outside the timings, as a
    # deployment's long-running services would be: one small crawl through the flow.
    pq.write_table(good.select(["url", "caption"]).slice(0, 20), work / "warm.parquet")
    ingest(url_list=str(work / "warm.parquet"), output=str(work / "warm"), params=params)

    def direct(i: int) -> tuple[float, int]:
        out = work / f"direct-{i}"
        staged = UrlList(source=str(url_list), staged=str(url_list), rows=good.num_rows, digest="")
        t = time.perf_counter()
        download(**_img2dataset_kwargs(staged, str(out), params))
        seconds = time.perf_counter() - t
        ok = sum(
            pq.read_table(f, columns=["status"]).column("status").to_pylist().count("success")
            for f in out.glob("*.parquet")
        )
        shutil.rmtree(out)
        return seconds, ok

    def via_flow(i: int) -> tuple[float, int]:
        out = work / f"flow-{i}"
        t = time.perf_counter()
        result = ingest(url_list=str(url_list), output=str(out), params=params)
        seconds = time.perf_counter() - t
        shutil.rmtree(out)
        return seconds, result.samples

    rates: dict[str, list[float]] = {"img2dataset": [], "flow": []}
    for i in range(args.rounds):
        order = [("img2dataset", direct), ("flow", via_flow)]
        for name, run in order if i % 2 == 0 else order[::-1]:
            seconds, ok = run(i)
            rates[name].append(ok / seconds)
            print(
                f"round {i}: {name:<12} {ok} images in {seconds:6.2f} s = {ok / seconds:7.1f} images/s"
            )
    server.terminate()
    best = {k: max(v) for k, v in rates.items()}
    print(f"\nimg2dataset.download : {best['img2dataset']:7.1f} images/s (best of {args.rounds})")
    print(f"ingest flow          : {best['flow']:7.1f} images/s (best of {args.rounds})")
    print(f"ratio flow / direct  : {best['flow'] / best['img2dataset']:.3f}  (goal >= 0.9)")
    median = {k: statistics.median(v) for k, v in rates.items()}
    print(
        f"medians: img2dataset {median['img2dataset']:.1f}, flow {median['flow']:.1f} images/s, ratio {median['flow'] / median['img2dataset']:.3f}"
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
