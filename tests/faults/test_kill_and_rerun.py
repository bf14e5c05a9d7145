"""A stage killed at a few points, then run again (issue 11, class 7 of "Deliver": "a kill at
random points of each stage followed by a rerun that completes with nothing lost").

Each stage runs as a real process (its own session, the test's Prefect API and MLflow) and is
SIGKILLed at points found by watching its files: as soon as its staging appears, when its first
shard (or embedding file) is written, and at a seeded random delay after it begins writing. After
every kill the output must either not look complete (no dataset opens there, no index loads) or
be complete and whole (it verifies and equals an uninterrupted run's); a curation killed while
replacing an older output must leave that older output intact. Then the stage runs again and
must produce exactly what an uninterrupted run produces.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import pytest
import yaml
from fault_model import tiny_checkpoint
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

pytestmark = pytest.mark.slow  # a dozen stage processes, each importing torch and Prefect

N = 40  # 4 crawl shards of 10
FILTERS = {
    "filters": [
        {"name": "basic", "min_side": 8, "max_aspect": 10.0, "min_words": 1, "min_chars": 1},
        {"name": "dedup_sha256"},
    ]
}


def _files(folder: Path, pattern: str, in_place: bool) -> list[Path]:
    """Files the run has written: in the output itself for an index (written in place), in the
    staging for a dataset (never the older output it is replacing)."""
    return list((folder if in_place else folder.parent / f".{folder.name}.staging").glob(pattern))


def _writing(folder: Path) -> bool:
    """The run has begun writing: its staging exists (a dataset), or the output's record says a
    run has it open (an index, written in place)."""
    if (folder.parent / f".{folder.name}.staging").exists():
        return True
    record = folder / ".output.json"
    try:
        return '"open"' in record.read_text()
    except OSError:
        return False


def _kill_points(name: str, first_file: str, in_place: bool = False) -> list[tuple[str, object]]:
    """(label, predicate factory) for each point a run of the stage `name` is killed at."""
    delay = random.Random(name).uniform(0.1, 1.0)  # seeded: the same "random" point every run
    return [
        ("it begins writing", _writing),
        (f"its first {first_file} is written", lambda out: bool(_files(out, first_file, in_place))),
        (f"{delay:.1f} s after it begins writing", _after(delay)),
    ]


def _after(delay: float):
    seen: dict[Path, float] = {}

    def ready(out: Path) -> bool:
        if not _writing(out):
            return False
        start_time = seen.setdefault(out, time.monotonic())
        return time.monotonic() - start_time >= delay

    return ready


def _run_killed(cmd: list[str], env: dict, log: Path, out: Path, predicate) -> bool:
    """Start the stage and SIGKILL it once `predicate(out)` holds; False if it ended first."""
    proc = start(cmd, env, log)
    try:
        caught = wait_for(lambda: predicate(out), 600, proc)
        finished = proc.poll() is not None
    finally:
        kill(proc)
    assert caught or finished, log.read_text()[-3000:]
    return not finished


def _dataset_state(out: Path) -> tuple[str, ...] | None:
    """The shard digests of the dataset at `out`, verified; None when none opens there."""
    try:
        ds = open_dataset(str(out), verify=True)
    except DatasetError:
        return None
    return tuple(s.tar_sha256 for s in ds.manifest.shards)


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    write_images(root, "A", N)
    return root


# ---- ingest -------------------------------------------------------------------------------------


def test_a_killed_crawl_never_looks_complete_and_its_rerun_loses_nothing(
    web, tmp_path, prefect_harness, mlflow_tmp
):
    from flows.ingest import ingest

    env, kills = child_env(tmp_path), []
    with serve(web, delay=0.1) as base:
        urls = write_url_list(tmp_path / "a.parquet", base, "A", N)
        for i, (label, predicate) in enumerate(_kill_points("ingest", "**/*.tar")):
            out = tmp_path / f"crawl{i}"
            killed = _run_killed(
                ingest_command(urls, out), env, tmp_path / f"ingest{i}.log", out, predicate
            )
            kills.append(killed)
            state = _dataset_state(out)
            assert state is None or not killed, f"killed when {label}: {out} looks complete"
            result = ingest(url_list=str(urls), output=str(out), params=crawl_params())
            assert result.rows == N, label
            captions = open_dataset(str(out), verify=True).metadata(["caption"])
            assert set(captions.column("caption").to_pylist()) == {
                f"A caption {j}" for j in range(N)
            }, label
    assert any(kills), "every crawl ended before its kill point: nothing was tested"


# ---- curate -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crawled(web, tmp_path_factory, prefect_harness, session_mlflow) -> Path:
    from flows.ingest import ingest

    root = tmp_path_factory.mktemp("crawled")
    with serve(web) as base:
        urls = write_url_list(root / "a.parquet", base, "A", N)
        ingest(url_list=str(urls), output=str(root / "crawl"), params=crawl_params())
    return root / "crawl"


def _curate_command(data: Path, out: Path, filters: Path, shards: int) -> list[str]:
    return [
        sys.executable, "-m", "flows.curate", "--input", str(data), "--output", str(out),
        "--filters", str(filters), "--num-shards", str(shards), "--force",
    ]  # fmt: skip


def test_a_killed_curation_keeps_the_older_output_and_its_rerun_loses_nothing(
    crawled, tmp_path, prefect_harness, mlflow_tmp
):
    from flows.curate import curate

    filters = tmp_path / "filters.yaml"
    filters.write_text(yaml.safe_dump(FILTERS))
    # what uninterrupted runs make: the older output (1 shard) and the new one (2 shards)
    for name, shards in (("older", 1), ("newer", 2)):
        curate(str(crawled), str(tmp_path / name), str(filters), num_shards=shards)
    older, newer = _dataset_state(tmp_path / "older"), _dataset_state(tmp_path / "newer")
    assert older and newer and older != newer

    env, kills = child_env(tmp_path), []
    for i, (label, predicate) in enumerate(_kill_points("curate", "*.tar")):
        out = tmp_path / f"curated{i}"
        curate(str(crawled), str(out), str(filters), num_shards=1)  # the output being replaced
        cmd = _curate_command(crawled, out, filters, 2)
        killed = _run_killed(cmd, env, tmp_path / f"curate{i}.log", out, predicate)
        kills.append(killed)
        state = _dataset_state(out)
        # killed before its commit: the older output, whole; after it: the new one, whole
        assert state in (older, newer), f"killed when {label} ({killed=}): {out} holds {state}"
        curate(str(crawled), str(out), str(filters), num_shards=2, force=True)
        assert _dataset_state(out) == newer, label
        open_dataset(str(crawled), verify=True)  # the input untouched
    assert any(kills), "every curation ended before its kill point: nothing was tested"


# ---- index --------------------------------------------------------------------------------------


def _index_state(out: Path, vectors: int) -> str:
    """ "none" (no index loads there) or "complete" (every vector, its sha256 checked)."""
    from storage.embeddings import EmbeddingStore, IndexFormatError

    store = EmbeddingStore(str(out))
    try:
        manifest = store.read_manifest()
    except (IndexFormatError, ValueError):
        return "none"
    if manifest is None or manifest.index is None:
        return "none"
    index = store.load_index(manifest.index)  # a recorded index must load, sha256 and all
    assert index.ntotal == manifest.index.vectors
    if manifest.index.shards != [s.name for s in manifest.shards]:
        return "none"  # an earlier build: the pending shards are not searchable yet
    assert index.ntotal == vectors, f"{out}: {index.ntotal} vectors of {vectors}"
    return "complete"


def test_a_killed_index_run_never_loads_half_and_its_rerun_loses_nothing(
    crawled, tmp_path, prefect_harness, mlflow_tmp
):
    from flows.index import index

    checkpoint = tiny_checkpoint(tmp_path / "model.pt")
    vectors = len(open_dataset(str(crawled)))
    env, kills = child_env(tmp_path), []
    for i, (label, predicate) in enumerate(
        _kill_points("index", "embeddings/*.npy", in_place=True)
    ):
        out = tmp_path / f"index{i}"
        cmd = [
            sys.executable, "-m", "flows.index", "--checkpoint", str(checkpoint),
            "--data", str(crawled), "--output", str(out), "--batch-size", "4",
        ]  # fmt: skip
        kills.append(_run_killed(cmd, env, tmp_path / f"index{i}.log", out, predicate))
        _index_state(out, vectors)  # raises if a recorded index is damaged or short
        result = index(checkpoint=str(checkpoint), data=str(crawled), output=str(out))
        assert result.vectors == vectors, label
        assert _index_state(out, vectors) == "complete", label
    assert any(kills), "every index run ended before its kill point: nothing was tested"
