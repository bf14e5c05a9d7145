"""Where per-shard work runs: one `map` over shards, in this process, on a local process pool, or
on a Ray cluster (docs/design.md, "Embedded defaults and scaling out").

    engine = Engine()                                  # in-process (tests, tiny inputs)
    engine = Engine(workers=4)                         # a local pool of 4 processes
    engine = Engine(kind="ray", address="auto")        # an existing Ray cluster
    for result in engine.map(scan_shard, jobs, desc="scan"):
        ...

One function per shard, an engine that decides where it runs (img2dataset's distributors, Ray
Data's `map`): the stage's code is the same whatever the engine, so its output is too. Results
come back in the order of the inputs, whatever order the work finishes in; a shard's failure
stops the map with that shard's exception. The functions and their arguments must be picklable
(module-level functions, plain data), and a Ray cluster's workers must be able to import this
project (install it on them, or a runtime_env).

Nothing is started by hand locally: the pool is made and shut down by `map`; `kind="ray"` joins
the Ray the process is already connected to, else `ray.init(address)` (`address=None` starts a
local Ray, as `ray.init()` does; docs/design.md, trap 15).
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from clip_model.progress import progress_bar

__all__ = ["ENGINE_KINDS", "Engine"]

ENGINE_KINDS = ("local", "ray")
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Engine:
    """`kind="local"`: `workers` processes (0: in this process); `kind="ray"`: Ray tasks at
    `address` ("auto", "ray://HOST:10001"; None: the Ray this process runs, or a new local one),
    at most `workers` in flight (0: as many as there are shards)."""

    kind: Literal["local", "ray"] = "local"
    workers: int = 0
    address: str | None = None
    _session: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in ENGINE_KINDS:
            raise ValueError(f"engine kind {self.kind!r}: accepted are {', '.join(ENGINE_KINDS)}")
        if self.workers < 0:
            raise ValueError(f"engine workers must be >= 0, got {self.workers}")
        if self.address is not None and self.kind != "ray":
            raise ValueError(f"a Ray address ({self.address}) needs engine kind 'ray'")

    def __enter__(self) -> Engine:
        """Keep one local pool for every `map` inside the block (a stage's scan and write),
        instead of starting one per map."""
        depth = self._session.get("depth", 0)
        if depth == 0 and self.kind == "local" and self.workers > 0:
            self._session["pool"] = _new_pool(self.workers)
        self._session["depth"] = depth + 1  # nested blocks share the outermost one's pool
        return self

    def __exit__(self, *exc: object) -> None:
        self._session["depth"] -= 1
        if self._session["depth"] == 0 and self._session.get("pool") is not None:
            self._session.pop("pool").shutdown(cancel_futures=True)

    def __getstate__(self) -> dict:
        return {"kind": self.kind, "workers": self.workers, "address": self.address}

    def __setstate__(self, state: dict) -> None:
        for name, value in state.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_session", {})  # a pool stays with the process that made it

    def describe(self) -> str:
        if self.kind == "ray":
            return f"ray ({self.address or 'local'})"
        return f"{self.workers} local processes" if self.workers else "in-process"

    def map(
        self,
        fn: Callable[[T], R],
        items: Sequence[T],
        *,
        desc: str = "shards",
        progress: bool = True,
    ) -> Iterator[R]:
        """fn(item) for every item, yielded in the order of `items`; a bar counts finished ones."""
        items = list(items)
        bar = progress_bar(total=len(items), desc=desc, unit="shard", enabled=progress)
        with bar:
            if self.kind == "ray":
                yield from _map_ray(fn, items, self.address, self.workers, bar)
            elif self.workers == 0 or len(items) <= 1:
                for item in items:
                    result = fn(item)
                    bar.update(1)
                    yield result
            else:
                if self._session.get("pool") is not None:
                    yield from _map_pool(fn, items, self._session["pool"], self.workers, bar)
                else:
                    with _new_pool(min(self.workers, len(items))) as pool:
                        yield from _map_pool(fn, items, pool, self.workers, bar)


def _new_pool(workers: int) -> ProcessPoolExecutor:
    # spawn, not fork: the flow runs Prefect's and MLflow's threads, and a forked child of a
    # threaded process can inherit a held lock
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def _map_pool(
    fn: Callable, items: list, pool: ProcessPoolExecutor, workers: int, bar: Any
) -> Iterator:
    # at most 2 x workers shards in flight, so the results held here stay bounded by the pool,
    # not the dataset
    pending: dict[int, Future] = {}
    done: dict[int, Any] = {}
    submitted = 0
    for i in range(len(items)):
        while submitted < len(items) and submitted < i + 2 * workers:
            pending[submitted] = pool.submit(fn, items[submitted])
            submitted += 1
        while i not in done:
            finished, _ = wait(pending.values(), return_when=FIRST_COMPLETED)
            for j in [j for j, f in pending.items() if f in finished]:
                done[j] = pending.pop(j).result()  # re-raises the shard's exception
                bar.update(1)
        yield done.pop(i)


def _map_ray(fn: Callable, items: list, address: str | None, workers: int, bar: Any) -> Iterator:
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    remote = ray.remote(num_cpus=1)(fn)
    window = workers * 2 if workers else len(items)
    refs: dict[int, Any] = {}
    done: dict[int, Any] = {}
    submitted = 0
    for i in range(len(items)):
        while submitted < len(items) and submitted < i + window:
            refs[submitted] = remote.remote(items[submitted])
            submitted += 1
        while i not in done:
            ready, _ = ray.wait(list(refs.values()), num_returns=1)
            for j in [j for j, r in refs.items() if r in ready]:
                done[j] = ray.get(refs.pop(j))  # re-raises the shard's exception
                bar.update(1)
        yield done.pop(i)
