"""storage.shard_order: a crawled shard in key order with fixed headers, whatever order and clock
img2dataset wrote it with."""

from __future__ import annotations

import io
import random
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.shard_order import write_in_key_order

SAMPLES = {f"{k:08d}": (f"jpg-{k}".encode(), f"caption {k}".encode()) for k in range(12)}


def crawled_tar(path, seed: int) -> None:
    """Members in a shuffled sample order, stamped with a different clock each time."""
    keys = list(SAMPLES)
    random.Random(seed).shuffle(keys)
    with tarfile.open(path, "w") as tar:
        for i, key in enumerate(keys):
            for ext, data in zip(("jpg", "txt"), SAMPLES[key], strict=True):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.uname = len(data), 1_700_000_000 + seed + i, "crawler"
                tar.addfile(info, io.BytesIO(data))


def crawled_parquet(path, seed: int) -> None:
    keys = list(SAMPLES)
    random.Random(seed).shuffle(keys)
    pq.write_table(pa.table({"key": keys, "status": ["success"] * len(keys)}), path)


def test_two_crawl_orders_give_the_same_bytes_in_key_order(tmp_path):
    outputs = []
    for seed in (1, 2):
        crawled_tar(tmp_path / f"in{seed}.tar", seed)
        crawled_parquet(tmp_path / f"in{seed}.parquet", seed)
        for ext in ("tar", "parquet"):
            write_in_key_order(
                str(tmp_path / f"in{seed}.{ext}"), str(tmp_path / f"out{seed}.{ext}")
            )
        outputs.append(
            {ext: (tmp_path / f"out{seed}.{ext}").read_bytes() for ext in ("tar", "parquet")}
        )
    assert (tmp_path / "in1.tar").read_bytes() != (tmp_path / "in2.tar").read_bytes()
    assert outputs[0] == outputs[1]

    with tarfile.open(tmp_path / "out1.tar") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [f"{k}.{e}" for k in SAMPLES for e in ("jpg", "txt")]
        assert {(m.mtime, m.uname) for m in members} == {(0, "")}
        assert tar.extractfile("00000003.txt").read() == b"caption 3"
    assert pq.read_table(tmp_path / "out1.parquet").column("key").to_pylist() == list(SAMPLES)


def test_other_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"x\.json: expected a shard's \.tar or \.parquet"):
        write_in_key_order(str(tmp_path / "x.json"), str(tmp_path / "y.json"))


def test_the_rewritten_shard_keeps_the_crawl_time(tmp_path):
    import os

    crawled_tar(tmp_path / "in.tar", 1)
    os.utime(tmp_path / "in.tar", ns=(1_600_000_000 * 10**9, 1_600_000_000 * 10**9))
    write_in_key_order(str(tmp_path / "in.tar"), str(tmp_path / "out.tar"))
    assert (tmp_path / "out.tar").stat().st_mtime_ns == 1_600_000_000 * 10**9
