"""A lock per output folder, on a local disk or an object store (docs/stage-outputs.md).

The lock is a small JSON file created exclusively (`O_EXCL` locally, a conditional put on an
object store through fsspec's "xb" mode) beside the folder it guards. It names its owner (host,
boot, pid and that process's start time, stage, when it was taken) and carries a heartbeat that
a thread of the owner refreshes, so a lock left by a dead run is told apart from a live one:

- on the same host (same boot): stale when the owner's pid is gone or is another process now;
- on another host: stale when its heartbeat is older than `ttl` seconds.

A stale lock is broken, with a warning naming its owner, under a short-lived break mutex so two
runs cannot both break it and both think they hold it. A live one refuses with `LockError`
naming the owner and the lock file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from storage.fs import atomic_write_bytes, filesystem

__all__ = ["DEFAULT_TTL", "LockError", "LockOwner", "OutputLock", "read_owner"]

DEFAULT_TTL = 600.0  # seconds without a heartbeat before another host may break the lock
BREAK_GRACE = 60.0  # a break mutex (or an unreadable lock) older than this is abandoned

log = logging.getLogger(__name__)


class LockError(RuntimeError):
    """The output is locked by a run that is (as far as can be told) still alive."""


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> str:
    """The kernel's start time of `pid` (clock ticks since boot): tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[19]  # field 22 of stat; the split starts at field 3
    except (OSError, IndexError):
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _now() -> float:
    return time.time()


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


@dataclass
class LockOwner:
    host: str
    boot_id: str
    pid: int
    process_start: str
    stage: str
    token: str
    acquired: float
    heartbeat: float

    @classmethod
    def me(cls, stage: str) -> LockOwner:
        now = _now()
        return cls(
            host=socket.gethostname(),
            boot_id=_boot_id(),
            pid=os.getpid(),
            process_start=_process_start(os.getpid()),
            stage=stage,
            token=uuid.uuid4().hex,
            acquired=now,
            heartbeat=now,
        )

    def describe(self) -> str:
        return (
            f"stage {self.stage!r}, host {self.host} pid {self.pid}, since "
            f"{_iso(self.acquired)}, last heartbeat {_iso(self.heartbeat)}"
        )

    def stale(self, ttl: float) -> str | None:
        """Why this owner is gone, or None while it may be alive."""
        if self.host == socket.gethostname() and self.boot_id == _boot_id():
            if not _pid_alive(self.pid):
                return f"its process {self.pid} on this host is gone"
            if self.process_start and _process_start(self.pid) != self.process_start:
                return f"pid {self.pid} on this host is another process now"
            return None
        age = _now() - self.heartbeat
        if age > ttl:
            return f"no heartbeat from host {self.host} for {age:.0f} s (ttl {ttl:.0f} s)"
        return None


def read_owner(url: str) -> LockOwner | None:
    """The owner recorded in the lock file at `url`; None if there is none or it is unreadable."""
    fs, path = filesystem(url)
    try:
        with fs.open(path, "rb") as f:
            return LockOwner(**json.loads(f.read()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        return None


def _age(url: str) -> float | None:
    fs, path = filesystem(url)
    try:
        modified = fs.modified(path)
    except (OSError, NotImplementedError, ValueError):
        return None
    return _now() - modified.timestamp()


class OutputLock:
    """An exclusive lock on the lock file `url`, held by this process until `release()`.

        with OutputLock(join(parent, ".name.lock"), stage="curate"):
            ...  # nobody else writes the folder this lock guards

    `acquire(wait=s)` retries for up to `s` seconds while another live run holds it.
    """

    def __init__(self, url: str, *, stage: str, ttl: float = DEFAULT_TTL):
        self.url = str(url)
        self.stage = stage
        self.ttl = ttl
        self.owner: LockOwner | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"OutputLock({self.url!r}, held={self.owner is not None})"

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # ---- taking and giving back ----------------------------------------------------------------

    def acquire(self, wait: float = 0.0, poll: float = 0.5) -> OutputLock:
        if self.owner is not None:
            raise LockError(f"{self.url}: already held by this OutputLock")
        deadline = _now() + wait
        while True:
            owner = LockOwner.me(self.stage)
            if self._create(owner):
                self.owner = owner
                self._start_heartbeat()
                return self
            holder = read_owner(self.url)
            reason = self._why_stale(holder)
            if reason is not None and self._break(holder, reason):
                continue
            if _now() >= deadline:
                raise LockError(self._refusal(holder))
            time.sleep(poll)

    def release(self) -> None:
        if self.owner is None:
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if self.held():
            fs, path = filesystem(self.url)
            with contextlib.suppress(FileNotFoundError):
                fs.rm(path)
        self.owner = None

    def held(self) -> bool:
        """Whether the lock file still names this holder (a run taken for dead may lose it)."""
        if self.owner is None:
            return False
        current = read_owner(self.url)
        return current is not None and current.token == self.owner.token

    # ---- internals -----------------------------------------------------------------------------

    def _create(self, owner: LockOwner) -> bool:
        fs, path = filesystem(self.url)
        parent = path.rsplit("/", 1)[0]
        if parent:
            fs.makedirs(parent, exist_ok=True)
        try:
            with fs.open(path, "xb") as f:
                f.write(json.dumps(asdict(owner)).encode())
        except FileExistsError:
            return False
        return True

    def _why_stale(self, holder: LockOwner | None) -> str | None:
        if holder is not None:
            return holder.stale(self.ttl)
        age = _age(self.url)  # exists but unreadable: being written, or left half-written
        if age is not None and age > BREAK_GRACE:
            return f"unreadable lock file {age:.0f} s old"
        return None

    def _break(self, holder: LockOwner | None, reason: str) -> bool:
        """Remove a stale lock, unless someone else is breaking or re-taking it right now."""
        mutex = OutputLock(self.url + ".break", stage=self.stage, ttl=BREAK_GRACE)
        mutex_owner = LockOwner.me(self.stage)
        if not mutex._create(mutex_owner):
            other = read_owner(mutex.url)
            if other is not None and _now() - other.acquired <= BREAK_GRACE:
                return False
            fs, path = filesystem(mutex.url)  # a breaker that died mid-break
            with contextlib.suppress(FileNotFoundError):
                fs.rm(path)
            return False
        try:
            again = read_owner(self.url)
            same = (again is None and holder is None) or (
                again is not None and holder is not None and again.token == holder.token
            )
            if not same:
                return False  # it changed hands since we looked
            who = holder.describe() if holder is not None else "owner unknown"
            log.warning("%s: breaking a stale lock (%s): %s", self.url, who, reason)
            fs, path = filesystem(self.url)
            with contextlib.suppress(FileNotFoundError):
                fs.rm(path)
            return True
        finally:
            fs, path = filesystem(mutex.url)
            with contextlib.suppress(FileNotFoundError):
                fs.rm(path)

    def _refusal(self, holder: LockOwner | None) -> str:
        who = holder.describe() if holder is not None else "an owner whose lock file is unreadable"
        return (
            f"{self.url}: another run is writing this output ({who}). Wait for it to finish; "
            f"if that run is gone, its lock is broken automatically once it is stale (a dead "
            f"process on this host, or no heartbeat for {self.ttl:.0f} s), or delete {self.url} "
            "by hand"
        )

    def _start_heartbeat(self) -> None:
        self._stop = threading.Event()
        interval = max(self.ttl / 5, 0.05)

        def beat() -> None:
            while not self._stop.wait(interval):
                if not self.held():
                    log.warning("%s: this run no longer holds the lock", self.url)
                    return
                self.owner.heartbeat = _now()
                with contextlib.suppress(OSError):
                    atomic_write_bytes(self.url, json.dumps(asdict(self.owner)).encode())

        self._beat = threading.Thread(target=beat, name=f"heartbeat {self.url}", daemon=True)
        self._beat.start()
