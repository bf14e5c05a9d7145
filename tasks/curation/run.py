"""Curation end to end, without Prefect: select samples with the spec's filters, then write them.

Input samples are the input's rows with status "success" (those with an image in a tar); failed
crawl rows are not samples and are neither kept nor rejected. Every input sample ends in exactly one
of: the output dataset (or its validation split), or `rejected.parquet` with the filter that
dropped it and why.

Filters run in the spec's order, each over what the previous ones kept. The image pass (decode +
pHash + CLIP score) sits just before the first filter that needs pixels; samples it cannot decode
are dropped there as `undecodable`. With no image filter it sits after the last filter, so nothing
undecodable reaches the output.

It streams (docs/design.md, "Embedded defaults and scaling out"): the per-shard work (row-local
filters, digests, the image pass: tasks/curation/scan.py) is one task per input shard on an engine
(tasks/engine.py: in process, a local pool, Ray); the driver keeps only fixed-width arrays per
sample (about 100 bytes) for the global steps, which compare samples: exact duplicates by hash
partitions of 128-bit digests, near-duplicates through a binary hash index, the CLIP top
fraction. Writing (tasks/curation/write.py) is again one task per output shard.
"""

from __future__ import annotations

import ctypes
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage import Dataset, DatasetError, Manifest, open_dataset
from storage.fs import exists, filesystem, join
from tasks.curation.filters import FILTERS, FilterContext
from tasks.curation.near_dup import THUMB_BYTES, load_eval_sets
from tasks.curation.scan import LOCAL_FILTERS, ShardJob, image_pass_position, scan_shard
from tasks.curation.spec import FilterSpec
from tasks.engine import Engine

__all__ = [
    "REJECTED_NAME",
    "UNDECODABLE",
    "Selection",
    "existing_output",
    "open_input",
    "select_samples",
]

REJECTED_NAME = "rejected.parquet"
UNDECODABLE = "undecodable"
TOO_LARGE = "too_large"  # a pixel bomb: more pixels than clip_model.images decodes
STAGE = "curate"
DEDUP_PARTITIONS = 16  # exact dedup sorts one hash partition at a time

log = logging.getLogger(__name__)
Log = Callable[[str], None]


@dataclass
class Selection:
    """The fate of every input sample: kept, or the filter that dropped it and why.

    `samples` holds only what the writer needs per sample: key, shard (and clip_score if scored);
    `short_side` the shorter original side (NaN unknown) for the report's histogram."""

    samples: pa.Table
    reason: np.ndarray  # filter name, None where kept
    detail: np.ndarray
    short_side: np.ndarray | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    input_rows: int = 0
    scored: bool = False

    @property
    def kept(self) -> np.ndarray:
        return np.equal(self.reason, None)

    @property
    def removed(self) -> dict[str, int]:
        return {s["filter"]: s["removed"] for s in self.steps}

    def stats(self) -> dict[str, Any]:
        n, k = self.samples.num_rows, int(self.kept.sum())
        return {
            "input_rows": self.input_rows,
            "input_samples": n,
            "crawl_failures": self.input_rows - n,
            "kept": k,
            "rejected": n - k,
            "removed": self.removed,
            "steps": self.steps,
        }


def open_input(url: str, log: Log = log.info) -> tuple[Dataset, dict[str, str]]:
    """Open the input; a missing or truncated tar does not stop curation: its samples become
    `undecodable`. Returns the dataset and {shard name: problem}."""
    try:
        return open_dataset(url), {}
    except DatasetError as error:
        fs, root = filesystem(join(url, "manifest.json"))
        if not fs.exists(root):
            raise
        try:
            with fs.open(root, "rb") as f:
                manifest = Manifest.model_validate_json(f.read())
        except ValueError:
            raise error from None
        if manifest.compute_digest() != manifest.digest:
            raise
        ds = Dataset(url, manifest)
        bad = {}
        for entry, tar_url in zip(manifest.shards, ds.tar_urls(), strict=True):
            if not exists(join(ds.url, f"{entry.name}.parquet")):
                raise  # no rows to account for: this is not a dataset we can curate
            fs, path = filesystem(tar_url)
            if not fs.exists(path):
                bad[entry.name] = f"shard {entry.name}.tar missing"
            elif fs.size(path) != entry.tar_bytes:
                bad[entry.name] = f"shard {entry.name}.tar truncated or replaced (size differs)"
        if not bad:
            raise
        log(f"input {url}: {len(bad)} damaged shard(s), their samples will be undecodable: {bad}")
        return ds, bad


def existing_output(output: str, input_digest: str, parameters: dict[str, Any]) -> Manifest | None:
    """The output's manifest if it is a finished curation of this input with these parameters."""
    try:
        out = open_dataset(output)
    except DatasetError:
        return None
    producer = out.manifest.producer
    same = (
        producer.stage == STAGE
        and producer.input_digest == input_digest
        and _normal(producer.parameters) == _normal(parameters)
        and exists(join(out.url, REJECTED_NAME))
    )
    return out.manifest if same else None


def _normal(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def curation_identity(input_digest: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """What decides a curated output: the input's digest and the curation parameters."""
    return {"input_digest": input_digest, "parameters": _normal(parameters)}


def select_samples(
    ds: Dataset,
    spec: FilterSpec,
    *,
    bad_shards: dict[str, str] | None = None,
    engine: Engine | None = None,
    progress: bool = True,
    log: Log = log.info,
) -> Selection:
    """Apply the spec's filters in order; the image pass sits before the first one on pixels."""
    engine = engine or Engine()
    jobs = [
        ShardJob(ds.url, entry.name, (bad_shards or {}).get(entry.name), spec)
        for entry in ds.manifest.shards
    ]
    scans = _Scans(engine.map(scan_shard, jobs, desc="curate: scan", progress=progress))
    _return_freed_memory()
    n = len(scans.keys)
    log(
        f"{ds.url}: {scans.rows} rows, {n} samples (rows with status success) in {len(jobs)} shards"
    )
    if pc.count_distinct(scans.keys).as_py() != n:
        counts = pc.value_counts(scans.keys)
        dup = [v["values"] for v in counts.to_pylist() if v["counts"] > 1][:5]
        raise DatasetError(f"{ds.url}: sample keys are not unique, e.g. {dup}")
    columns = {"key": scans.keys, "shard": scans.shard}
    if scans.clip_score is not None:
        columns["clip_score"] = pa.array(scans.clip_score, mask=np.isnan(scans.clip_score))
    sel = Selection(
        samples=pa.table(columns),
        reason=np.full(n, None, dtype=object),
        detail=np.full(n, None, dtype=object),
        short_side=scans.short_side,
        input_rows=scans.rows,
        scored=scans.clip_score is not None,
    )
    ctx = FilterContext()
    near = spec.get("near_duplicates")
    if near is not None and near.eval_dirs:
        ctx.eval_set = load_eval_sets(near.eval_dirs)
        log(f"decontamination: {len(ctx.eval_set.names)} eval images under {near.eval_dirs}")
        if ctx.eval_set.unreadable:
            log(f"unreadable eval images, ignored: {ctx.eval_set.unreadable[:10]}")

    def drop(rows: np.ndarray, reason: str, details: list | np.ndarray) -> None:
        sel.reason[rows] = reason
        sel.detail[rows] = np.asarray(details, dtype=object) if len(rows) else details
        remaining = int(sel.kept.sum())
        sel.steps.append({"filter": reason, "removed": len(rows), "remaining": remaining})
        log(f"{reason}: removed {len(rows)}, {remaining} remain")

    def image_pass() -> None:
        alive = np.flatnonzero(sel.kept)
        for reason in (UNDECODABLE, TOO_LARGE):  # clip_model.images.REASONS
            failed = scans.failed(alive, reason)
            if reason == UNDECODABLE or len(failed):  # a step for pixel bombs only when met
                drop(failed, reason, scans.failure_detail(failed))

    position = image_pass_position(spec)
    for i, cfg in enumerate(spec.filters):
        if i == position:
            image_pass()
        alive = np.flatnonzero(sel.kept)
        if cfg.name in LOCAL_FILTERS:
            rows, details = scans.local_drops(cfg.name, alive)
        elif cfg.name in ("dedup_url", "dedup_sha256"):
            column, what = ("url", "url") if cfg.name == "dedup_url" else ("sha256", "image bytes")
            rows, original = exact_duplicates(scans.digests[column], scans.present[column], alive)
            originals = scans.keys.take(pa.array(original)).to_pylist()
            details = [f"same {what} as {key}" for key in originals]
        else:  # near_duplicates, clip_score: the filter over the survivors' image features
            table = scans.image_table(cfg.name, alive)
            why = FILTERS[cfg.name](table, cfg, ctx)
            hit = why.is_valid().to_numpy(zero_copy_only=False)
            rows, details = alive[hit], why.filter(pa.array(hit)).to_pylist()
        drop(rows, cfg.name, details)
        _return_freed_memory()  # the step's transients
    if position == len(spec.filters):
        image_pass()
    assert sum(sel.removed.values()) + int(sel.kept.sum()) == n, "kept + rejected != input"
    return sel


def exact_duplicates(
    digests: np.ndarray, present: np.ndarray, alive: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Among the `alive` rows (ascending), those whose digest an earlier alive row has, and that
    earlier row (the first of its value). One hash partition at a time: rows with equal values
    share a partition, so each is sorted on its own (and could be on its own machine)."""
    rows = alive[present[alive]]
    partition = digests[rows, 0] % np.uint64(DEDUP_PARTITIONS)
    dups, originals = [], []
    for p in range(DEDUP_PARTITIONS):
        part = rows[partition == p]
        order = part[np.lexsort((part, digests[part, 1], digests[part, 0]))]
        d = digests[order]
        same = np.zeros(len(order), bool)
        same[1:] = (d[1:] == d[:-1]).all(axis=1)
        # each row's group starts at the last row that differs from its predecessor
        start = np.maximum.accumulate(np.where(~same, np.arange(len(order)), 0))
        dups.append(order[same])
        originals.append(order[start[same]])
    dup, original = np.concatenate(dups), np.concatenate(originals)
    order = np.argsort(dup, kind="stable")
    return dup[order].astype(np.int64), original[order].astype(np.int64)


class _Scans:
    """The shards' scans laid end to end: one fixed-width array per feature, in input order."""

    def __init__(self, scans):
        keys, shards, local, failure, detail = [], [], {}, [], []
        digests, present, phash, thumbs, clip, short = {}, {}, [], [], [], []
        self.rows = 0
        for scan in scans:  # consumed as they arrive: one shard's result held at a time
            self.rows += scan.rows
            keys.append(scan.keys)
            shards.append((scan.shard, len(scan.keys)))
            for name, why in scan.local.items():
                local.setdefault(name, []).append(why)
            for column in scan.digests:
                digests.setdefault(column, []).append(scan.digests[column])
                present.setdefault(column, []).append(scan.present[column])
            failure.append(scan.failure)
            detail.append(scan.detail)
            short.append(scan.short_side)
            if scan.phash is not None:
                phash.append(scan.phash)
                thumbs.append(scan.thumbs)
            if scan.clip_score is not None:
                clip.append(scan.clip_score)
        # each feature's parts are dropped once joined: the peak is one copy plus one feature
        self.keys = _concat(_drain(keys), pa.string())
        names = [s for s, _ in shards]
        self.shard = pa.DictionaryArray.from_arrays(
            pa.array(np.repeat(np.arange(len(names), dtype=np.int32), [k for _, k in shards])),
            pa.array(names, pa.string()),
        )
        self.local = {name: _concat(_drain(local[name]), pa.string()) for name in list(local)}
        self.digests = {c: np.concatenate(_drain(digests[c])) for c in list(digests)}
        self.present = {c: np.concatenate(_drain(present[c])) for c in list(present)}
        self.failure = _concat(_drain(failure), pa.string())  # null: decoded or not asked
        self._detail = _concat(_drain(detail), pa.string())
        self.short_side = np.concatenate(_drain(short)) if short else np.zeros(0, np.float32)
        self.phash = np.concatenate(_drain(phash)) if phash else None
        self.thumbs = np.concatenate(_drain(thumbs)) if thumbs else None
        self.clip_score = np.concatenate(_drain(clip)) if clip else None

    def failed(self, rows: np.ndarray, reason: str) -> np.ndarray:
        """Those of `rows` the image pass failed for `reason`."""
        hit = pc.equal(self.failure.take(pa.array(rows, pa.int64())), reason)
        return rows[pc.fill_null(hit, False).to_numpy(zero_copy_only=False)]

    def failure_detail(self, rows: np.ndarray) -> list:
        return self._detail.take(pa.array(rows, pa.int64())).to_pylist()

    def local_drops(self, name: str, alive: np.ndarray) -> tuple[np.ndarray, list]:
        why = self.local[name].take(pa.array(alive, pa.int64()))
        hit = why.is_valid().to_numpy(zero_copy_only=False)
        return alive[hit], why.filter(pa.array(hit)).to_pylist()

    def image_table(self, name: str, alive: np.ndarray) -> pa.Table:
        """The columns an image filter reads (tasks.curation.filters.COLUMNS), for `alive`."""
        if name == "clip_score":
            scores = self.clip_score[alive]
            return pa.table({"clip_score": pa.array(scores, mask=np.isnan(scores))})
        thumbs = np.ascontiguousarray(self.thumbs[alive])
        thumb_type = pa.binary(THUMB_BYTES)
        return pa.table(
            {
                "key": self.keys.take(pa.array(alive, pa.int64())),
                "_phash": pa.array(self.phash[alive]),
                "_thumb": pa.FixedSizeBinaryArray.from_buffers(
                    thumb_type, len(alive), [None, pa.py_buffer(thumbs)]
                ),
            }
        )


def _return_freed_memory() -> None:
    """Hand the heap pages freed by the joins and global steps back to the OS: glibc keeps them
    when long-lived arrays sit between them (at 1M samples, about 120 MB after the scans' join).
    Not glibc (macOS, musl): nothing to do."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _drain(parts: list) -> list:
    """The list's items, leaving it empty: the caller's join then holds the only references."""
    items = parts[:]
    parts.clear()
    return items


def _concat(arrays: list, type_: pa.DataType) -> pa.Array:
    """One array of (chunked) arrays, cast to `type_`."""
    chunks = [
        a.cast(type_).combine_chunks() if isinstance(a, pa.ChunkedArray) else a.cast(type_)
        for a in arrays
    ]
    return pa.concat_arrays(chunks) if chunks else pa.array([], type_)
