"""The per-shard pass of curation: one input shard in, its samples' compact features out.

`scan_shard(job)` reads only the Parquet columns the spec needs, applies the row-local filters
(`basic`, `language`), hashes what the global steps compare (URL and image sha256 as 128-bit
digests), and decodes the images still alive at the image pass once (a sample that does not read or decode,
storage.dataset.SampleError or clip_model.images, is `undecodable`; a store that fails to read
stops the run): pHash and colour thumbnail
for near-duplicates, CLIP score when the spec scores. It returns fixed-width arrays (about 100
bytes a sample), never the shard's rows, so the driver's memory grows by that much per sample and
the shard's bytes stay in the worker. It runs wherever the engine (tasks/engine.py) puts it: in
process, in a local pool or on Ray; its result depends only on the shard and the spec.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clip_model.images import ImageDecodeError, decode_image
from storage import DatasetError, SampleError, read_shard
from storage.fs import filesystem, join
from tasks.curation.filters import (
    COLUMNS,
    FILTERS,
    FilterContext,
    LanguageIdentifier,
    language_prior,
)
from tasks.curation.near_dup import THUMB_BYTES, phash64, thumbnail
from tasks.curation.spec import ClipScore, FilterSpec

__all__ = ["LOCAL_FILTERS", "ShardJob", "ShardScan", "image_pass_position", "scan_shard"]

#: filters decided by a sample's own row; the others compare samples (global steps)
LOCAL_FILTERS = ("basic", "language")
_SIZE_COLUMNS = ("original_width", "original_height", "width", "height")
_DEDUP_COLUMNS = {"dedup_url": "url", "dedup_sha256": "sha256"}


@dataclass(frozen=True)
class ShardJob:
    """One input shard to scan: the dataset, the shard's name, why its tar is unusable (None: it
    is fine) and the spec."""

    dataset: str
    shard: str
    problem: str | None
    spec: FilterSpec


@dataclass
class ShardScan:
    """Per sample of one shard (rows with status success, in Parquet order)."""

    shard: str
    rows: int  # Parquet rows, failed crawl rows included
    keys: pa.Array
    local: dict[str, pa.Array]  # row-local filter -> why it drops each sample (null: kept)
    digests: dict[str, np.ndarray] = field(default_factory=dict)  # column -> [n, 2] uint64
    present: dict[str, np.ndarray] = field(default_factory=dict)  # column -> not null
    failure: pa.Array | None = None  # image pass: undecodable / too_large (null: decoded or not
    detail: pa.Array | None = None  # asked), and the decoder's message
    phash: np.ndarray | None = None
    thumbs: np.ndarray | None = None
    clip_score: np.ndarray | None = None  # NaN where not scored
    short_side: np.ndarray | None = None  # shorter original side, NaN where unknown (float32)


def image_pass_position(spec: FilterSpec) -> int:
    """Index in spec.filters before which the image pass runs (the end when none needs pixels)."""
    return next((i for i, f in enumerate(spec.filters) if f.needs_images), len(spec.filters))


def scan_shard(job: ShardJob) -> ShardScan:
    """Row-local filters, digests and the image pass of one shard (see the module docstring)."""
    spec = job.spec
    parquet = join(job.dataset, f"{job.shard}.parquet")
    table = _read_rows(parquet, spec)
    rows = table.num_rows
    ok = pc.fill_null(pc.equal(table.column("status"), "success"), False)
    samples = table.filter(ok)
    out = ShardScan(
        shard=job.shard, rows=rows, keys=samples.column("key").combine_chunks(), local={}
    )
    out.short_side = _short_side(samples)
    ctx = FilterContext()
    for cfg in spec.filters:
        if cfg.name in LOCAL_FILTERS:
            if cfg.name == "language":
                ctx.langid = _language_identifier(
                    tuple(cfg.candidates or ()), tuple(sorted(language_prior(cfg).items()))
                )
            columns = [c for c in COLUMNS[cfg.name] if c in samples.column_names]
            out.local[cfg.name] = FILTERS[cfg.name](samples.select(columns), cfg, ctx)
        elif cfg.name in _DEDUP_COLUMNS:
            column = _DEDUP_COLUMNS[cfg.name]
            if column not in samples.column_names:
                raise KeyError(
                    f"{parquet}: no {column!r} column; {cfg.name} (deduplication) needs it"
                )
            out.digests[column], out.present[column] = _digests(samples.column(column))
    # the image pass sees what the row-local filters before it kept (the global steps before it
    # are decided later: their samples are decoded too, and their fate is theirs)
    before = {f.name for f in spec.filters[: image_pass_position(spec)]}
    wanted = np.ones(samples.num_rows, bool)
    for name, why in out.local.items():
        if name in before:
            wanted &= ~why.is_valid().to_numpy(zero_copy_only=False)
    _image_pass(job, samples, wanted, out)
    return out


def _read_rows(parquet: str, spec: FilterSpec) -> pa.Table:
    """The columns the spec reads, of one shard's Parquet."""
    fs, path = filesystem(parquet)
    try:
        with fs.open(path, "rb") as f:
            file = pq.ParquetFile(f)
            names = set(file.schema_arrow.names)
            for column in ("key", "status", "caption"):
                if column not in names:
                    raise DatasetError(f"{parquet}: no {column!r} column (has {sorted(names)})")
            wanted = {"key", "status", "caption", *_SIZE_COLUMNS}
            for cfg in spec.filters:
                wanted |= set(COLUMNS.get(cfg.name, ())) | {_DEDUP_COLUMNS.get(cfg.name, "key")}
            return file.read(columns=[c for c in file.schema_arrow.names if c in wanted])
    except (OSError, pa.ArrowInvalid) as e:
        raise DatasetError(f"{parquet}: unreadable Parquet ({e})") from e


def _short_side(samples: pa.Table) -> np.ndarray:
    """The shorter original side (the stored size where the original is unknown), NaN unknown."""
    sides = []
    for names in (("original_width", "width"), ("original_height", "height")):
        present = [samples.column(c) for c in names if c in samples.column_names]
        if not present:
            return np.full(samples.num_rows, np.nan, np.float32)
        side = present[0] if len(present) == 1 else pc.coalesce(*present)
        sides.append(side.cast(pa.float32()).to_numpy(zero_copy_only=False))
    return np.minimum(sides[0], sides[1]).astype(np.float32)


def _digests(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """128-bit BLAKE2b of each value as [n, 2] uint64, and which values are present (not null)."""
    values = column.cast(pa.string()).to_pylist()
    blob = b"".join(
        hashlib.blake2b(v.encode(), digest_size=16).digest() if v is not None else bytes(16)
        for v in values
    )
    digests = np.frombuffer(blob, np.uint64).reshape(-1, 2).copy()
    return digests, np.array([v is not None for v in values], bool)


@cache
def _language_identifier(candidates: tuple[str, ...], prior: tuple[tuple[str, float], ...]):
    # building langid's model costs about a second: once per worker process and setting
    return LanguageIdentifier(list(candidates) or None, dict(prior))


@cache
def _scorer(cfg: ClipScore):
    from tasks.curation.images import ClipScorer  # torch: only when the spec scores

    return ClipScorer(cfg)


def _image_pass(job: ShardJob, samples: pa.Table, wanted: np.ndarray, out: ShardScan) -> None:
    spec = job.spec
    n = samples.num_rows
    want_phash = spec.get("near_duplicates") is not None
    clip = spec.get("clip_score")
    scorer = _scorer(clip) if clip is not None else None
    failure = np.full(n, None, dtype=object)
    detail = np.full(n, None, dtype=object)
    phash = np.zeros(n, np.uint64)
    thumbs = np.zeros((n, THUMB_BYTES), np.uint8) if want_phash else None
    scores = np.full(n, np.nan, np.float32) if scorer is not None else None
    keys = out.keys.to_pylist()
    row_of = {k: i for i, k in enumerate(keys) if wanted[i]}
    captions = [c or "" for c in samples.column("caption").to_pylist()]
    min_size = scorer.image_size if scorer is not None else 64
    batch: list[tuple[int, object]] = []

    def score_batch() -> None:
        import torch

        rows = [r for r, _ in batch]
        scores[rows] = scorer.score(torch.stack([t for _, t in batch]), [captions[r] for r in rows])
        batch.clear()

    tar_url = join(job.dataset, f"{job.shard}.tar")
    seen: set[str] = set()
    bad: dict[str, SampleError] = {}  # caption not UTF-8, metadata not JSON, no image
    problem = job.problem
    if problem is None and row_of:
        try:
            for sample in read_shard(tar_url, lambda e: bad.setdefault(e.key, e)):
                row = row_of.get(sample.key)
                if row is None or sample.key in seen:
                    continue
                seen.add(sample.key)
                try:
                    image = decode_image(sample.image, sample.key, draft_size=min_size)
                    if want_phash:
                        phash[row], thumbs[row] = phash64(image), thumbnail(image)
                    tensor = scorer.transform(image) if scorer is not None else None
                except ImageDecodeError as e:
                    failure[row], detail[row] = e.reason, e.detail
                    continue
                except Exception as e:  # noqa: BLE001  (any decoder failure is this sample's)
                    failure[row] = "undecodable"
                    detail[row] = f"cannot decode image: {type(e).__name__}: {e}"[:300]
                    continue
                if tensor is not None:
                    batch.append((row, tensor))
                    if len(batch) >= scorer.batch_size:
                        score_batch()
        except DatasetError as e:
            problem = f"corrupt shard: {e}"
    if batch:
        score_batch()
    for key, row in row_of.items():
        if key not in seen:
            why = str(bad[key]) if key in bad else problem or f"sample missing from {tar_url}"
            failure[row], detail[row] = "undecodable", why
    out.failure = pa.array(failure.tolist(), pa.string())
    out.detail = pa.array(detail.tolist(), pa.string())
    out.phash = phash if want_phash else None
    out.thumbs = thumbs
    out.clip_score = scores
