"""Search an embedding index by text, by image, or both: plain functions, no orchestration.

    index = SearchIndex.open("data/index")       # loads the model the index was built with
    index.query_text("a red star", k=10)          # -> [Hit(key, caption, score, shard), ...]
    index.query_image(jpeg_bytes_or_pil, k=10)
    index.query(text="a red star", image=pil, weight=0.5, k=10)

Scores are cosine similarities. A query by both embeds each, normalises each, sums them
weighted (`weight` on the text, 1 - weight on the image) and normalises the sum.

Bad input is refused with `SearchError` (empty text, an image that does not decode or is larger
than clip_model.images accepts, no query at all, k < 1, a weight outside [0, 1]); an index opened with another model than the one that
built it raises `ModelMismatchError`. A k larger than the index is clamped to the index size
with a logged warning: asking for "everything" is a fair request, not a mistake.

`create_app(index)` is the web page over an index (FastAPI): `python -m flows.search --index DIR
--serve`. Thumbnails are read from the dataset's own shards by (shard, key).
"""

from __future__ import annotations

import logging
import tarfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from fastapi import FastAPI, File, Form, HTTPException, UploadFile
from fastapi.responses import HTMLResponse, Response
from PIL import Image

from clip_model.checkpoint import LoadedClip, ModelUnknown, load_clip
from clip_model.embedder import Embedder
from clip_model.images import ImageDecodeError, decode_image, to_rgb
from storage.embeddings import (
    EmbeddingStore,
    IndexFormatError,
    IndexManifest,
    ModelIdentity,
    search_faiss,
)
from storage.fs import exists, filesystem, join

__all__ = [
    "Hit",
    "LoadedClip",
    "ModelMismatchError",
    "SearchError",
    "SearchIndex",
    "create_app",
    "load_clip",
    "query_picture",
]

log = logging.getLogger(__name__)
PAGE = Path(__file__).with_name("search_page.html")
MAX_UPLOAD = 20 << 20  # bytes of an uploaded query image


class SearchError(ValueError):
    """A query that cannot be answered: what was wrong and what would be accepted."""


class ModelMismatchError(IndexFormatError):
    """The loaded model is not the one that embedded the index: their vectors do not compare."""


# ---- the model ---------------------------------------------------------------------------------


def model_identity(clip: LoadedClip) -> ModelIdentity:
    """What an index records of the model that embedded it."""
    return ModelIdentity(
        model_id=clip.model_id,
        checkpoint=clip.checkpoint,
        name=clip.model.config.name,
        embed_dim=clip.model.config.embed_dim,
        image_size=clip.image_size,
        architecture=clip.model.config.model_dump(mode="json", exclude={"grad_checkpointing"}),
    )


def query_picture(image: bytes | Image.Image | str | Path) -> Image.Image:
    """The RGB image of a query: bytes or a file decoded by clip_model.images (a PIL image is
    normalised the same way); SearchError, with the decoder's reason, if it does not decode."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    name = str(image) if isinstance(image, str | Path) else f"query image ({len(image)} bytes)"
    try:
        data = Path(image).read_bytes() if isinstance(image, str | Path) else bytes(image)
        return decode_image(data, name)
    except ImageDecodeError as e:
        raise SearchError(str(e)) from None
    except OSError as e:
        raise SearchError(f"{name}: cannot be read ({e})") from None


# ---- images of the dataset, by (shard, key) ----------------------------------------------------


class DatasetImages:
    """Random access to the images of a dataset's tar shards (tar headers indexed on first use)."""

    MEDIA = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}

    def __init__(self, url: str, shards: Sequence[str]):
        self.url, self.shards = str(url).rstrip("/"), set(shards)
        self._members: dict[str, dict[str, tuple[int, int, str]]] = {}
        self._lock = threading.Lock()

    def _index(self, shard: str) -> dict[str, tuple[int, int, str]]:
        with self._lock:
            if shard not in self._members:
                fs, path = filesystem(join(self.url, f"{shard}.tar"))
                members = {}
                with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
                    for m in tar:
                        key, _, ext = m.name.rsplit("/", 1)[-1].partition(".")
                        if m.isfile() and ext in self.MEDIA:
                            members[key] = (m.offset_data, m.size, ext)
                self._members[shard] = members
            return self._members[shard]

    def read(self, shard: str, key: str) -> tuple[bytes, str]:
        """(image bytes, media type); KeyError if the shard or key is not in the dataset."""
        if shard not in self.shards:
            raise KeyError(f"shard {shard!r} is not in the index")
        offset, size, ext = self._index(shard)[key]
        fs, path = filesystem(join(self.url, f"{shard}.tar"))
        with fs.open(path, "rb") as f:
            f.seek(offset)
            return f.read(size), self.MEDIA[ext]


# ---- the index ---------------------------------------------------------------------------------


@dataclass
class Hit:
    key: str
    caption: str
    score: float
    shard: str


class SearchIndex:
    """An index folder opened for queries, with the model that built it."""

    def __init__(self, url: str, manifest: IndexManifest, clip: LoadedClip, *, data: str | None):
        entry = manifest.index
        self.url, self.manifest, self.clip = url, manifest, clip
        store = EmbeddingStore(url)
        self.faiss = store.load_index(entry)
        tables = []
        for name in entry.shards:
            keys = store.keys(name)
            tables.append(keys.append_column("shard", pa.array([name] * keys.num_rows)))
        self.rows = pa.concat_tables(tables) if tables else None
        if self.rows is not None and self.rows.num_rows != self.faiss.ntotal:
            raise IndexFormatError(
                f"{url}: {self.rows.num_rows} keys but {self.faiss.ntotal} vectors in the index"
            )
        # queries one at a time: no batches to show progress of
        self.embedder = Embedder.of(clip, device="auto", progress=False)
        self.images = DatasetImages(data or manifest.dataset_url, entry.shards)
        # one query at a time through the model and FAISS; images decode before taking it, so
        # one big upload never stalls the other queries
        self._lock = threading.Lock()

    @classmethod
    def open(
        cls,
        url: str | Path,
        *,
        clip: LoadedClip | None = None,
        checkpoint: str | Path | None = None,
        data: str | None = None,
        allow_torchscript: bool = False,
        model: str | None = None,
    ) -> SearchIndex:
        """Open `url`; the model is `clip`, else `checkpoint`, else the one the index names;
        `model` (a preset or config file) is its architecture when the weights do not say it,
        else the architecture the index recorded.

        ModelMismatchError if that model is not the one whose embeddings the index holds.
        `data` points at the dataset when it moved since the index was built (thumbnails).
        A TorchScript checkpoint loads only with `allow_torchscript` (it runs code as it loads).
        """
        url = str(url).rstrip("/")
        manifest = EmbeddingStore(url).manifest()
        if manifest.index is None:
            counts = manifest.counts()
            raise IndexFormatError(
                f"{url}: the FAISS index is not built yet ({counts['embedded']} of "
                f"{len(manifest.shards)} shards embedded); rerun the index flow to finish it"
            )
        if clip is None:
            source = checkpoint or manifest.model.checkpoint
            if not exists(source):  # a path or an fsspec URL
                raise FileNotFoundError(
                    f"{url} was built with the checkpoint {source}, which is not there; pass the "
                    "same model with --checkpoint"
                )
            try:
                clip = load_clip(source, model=model, allow_torchscript=allow_torchscript)
            except ModelUnknown:
                if model is not None or manifest.model.architecture is None:
                    raise
                # weights that do not say their architecture: the one they were indexed with
                clip = load_clip(
                    source,
                    model=manifest.model.architecture,
                    allow_torchscript=allow_torchscript,
                )
        if clip.model_id != manifest.model.model_id:
            raise ModelMismatchError(
                f"{url} was built with model {manifest.model.model_id[:23]} "
                f"({manifest.model.name}, {manifest.model.checkpoint}); the model given is "
                f"{clip.model_id[:23]} ({clip.model.config.name}, {clip.checkpoint}). Embeddings "
                "of different models are not comparable: query with the model that built the "
                "index, or build an index for this one (python -m flows.index)"
            )
        return cls(url, manifest, clip, data=data)

    def __len__(self) -> int:
        return int(self.faiss.ntotal)

    def info(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "index": self.url,
            "vectors": len(self),
            "kind": m.index.spec.describe(),
            "model": m.model.model_dump(),
            "dataset": {"url": m.dataset_url, "digest": m.dataset_digest},
        }

    # queries
    @staticmethod
    def _check_k(k: int) -> None:
        if not isinstance(k, int | np.integer) or isinstance(k, bool) or k < 1:
            raise SearchError(f"k must be a positive integer, got {k!r}")

    def _clamp_k(self, k: int) -> int:
        self._check_k(k)
        if k > len(self):
            log.warning("k=%d is larger than the index (%d vectors): returning all", k, len(self))
            return len(self)
        return k

    @staticmethod
    def _check_text(text: str) -> None:
        if not isinstance(text, str) or not text.strip():
            raise SearchError("empty text query: type at least one word")

    def embed_text(self, text: str) -> np.ndarray:
        self._check_text(text)
        with self._lock:
            return self.embedder.texts([text])[0].numpy()

    def embed_image(self, image: bytes | Image.Image | str | Path) -> np.ndarray:
        picture = query_picture(image)
        with self._lock:
            return self.embedder.images([picture])[0].numpy()

    def query_vectors(self, vectors: np.ndarray, k: int = 10) -> list[list[Hit]]:
        """Top-k hits of each row of `vectors` (normalised [m, D] query embeddings)."""
        k = self._clamp_k(int(k))
        with self._lock:
            scores, ids = search_faiss(self.faiss, vectors, k)
        return [
            [self._hit(int(i), float(s)) for s, i in zip(row_s, row_i, strict=True) if i >= 0]
            for row_s, row_i in zip(scores, ids, strict=True)
        ]

    def _hit(self, row: int, score: float) -> Hit:
        r = self.rows.slice(row, 1).to_pylist()[0]
        return Hit(key=r["key"], caption=r["caption"], score=round(score, 6), shard=r["shard"])

    def query_text(self, text: str, k: int = 10) -> list[Hit]:
        return self.query(text=text, k=k)

    def query_texts(self, texts: Sequence[str], k: int = 10) -> list[list[Hit]]:
        """Many text queries at once (batched through the text encoder)."""
        for text in texts:
            if not isinstance(text, str) or not text.strip():
                raise SearchError(f"empty text query among {len(texts)}: {text!r}")
        with self._lock:
            vectors = self.embedder.texts(list(texts)).numpy()
        return self.query_vectors(vectors, k)

    def query_image(self, image: bytes | Image.Image | str | Path, k: int = 10) -> list[Hit]:
        return self.query(image=image, k=k)

    def query(
        self,
        *,
        text: str | None = None,
        image: bytes | Image.Image | str | Path | None = None,
        weight: float = 0.5,
        k: int = 10,
    ) -> list[Hit]:
        """Top-k images for a text, an image, or both (`weight` on the text, 1 - weight on the
        image, summed after normalising each)."""
        if text is None and image is None:
            raise SearchError("no query: give a text, an image, or both")
        if not 0.0 <= weight <= 1.0:
            raise SearchError(f"weight must lie in [0, 1] (the text's share), got {weight}")
        self._check_k(k)
        if text is not None:
            self._check_text(text)
        picture = query_picture(image) if image is not None else None
        with self._lock:
            t = self.embedder.texts([text])[0].numpy() if text is not None else None
            i = self.embedder.images([picture])[0].numpy() if picture is not None else None
        if t is not None and i is not None:
            q = weight * t + (1.0 - weight) * i
            norm = float(np.linalg.norm(q))
            if norm < 1e-6:
                raise SearchError("the text and the image cancel out at this weight; change it")
            q = q / norm
        else:
            q = t if t is not None else i
        return self.query_vectors(q[None, :].astype(np.float32), k)[0]


# ---- the web page ------------------------------------------------------------------------------


def create_app(index: SearchIndex):
    """A FastAPI app: GET / (the page), POST /api/search, GET /api/info, GET /image/{shard}/{key}."""
    app = FastAPI(title="CLIP search", docs_url=None, redoc_url=None)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.read_text("utf-8")

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return index.info()

    @app.post("/api/search")
    def search(
        text: str = Form(""),
        weight: float = Form(0.5),
        k: int = Form(12),
        image: UploadFile | None = File(None),
    ) -> dict[str, Any]:
        data = image.file.read(MAX_UPLOAD + 1) if image is not None and image.filename else None
        if data is not None and len(data) > MAX_UPLOAD:
            raise HTTPException(status_code=413, detail=f"image over {MAX_UPLOAD >> 20} MiB")
        query = text if text.strip() else None
        warning = None
        if k > len(index):
            warning = f"k={k} is larger than the index: showing all {len(index)} images"
        try:
            if query is None and data is None:
                raise SearchError("empty query: type a text or choose an image")
            hits = index.query(text=query, image=data, weight=weight, k=k)
        except SearchError as e:
            raise HTTPException(status_code=400, detail=str(e)) from None
        return {
            "hits": [{**asdict(h), "image": f"/image/{h.shard}/{h.key}"} for h in hits],
            "warning": warning,
        }

    @app.get("/image/{shard}/{key}")
    def image(shard: str, key: str) -> Response:
        try:
            data, media = index.images.read(shard, key)
        except KeyError:
            raise HTTPException(status_code=404, detail=f"no image {shard}/{key}") from None
        return Response(content=data, media_type=media, headers={"Cache-Control": "max-age=3600"})

    return app


@contextmanager
def serve_search(index: SearchIndex, *, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve the page in a background thread; yields its base URL (port 0: a free port)."""
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(create_app(index), host=host, port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the search server did not start on {host}:{port}")
        threading.Event().wait(0.05)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
