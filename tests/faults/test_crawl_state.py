"""Fault: a changed URL list crawled into the same output (docs/design.md, trap 12).

img2dataset's incremental mode treats a shard as done when its stats file exists, whatever list
produced it. A crawl's output and working state are bound to the list's sha256 and the crawl
parameters: a changed list is refused (or, with --force, starts clean), never mixed.
"""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fault_web import (
    child_env,
    crawl_params,
    ingest_command,
    kill,
    serve,
    start,
    wait_for,
    write_images,
    write_url_list,
)

from storage import DatasetError, open_dataset

N = 30  # 3 shards of 10


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    write_images(root, "A", N)
    write_images(root, "B", N)
    return root


def captions(url: str) -> set[str]:
    return set(open_dataset(url, verify=True).metadata(["caption"]).column("caption").to_pylist())


def test_a_second_list_of_the_same_length_never_gets_the_first_lists_captions(
    web, tmp_path, prefect_harness, mlflow_tmp
):
    from flows.ingest import ingest

    out = tmp_path / "crawl"
    with serve(web) as base:
        list_a = write_url_list(tmp_path / "a.parquet", base, "A", N)
        list_b = write_url_list(tmp_path / "b.parquet", base, "B", N)
        first = ingest(url_list=str(list_a), output=str(out), params=crawl_params())
        assert captions(str(out)) == {f"A caption {i}" for i in range(N)}
        with pytest.raises(ValueError, match=r"already holds the ingest stage's output.*--force"):
            ingest(url_list=str(list_b), output=str(out), params=crawl_params())
        assert open_dataset(str(out)).digest == first.digest  # refused: A's crawl untouched
        second = ingest(url_list=str(list_b), output=str(out), params=crawl_params(), force=True)
    assert not second.skipped and second.rows == N
    assert captions(str(out)) == {f"B caption {i}" for i in range(N)}
    urls = open_dataset(str(out)).metadata(["url"]).column("url").to_pylist()
    assert all("/B" in u for u in urls)
    manifest = open_dataset(str(out)).manifest
    assert manifest.producer.parameters["url_list"] == str(list_b)


@pytest.mark.slow
def test_a_killed_crawl_of_another_list_is_never_resumed(
    web, tmp_path, prefect_harness, mlflow_tmp
):
    """Kill a real crawl of A after its first shard, then crawl B into the same output."""
    out = tmp_path / "crawl"
    env = child_env(tmp_path)
    with serve(web, delay=0.15) as base:  # ~0.4 s a shard of 10 on 4 threads: caught half-way
        list_a = write_url_list(tmp_path / "a.parquet", base, "A", N)
        proc = start(ingest_command(list_a, out), env, tmp_path / "a.log")
        try:
            caught = wait_for(lambda: any(tmp_path.rglob("*_stats.json")), 240, proc)
        finally:
            kill(proc)
        assert caught, (tmp_path / "a.log").read_text()[-3000:]
        finished = list(tmp_path.rglob("*_stats.json"))
        assert len(finished) < math.ceil(N / 10), "A's crawl finished before it was killed"

    with serve(web) as base:
        list_b = write_url_list(tmp_path / "b.parquet", base, "B", N)
        from flows.ingest import ingest

        result = ingest(url_list=str(list_b), output=str(out), params=crawl_params())
    assert result.rows == N and not result.skipped
    assert captions(str(out)) == {f"B caption {i}" for i in range(N)}


def test_a_shard_of_another_list_is_not_sealed(tmp_path):
    """Finished shards are checked against the staged list before the manifest is sealed."""
    from tasks.ingest import CRAWL_DIR, UrlList, commit_shards

    out = tmp_path / "staging"
    crawl_dir = out / CRAWL_DIR
    crawl_dir.mkdir(parents=True)
    staged = out / ".ingest" / "url_list.parquet"
    write_url_list(staged, "http://127.0.0.1:9", "B", 10)
    # a finished shard of list A: img2dataset's files for shard 00000
    rows = [
        {"url": f"http://127.0.0.1:9/A{i:03d}.jpg", "caption": f"A caption {i}", "key": f"{i:05d}",
         "status": "failed_to_download", "error_message": "x"}
        for i in range(10)
    ]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), crawl_dir / "00000.parquet")
    import tarfile

    tarfile.open(crawl_dir / "00000.tar", "w").close()
    (crawl_dir / "00000_stats.json").write_text(json.dumps({"count": 10}))
    url_list = UrlList(source="b.parquet", staged=str(staged), rows=10, digest="sha256:b")
    with pytest.raises(DatasetError, match=r"00000\.parquet: sample 00000 is .*A000.*B000"):
        commit_shards.fn(url_list, str(out), crawl_params())
    assert not (out / "manifest.json").exists()
