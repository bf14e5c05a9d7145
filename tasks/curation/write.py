"""Writing a curation: the kept samples resharded into evenly sized shards (one task per output
shard, on the engine), a validation split held out by a stable hash of the key as its own dataset
(`<output>/val`), `rejected.parquet` (streamed shard by shard) and the manifest, last.

Which samples go into output shard j is decided before any is written (sizes differ by at most
one, samples in input order), so the shards' bytes, and the manifest's digest, are the same
whatever the engine and however many workers write them. The validation samples from the input
range of training shard j go into a validation shard written by the same task, in the same pass
over the input tars: holding out 1% costs no second read of the data.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage import (
    MANIFEST_NAME,
    Dataset,
    DatasetError,
    DatasetWriter,
    Manifest,
    SampleError,
    open_dataset,
    read_shard,
    stage_output,
)
from storage.dataset import write_manifest
from storage.fs import atomic_open, filesystem, join, sha256_file
from storage.manifest import ShardEntry
from tasks.curation.run import REJECTED_NAME, STAGE, Selection, curation_identity
from tasks.engine import Engine

__all__ = [
    "VAL_NAME",
    "is_validation",
    "plan_shards",
    "shard_sizes",
    "write_curated",
    "write_shard",
]

VAL_NAME = "val"  # the validation split: a dataset of its own inside the output

log = logging.getLogger(__name__)
Log = Callable[[str], None]


def shard_sizes(n: int, num_shards: int) -> list[int]:
    """`n` samples over min(num_shards, n) shards whose sizes differ by at most one."""
    k = min(num_shards, n)
    return [n // k + (1 if i < n % k else 0) for i in range(k)] if k else []


def is_validation(keys: Sequence[str] | pa.Array, fraction: float) -> np.ndarray:
    """Whether each key belongs to the validation split: the first 8 bytes of BLAKE2b(key) read
    as a number in [0, 1) fall below `fraction`. Stable: a key's split never depends on the rest
    of the dataset, its order, or the run (so a re-curation keeps train and val apart). An Arrow
    array is hashed a slice at a time, so its keys never become Python objects all at once."""
    if fraction <= 0:
        return np.zeros(len(keys), bool)
    if isinstance(keys, pa.Array | pa.ChunkedArray):
        slices = (keys.slice(i, _HASH_SLICE).to_pylist() for i in range(0, len(keys), _HASH_SLICE))
        return np.concatenate([np.zeros(0, bool), *(is_validation(s, fraction) for s in slices)])
    blob = b"".join(hashlib.blake2b(k.encode(), digest_size=8).digest() for k in keys)
    values = np.frombuffer(blob, ">u8").astype(np.float64) / 2.0**64
    return values < fraction


_HASH_SLICE = 65_536


@dataclass(frozen=True)
class ShardPart:
    """Samples of one input shard that go into an output shard (keys in input order). Arrow
    arrays, not Python objects per sample: the driver holds every job of the write at once."""

    shard: str
    keys: pa.Array  # string
    clip_scores: pa.Array | None = None  # float32, null where not scored


@dataclass(frozen=True)
class ShardPlan:
    """One output shard: the folder it goes into, its number, its samples by input shard."""

    output: str
    index: int
    parts: tuple[ShardPart, ...]


@dataclass(frozen=True)
class ReshardJob:
    """A training shard and the validation shard held out of the same input range, written in
    one pass over those input shards."""

    dataset: str  # the input
    train: ShardPlan | None
    val: ShardPlan | None


def write_shard(job: ReshardJob) -> tuple[ShardEntry | None, ShardEntry | None]:
    """Write one job's shards: the samples' tar members copied from the input tars (never
    decoded), their Parquet rows from the input's, with `clip_score` where scored."""
    plans = [p for p in (job.train, job.val) if p is not None]
    writers = {
        id(plan): DatasetWriter(
            plan.output,
            stage=STAGE,
            samples_per_shard=sum(len(p.keys) for p in plan.parts) + 1,
            first_shard=plan.index,
        )
        for plan in plans
    }
    routes: dict[str, dict[str, tuple[int, float | None]]] = {}  # shard -> key -> (plan, score)
    for plan in plans:
        for part in plan.parts:
            keys = part.keys.to_pylist()
            scores = part.clip_scores.to_pylist() if part.clip_scores is not None else None
            route = routes.setdefault(part.shard, {})
            route.update(
                (k, (id(plan), sc))
                for k, sc in zip(keys, scores or [None] * len(keys), strict=True)
            )
    scored = any(part.clip_scores is not None for plan in plans for part in plan.parts)
    for shard, route in sorted(routes.items()):  # input shards in input order
        parquet = join(job.dataset, f"{shard}.parquet")
        fs, path = filesystem(parquet)
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        table = table.filter(pc.fill_null(pc.equal(table.column("status"), "success"), False))
        table = table.filter(pc.is_in(table.column("key"), value_set=pa.array(list(route))))
        rows = {r["key"]: r for r in table.to_pylist()}
        wanted = set(route)
        for sample in read_shard(join(job.dataset, f"{shard}.tar"), _unless(wanted)):
            if sample.key not in wanted:
                continue
            wanted.discard(sample.key)
            plan_id, score = route[sample.key]
            row, meta = rows[sample.key], dict(sample.meta)
            if scored:
                row["clip_score"] = meta["clip_score"] = score
            writers[plan_id].write(
                sample.key, sample.image, sample.caption, meta, row, sample.image_ext
            )
            if not wanted:
                break  # every sample of this job is written: the rest of the tar is not ours
        if wanted:
            raise DatasetError(f"{shard}.tar: kept samples vanished: {sorted(wanted)[:5]}")
    entries = []
    for plan in (job.train, job.val):
        if plan is None:
            entries.append(None)
            continue
        (entry,) = writers[id(plan)].flush()
        size = sum(len(p.keys) for p in plan.parts)
        if entry.num_samples != size:
            raise DatasetError(f"{plan.output}: shard {entry.name} holds {entry.num_samples}")
        entries.append(entry)
    return entries[0], entries[1]


def _unless(wanted: set[str]) -> Callable[[SampleError], None]:
    """A bad sample the image pass already rejected is passed over; one we keep cannot be bad."""

    def on_bad_sample(error: SampleError) -> None:
        if error.key in wanted:
            raise error

    return on_bad_sample


class _Parts:
    """Cuts runs of sample positions into ShardParts (one per input shard they come from)."""

    def __init__(self, sel: Selection):
        self.keys = sel.samples.column("key")
        codes = sel.samples.column("shard").combine_chunks()
        self.codes = codes if pa.types.is_dictionary(codes.type) else pc.dictionary_encode(codes)
        self.scores = sel.samples.column("clip_score") if sel.scored else None

    def __call__(self, rows: np.ndarray) -> tuple[ShardPart, ...]:
        take = pa.array(rows, pa.int64())
        keys = _array(self.keys.take(take))
        shards = self.codes.indices.take(take).to_numpy(zero_copy_only=False)
        scores = _array(self.scores.take(take)) if self.scores is not None else None
        parts, begin = [], 0
        for end in [*(np.flatnonzero(np.diff(shards)) + 1).tolist(), len(keys)]:
            parts.append(
                ShardPart(
                    shard=self.codes.dictionary[int(shards[begin])].as_py(),
                    # copies, not slices: a pickled slice would carry the whole buffer
                    keys=_copy(keys.slice(begin, end - begin)),
                    clip_scores=_copy(scores.slice(begin, end - begin))
                    if scores is not None
                    else None,
                )
            )
            begin = end
        return tuple(parts)


def _array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def _copy(values: pa.Array) -> pa.Array:
    return pa.concat_arrays([values])


def plan_shards(
    ds_url: str, output: str, sel: Selection, train: np.ndarray, val: np.ndarray, num_shards: int
) -> list[ReshardJob]:
    """Training shard j takes the j-th run of `train` (ascending sample positions; sizes differ
    by at most one); the validation samples that lie among its input positions form validation
    shard j' (the non-empty ones numbered in order) of OUTPUT/val, written by the same job."""
    parts = _Parts(sel)
    sizes = shard_sizes(len(train), num_shards)
    starts = np.cumsum([0, *sizes])
    first = train[starts[:-1]] if sizes else np.zeros(1, np.int64)
    slot = np.clip(np.searchsorted(first, val, side="right") - 1, 0, max(len(sizes), 1) - 1)
    jobs, val_index = [], 0
    for j in range(max(len(sizes), 1)):
        train_plan = (
            ShardPlan(output, j, parts(train[starts[j] : starts[j + 1]])) if sizes else None
        )
        held = val[slot == j]
        val_plan = None
        if len(held):
            val_plan = ShardPlan(join(output, VAL_NAME), val_index, parts(held))
            val_index += 1
        if train_plan is not None or val_plan is not None:
            jobs.append(ReshardJob(ds_url, train_plan, val_plan))
    return jobs


def _write_rejected(ds: Dataset, sel: Selection, url: str) -> int:
    """Every dropped sample's key, url, caption, filter, detail, shard (+ clip_score), written
    one input shard at a time."""
    fields = [
        ("key", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("filter", pa.string()),
        ("detail", pa.string()),
        ("shard", pa.string()),
    ]
    if sel.scored:
        fields.append(("clip_score", pa.float32()))
    schema = pa.schema(fields)
    dropped = ~sel.kept
    written, offset = 0, 0
    with atomic_open(url, "wb") as f, pq.ParquetWriter(f, schema) as out:
        for entry in ds.manifest.shards:
            fs, path = filesystem(join(ds.url, f"{entry.name}.parquet"))
            with fs.open(path, "rb") as pf:
                file = pq.ParquetFile(pf)
                columns = [
                    c for c in ("key", "url", "caption", "status") if c in file.schema_arrow.names
                ]
                table = file.read(columns=columns)
            table = table.filter(pc.fill_null(pc.equal(table.column("status"), "success"), False))
            n = table.num_rows
            local = np.flatnonzero(dropped[offset : offset + n])
            rows = local + offset
            offset += n
            if not len(local):
                continue
            take = pa.array(local, pa.int64())
            piece = {
                "key": table.column("key").take(take),
                "url": table.column("url").take(take).cast(pa.string())
                if "url" in table.column_names
                else pa.nulls(len(local), pa.string()),
                "caption": table.column("caption").take(take).cast(pa.string()),
                "filter": pa.array(sel.reason[rows].tolist(), pa.string()),
                "detail": pa.array(sel.detail[rows].tolist(), pa.string()),
                "shard": pa.array([entry.name] * len(local), pa.string()),
            }
            if sel.scored:
                piece["clip_score"] = sel.samples.column("clip_score").take(pa.array(rows))
            out.write_table(pa.table(piece, schema=schema))
            written += len(local)
    if offset != sel.samples.num_rows:
        raise DatasetError(f"{ds.url}: its shards changed during curation")
    return written


def write_curated(
    ds: Dataset,
    sel: Selection,
    output: str,
    *,
    num_shards: int,
    parameters: dict[str, Any],
    val_fraction: float = 0.0,
    bad_shards: dict[str, str] | None = None,
    engine: Engine | None = None,
    progress: bool = True,
    log: Log = log.info,
    force: bool = False,
    inputs: Sequence[str] = (),
) -> Manifest:
    """Reshard the kept samples into evenly sized shards (`val_fraction` of them, by key hash,
    into the dataset `<output>/val`), then `rejected.parquet`, then the manifest, into a staging
    folder swapped in whole when complete (docs/stage-outputs.md): an output that aliases the
    input (or `inputs`), or holds anything but this curation, is refused (unless `force`), and a
    run killed before the swap leaves the output as it was."""
    output = str(output).rstrip("/")
    engine = engine or Engine()
    with stage_output(
        output,
        stage=STAGE,
        inputs=[ds.url, *inputs],
        identity=curation_identity(ds.digest, parameters),
        force=force,
        seal=MANIFEST_NAME,
        info=log,
    ) as out:
        if out.done:
            return open_dataset(output).manifest
        manifest = _write_curated(
            ds, sel, out.staging, num_shards=num_shards, parameters=parameters,
            val_fraction=val_fraction, engine=engine, progress=progress, log=log,
        )  # fmt: skip
        out.commit()
    log(
        f"wrote {output}: {manifest.total_samples} samples in {len(manifest.shards)} shards, "
        f"{manifest.stats.get('val', {}).get('samples', 0)} in {VAL_NAME}/, "
        f"{manifest.stats.get('rejected', 0)} rejected"
    )
    return manifest


def _write_curated(
    ds: Dataset,
    sel: Selection,
    output: str,
    *,
    num_shards: int,
    parameters: dict[str, Any],
    val_fraction: float,
    engine: Engine,
    progress: bool,
    log: Log,
) -> Manifest:
    kept = np.flatnonzero(sel.kept)
    val = is_validation(sel.samples.column("key").take(pa.array(kept, pa.int64())), val_fraction)
    train_rows, val_rows = kept[~val], kept[val]
    sizes = shard_sizes(len(train_rows), num_shards)
    if 0 < len(train_rows) < num_shards:
        log(
            f"only {len(train_rows)} samples kept: writing {len(train_rows)} shards, not {num_shards}"
        )
    stats = sel.stats() | {"num_shards": len(sizes), "shard_sizes": sorted(set(sizes))}
    jobs = plan_shards(ds.url, output, sel, train_rows, val_rows, num_shards)
    written = list(engine.map(write_shard, jobs, desc="curate: write", progress=progress))
    train = [t for t, _ in written if t is not None]
    if len(val_rows):
        val_url = join(output, VAL_NAME)
        val_manifest = write_manifest(
            val_url,
            [v for _, v in written if v is not None],
            stage=STAGE,
            parameters={**parameters, "split": VAL_NAME},
            input_digest=ds.digest,
            stats={"split": VAL_NAME, "fraction": val_fraction, "samples": len(val_rows)},
        )
        stats[VAL_NAME] = {
            "samples": len(val_rows),
            "fraction": val_fraction,
            "digest": val_manifest.digest,
        }
    rejected = _write_rejected(ds, sel, join(output, REJECTED_NAME))
    assert len(kept) + rejected == sel.samples.num_rows, "kept + rejected != input"
    stats["rejected_sha256"] = sha256_file(join(output, REJECTED_NAME))[0]
    manifest = write_manifest(
        output,
        train,
        stage=STAGE,
        parameters=parameters,
        input_digest=ds.digest,
        stats=stats,
    )
    assert [s.num_samples for s in manifest.shards] == sizes, "shards are not evenly sized"
    return manifest
