"""The index stage's output (issue 11, classes 2, 7 and 8): never inside its dataset, one run per
folder, and a FAISS file that no longer matches the sha256 its manifest records is refused on load
(and rebuilt by a rerun of the stage) instead of being searched."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fault_model import tiny_checkpoint
from PIL import Image

from storage import DatasetWriter, LockError, OutputError, open_dataset
from storage.embeddings import EmbeddingStore, IndexFormatError, build_faiss_index, choose_spec


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _dataset(path: Path, n: int = 6) -> str:
    with DatasetWriter(str(path), stage="test", samples_per_shard=3) as writer:
        for i in range(n):
            writer.write(f"s{i}", _jpeg(i), f"picture {i}")
    return str(path)


def _damage(path: Path) -> None:
    """Change the last bytes (vector data): FAISS still parses the file, only its sha256 tells."""
    data = bytearray(path.read_bytes())
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])
    path.write_bytes(bytes(data))


# ---- the FAISS file's sha256 --------------------------------------------------------------------


def test_a_faiss_file_changed_after_it_was_written_is_refused_on_load(tmp_path):
    store = EmbeddingStore(str(tmp_path / "index"))
    vectors = np.random.default_rng(0).standard_normal((50, 8)).astype("float32")
    spec = choose_spec(len(vectors))
    entry = store.save_index(build_faiss_index(spec, vectors), spec, ["00000"])
    assert store.load_index(entry).ntotal == 50
    _damage(tmp_path / "index" / entry.file)
    with pytest.raises(IndexFormatError, match=r"sha256 .* differs .*rerun the index stage"):
        store.load_index(entry)


# ---- an output inside the dataset ---------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("model") / "model.pt")


def test_the_command_line_refuses_an_index_inside_its_dataset(tmp_path, checkpoint):
    from tasks.params.index import IndexParams

    data = _dataset(tmp_path / "ds")
    (tmp_path / "link").symlink_to(tmp_path / "ds")
    for output in (f"{data}/index", f"{tmp_path}/x/../ds/./index", f"{tmp_path}/link/index"):
        params = IndexParams(checkpoint=str(checkpoint), data=data, output=output)
        with pytest.raises(ValueError, match=r"--output .* lies inside the input"):
            params.check()


def test_the_index_flow_refuses_an_output_inside_its_dataset_writing_nothing(
    tmp_path, checkpoint, prefect_harness, mlflow_tmp
):
    from flows.index import index

    data = _dataset(tmp_path / "ds")
    before = sorted(os.listdir(data))
    (tmp_path / "link").symlink_to(tmp_path / "ds")
    with pytest.raises(OutputError, match="lies inside the input"):
        index(checkpoint=str(checkpoint), data=data, output=str(tmp_path / "link" / "index"))
    assert sorted(os.listdir(data)) == before
    open_dataset(data, verify=True)


# ---- one run per folder, and a damaged FAISS file rebuilt ----------------------------------------

HOLD = """
import sys, time
from storage.output import stage_output
with stage_output(sys.argv[1], stage="index", mode="in_place"):
    print("held", flush=True)
    time.sleep(300)
"""


def test_a_second_index_run_on_one_output_is_refused_naming_the_owner(
    tmp_path, checkpoint, prefect_harness, mlflow_tmp
):
    from flows.index import index

    data, output = _dataset(tmp_path / "ds"), str(tmp_path / "index")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, output], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockError, match=rf"another run is writing.*'index'.*pid {holder.pid}"):
            index(checkpoint=str(checkpoint), data=data, output=output)
    finally:
        holder.kill()  # SIGKILL: its lock file stays behind, stale
        holder.wait()
    result = index(checkpoint=str(checkpoint), data=data, output=output)
    assert result.vectors == 6


def test_a_rerun_rebuilds_a_damaged_faiss_file(tmp_path, checkpoint, prefect_harness, mlflow_tmp):
    from flows.index import index

    data, output = _dataset(tmp_path / "ds"), str(tmp_path / "index")
    index(checkpoint=str(checkpoint), data=data, output=output)
    store = EmbeddingStore(output)
    _damage(Path(output) / store.manifest().index.file)
    result = index(checkpoint=str(checkpoint), data=data, output=output)
    assert result.rebuilt and result.reused_shards == 2
    assert store.load_index(store.manifest().index).ntotal == 6
