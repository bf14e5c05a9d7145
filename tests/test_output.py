"""Stage outputs as transactions (storage/output.py, storage/lock.py): aliasing refused, foreign
outputs kept unless forced, staging swapped in whole, one writer per output, stale locks broken."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from storage.fs import atomic_write_bytes, filesystem, join
from storage.lock import LockError, LockOwner, OutputLock
from storage.output import OutputError, read_record, stage_output

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "memory"])
def where(request, tmp_path):
    """A parent folder: a local one, or an in-memory fsspec one (no directory rename there)."""
    if request.param == "local":
        return str(tmp_path)
    return f"memory://t-{uuid.uuid4().hex[:8]}"


def write_version(out, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        atomic_write_bytes(join(out.staging, name), data)


def listing(url: str) -> dict[str, bytes]:
    fs, root = filesystem(url)
    return {
        p[len(root.rstrip("/")) + 1 :]: fs.cat_file(p)
        for p in fs.find(root)
        if not p.rsplit("/", 1)[-1].startswith(".")
    }


def test_a_committed_output_replaces_the_old_one_whole(where):
    out_url = join(where, "out")
    with stage_output(out_url, stage="s", identity={"v": 1}, seal="seal") as out:
        assert not out.done and out.staging != out_url
        write_version(out, {"a": b"1", "old-only": b"x", "seal": b"ok"})
        out.commit()
    assert listing(out_url) == {"a": b"1", "old-only": b"x", "seal": b"ok"}
    with stage_output(out_url, stage="s", identity={"v": 2}, force=True, seal="seal") as out:
        write_version(out, {"a": b"2", "seal": b"ok"})
        assert listing(out_url)["a"] == b"1"  # untouched until the commit
        out.commit()
    assert listing(out_url) == {"a": b"2", "seal": b"ok"}
    fs, parent = filesystem(where)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(parent, detail=False)) == ["out"]
    assert read_record(out_url).state == "committed"


def test_same_identity_is_done_and_a_failed_run_leaves_the_output_as_it_was(where):
    out_url = join(where, "out")
    with stage_output(out_url, stage="s", identity={"v": 1}) as out:
        write_version(out, {"a": b"1"})
        out.commit()
    with stage_output(out_url, stage="s", identity={"v": 1}) as out:
        assert out.done
    with pytest.raises(RuntimeError, match="boom"):
        with stage_output(out_url, stage="s", identity={"v": 1}, force=True) as out:
            assert not out.done  # force redoes an up-to-date output
            write_version(out, {"a": b"half"})
            raise RuntimeError("boom")
    assert listing(out_url) == {"a": b"1"}


def test_a_partial_staging_is_resumed_only_for_the_same_identity(where):
    out_url = join(where, "out")
    with pytest.raises(RuntimeError):
        with stage_output(out_url, stage="s", identity={"list": "A"}, resume=True) as out:
            write_version(out, {"shard-0": b"A0"})
            raise RuntimeError("killed")
    with stage_output(out_url, stage="s", identity={"list": "A"}, resume=True) as out:
        assert out.resumed and listing(out.staging) == {"shard-0": b"A0"}
    with stage_output(out_url, stage="s", identity={"list": "B"}, resume=True) as out:
        assert not out.resumed and listing(out.staging) == {}  # never mixed with A's shards


def test_another_stages_or_unrecorded_output_is_refused_without_force(where):
    fs, _ = filesystem(where)
    foreign = join(where, "foreign")
    atomic_write_bytes(join(foreign, "precious.txt"), b"keep me")
    with pytest.raises(OutputError, match=r"files that no stage.*precious\.txt.*--force"):
        with stage_output(foreign, stage="s", identity={"v": 1}):
            pass
    assert listing(foreign) == {"precious.txt": b"keep me"}
    other = join(where, "other")
    with stage_output(other, stage="ingest", identity={"v": 1, "params": {"size": 1}}) as out:
        out.commit()
    with pytest.raises(OutputError, match=r"the ingest stage's output.*--force"):
        with stage_output(other, stage="curate", identity={"v": 1, "params": {"size": 1}}):
            pass
    with pytest.raises(OutputError, match=r"other inputs or parameters \(params\.size\)"):
        with stage_output(other, stage="ingest", identity={"v": 1, "params": {"size": 2}}):
            pass


def test_in_place_output_is_bound_to_its_identity_and_force_starts_it_clean(where):
    run = join(where, "run")
    with stage_output(run, stage="train", identity={"model": "a"}, mode="in_place") as out:
        assert out.staging == out.url
        atomic_write_bytes(join(run, "checkpoints", "step-1.ckpt"), b"w")
    with stage_output(run, stage="train", identity={"model": "a"}, mode="in_place") as out:
        assert out.interrupted and not out.done  # resumable: the run never committed
        out.commit()
    assert read_record(run).state == "committed"
    with pytest.raises(OutputError, match=r"other inputs or parameters \(model\)"):
        with stage_output(run, stage="train", identity={"model": "b"}, mode="in_place"):
            pass
    with stage_output(run, stage="train", identity={"model": "b"}, mode="in_place", force=True):
        assert listing(run) == {}
    with stage_output(run, stage="train", identity=None, mode="in_place") as out:
        assert out.record.stage == "train"  # identity None: any output of this stage is ours
    with pytest.raises(OutputError, match="the train stage's output"):
        with stage_output(run, stage="index", identity=None, mode="in_place"):
            pass


@pytest.mark.parametrize(
    ("output", "inputs", "message"),
    [
        ("in/.", ["in"], "is the input"),
        ("x/../in", ["in"], "is the input"),
        ("link", ["in"], "is the input"),
        ("in/sub/out", ["in"], "lies inside the input"),
        ("linkdir/out", ["in"], "lies inside the input"),
        (".", ["in"], "contains the input"),
        ("data", ["data/urls.parquet"], "contains the input"),
        ("in", ["elsewhere", "in/x"], "contains the input"),
    ],
)
def test_outputs_aliasing_an_input_are_refused_naming_both(
    tmp_path, monkeypatch, output, inputs, message
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "manifest.json").write_text("{}")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "urls.parquet").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "in")
    (tmp_path / "linkdir").symlink_to(tmp_path / "in")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(OutputError, match=message) as refused:
        with stage_output(output, stage="s", inputs=inputs, force=True):
            pass
    assert repr(output) in str(refused.value)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written, no lock


def test_aliasing_is_refused_on_fsspec_urls_too():
    with pytest.raises(OutputError, match="is the input"):
        with stage_output("memory://b/data/./ds/", stage="s", inputs=["memory://b/data/ds"]):
            pass
    with pytest.raises(OutputError, match="lies inside the input"):
        with stage_output("memory://b/x/../data/ds/idx", stage="s", inputs=["memory://b/data/ds"]):
            pass


def test_force_never_replaces_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path / "work")
    with pytest.raises(OutputError, match="working directory"):
        with stage_output(str(tmp_path / "work"), stage="s", force=True):
            pass
    assert (tmp_path / "work" / "notes.txt").read_text() == "mine"


def test_an_interrupted_commit_is_finished_by_the_next_run(tmp_path):
    out_url = str(tmp_path / "out")
    with stage_output(out_url, stage="s", identity={"v": 1}) as out:
        write_version(out, {"a": b"1"})
        out.commit()
    # a run that marked its staging committed and died before swapping it in
    staging = tmp_path / ".out.staging"
    staging.mkdir()
    (staging / "a").write_bytes(b"2")
    record = json.loads((tmp_path / "out" / ".output.json").read_text())
    record["identity"], record["fields"] = "sha256:v2", {"v": 2}
    (staging / ".output.json").write_text(json.dumps(record))
    with stage_output(out_url, stage="s", identity={"v": 9}, force=True) as out:
        assert (tmp_path / "out" / "a").read_bytes() == b"2"
        assert out.record.identity == "sha256:v2"


# ---- locks ------------------------------------------------------------------------------------

HOLD = """
import sys, time
from storage.output import stage_output
with stage_output(sys.argv[1], stage="holder") as out:
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_process_on_the_same_output_is_refused_naming_the_owner(tmp_path):
    out_url = str(tmp_path / "out")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, out_url], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockError, match=rf"stage 'holder', host .* pid {holder.pid}"):
            with stage_output(out_url, stage="s"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with stage_output(out_url, stage="s") as out:  # its owner is dead: the lock is stale
        out.commit()


def _fake_lock(path: Path, **changes) -> None:
    owner = LockOwner.me("crawler")
    for k, v in changes.items():
        setattr(owner, k, v)
    path.write_text(json.dumps(owner.__dict__))


def test_stale_locks_are_broken_and_reported_live_ones_are_not(tmp_path, caplog):
    lock_file = tmp_path / ".out.lock"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    _fake_lock(lock_file, pid=int(dead.stdout))
    with caplog.at_level(logging.WARNING), OutputLock(str(lock_file), stage="s"):
        pass
    assert f"process {int(dead.stdout)} on this host is gone" in caplog.text
    caplog.clear()
    _fake_lock(lock_file, host="elsewhere", heartbeat=time.time() - 3600)
    with caplog.at_level(logging.WARNING), OutputLock(str(lock_file), stage="s", ttl=600):
        pass
    assert "no heartbeat from host elsewhere" in caplog.text
    _fake_lock(lock_file, host="elsewhere", heartbeat=time.time())
    with pytest.raises(LockError, match=r"host elsewhere .*delete .*\.out\.lock"):
        OutputLock(str(lock_file), stage="s").acquire(wait=0.2, poll=0.05)
    assert socket.gethostname() != "elsewhere"


def test_a_held_lock_beats_and_a_run_that_lost_it_does_not_commit(tmp_path):
    out_url = str(tmp_path / "out")
    with stage_output(out_url, stage="s", ttl=0.5) as out:
        lock_file = Path(out.lock.url)
        first = json.loads(lock_file.read_text())["heartbeat"]
        time.sleep(0.4)
        assert json.loads(lock_file.read_text())["heartbeat"] > first
        _fake_lock(lock_file, host="thief")  # another run took it for dead
        write_version(out, {"a": b"1"})
        with pytest.raises(LockError, match="lost its lock"):
            out.commit()
    assert not (tmp_path / "out").exists()
