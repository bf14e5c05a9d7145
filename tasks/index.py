"""Tasks of the `index` flow: embed a dataset's shards with a CLIP and build a FAISS index.

    plan_index     compare the dataset with what the output index already holds (resume/grow)
    embed_shard    embed one shard's images and captions; commit its embedding files
    build_index    add new shards to the FAISS index, or rebuild it when its kind must change

The on-disk format is storage/embeddings.py; querying is tasks/search.py.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from pydantic import BaseModel

from clip_model.checkpoint import LoadedClip
from clip_model.embedder import Embedder
from clip_model.images import ImageDecodeError, decode_image
from storage import Dataset, DatasetError, SampleError
from storage.embeddings import (
    Dtype,
    EmbeddingStore,
    IndexFormatError,
    IndexManifest,
    ShardEmbeddings,
    build_faiss_index,
    choose_spec,
)
from tasks.search import ModelMismatchError, model_identity

__all__ = ["IndexResult", "build_index", "embed_shard", "plan_index"]


class IndexResult(BaseModel):
    index: str
    vectors: int
    kind: str
    embedded_shards: int
    reused_shards: int
    skipped_images: int
    images_per_s: float
    rebuilt: bool
    model_id: str
    dataset_digest: str
    mlflow_run_id: str | None = None


def _absolute(url: str) -> str:
    """A local path made absolute (the index may be queried from anywhere); URLs unchanged."""
    return url if "://" in url else str(Path(url).resolve())


@task(name="plan-index", cache_policy=NONE)
def plan_index(dataset: Dataset, output: str, clip: LoadedClip, dtype: Dtype) -> IndexManifest:
    """The manifest to work from: finished shards of an earlier run kept, the rest pending.

    A shard is kept when the dataset still holds it with the same bytes (tar sha256). An index
    of another model or dtype in `output` is refused rather than mixed with new vectors.
    """
    store = EmbeddingStore(output)
    old = store.read_manifest()
    if old is not None and old.model.model_id != clip.model_id:
        raise ModelMismatchError(
            f"{output} holds an index of model {old.model.model_id[:23]} "
            f"({old.model.checkpoint}); this run's model is {clip.model_id[:23]} "
            f"({clip.checkpoint}). Write the new index to another folder."
        )
    if old is not None and old.dtype != dtype:
        raise ValueError(
            f"{output} stores {old.dtype} embeddings; this run asks for {dtype} "
            "(use the same --dtype or another output folder)"
        )
    kept = {}
    if old is not None:
        kept = {s.name: s for s in old.shards if s.status != "pending"}
    shards = []
    for entry in dataset.manifest.shards:
        done = kept.get(entry.name)
        if done is not None and done.tar_sha256 == entry.tar_sha256:
            shards.append(done)
        else:
            shards.append(ShardEmbeddings(name=entry.name, tar_sha256=entry.tar_sha256))
    manifest = IndexManifest(
        model=model_identity(clip),
        dataset_url=_absolute(dataset.url),
        dataset_digest=dataset.digest,
        dtype=dtype,
        shards=shards,
        index=old.index if old is not None else None,
    )
    return store.write_manifest(manifest)


@task(name="embed-shard", cache_policy=NONE)
def embed_shard(
    dataset: Dataset,
    output: str,
    entry: ShardEmbeddings,
    embedder: Embedder,
    *,
    dtype: Dtype = "float32",
    progress: Any = None,
) -> ShardEmbeddings:
    """Embed every image and caption of one dataset shard and commit its embedding files.

    An image that does not decode (clip_model.images: `undecodable` or `too_large`) or a sample
    that does not read (storage.dataset.SampleError) is left out and counted, never a reason to
    stop: the row order of the written vectors is that of the keys file.
    """
    logger = get_run_logger()
    keys, captions, image_vectors, text_vectors = [], [], [], []
    skipped = 0
    batch: list = []

    def flush() -> None:
        if batch:
            image_vectors.append(embedder.images([im for _, _, im in batch]).numpy())
            text_vectors.append(embedder.texts([c for _, c, _ in batch]).numpy())
            keys.extend(k for k, _, _ in batch)
            captions.extend(c for _, c, _ in batch)
            if progress is not None:
                progress.update(len(batch))
            batch.clear()

    def bad_sample(error: SampleError) -> None:  # caption not UTF-8, metadata not JSON, no image
        nonlocal skipped
        skipped += 1
        logger.warning("shard %s: sample skipped: %s", entry.name, error)
        if progress is not None:
            progress.update(1)

    for sample in dataset.iter_samples(shards=[entry.name], on_bad_sample=bad_sample):
        try:
            batch.append((sample.key, sample.caption, decode_image(sample.image, sample.key)))
        except ImageDecodeError as e:
            skipped += 1
            logger.warning("shard %s: sample skipped (%s): %s", entry.name, e.reason, e)
            if progress is not None:
                progress.update(1)
        if len(batch) >= embedder.batch_size:
            flush()
    flush()
    if not keys and skipped:
        raise DatasetError(f"{dataset.url}/{entry.name}.tar: none of its images decodes")

    dim = embedder.dim
    images = np.concatenate(image_vectors) if image_vectors else np.zeros((0, dim), "f4")
    texts = np.concatenate(text_vectors) if text_vectors else np.zeros((0, dim), "f4")
    n = EmbeddingStore(output).write_shard(
        entry.name,
        keys=keys,
        captions=captions,
        image_vectors=images,
        text_vectors=texts,
        dtype=dtype,
    )
    return entry.model_copy(update={"status": "embedded", "num_vectors": n, "skipped": skipped})


@task(name="build-index", cache_policy=NONE)
def build_index(
    output: str, manifest: IndexManifest, kind: str = "auto"
) -> tuple[IndexManifest, bool]:
    """Bring the FAISS index up to date with the embedded shards; (manifest, rebuilt).

    New shards are added to the existing index when it already holds a prefix of the shards and
    its kind still suits the new size; otherwise (first build, a changed shard, a size that calls
    for another kind or more IVF lists) it is rebuilt from the stored embeddings, which costs no
    embedding.
    """
    logger = get_run_logger()
    store = EmbeddingStore(output)
    names = [s.name for s in manifest.shards]
    not_done = [s.name for s in manifest.shards if s.status == "pending"]
    if not_done:
        raise RuntimeError(f"{output}: shards {not_done} are not embedded yet")
    total = sum(s.num_vectors for s in manifest.shards)
    if total == 0:
        raise DatasetError(f"{manifest.dataset_url}: no images to index")
    spec = choose_spec(total, kind=kind)
    old = manifest.index
    t0 = time.perf_counter()
    incremental = (
        old is not None
        and old.spec == spec
        and names[: len(old.shards)] == old.shards
        and all(manifest.shard(n).status == "indexed" for n in old.shards)
    )
    if incremental:
        try:
            index = store.load_index(old)
        except IndexFormatError as e:  # damaged or missing: the stored embeddings rebuild it
            logger.warning("%s; rebuilding the index from the stored embeddings", e)
            incremental = False
    if incremental:
        new = names[len(old.shards) :]
        if new:
            index.add(store.all_vectors(new))
        logger.info("added %d shard(s) to the %s index", len(new), spec.describe())
    else:
        index = build_faiss_index(spec, store.all_vectors(names))
        logger.info("built a %s index over %d vectors", spec.describe(), total)
    entry = store.save_index(index, spec, names)
    shards = [s.model_copy(update={"status": "indexed"}) for s in manifest.shards]
    manifest = manifest.model_copy(update={"index": entry, "shards": shards})
    store.write_manifest(manifest)
    for name in store.remove_stale(manifest):
        logger.info("removed %s (no longer part of the index)", name)
    logger.info("index written in %.2f s", time.perf_counter() - t0)
    return manifest, not incremental
