"""Stage outputs as transactions: every stage writes its output through `stage_output`.

    with stage_output(output, stage="curate", inputs=[input_url], identity={...}, force=force) as out:
        if out.done:                      # this very output is already there: nothing to do
            return ...
        write_everything_into(out.staging)
        out.commit()                      # swapped in whole; before this, OUTPUT is untouched

What it guarantees (docs/stage-outputs.md has the reasoning):

- An output that is, contains or lies inside one of the stage's inputs (after resolving `.`,
  `..` and symlinks, for local paths and fsspec URLs) is refused before anything is written.
- A non-empty output that is not this stage's earlier output for the same identity (inputs and
  parameters) is refused unless `force`; `force` also redoes an output that is up to date.
- A lock per output (`.NAME.lock` beside it, see storage/lock.py) stops two runs writing it.
- `mode="replace"` (datasets): the stage writes a complete new version into `out.staging`
  (`.NAME.staging` beside the output) and `commit()` swaps it in: an atomic directory exchange
  on a local disk; on an object store, where no rename exists, the files are copied into place
  with the seal (e.g. `manifest.json`) and the output's record written last, so the output looks
  complete only once every file is there. A partial staging of the same identity may be resumed
  (`resume=True`, the crawl's working state); one of another identity is discarded, never mixed.
- `mode="in_place"` (a training run folder, a search index, an evaluation results folder): the
  output is itself resumable working state whose own files commit themselves (checkpoints, a
  manifest written last); the stage writes into `out.staging == out.url`, bound to its identity
  by the record, under the lock. `identity=None` accepts any output of this stage (a folder
  that collects many runs' results).

Every output carries `.output.json`, its record: stage, identity digest, inputs, state.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import posixpath
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel, ConfigDict, Field

from storage.fs import atomic_write_bytes, filesystem
from storage.lock import DEFAULT_TTL, LockError, OutputLock

__all__ = [
    "RECORD_NAME",
    "OutputError",
    "OutputRecord",
    "StageOutput",
    "canonical",
    "check_not_aliased",
    "identity_digest",
    "preflight",
    "read_record",
    "stage_output",
]

RECORD_NAME = ".output.json"
Mode = Literal["replace", "in_place"]

log = logging.getLogger(__name__)


class OutputError(ValueError):
    """An output refused: it aliases an input, or holds something this run may not replace."""


class OutputRecord(BaseModel):
    """`.output.json`: which stage wrote this folder, for which inputs and parameters."""

    model_config = ConfigDict(extra="forbid")

    stage: str
    identity: str | None = Field(description="digest of the inputs and parameters; None: any")
    fields: Any = Field(default=None, description="what the identity digest was computed from")
    inputs: list[str] = Field(default_factory=list)
    state: Literal["staging", "open", "committed"]
    updated: str = ""


def identity_digest(identity: Any) -> str | None:
    if identity is None:
        return None
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


# ---- paths: where an output is, and what it really points at -----------------------------------


class _Location:
    """An output URL split into its filesystem and a normalised path (local: symlinks resolved)."""

    def __init__(self, url: str):
        self.given = str(url)
        self.fs, path = filesystem(self.given)
        self.local = isinstance(self.fs, LocalFileSystem)
        if self.local:
            self.path = os.path.realpath(os.path.expanduser(path))
        else:
            self.path = posixpath.normpath(path) if path else ""
        self.parent, self.name = posixpath.split(self.path.rstrip("/"))
        protocol = self.fs.protocol
        self.protocol = (
            "file" if self.local else (protocol[0] if isinstance(protocol, tuple) else protocol)
        )

    def url(self, path: str) -> str:
        """A URL the rest of the code reads back: a plain path locally, protocol://path else."""
        return path if self.local else self.fs.unstrip_protocol(path)

    def sibling(self, suffix: str) -> str:
        return posixpath.join(self.parent, f".{self.name}.{suffix}")

    @property
    def canonical(self) -> str:
        return f"{self.protocol}://{self.path}"


def canonical(url: str) -> str:
    """`protocol://path` with `.`, `..` and (locally) symlinks resolved: equal means same place."""
    return _Location(url).canonical


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip("/") + "/")


def check_not_aliased(output: str, inputs: Sequence[str]) -> None:
    """Refuse an output that is, contains or lies inside one of `inputs` (files or folders)."""
    out = _Location(output)
    for given in inputs:
        if given is None:
            continue
        inp = _Location(given)
        if inp.protocol != out.protocol:
            continue
        if out.path == inp.path:
            raise OutputError(
                f"output {output!r} is the input {given!r} (both are {out.canonical}): a stage "
                "never writes over what it reads; choose another output"
            )
        if _inside(out.path, inp.path):
            raise OutputError(
                f"output {output!r} lies inside the input {given!r} ({out.canonical} is under "
                f"{inp.canonical}): writing it would change the input; choose an output outside it"
            )
        if _inside(inp.path, out.path):
            raise OutputError(
                f"output {output!r} contains the input {given!r} ({inp.canonical} is under "
                f"{out.canonical}): replacing the output would destroy the input; choose another "
                "output"
            )


# ---- the record --------------------------------------------------------------------------------


def _read_json_record(fs, path: str) -> OutputRecord | None:
    try:
        with fs.open(path, "rb") as f:
            return OutputRecord.model_validate_json(f.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None  # unreadable: treated as no record (so: foreign)


def read_record(url: str) -> OutputRecord | None:
    """The record of the output at `url`, or None."""
    loc = _Location(url)
    return _read_json_record(loc.fs, posixpath.join(loc.path, RECORD_NAME))


def _write_record(loc: _Location, folder: str, record: OutputRecord) -> None:
    record.updated = datetime.now(UTC).isoformat(timespec="seconds")
    atomic_write_bytes(
        loc.url(posixpath.join(folder, RECORD_NAME)),
        (record.model_dump_json(indent=2) + "\n").encode(),
    )


# ---- swapping a folder into place --------------------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two local paths (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), a)


def _remove(loc: _Location, path: str) -> None:
    if loc.local:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)
    elif loc.fs.exists(path):
        loc.fs.rm(path, recursive=True)


def _entries(loc: _Location, path: str) -> list[str]:
    if loc.local:
        return os.listdir(path) if os.path.isdir(path) else []
    try:
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in loc.fs.ls(path, detail=False)]
    except FileNotFoundError:
        return []


def _files(loc: _Location, root: str) -> list[str]:
    """Every file under `root`, relative to it."""
    found = loc.fs.find(root)
    return sorted(p[len(root.rstrip("/")) + 1 :] for p in found)


def _swap_local(loc: _Location, staging: str) -> None:
    if not os.path.lexists(loc.path):
        os.rename(staging, loc.path)
        return
    if _exchange(staging, loc.path):
        _remove(loc, staging)  # now holds the old output
        return
    # no atomic exchange on this filesystem: two renames; a crash between them leaves the new
    # output committed in staging, which the next run moves into place (see _finish_commit)
    old = loc.sibling(f"old-{uuid.uuid4().hex[:8]}")
    os.rename(loc.path, old)
    os.rename(staging, loc.path)
    _remove(loc, old)


def _swap_remote(loc: _Location, staging: str, seal: str | None) -> None:
    """No directory rename on an object store: the output stops looking complete (its record and
    seal go first), the staged files are copied in, stale ones removed, the seal and the record
    copied last. A crash anywhere leaves an output without a record, and the staging (already
    marked committed) from which the next run finishes the copy."""
    fs = loc.fs
    last = [name for name in (seal, RECORD_NAME) if name]
    for name in last:
        path = posixpath.join(loc.path, name)
        if fs.exists(path):
            fs.rm(path)
    staged = _files(loc, staging)
    for rel in staged:
        if rel not in last:
            fs.copy(posixpath.join(staging, rel), posixpath.join(loc.path, rel))
    if fs.exists(loc.path):
        keep = set(staged)
        for rel in _files(loc, loc.path):
            if rel not in keep:
                fs.rm(posixpath.join(loc.path, rel))
    for name in last:
        if name in staged:
            fs.copy(posixpath.join(staging, name), posixpath.join(loc.path, name))
    fs.rm(staging, recursive=True)


# ---- the transaction ---------------------------------------------------------------------------


class StageOutput:
    """An output being written by one run. Made by `stage_output`; see the module docstring."""

    def __init__(
        self,
        loc: _Location,
        *,
        stage: str,
        inputs: list[str],
        identity: Any,
        mode: Mode,
        seal: str | None,
        lock: OutputLock,
    ):
        self._loc = loc
        self.url = loc.given.rstrip("/") or loc.given
        self.stage, self.inputs, self.mode, self.seal = stage, inputs, mode, seal
        self.fields = identity
        self.identity = identity_digest(identity)
        self.lock = lock
        self.record: OutputRecord | None = None  # what the output held when the run began
        self.done = False  # the output is already this stage's committed output for this identity
        self.resumed = False  # replace mode: a partial staging of this identity was kept
        self.committed = False
        self._staging_path = loc.sibling("staging") if mode == "replace" else loc.path

    def __repr__(self) -> str:
        return f"StageOutput({self.url!r}, stage={self.stage!r}, mode={self.mode!r})"

    @property
    def staging(self) -> str:
        """Where the stage writes: the staging folder (replace) or the output itself (in_place)."""
        return self._loc.url(self._staging_path) if self.mode == "replace" else self.url

    @property
    def interrupted(self) -> bool:
        """The output is this identity's, left unfinished by an earlier run (resumable state)."""
        r = self.record
        return (
            r is not None and r.stage == self.stage and r.identity == self.identity
            and r.state != "committed"
        )  # fmt: skip

    def _new_record(self, state: str) -> OutputRecord:
        return OutputRecord(
            stage=self.stage,
            identity=self.identity,
            fields=self.fields,
            inputs=self.inputs,
            state=state,
        )

    def reopen(self) -> None:
        """In place: the stage is about to change an output it found complete (a training
        continued under another config): marked open, so it reads as unfinished until `commit()`."""
        if self.mode != "in_place":
            raise ValueError(f"{self.url}: reopen() is for in-place outputs; replace stages anew")
        _write_record(self._loc, self._loc.path, self._new_record("open"))
        self.done = self.committed = False

    def commit(self) -> None:
        """Make what the stage wrote the output: swapped in whole (replace) or marked committed."""
        if self.committed:
            return
        if not self.lock.held():
            raise LockError(
                f"{self.url}: this run lost its lock ({self.lock.url}) to another run that took "
                "it for dead; nothing committed"
            )
        loc = self._loc
        if self.seal is not None and not loc.fs.exists(
            posixpath.join(self._staging_path, self.seal)
        ):
            raise RuntimeError(f"{self.staging}: no {self.seal}; the output is not complete")
        _write_record(loc, self._staging_path, self._new_record("committed"))
        if self.mode == "replace":
            _finish_commit(loc, self._staging_path, self.seal)
        self.committed = self.done = True


def _finish_commit(loc: _Location, staging: str, seal: str | None) -> None:
    if loc.local:
        _swap_local(loc, staging)
    else:
        _swap_remote(loc, staging, seal)


def _describe(record: OutputRecord | None, entries: list[str]) -> str:
    if record is None:
        shown = ", ".join(sorted(entries)[:5]) + (", ..." if len(entries) > 5 else "")
        return f"files that no stage of this pipeline recorded writing ({shown})"
    inputs = f" from {', '.join(record.inputs)}" if record.inputs else ""
    return f"the {record.stage} stage's output{inputs} (identity {str(record.identity)[:19]})"


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [prefix.rstrip(".") or "identity"]


def _refuse_dangerous(loc: _Location) -> None:
    """`force` replaces a folder: never the filesystem root, a home folder, or one holding the
    current working directory."""
    if not loc.local:
        return
    cwd = os.path.realpath(os.getcwd())
    home = os.path.realpath(os.path.expanduser("~"))
    if loc.path in ("/", home) or _inside(cwd, loc.path):
        raise OutputError(
            f"output {loc.given!r} ({loc.path}) holds the home folder or the working directory; "
            "it is never replaced, even with --force"
        )


def _ownership(
    loc: _Location,
    stage: str,
    identity: Any,
    force: bool,
    legacy: Callable[[str], bool] | None = None,
    info: Callable[[str], None] = log.info,
) -> tuple[OutputRecord | None, bool, list[str]]:
    """(the output's record, whether it is this stage's for `identity`, its entries); refuses a
    non-empty output that is not, unless `force`."""
    entries = _entries(loc, loc.path)
    record = _read_json_record(loc.fs, posixpath.join(loc.path, RECORD_NAME)) if entries else None
    digest = identity_digest(identity)
    if entries and record is None and legacy is not None and legacy(loc.url(loc.path)):
        # written by this stage before outputs carried a record: adopted, its files kept (the
        # record is written when the run opens the output)
        info(f"{loc.given}: an output of the {stage} stage from before output records; kept")
        record = OutputRecord(stage=stage, identity=digest, state="committed")
    ours = (
        record is not None
        and record.stage == stage
        and (digest is None or record.identity == digest)
    )
    if entries and not ours and not force:
        hint = ""
        if record is not None and record.stage == stage:
            changed = _differences(record.fields, identity)
            hint = f"; it was made from other inputs or parameters ({', '.join(changed)})"
        raise OutputError(
            f"output {loc.given!r} already holds {_describe(record, entries)}{hint}. Pass "
            "--force (force=True) to replace it, or choose another output"
        )
    return record, ours, entries


def _open_location(url: str, inputs: Sequence[str]) -> _Location:
    loc = _Location(url)
    if not loc.name or loc.name in (".", "..") or not loc.parent:
        raise OutputError(f"output {url!r}: a folder inside some parent is needed, not a root")
    check_not_aliased(url, inputs)
    if loc.fs.exists(loc.path) and not loc.fs.isdir(loc.path):
        raise OutputError(f"output {url!r} is a file; a stage writes a folder there")
    return loc


def preflight(
    url: str,
    *,
    stage: str,
    inputs: Sequence[str | None] = (),
    identity: Any = None,
    force: bool = False,
) -> OutputRecord | None:
    """The refusals of `stage_output` (aliasing, a foreign output without `force`) checked now,
    before a stage spends time on work it could not write; no lock taken, nothing written.
    Returns the output's record when it is this stage's for `identity`."""
    loc = _open_location(url, [str(i) for i in inputs if i is not None])
    record, ours, entries = _ownership(loc, stage, identity, force)
    if entries and not ours:
        _refuse_dangerous(loc)
    return record if ours else None


@contextlib.contextmanager
def stage_output(
    url: str,
    *,
    stage: str,
    inputs: Sequence[str | None] = (),
    identity: Any = None,
    force: bool = False,
    mode: Mode = "replace",
    resume: bool = False,
    seal: str | None = None,
    lock_wait: float = 0.0,
    ttl: float = DEFAULT_TTL,
    legacy: Callable[[str], bool] | None = None,
    info: Callable[[str], None] | None = None,
) -> Iterator[StageOutput]:
    """Open the output `url` of `stage` for one run (see the module docstring).

    `identity`: JSON-able inputs and parameters that decide the output (None: any output of this
    stage is this run's). `resume`: keep a partial staging of the same identity. `seal`: the file
    whose presence makes the output complete (`manifest.json` for a dataset), checked at commit
    and copied last on an object store. `lock_wait`: seconds to wait for another run's lock.
    `legacy(url)`: whether a non-empty output without a record is this stage's output for this
    identity, written before outputs carried records (then it is kept as this stage's, not
    refused as foreign); the stage must recognise its own files positively (a format tag).
    """
    info = info or log.info
    inputs = [str(i) for i in inputs if i is not None]
    loc = _open_location(url, inputs)
    fs = loc.fs
    lock = OutputLock(loc.url(loc.sibling("lock")), stage=stage, ttl=ttl)
    lock.acquire(wait=lock_wait)
    try:
        out = StageOutput(
            loc, stage=stage, inputs=inputs, identity=identity, mode=mode, seal=seal, lock=lock
        )
        if mode == "replace":
            staged = _read_json_record(fs, posixpath.join(out._staging_path, RECORD_NAME))
            if staged is not None and staged.state == "committed":
                info(f"{url}: finishing the commit an interrupted run had begun")
                _finish_commit(loc, out._staging_path, seal)
            for name in _entries(loc, loc.parent):
                if name.startswith(f".{loc.name}.old-"):
                    _remove(loc, posixpath.join(loc.parent, name))
        record, ours, entries = _ownership(loc, stage, identity, force, legacy, info)
        out.record = record
        if entries and not ours:
            _refuse_dangerous(loc)
            info(f"{url}: replacing {_describe(record, entries)} (force)")
            if mode == "in_place":
                if loc.local:  # out of the way at once, then deleted
                    aside = loc.sibling(f"old-{uuid.uuid4().hex[:8]}")
                    os.rename(loc.path, aside)
                    _remove(loc, aside)
                else:
                    _remove(loc, loc.path)
        out.done = ours and record.state == "committed" and not force
        if mode == "replace" and not out.done:
            staged = _read_json_record(fs, posixpath.join(out._staging_path, RECORD_NAME))
            if _entries(loc, out._staging_path):
                keep = (
                    resume
                    and staged is not None
                    and staged.stage == stage
                    and staged.identity == out.identity
                    and staged.state == "staging"
                )
                if keep:
                    out.resumed = True
                    info(f"{url}: resuming the partial output in {out.staging}")
                else:
                    why = (
                        "another run's"
                        if staged is None or staged.identity != out.identity
                        else "a"
                    )
                    info(f"{url}: discarding {why} partial output ({out.staging})")
                    _remove(loc, out._staging_path)
            fs.makedirs(out._staging_path, exist_ok=True)
            if not out.resumed:
                _write_record(loc, out._staging_path, out._new_record("staging"))
        elif mode == "in_place" and not out.done:
            fs.makedirs(loc.path, exist_ok=True)
            _write_record(loc, loc.path, out._new_record("open"))
        yield out
    finally:
        lock.release()
