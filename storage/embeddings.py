"""Embedding indexes: per-shard CLIP embeddings of a dataset, and a FAISS index over the images.

An index is a folder or fsspec URL beside (never inside) the dataset it describes:

    index.json                      IndexManifest: the model (a digest of its weights), the
                                    dataset (URL + manifest digest), every dataset shard's status
                                    and the FAISS index: its kind and the shards it holds
    embeddings/NNNNN.image.npy      [n, D] L2-normalised image embeddings of dataset shard NNNNN
    embeddings/NNNNN.text.npy       [n, D] caption embeddings, row for row with the images
    embeddings/NNNNN.keys.parquet   key, caption: row i names vector row i
    images-<sha256>.faiss           the FAISS index over every image embedding; the id of a vector
                                    is its row in the shards of `index.shards`, concatenated. A
                                    new index is a new file, and index.json naming it is the commit

Shard status goes `pending` (planned) -> `embedded` (its three files are committed) -> `indexed`
(its vectors are in images.faiss). Every file is written atomically and index.json after it, so a
killed run resumes at the first shard not `embedded`, and a dataset that grows adds only its new
shards. A dataset shard whose bytes changed (another tar sha256) is embedded again.

Index kinds (`choose_spec`): an exact `IndexFlatIP` up to `EXACT_LIMIT` vectors; above it an
inverted file (`IVF{nlist},Flat`, nlist ~ 4 sqrt(n), FAISS's guideline) searched with `nprobe`
lists; `hnsw` on request. Vectors are normalised, so inner product is cosine similarity.
"""

from __future__ import annotations

import hashlib
import io
import math
from datetime import UTC, datetime
from typing import Any, Literal

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from storage.fs import atomic_write_bytes, exists, filesystem, join

__all__ = [
    "EXACT_LIMIT",
    "INDEX_MANIFEST",
    "EmbeddingStore",
    "FaissIndexEntry",
    "IndexFormatError",
    "IndexManifest",
    "IndexSpec",
    "ModelIdentity",
    "ShardEmbeddings",
    "build_faiss_index",
    "choose_spec",
    "search_faiss",
]

FORMAT_VERSION = 1
INDEX_MANIFEST = "index.json"
EXACT_LIMIT = 100_000  # exact search below this: ~10 ms a query at 100k x 512 on one core
Dtype = Literal["float32", "float16"]
ShardStatus = Literal["pending", "embedded", "indexed"]


class IndexFormatError(ValueError):
    """An index folder that cannot be read, or that does not fit what it is used with."""


class ModelIdentity(BaseModel):
    """Which model embedded an index; `model_id` is a digest of its weights and config."""

    model_config = ConfigDict(extra="forbid")

    model_id: str
    checkpoint: str = Field(description="where the model was loaded from (informational)")
    name: str = ""
    embed_dim: int
    image_size: int
    architecture: dict[str, Any] | None = Field(
        None, description="the model config, so weights that do not say it reload as they were"
    )


class ShardEmbeddings(BaseModel):
    """One dataset shard's embeddings: status, and the tar bytes they were computed from."""

    model_config = ConfigDict(extra="forbid")

    name: str
    status: ShardStatus = "pending"
    tar_sha256: str
    num_vectors: int = 0
    skipped: int = Field(default=0, description="samples left out: their image does not decode")


class IndexSpec(BaseModel):
    """A FAISS index kind and its parameters (inner product on normalised vectors)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["flat", "ivf", "hnsw"]
    nlist: int | None = None  # ivf: inverted lists (k-means centroids)
    nprobe: int | None = None  # ivf: lists visited per query
    m: int | None = None  # hnsw: graph degree
    ef_search: int | None = None  # hnsw: candidate list length per query

    def factory(self) -> str:
        if self.kind == "flat":
            return "Flat"
        if self.kind == "ivf":
            return f"IVF{self.nlist},Flat"
        return f"HNSW{self.m},Flat"

    def describe(self) -> str:
        extra = {"flat": "", "ivf": f" nprobe={self.nprobe}", "hnsw": f" ef={self.ef_search}"}
        return self.factory() + extra[self.kind]


class FaissIndexEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    spec: IndexSpec
    file: str
    shards: list[str] = Field(description="dataset shards in the index, in vector id order")
    vectors: int
    sha256: str


class IndexManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    model: ModelIdentity
    dataset_url: str
    dataset_digest: str
    dtype: Dtype = "float32"
    shards: list[ShardEmbeddings] = Field(default_factory=list)
    index: FaissIndexEntry | None = None
    updated_at: str = ""

    def shard(self, name: str) -> ShardEmbeddings:
        for entry in self.shards:
            if entry.name == name:
                return entry
        raise KeyError(name)

    def counts(self) -> dict[str, int]:
        """Shards per status."""
        out = {"pending": 0, "embedded": 0, "indexed": 0}
        for entry in self.shards:
            out[entry.status] += 1
        return out


# ---- choosing and building FAISS indexes -------------------------------------------------------


def choose_spec(n: int, *, kind: str = "auto") -> IndexSpec:
    """The index for `n` vectors: exact up to EXACT_LIMIT, else IVF (or the `kind` asked for)."""
    if kind == "auto":
        kind = "flat" if n <= EXACT_LIMIT else "ivf"
    if kind == "flat":
        return IndexSpec(kind="flat")
    if kind == "ivf":
        # FAISS guideline: nlist ~ 4..16 sqrt(n), trained on >= 39 vectors per list; a power of
        # two so that the spec (and the index) changes only when the data grows by ~4x.
        nlist = 2 ** round(math.log2(max(4 * math.sqrt(max(n, 1)), 1)))
        nlist = max(1, min(nlist, n // 39))
        return IndexSpec(kind="ivf", nlist=nlist, nprobe=max(1, nlist // 16))
    if kind == "hnsw":
        return IndexSpec(kind="hnsw", m=32, ef_search=128)
    raise ValueError(f"index kind {kind!r} is not one of auto, flat, ivf, hnsw")


def _apply_search_params(index: faiss.Index, spec: IndexSpec) -> None:
    if spec.kind == "ivf":
        faiss.extract_index_ivf(index).nprobe = spec.nprobe
    elif spec.kind == "hnsw":
        faiss.downcast_index(index).hnsw.efSearch = spec.ef_search


def build_faiss_index(spec: IndexSpec, vectors: np.ndarray, *, seed: int = 0) -> faiss.Index:
    """A FAISS inner-product index of `spec` holding `vectors` (ids 0..n-1, in row order)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be [n, dim], got shape {vectors.shape}")
    index = faiss.index_factory(vectors.shape[1], spec.factory(), faiss.METRIC_INNER_PRODUCT)
    if spec.kind == "hnsw":
        faiss.downcast_index(index).hnsw.efConstruction = 80
    if not index.is_trained:
        # k-means on a seeded sample of up to 256 vectors a list (more adds time, not quality)
        sample = vectors
        limit = 256 * (spec.nlist or 1)
        if len(vectors) > limit:
            rows = np.random.default_rng(seed).choice(len(vectors), limit, replace=False)
            sample = vectors[np.sort(rows)]
        index.train(sample)
    index.add(vectors)
    _apply_search_params(index, spec)
    return index


def search_faiss(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores [m, k], ids [m, k]) of the k best vectors per query; id -1 where fewer exist."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim == 1:
        queries = queries[None, :]
    return index.search(queries, k)


def serialize_index(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def deserialize_index(data: bytes, spec: IndexSpec) -> faiss.Index:
    index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    _apply_search_params(index, spec)
    return index


# ---- the index folder --------------------------------------------------------------------------


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return f.read()


class EmbeddingStore:
    """An index folder: its manifest, per-shard embedding files and the FAISS index file."""

    def __init__(self, url: str):
        self.url = str(url).rstrip("/")

    def __repr__(self) -> str:
        return f"EmbeddingStore({self.url!r})"

    # manifest
    @property
    def manifest_url(self) -> str:
        return join(self.url, INDEX_MANIFEST)

    def read_manifest(self) -> IndexManifest | None:
        """The manifest, or None when the folder holds no index yet."""
        if not exists(self.manifest_url):
            return None
        try:
            manifest = IndexManifest.model_validate_json(_read_bytes(self.manifest_url))
        except ValidationError as e:
            raise IndexFormatError(f"{self.manifest_url}: not a valid index manifest ({e})") from e
        if manifest.format_version != FORMAT_VERSION:
            raise IndexFormatError(
                f"{self.manifest_url}: format_version {manifest.format_version}, this code reads "
                f"{FORMAT_VERSION}"
            )
        return manifest

    def manifest(self) -> IndexManifest:
        """The manifest; IndexFormatError naming the folder when there is none."""
        manifest = self.read_manifest()
        if manifest is None:
            raise IndexFormatError(
                f"{self.url}: not a search index (no {INDEX_MANIFEST}; build one with "
                "`python -m flows.index --checkpoint CKPT --data DATASET --output DIR`)"
            )
        return manifest

    def write_manifest(self, manifest: IndexManifest) -> IndexManifest:
        manifest.updated_at = datetime.now(UTC).isoformat()
        atomic_write_bytes(self.manifest_url, (manifest.model_dump_json(indent=2) + "\n").encode())
        return manifest

    # per-shard embeddings
    def _shard_url(self, name: str, part: str) -> str:
        return join(self.url, "embeddings", f"{name}.{part}")

    def write_shard(
        self,
        name: str,
        *,
        keys: list[str],
        captions: list[str],
        image_vectors: np.ndarray,
        text_vectors: np.ndarray,
        dtype: Dtype = "float32",
    ) -> int:
        """Commit one shard's embeddings (vectors first, the keys file last). Returns rows."""
        n = len(keys)
        if len(captions) != n or len(image_vectors) != n or len(text_vectors) != n:
            raise ValueError(
                f"shard {name}: {n} keys, {len(captions)} captions, {len(image_vectors)} image "
                f"and {len(text_vectors)} text vectors; they must be equal"
            )
        for part, vectors in (("image.npy", image_vectors), ("text.npy", text_vectors)):
            atomic_write_bytes(self._shard_url(name, part), _npy_bytes(vectors.astype(dtype)))
        table = pa.table({"key": pa.array(keys, pa.string()), "caption": pa.array(captions)})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        atomic_write_bytes(self._shard_url(name, "keys.parquet"), buf.getvalue())
        return n

    def vectors(self, name: str, *, modality: Literal["image", "text"] = "image") -> np.ndarray:
        """A shard's normalised vectors as float32 [n, D]."""
        url = self._shard_url(name, f"{modality}.npy")
        if not exists(url):
            raise IndexFormatError(f"{url}: missing (shard {name} is listed as embedded)")
        return np.load(io.BytesIO(_read_bytes(url)), allow_pickle=False).astype(np.float32)

    def keys(self, name: str) -> pa.Table:
        """A shard's key and caption columns, row for row with its vectors."""
        url = self._shard_url(name, "keys.parquet")
        if not exists(url):
            raise IndexFormatError(f"{url}: missing (shard {name} is listed as embedded)")
        return pq.read_table(io.BytesIO(_read_bytes(url)))

    def all_vectors(self, names: list[str], *, modality: Literal["image", "text"] = "image"):
        """The vectors of `names`, concatenated in that order (float32 [n, D])."""
        parts = [self.vectors(n, modality=modality) for n in names]
        if not parts:
            return np.zeros((0, 0), dtype=np.float32)
        return np.concatenate(parts)

    # FAISS
    def save_index(self, index: faiss.Index, spec: IndexSpec, shards: list[str]) -> FaissIndexEntry:
        """Write the index under a name of its own; it counts once a manifest names it."""
        data = serialize_index(index)
        digest = hashlib.sha256(data).hexdigest()
        name = f"images-{digest[:16]}.faiss"
        atomic_write_bytes(join(self.url, name), data)
        return FaissIndexEntry(
            spec=spec, file=name, shards=list(shards), vectors=int(index.ntotal), sha256=digest
        )

    def remove_stale(self, manifest: IndexManifest) -> list[str]:
        """Delete FAISS files the manifest does not name (earlier builds) and embedding files of
        shards it no longer lists (gone from the dataset). Returns the names removed."""
        fs, root = filesystem(self.url)
        keep = {manifest.index.file} if manifest.index is not None else set()
        shards = {s.name for s in manifest.shards}
        removed = []
        for folder, stale in (
            (root, lambda n: n.startswith("images-") and n.endswith(".faiss") and n not in keep),
            (f"{root}/embeddings", lambda n: n.split(".", 1)[0] not in shards),
        ):
            if not fs.exists(folder):
                continue
            for path in fs.ls(folder, detail=False):
                name = path.rstrip("/").rsplit("/", 1)[-1]
                if not name.startswith(".") and stale(name):
                    fs.rm(path)
                    removed.append(name)
        return removed

    def load_index(self, entry: FaissIndexEntry) -> faiss.Index:
        url = join(self.url, entry.file)
        if not exists(url):
            raise IndexFormatError(f"{url}: missing; {INDEX_MANIFEST} lists it (rebuild the index)")
        data = _read_bytes(url)
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry.sha256:  # checked before FAISS parses the bytes
            raise IndexFormatError(
                f"{url}: sha256 {digest[:16]}... differs from the {entry.sha256[:16]}... that "
                f"{INDEX_MANIFEST} records: the file was changed or damaged after it was written; "
                "rerun the index stage on this folder to rebuild it"
            )
        index = deserialize_index(data, entry.spec)
        if index.ntotal != entry.vectors:
            raise IndexFormatError(
                f"{url}: holds {index.ntotal} vectors, {INDEX_MANIFEST} says {entry.vectors}"
            )
        return index
