"""Bad samples inside a sound shard, and a store that fails to read one (issue 11, class 5).

A caption that is not UTF-8 and metadata that is not JSON are the sample's fault: every reader
(storage's `read_shard`, the index, curation, the training DataModule) leaves the sample out,
counts it, names its shard and key, and goes on. A shard the store fails to read (here: deleted
after the dataset was opened) is not the data's fault: the run stops, naming the shard, instead
of counting it as corrupt and training on without it.
"""

from __future__ import annotations

import io
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from storage import SampleError, ShardReadError, open_dataset, read_shard
from storage.dataset import describe_shard, write_manifest

BAD = {
    "badtxt": {"txt": b"caf\xe9 au lait", "json": b"{}"},  # Latin-1, not UTF-8
    "badjson": {"txt": b"a fine caption", "json": b'{"width": 64,'},  # cut short
}


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def shard_dataset(path: Path, shards: list[dict[str, dict[str, bytes]]]) -> str:
    """A sealed dataset whose tars hold exactly `shards` ({key: {ext: bytes}}), bad bytes too
    (DatasetWriter would refuse to write them)."""
    path.mkdir(parents=True)
    entries = []
    for i, samples in enumerate(shards):
        name = f"{i:05d}"
        with tarfile.open(path / f"{name}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, parts in samples.items():
                for ext, data in {"jpg": _jpeg(len(key) + i), **parts}.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        rows = [{"key": k, "caption": f"a photo of {k}", "status": "success"} for k in samples]
        pq.write_table(pa.Table.from_pylist(rows), path / f"{name}.parquet")
        entries.append(describe_shard(str(path), name))
    write_manifest(str(path), entries, stage="test")
    return str(path)


def good(n: int, prefix: str = "good") -> dict[str, dict[str, bytes]]:
    return {f"{prefix}{i}": {"txt": f"picture {i}".encode(), "json": b"{}"} for i in range(n)}


@pytest.fixture
def dataset(tmp_path) -> str:
    """Two shards; the first holds a non-UTF-8 caption and a malformed .json among good ones."""
    first = {**good(2, "a"), **BAD, **good(2, "b")}
    return shard_dataset(tmp_path / "ds", [first, good(4, "c")])


# ---- storage: the one dataset reader ------------------------------------------------------------


def test_the_reader_counts_and_names_each_bad_sample_and_reads_on(dataset):
    bad: list[SampleError] = []
    keys = [s.key for s in open_dataset(dataset).iter_samples(on_bad_sample=bad.append)]
    assert keys == ["a0", "a1", "b0", "b1", "c0", "c1", "c2", "c3"]
    problems = {e.key: str(e) for e in bad}
    assert set(problems) == set(BAD)
    assert "00000.tar: sample 'badtxt': caption (badtxt.txt) is not UTF-8" in problems["badtxt"]
    assert "00000.tar: sample 'badjson': metadata (badjson.json) is not JSON" in problems["badjson"]


def test_a_reader_that_may_not_lose_samples_stops_naming_shard_and_key(dataset):
    with pytest.raises(SampleError, match=r"00000\.tar: sample 'badtxt': caption .* not UTF-8"):
        list(read_shard(str(Path(dataset) / "00000.tar")))


def test_verify_counts_a_bad_sample_as_one_of_its_shards_samples(dataset):
    assert len(open_dataset(dataset, verify=True)) == 10


def test_a_shard_the_store_cannot_read_stops_the_reader_naming_it(dataset):
    ds = open_dataset(dataset)
    (Path(dataset) / "00001.tar").unlink()  # gone from the store after the dataset was opened
    with pytest.raises(ShardReadError, match=r"00001\.tar: the store failed to read"):
        list(ds.iter_samples(on_bad_sample=lambda e: None))


# ---- training: the DataModule -------------------------------------------------------------------


def _datamodule(data: str, batch_size: int):
    from clip_model.datamodule import ClipDataModule
    from clip_model.tokenizer import get_tokenizer
    from clip_model.transforms import eval_transform, train_transform

    return ClipDataModule(
        data,
        tokenizer=get_tokenizer("openai", context_length=16),
        train_transform=train_transform(32),
        val_transform=eval_transform(32),
        image_size=32,
        batch_size=batch_size,
        workers=0,
        seed=5,
        shuffle_buffer=1,
    )


def test_training_replaces_a_non_utf8_caption_counting_and_naming_it(tmp_path):
    # metadata is not read by training: only the caption can hurt it
    data = shard_dataset(tmp_path / "ds", [{**good(3), **BAD}])
    dm = _datamodule(data, batch_size=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (batch,) = list(dm.train_dataloader())
        dm.on_before_batch_transfer(batch, 0)
    assert batch["image"].shape == (5, 3, 32, 32)
    assert dm.bad_samples == 1
    messages = [str(w.message) for w in caught]
    assert any("'badtxt'" in m and "00000.tar" in m and "utf-8" in m for m in messages), messages


def test_training_stops_naming_a_shard_the_store_cannot_read(tmp_path):
    data = shard_dataset(tmp_path / "ds", [good(4, "a"), good(4, "b")])
    dm = _datamodule(data, batch_size=4)
    (Path(data) / "00001.tar").unlink()  # not a corrupt shard to skip: the store lost it
    with pytest.raises(ShardReadError, match=r"00001\.tar: the store failed to read"):
        list(dm.train_dataloader())


# ---- curation and the index --------------------------------------------------------------------


def test_curation_rejects_each_bad_sample_naming_it_and_keeps_the_rest(dataset, tmp_path):
    from tasks.curation import REJECTED_NAME, select_samples, write_curated
    from tasks.curation.spec import FilterSpec

    ds = open_dataset(dataset)
    selection = select_samples(ds, FilterSpec(), progress=False)
    output = str(tmp_path / "curated")
    write_curated(ds, selection, output, num_shards=1, parameters={}, progress=False)
    kept = sorted(s.key for s in open_dataset(output).iter_samples())
    assert kept == ["a0", "a1", "b0", "b1", "c0", "c1", "c2", "c3"]
    rejected = pq.read_table(Path(output) / REJECTED_NAME).to_pylist()
    details = {r["key"]: (r["filter"], r["detail"]) for r in rejected}
    assert details["badtxt"][0] == "undecodable" and "not UTF-8" in details["badtxt"][1]
    assert details["badjson"][0] == "undecodable" and "not JSON" in details["badjson"][1]


# ---- memory: not the sample's fault -------------------------------------------------------------

OUT_OF_MEMORY = """
import resource, sys
from clip_model.datamodule import ClipDataModule
from clip_model.tokenizer import get_tokenizer
from clip_model.transforms import eval_transform, train_transform

dm = ClipDataModule(
    sys.argv[1], tokenizer=get_tokenizer("openai", context_length=16),
    train_transform=train_transform(32), val_transform=eval_transform(32), image_size=32,
    batch_size=4, workers=0, seed=5, shuffle_buffer=1,
)
loader = dm.train_dataloader()
pages = int(open("/proc/self/statm").read().split()[0])
limit = pages * resource.getpagesize() + 300 * 2**20  # 300 MiB more than now
resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
list(loader)
print(f"trained on, {dm.bad_samples} bad sample(s)")
"""


@pytest.mark.slow  # a process importing torch and decoding a 144 Mpx image: over a minute
def test_training_stops_on_memory_error_instead_of_counting_a_bad_sample(tmp_path):
    """A 144 Mpx image let through by a raised pixel cap needs 432 MB as RGB: under a memory
    limit its decode raises a real MemoryError, which must stop training, not be skipped."""
    import os
    import subprocess
    import sys

    from test_decode import png_bomb

    samples = {**good(3), "huge": {"txt": b"a huge picture"}}
    data = shard_dataset(tmp_path / "ds", [samples])
    (Path(data) / "00000.tar").unlink()
    with tarfile.open(Path(data) / "00000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, parts in samples.items():
            image = png_bomb() if key == "huge" else _jpeg(len(key))
            for ext, payload in {"png" if key == "huge" else "jpg": image, **parts}.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    entries = [describe_shard(data, "00000")]
    (Path(data) / "manifest.json").unlink()
    write_manifest(data, entries, stage="test")
    env = {**os.environ, "CLIP_MAX_IMAGE_PIXELS": "200000000"}
    proc = subprocess.run(
        [sys.executable, "-c", OUT_OF_MEMORY, data], capture_output=True, text=True, env=env
    )
    assert proc.returncode != 0 and "MemoryError" in proc.stderr, proc.stdout + proc.stderr[-2000:]
    assert "replacing bad sample" not in proc.stderr
