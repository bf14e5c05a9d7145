"""The one dataset format every stage reads and writes (docs/design.md, "The dataset format").

A dataset is a folder or fsspec URL holding

    00000.tar       WebDataset shard: per sample KEY.jpg, KEY.txt (caption), KEY.json (metadata)
    00000.parquet   a row per input row of that shard (key, url, caption, sizes, sha256, status,
                    error_message, ...); failed rows have no sample in the tar
    manifest.json   format version, per-shard counts and sha256, totals, producer, digest

A shard counts only once it is committed (written under a temporary name, then renamed) and the
manifest is written last, so a folder without `manifest.json` is an interrupted run, never a
dataset that looks complete.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from storage.fs import atomic_open, exists, filesystem, join, sha256_file
from storage.manifest import FORMAT_VERSION, MANIFEST_NAME, Manifest, Producer, ShardEntry

__all__ = [
    "Dataset",
    "DatasetError",
    "DatasetWriter",
    "Sample",
    "SampleError",
    "ShardReadError",
    "open_dataset",
    "shard_name",
]

SHARD_RE = re.compile(r"^\d{5,}$")


class DatasetError(ValueError):
    """A dataset, shard or manifest that cannot be read as this project's format."""


class SampleError(DatasetError):
    """One sample of a shard that cannot be read: no image, a caption that is not UTF-8, metadata
    that is not a JSON object. The sample's fault, never the run's: readers count it and go on."""

    def __init__(self, shard: str, key: str, problem: str):
        super().__init__(f"{shard}: sample {key!r}: {problem}")
        self.shard, self.key, self.problem = shard, key, problem


class ShardReadError(OSError):
    """The store failed to read a shard (permissions, network, disk): not the data's fault, so it
    stops the run instead of being counted as a corrupt shard (a retry may succeed)."""


OnBadSample = Callable[[SampleError], None]


def shard_name(index: int) -> str:
    return f"{index:05d}"


@dataclass
class Sample:
    key: str
    image: bytes
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)
    image_ext: str = "jpg"


class Dataset:
    """A committed dataset. Open it with `open_dataset`."""

    def __init__(self, url: str, manifest: Manifest):
        self.url = str(url).rstrip("/")
        self.manifest = manifest

    def __repr__(self) -> str:
        m = self.manifest
        return f"Dataset({self.url!r}, shards={len(m.shards)}, samples={m.total_samples})"

    @property
    def digest(self) -> str:
        return self.manifest.digest

    def __len__(self) -> int:
        return self.manifest.total_samples

    def tar_urls(self) -> list[str]:
        return [join(self.url, f"{s.name}.tar") for s in self.manifest.shards]

    def parquet_urls(self) -> list[str]:
        return [join(self.url, f"{s.name}.parquet") for s in self.manifest.shards]

    def metadata(self, columns: list[str] | None = None, *, with_shard: bool = False) -> pa.Table:
        """Every shard's Parquet rows, in shard order (failed rows included; filter on `status`)."""
        tables = []
        for entry, url in zip(self.manifest.shards, self.parquet_urls(), strict=True):
            fs, path = filesystem(url)
            try:
                table = pq.read_table(path, filesystem=fs, columns=columns)
            except (OSError, pa.ArrowInvalid) as e:
                raise DatasetError(f"{url}: unreadable Parquet ({e})") from e
            if with_shard:
                table = table.append_column("shard", pa.array([entry.name] * table.num_rows))
            tables.append(table)
        if not tables:
            return pa.table({c: pa.array([], pa.string()) for c in (columns or ["key"])})
        return pa.concat_tables(tables, promote_options="default")

    def iter_samples(
        self, shards: list[str] | None = None, *, on_bad_sample: OnBadSample | None = None
    ) -> Iterator[Sample]:
        """Samples in shard order; a truncated or corrupt tar raises DatasetError naming it, a bad
        sample goes to `on_bad_sample` (see `read_shard`)."""
        for entry in self.manifest.shards:
            if shards is None or entry.name in shards:
                yield from read_shard(join(self.url, f"{entry.name}.tar"), on_bad_sample)

    def verify(self) -> None:
        """Deep check: every shard's bytes, row and sample counts agree with the manifest."""
        for entry in self.manifest.shards:
            tar_url = join(self.url, f"{entry.name}.tar")
            pq_url = join(self.url, f"{entry.name}.parquet")
            digest, _ = sha256_file(tar_url)
            if digest != entry.tar_sha256:
                raise DatasetError(f"{tar_url}: sha256 differs from {MANIFEST_NAME}")
            bad: list[SampleError] = []  # a bad sample is still one of the shard's samples
            n = sum(1 for _ in read_shard(tar_url, bad.append)) + len(bad)
            if n != entry.num_samples:
                raise DatasetError(
                    f"{tar_url}: holds {n} samples, {MANIFEST_NAME} says {entry.num_samples}"
                )
            fs, path = filesystem(pq_url)
            rows = pq.ParquetFile(fs.open(path, "rb")).metadata.num_rows
            if rows != entry.num_rows:
                raise DatasetError(
                    f"{pq_url}: holds {rows} rows, {MANIFEST_NAME} says {entry.num_rows}"
                )


def read_shard(tar_url: str, on_bad_sample: OnBadSample | None = None) -> Iterator[Sample]:
    """The samples of one WebDataset tar, grouped by key.

    Three kinds of failure, three outcomes:
    - a bad sample (no image, caption not UTF-8, metadata not a JSON object) is left out and
      handed to `on_bad_sample` as a SampleError naming the shard and the key; the shard goes on.
      Without `on_bad_sample` it is raised (a reader that may not lose samples, stopped clearly);
    - a truncated or corrupt tar raises DatasetError naming it (the shard's fault);
    - the store failing to read (any other OSError) raises ShardReadError naming it: not the
      data's fault, so never to be counted as corruption (docs/design.md, "The dataset format").
    """
    fs, path = filesystem(tar_url)
    current: dict[str, Any] = {}

    def sample(parts: dict[str, Any]) -> Iterator[Sample]:
        try:
            yield _to_sample(parts, tar_url)
        except SampleError as e:
            if on_bad_sample is None:
                raise
            on_bad_sample(e)

    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                key, _, ext = base.partition(".")
                data = tar.extractfile(member).read()
                if current and current["key"] != key:
                    yield from sample(current)
                    current = {}
                current["key"] = key
                current[ext] = data
    except (tarfile.TarError, EOFError) as e:
        raise DatasetError(f"{tar_url}: truncated or corrupt tar ({e})") from e
    except OSError as e:
        raise ShardReadError(
            f"{tar_url}: the store failed to read this shard ({e}); not counted as a corrupt "
            "shard: fix the store or retry"
        ) from e
    if current:
        yield from sample(current)


def _to_sample(parts: dict[str, Any], tar_url: str) -> Sample:
    key = parts["key"]
    ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in parts), None)
    if ext is None:
        raise SampleError(tar_url, key, "has no image (jpg/jpeg/png/webp)")
    try:
        caption = parts.get("txt", b"").decode("utf-8")
    except UnicodeDecodeError as e:
        raise SampleError(tar_url, key, f"caption ({key}.txt) is not UTF-8 ({e})") from None
    try:
        meta = json.loads(parts["json"]) if "json" in parts else {}
    except (UnicodeDecodeError, ValueError) as e:
        raise SampleError(tar_url, key, f"metadata ({key}.json) is not JSON ({e})") from None
    if not isinstance(meta, dict):
        raise SampleError(tar_url, key, f"metadata ({key}.json) is not a JSON object")
    return Sample(key=key, image=parts[ext], caption=caption, meta=meta, image_ext=ext)


def open_dataset(url: str, *, verify: bool = False) -> Dataset:
    """Open a committed dataset; raises DatasetError naming the file at fault.

    Cheap checks always run (manifest parses, every listed shard exists with the recorded size, so
    a truncated tar is caught); `verify=True` also re-hashes and re-counts every shard.
    """
    url = str(url).rstrip("/")
    manifest_url = join(url, MANIFEST_NAME)
    fs, root = filesystem(url)
    if not fs.exists(root):
        raise DatasetError(f"{url}: no such dataset folder")
    if not fs.exists(filesystem(manifest_url)[1]):
        tars = [p for p in fs.ls(root, detail=False) if p.endswith(".tar")]
        if tars:
            raise DatasetError(
                f"{url}: has {len(tars)} shard(s) but no {MANIFEST_NAME}: an interrupted run, "
                "not a complete dataset (rerun the stage that writes it)"
            )
        raise DatasetError(
            f"{url}: not a dataset (expected NNNNN.tar + NNNNN.parquet shards and {MANIFEST_NAME})"
        )
    try:
        with fs.open(filesystem(manifest_url)[1], "rb") as f:
            manifest = Manifest.model_validate_json(f.read())
    except ValidationError as e:
        raise DatasetError(f"{manifest_url}: not a valid manifest ({e})") from e
    if manifest.format_version != FORMAT_VERSION:
        raise DatasetError(
            f"{manifest_url}: format_version {manifest.format_version}, "
            f"this code reads {FORMAT_VERSION}"
        )
    if manifest.compute_digest() != manifest.digest:
        raise DatasetError(f"{manifest_url}: digest does not match its contents (edited by hand?)")
    if manifest.total_samples != sum(s.num_samples for s in manifest.shards):
        raise DatasetError(f"{manifest_url}: total_samples disagrees with its per-shard counts")
    for entry in manifest.shards:
        for ext in ("tar", "parquet"):
            shard_url = join(url, f"{entry.name}.{ext}")
            if not exists(shard_url):
                raise DatasetError(f"{shard_url}: listed in {MANIFEST_NAME} but missing")
        tar_url = join(url, f"{entry.name}.tar")
        size = fs.size(filesystem(tar_url)[1])
        if size != entry.tar_bytes:
            raise DatasetError(
                f"{tar_url}: {size} bytes, {MANIFEST_NAME} says {entry.tar_bytes} "
                "(truncated or replaced)"
            )
    ds = Dataset(url, manifest)
    if verify:
        ds.verify()
    return ds


def describe_shard(url: str, name: str) -> ShardEntry:
    """Hash and count a shard already written under `url` (tar and parquet beside each other)."""
    tar_url, pq_url = join(url, f"{name}.tar"), join(url, f"{name}.parquet")
    tar_sha, tar_bytes = sha256_file(tar_url)
    pq_sha, _ = sha256_file(pq_url)
    fs, path = filesystem(pq_url)
    with fs.open(path, "rb") as f:
        table = pq.read_table(f, columns=["status"])
    statuses = table.column("status").to_pylist()
    return ShardEntry(
        name=name,
        num_samples=sum(s == "success" for s in statuses),
        num_rows=len(statuses),
        tar_sha256=tar_sha,
        tar_bytes=tar_bytes,
        parquet_sha256=pq_sha,
    )


def write_manifest(
    url: str,
    shards: list[ShardEntry],
    *,
    stage: str,
    parameters: dict[str, Any] | None = None,
    input_digest: str | None = None,
    stats: dict[str, Any] | None = None,
) -> Manifest:
    """Seal a dataset: write `manifest.json` last, atomically. Returns the manifest."""
    manifest = Manifest(
        shards=sorted(shards, key=lambda s: s.name),
        total_samples=0,
        total_rows=0,
        producer=Producer(stage=stage, parameters=parameters or {}, input_digest=input_digest),
        stats=stats or {},
    ).sealed()
    with atomic_open(join(url, MANIFEST_NAME), "wb") as f:
        f.write(manifest.to_json().encode())
    return manifest


class DatasetWriter:
    """Writes samples into committed shards of `samples_per_shard`, then the manifest, into a
    folder that holds no dataset yet: a stage's `stage_output(...).staging` (storage/output.py),
    which is swapped into place once complete, or a fresh folder of a test or a benchmark.

        with DatasetWriter(out, stage="curate", parameters=spec) as w:
            w.write(key, jpeg_bytes, caption, meta={...}, row={...})
        w.manifest  # sealed on a clean exit; on an exception no manifest is written

    Tar members carry fixed mtimes and owners, so the same samples give the same bytes and the
    same digest on every run.
    """

    def __init__(
        self,
        url: str,
        *,
        stage: str,
        parameters: dict[str, Any] | None = None,
        input_digest: str | None = None,
        samples_per_shard: int = 1000,
        first_shard: int = 0,
    ):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.url = str(url).rstrip("/")
        self.stage, self.parameters, self.input_digest = stage, parameters or {}, input_digest
        self.samples_per_shard = samples_per_shard
        self.first_shard = first_shard  # several writers may fill one folder, each its own names
        self.stats: dict[str, Any] = {}
        self.shards: list[ShardEntry] = []
        self.manifest: Manifest | None = None
        self._tar_buf: io.BytesIO | None = None
        self._tar: tarfile.TarFile | None = None
        self._rows: list[dict[str, Any]] = []
        self._keys: set[str] = set()
        fs, root = filesystem(self.url)
        fs.makedirs(root, exist_ok=True)
        if fs.exists(filesystem(join(self.url, MANIFEST_NAME))[1]):
            # one way to replace a dataset: write the new one into a staging folder and swap it
            # in whole (storage.output.stage_output), never shard by shard over the old one
            raise DatasetError(
                f"{self.url}: already holds a dataset ({MANIFEST_NAME}); write the new version "
                "through storage.output.stage_output (a staging folder swapped in when complete)"
            )

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()

    def write(
        self,
        key: str,
        image: bytes,
        caption: str,
        meta: dict[str, Any] | None = None,
        row: dict[str, Any] | None = None,
        image_ext: str = "jpg",
    ) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        self._keys.add(key)
        if self._tar is None:
            self._tar_buf = io.BytesIO()
            self._tar = tarfile.open(fileobj=self._tar_buf, mode="w", format=tarfile.USTAR_FORMAT)
        meta = dict(meta or {})
        for ext, data in (
            (image_ext, image),
            ("txt", caption.encode("utf-8")),
            ("json", json.dumps(meta, sort_keys=True, default=str).encode()),
        ):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._rows.append({**(row or {}), "key": key, "caption": caption, "status": "success"})
        if len(self._rows) >= self.samples_per_shard:
            self._commit_shard()

    def _commit_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        name = shard_name(self.first_shard + len(self.shards))
        with atomic_open(join(self.url, f"{name}.parquet"), "wb") as f:
            pq.write_table(pa.Table.from_pylist(self._rows), f)
        with atomic_open(join(self.url, f"{name}.tar"), "wb") as f:
            f.write(self._tar_buf.getvalue())
        self.shards.append(describe_shard(self.url, name))
        self._tar, self._tar_buf, self._rows = None, None, []

    def flush(self) -> list[ShardEntry]:
        """Commit the open shard; the shards written so far. Without `close`, no manifest is
        written: one writer of several (curation's resharding) hands its shards to the caller."""
        self._commit_shard()
        return list(self.shards)

    def close(self) -> Manifest:
        if self.manifest is None:
            self._commit_shard()
            self.manifest = write_manifest(
                self.url,
                self.shards,
                stage=self.stage,
                parameters=self.parameters,
                input_digest=self.input_digest,
                stats=self.stats,
            )
        return self.manifest
