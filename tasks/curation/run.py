"""Curation end to end, without Prefect: select samples with the spec's filters, then write them.

Input samples are the input's rows with status "success" (those with an image in a tar); failed
crawl rows are not samples and are neither kept nor rejected. Every input sample ends in exactly one
of: the output dataset, or `rejected.parquet` with the filter that dropped it and why.

Filters run in the spec's order, each over what the previous ones kept. The image pass (decode +
pHash + CLIP score) runs once, just before the first filter that needs pixels, over the samples
still alive then; samples it cannot decode are dropped there as `undecodable`. With no image
filter it still runs, after the last filter, so nothing undecodable reaches the output.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

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
from storage.fs import atomic_open, exists, filesystem, join, sha256_file
from tasks.curation.filters import (
    COLUMNS,
    FILTERS,
    FilterContext,
    LanguageIdentifier,
    language_prior,
)
from tasks.curation.images import ClipScorer, scan_images
from tasks.curation.near_dup import THUMB_BYTES, load_eval_sets
from tasks.curation.spec import FilterSpec

__all__ = [
    "REJECTED_NAME",
    "UNDECODABLE",
    "Selection",
    "existing_output",
    "open_input",
    "select_samples",
    "shard_sizes",
    "write_curated",
]

REJECTED_NAME = "rejected.parquet"
UNDECODABLE = "undecodable"
TOO_LARGE = "too_large"  # a pixel bomb: more pixels than clip_model.images decodes
STAGE = "curate"
_INTERNAL = ("shard", "_phash", "_thumb")

log = logging.getLogger(__name__)
Log = Callable[[str], None]


@dataclass
class Selection:
    """The fate of every input sample: kept, or the filter that dropped it and why."""

    samples: pa.Table  # input samples in input order, plus `shard` (and `clip_score` if scored)
    reason: np.ndarray  # filter name, None where kept
    detail: np.ndarray
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

    def rejected_table(self) -> pa.Table:
        """key, url, caption, filter, detail, shard (+ clip_score) of every dropped sample."""
        drop = pa.array(~self.kept)
        t = self.samples.filter(drop)
        cols = {
            "key": t.column("key"),
            "url": t.column("url")
            if "url" in t.column_names
            else pa.nulls(t.num_rows, pa.string()),
            "caption": t.column("caption"),
            "filter": pa.array(self.reason[~self.kept].tolist(), pa.string()),
            "detail": pa.array(self.detail[~self.kept].tolist(), pa.string()),
            "shard": t.column("shard"),
        }
        if self.scored:
            cols["clip_score"] = t.column("clip_score")
        return pa.table(cols)


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


def input_samples(ds: Dataset) -> tuple[pa.Table, int]:
    """The input's samples (rows with status success, in shard order) and its total row count."""
    table = ds.metadata(with_shard=True)
    if "status" not in table.column_names:
        raise DatasetError(
            f"{ds.url}: its Parquet has no `status` column (has {table.column_names})"
        )
    for column in ("key", "caption"):
        if column not in table.column_names:
            raise DatasetError(f"{ds.url}: its Parquet has no {column!r} column")
    samples = table.filter(pc.fill_null(pc.equal(table.column("status"), "success"), False))
    keys = samples.column("key")
    if pc.count_distinct(keys).as_py() != samples.num_rows:
        counts = pc.value_counts(keys)
        dup = [v["values"] for v in counts.to_pylist() if v["counts"] > 1][:5]
        raise DatasetError(f"{ds.url}: sample keys are not unique, e.g. {dup}")
    return samples, table.num_rows


def select_samples(
    ds: Dataset,
    spec: FilterSpec,
    *,
    bad_shards: dict[str, str] | None = None,
    workers: int = 0,
    progress: bool = True,
    log: Log = log.info,
) -> Selection:
    """Apply the spec's filters in order; the image pass runs before the first one on pixels."""
    samples, input_rows = input_samples(ds)
    n = samples.num_rows
    sel = Selection(
        samples=samples,
        reason=np.full(n, None, dtype=object),
        detail=np.full(n, None, dtype=object),
        input_rows=input_rows,
    )
    log(f"{ds.url}: {input_rows} rows, {n} samples (rows with status success)")
    ctx = FilterContext()
    language = spec.get("language")
    if language is not None:
        ctx.langid = LanguageIdentifier(language.candidates, language_prior(language))
    near = spec.get("near_duplicates")
    if near is not None and near.eval_dirs:
        ctx.eval_set = load_eval_sets(near.eval_dirs)
        log(f"decontamination: {len(ctx.eval_set.names)} eval images under {near.eval_dirs}")
        if ctx.eval_set.unreadable:
            log(f"unreadable eval images, ignored: {ctx.eval_set.unreadable[:10]}")

    def image_pass() -> None:
        alive = np.flatnonzero(sel.kept)
        clip = spec.get("clip_score")
        scorer = ClipScorer(clip) if clip is not None else None
        feats = scan_images(
            ds,
            sel.samples.select(["key", "shard", "caption"]).take(alive),
            want_phash=near is not None,
            scorer=scorer,
            bad_shards=bad_shards,
            workers=workers,
            progress=progress,
        )
        phash = np.zeros(n, np.uint64)
        phash[alive] = feats.phash
        sel.samples = sel.samples.append_column("_phash", pa.array(phash))
        thumbs = np.zeros((n, THUMB_BYTES), np.uint8)
        thumbs[alive] = feats.thumbs
        thumb_type = pa.binary(THUMB_BYTES)
        sel.samples = sel.samples.append_column(
            "_thumb",
            pa.FixedSizeBinaryArray.from_buffers(thumb_type, n, [None, pa.py_buffer(thumbs)]),
        )
        if scorer is not None:
            scores = np.full(n, np.nan, np.float32)
            scores[alive] = feats.clip_score
            sel.samples = sel.samples.append_column(
                "clip_score", pa.array(scores, mask=np.isnan(scores))
            )
            sel.scored = True
        for reason in (UNDECODABLE, TOO_LARGE):  # clip_model.images.REASONS
            failed = ~feats.ok & (feats.reason == reason)
            sel.reason[alive[failed]], sel.detail[alive[failed]] = reason, feats.error[failed]
            if reason == UNDECODABLE or failed.any():  # a step for pixel bombs only when met
                record(reason, int(failed.sum()))

    def record(name: str, removed: int) -> None:
        remaining = int(sel.kept.sum())
        sel.steps.append({"filter": name, "removed": removed, "remaining": remaining})
        log(f"{name}: removed {removed}, {remaining} remain")

    scanned = False
    for cfg in spec.filters:
        if cfg.needs_images and not scanned:
            image_pass()
            scanned = True
        alive = np.flatnonzero(sel.kept)
        columns = [c for c in COLUMNS[cfg.name] if c in sel.samples.column_names]
        why = FILTERS[cfg.name](sel.samples.select(columns).take(alive), cfg, ctx)
        drop = why.is_valid().to_numpy(zero_copy_only=False)
        sel.reason[alive[drop]] = cfg.name
        sel.detail[alive[drop]] = np.asarray(why.filter(pa.array(drop)).to_pylist(), dtype=object)
        record(cfg.name, int(drop.sum()))
    if not scanned:
        image_pass()
    assert sum(sel.removed.values()) + int(sel.kept.sum()) == n, "kept + rejected != input"
    return sel


def shard_sizes(n: int, num_shards: int) -> list[int]:
    """`n` samples over min(num_shards, n) shards whose sizes differ by at most one."""
    k = min(num_shards, n)
    return [n // k + (1 if i < n % k else 0) for i in range(k)] if k else []


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


def write_curated(
    ds: Dataset,
    sel: Selection,
    output: str,
    *,
    num_shards: int,
    parameters: dict[str, Any],
    bad_shards: dict[str, str] | None = None,
    progress: bool = True,
    log: Log = log.info,
    force: bool = False,
    inputs: Sequence[str] = (),
) -> Manifest:
    """Reshard the kept samples into evenly sized shards, then `rejected.parquet`, then the manifest,
    into a staging folder swapped in whole when complete (docs/stage-outputs.md): an output that
    aliases the input (or `inputs`), or holds anything but this curation, is refused (unless
    `force`), and a run killed before the swap leaves the output as it was."""
    output = str(output).rstrip("/")
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
            bad_shards=bad_shards, progress=progress, log=log,
        )  # fmt: skip
        out.commit()
    log(
        f"wrote {output}: {manifest.total_samples} samples in {len(manifest.shards)} shards, "
        f"{manifest.stats.get('rejected', 0)} rejected"
    )
    return manifest


def curation_identity(input_digest: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """What decides a curated output: the input's digest and the curation parameters."""
    return {"input_digest": input_digest, "parameters": _normal(parameters)}


def _unless(wanted: dict[str, Any]) -> Callable[[SampleError], None]:
    """A bad sample the image pass already rejected is passed over; one we keep cannot be bad."""

    def on_bad_sample(error: SampleError) -> None:
        if error.key in wanted:
            raise error

    return on_bad_sample


def _write_curated(
    ds: Dataset,
    sel: Selection,
    output: str,
    *,
    num_shards: int,
    parameters: dict[str, Any],
    bad_shards: dict[str, str] | None,
    progress: bool,
    log: Log,
) -> Manifest:
    kept = sel.kept
    n_kept = int(kept.sum())
    sizes = shard_sizes(n_kept, num_shards)
    if 0 < n_kept < num_shards:
        log(f"only {n_kept} samples kept: writing {n_kept} shards, not {num_shards}")
    rows = sel.samples.filter(pa.array(kept))
    rows = rows.drop_columns([c for c in _INTERNAL if c in rows.column_names])
    kept_shards = sel.samples.column("shard").filter(pa.array(kept)).to_pylist()
    by_shard: dict[str, list[int]] = {}
    for i, shard in enumerate(kept_shards):
        by_shard.setdefault(shard, []).append(i)
    rejected = sel.rejected_table()
    stats = sel.stats() | {"num_shards": len(sizes), "shard_sizes": sorted(set(sizes))}
    written = 0
    with DatasetWriter(
        output,
        stage=STAGE,
        parameters=parameters,
        input_digest=ds.digest,
        samples_per_shard=sizes[0] if sizes else 1,
    ) as writer:
        with tqdm(total=n_kept, desc="reshard", disable=not progress) as bar:
            for shard in sorted(by_shard):
                if (bad_shards or {}).get(shard):
                    raise RuntimeError(f"kept samples in damaged shard {shard}")  # cannot happen
                part = rows.take(pa.array(by_shard[shard]))
                wanted = {r["key"]: r for r in part.to_pylist()}
                for sample in read_shard(join(ds.url, f"{shard}.tar"), _unless(wanted)):
                    row = wanted.pop(sample.key, None)
                    if row is None:
                        continue
                    meta = dict(sample.meta)
                    if sel.scored:
                        meta["clip_score"] = row["clip_score"]
                    writer.write(
                        sample.key, sample.image, sample.caption, meta, row, sample.image_ext
                    )
                    written += 1
                    # DatasetWriter commits a shard when it reaches samples_per_shard: aim each
                    # shard at its planned size so the sizes differ by at most one
                    if len(writer.shards) < len(sizes):
                        writer.samples_per_shard = sizes[len(writer.shards)]
                    bar.update()
                if wanted:
                    raise DatasetError(f"{shard}.tar: kept samples vanished: {list(wanted)[:5]}")
        assert written == n_kept and written + rejected.num_rows == sel.samples.num_rows
        with atomic_open(join(output, REJECTED_NAME), "wb") as f:
            pq.write_table(rejected, f)
        stats["rejected_sha256"] = sha256_file(join(output, REJECTED_NAME))[0]
        writer.stats = stats
    manifest = writer.manifest
    assert manifest.total_samples == n_kept
    assert [s.num_samples for s in manifest.shards] == sizes, "shards are not evenly sized"
    return manifest
