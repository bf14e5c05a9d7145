"""The dataset format: shards + Parquet + manifest, atomic commits, local paths and fsspec URLs."""

from __future__ import annotations

import json
import uuid

import pyarrow.parquet as pq
import pytest

from storage import DatasetError, DatasetWriter, open_dataset, read_shard
from storage.fs import atomic_open, exists, join
from storage.manifest import MANIFEST_NAME


def write_dataset(url: str, n: int = 7, per_shard: int = 3, **kwargs):
    with DatasetWriter(url, stage="test", samples_per_shard=per_shard, **kwargs) as w:
        for i in range(n):
            w.write(
                f"{i:05d}",
                bytes([i]) * (10 + i),
                f"caption {i}",
                meta={"i": i},
                row={"url": f"http://example.test/{i}.jpg", "width": 10 + i},
            )
    return w.manifest


@pytest.fixture(params=["local", "memory"])
def dataset_url(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "ds")
    return f"memory://ds-{uuid.uuid4().hex}"


def test_written_dataset_reads_back_sample_for_sample(dataset_url):
    manifest = write_dataset(dataset_url, n=7, per_shard=3)
    assert [s.num_samples for s in manifest.shards] == [3, 3, 1]
    ds = open_dataset(dataset_url, verify=True)
    assert len(ds) == 7 and ds.digest == manifest.digest
    samples = list(ds.iter_samples())
    assert [s.key for s in samples] == [f"{i:05d}" for i in range(7)]
    assert samples[4].image == bytes([4]) * 14
    assert samples[4].caption == "caption 4" and samples[4].meta == {"i": 4}
    meta = ds.metadata()
    assert meta.column("url").to_pylist()[6] == "http://example.test/6.jpg"
    assert set(meta.column("status").to_pylist()) == {"success"}
    assert len(ds.tar_urls()) == 3 and ds.tar_urls()[0].endswith("00000.tar")


def test_same_samples_give_the_same_digest(tmp_path):
    a = write_dataset(str(tmp_path / "a"))
    b = write_dataset(str(tmp_path / "b"))
    c = write_dataset(str(tmp_path / "c"), n=6)
    assert a.digest == b.digest != c.digest


def test_digest_records_producer_and_input(tmp_path):
    a = write_dataset(str(tmp_path / "a"), parameters={"x": 1}, input_digest="sha256:aa")
    b = write_dataset(str(tmp_path / "b"), parameters={"x": 2}, input_digest="sha256:aa")
    assert a.digest != b.digest
    assert a.producer.input_digest == "sha256:aa" and a.producer.parameters == {"x": 1}


def test_folder_without_manifest_is_not_a_dataset(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="not a dataset"):
        open_dataset(str(tmp_path / "empty"))
    with pytest.raises(DatasetError, match="no such dataset folder"):
        open_dataset(str(tmp_path / "nowhere"))


def test_interrupted_writer_leaves_no_manifest(tmp_path):
    url = str(tmp_path / "ds")
    with pytest.raises(RuntimeError), DatasetWriter(url, stage="test", samples_per_shard=2) as w:
        for i in range(5):
            w.write(f"{i:05d}", b"x", "c")
        raise RuntimeError("killed")
    assert exists(join(url, "00000.tar")) and not exists(join(url, MANIFEST_NAME))
    with pytest.raises(DatasetError, match="interrupted run"):
        open_dataset(url)


def test_writer_never_writes_over_a_dataset(tmp_path):
    url = str(tmp_path / "ds")
    manifest = write_dataset(url)
    with pytest.raises(DatasetError, match=r"already holds a dataset.*stage_output"):
        DatasetWriter(url, stage="test")
    assert open_dataset(url, verify=True).digest == manifest.digest  # untouched


def test_truncated_tar_is_named(tmp_path):
    url = str(tmp_path / "ds")
    write_dataset(url)
    tar = tmp_path / "ds" / "00001.tar"
    tar.write_bytes(tar.read_bytes()[:700])
    with pytest.raises(DatasetError, match=r"00001\.tar: 700 bytes.*truncated"):
        open_dataset(url)
    with pytest.raises(DatasetError, match=r"00001\.tar: truncated or corrupt tar"):
        list(read_shard(str(tar)))


def test_manifest_that_disagrees_with_its_shards_is_named(tmp_path):
    url = str(tmp_path / "ds")
    write_dataset(url)
    path = tmp_path / "ds" / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["shards"][0]["num_samples"] = 99
    path.write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="manifest.json: digest does not match"):
        open_dataset(url)


def test_missing_shard_is_named(tmp_path):
    url = str(tmp_path / "ds")
    write_dataset(url)
    (tmp_path / "ds" / "00002.parquet").unlink()
    with pytest.raises(DatasetError, match=r"00002\.parquet: listed in manifest.json but missing"):
        open_dataset(url)


def test_verify_counts_samples_against_manifest(tmp_path):
    url = str(tmp_path / "ds")
    write_dataset(url)
    # Replace a shard by one of the same size with a different count: only `verify` sees it.
    shard = tmp_path / "ds" / "00000.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF
    shard.write_bytes(bytes(data))
    open_dataset(url)
    with pytest.raises(DatasetError, match=r"00000\.tar: sha256 differs"):
        open_dataset(url, verify=True)


def test_atomic_open_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(ValueError), atomic_open(str(target)) as f:
        f.write(b"half")
        raise ValueError("boom")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_open(str(target)) as f:
        f.write(b"whole")
    assert target.read_bytes() == b"whole"


def test_parquet_rows_carry_writer_columns(tmp_path):
    url = str(tmp_path / "ds")
    write_dataset(url, n=2, per_shard=5)
    table = pq.read_table(tmp_path / "ds" / "00000.parquet")
    assert set(table.column_names) >= {"key", "caption", "status", "url", "width"}


def test_writer_rejects_bad_keys(tmp_path):
    w = DatasetWriter(str(tmp_path / "ds"), stage="test")
    with pytest.raises(ValueError, match="must not contain"):
        w.write("a.b", b"x", "c")
    w.write("a", b"x", "c")
    with pytest.raises(ValueError, match="duplicate sample key 'a'"):
        w.write("a", b"x", "c")
