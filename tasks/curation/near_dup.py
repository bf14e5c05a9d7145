"""Near-duplicate images by 64-bit perceptual hash (pHash), without comparing every pair.

Two images are near-duplicates when the Hamming distance of their pHashes (imagehash.phash: DCT of
a 32x32 grey thumbnail, 8x8 lowest frequencies against their median) is <= a threshold. Re-encoding,
resizing or a light colour change moves a pHash by a few bits; different pictures sit near 32.

Search is multi-index hashing (Norouzi et al., "Fast Search in Hamming Space with Multi-Index
Hashing", CVPR 2012): split the 64 bits into m chunks; two hashes within distance t agree to within
floor(t/m) bits on at least one chunk (pigeonhole), so each query probes every chunk value within
that radius in a per-chunk hash table instead of scanning the whole set. The tables and the
exact check of candidates are FAISS's (`IndexBinaryMultiHash`, a range search); m is picked per
call from the table size and t.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import imagehash
import numpy as np
from PIL import Image

from clip_model.images import ImageDecodeError, decode_image
from storage.fs import filesystem, join

__all__ = [
    "EVAL_IMAGE_EXTENSIONS",
    "EvalSet",
    "HashIndex",
    "greedy_dedup",
    "hamming",
    "load_eval_sets",
    "phash64",
]

EVAL_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
_MAX_PROBES = 4096  # buckets probed per query and table; bounds the plan's radius


def phash64(image: Image.Image) -> int:
    """The 64-bit pHash of an image as an unsigned integer (bit 63 = imagehash's first bit)."""
    bits = imagehash.phash(image, hash_size=8).hash.reshape(-1)
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


THUMB = 4  # side of the RGB thumbnail that confirms a pHash match (pHash is colour-blind)
THUMB_BYTES = THUMB * THUMB * 3


def thumbnail(image: Image.Image) -> np.ndarray:
    """A 4x4 RGB area-average thumbnail, flattened (48 uint8): the image's coarse colours."""
    small = image.convert("RGB").resize((THUMB, THUMB), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.uint8).reshape(-1)


def thumb_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean absolute difference (0-255) of rows of two thumbnail arrays [N, 48]."""
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).mean(axis=-1)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise Hamming distance of uint64 hashes."""
    return np.bitwise_count(np.bitwise_xor(a, b)).astype(np.int64)


def _n_probes(width: int, radius: int) -> int:
    return sum(math.comb(width, k) for k in range(radius + 1))


def _plan(n_db: int, threshold: int) -> tuple[int, int]:
    """(hash tables, bits per table) with the lowest expected probes + candidates per query."""
    best, best_cost = (min(threshold + 1, 64), 64 // min(threshold + 1, 64)), math.inf
    for m in range(1, min(threshold + 1, 64) + 1):
        bits = 64 // m  # m disjoint substrings: the pigeonhole bound needs them disjoint
        probes = _n_probes(bits, threshold // m)
        if probes > _MAX_PROBES:
            continue
        cost = m * probes * (1.0 + n_db / 2.0**bits)
        if cost < best_cost:
            best, best_cost = (m, bits), cost
    return best


def _codes(hashes: np.ndarray) -> np.ndarray:
    """uint64 hashes as FAISS binary codes: 8 bytes each, most significant first."""
    return np.ascontiguousarray(hashes.astype(">u8")).view(np.uint8).reshape(-1, 8)


Verify = Callable[[np.ndarray, np.ndarray], np.ndarray]


class HashIndex:
    """FAISS's multi-index hashing over 64-bit hashes (`faiss.IndexBinaryMultiHash`): `m` hash
    tables over disjoint `bits`-bit substrings, each probed within `radius` = threshold // m
    flipped bits, so every pair within `threshold` shares a probed bucket (pigeonhole) and the
    range search is exact (tests/test_curate.py checks it against brute force)."""

    _BATCH = 65_536  # queries per range search: bounds the result arrays held at once

    def __init__(self, hashes: np.ndarray, threshold: int):
        import faiss

        self.hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
        self.threshold = int(threshold)
        self.m, self.bits = _plan(len(self.hashes), self.threshold)
        self.radius = self.threshold // self.m
        self._index = faiss.IndexBinaryMultiHash(64, self.m, self.bits)
        self._index.nflip = self.radius
        if len(self.hashes):
            self._index.add(_codes(self.hashes))

    def __len__(self) -> int:
        return len(self.hashes)

    def search(
        self, queries: np.ndarray, verify: Verify | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(query index, database index, distance) of every pair within the threshold, unique,
        sorted by query then database index.

        `verify(query_idx, db_idx) -> mask` can veto candidate pairs (e.g. colours too different).
        """
        queries = np.ascontiguousarray(queries, dtype=np.uint64)
        found_q, found_d, found_dist = [], [], []
        if len(queries) and len(self.hashes):
            for start in range(0, len(queries), self._BATCH):
                batch = _codes(queries[start : start + self._BATCH])
                # FAISS's binary range search keeps distances strictly below the radius given
                lims, dist, ids = self._index.range_search(batch, self.threshold + 1)
                q_idx = np.repeat(np.arange(len(batch)), np.diff(lims.astype(np.int64))) + start
                d_idx = ids.astype(np.int64)
                if verify is not None and len(q_idx):
                    keep = verify(q_idx, d_idx)
                    q_idx, d_idx, dist = q_idx[keep], d_idx[keep], dist[keep]
                found_q.append(q_idx)
                found_d.append(d_idx)
                found_dist.append(dist.astype(np.int64))
        if not found_q:
            empty = np.zeros(0, np.int64)
            return empty, empty, empty
        q_idx, d_idx = np.concatenate(found_q), np.concatenate(found_d)
        dist = np.concatenate(found_dist)
        order = np.lexsort((d_idx, q_idx))
        return q_idx[order], d_idx[order], dist[order]

    def nearest(
        self, queries: np.ndarray, verify: Verify | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per query: the closest database index within the threshold (-1: none) and distance."""
        q_idx, d_idx, dist = self.search(queries, verify)
        best = np.full(len(queries), -1, np.int64)
        best_dist = np.full(len(queries), -1, np.int64)
        order = np.lexsort((d_idx, -dist, q_idx))  # per query, the smallest distance wins (last)
        best[q_idx[order]] = d_idx[order]
        best_dist[q_idx[order]] = dist[order]
        return best, best_dist


def greedy_dedup(
    hashes: np.ndarray,
    threshold: int,
    thumbs: np.ndarray | None = None,
    max_thumb_difference: float = 255.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scan hashes in order; drop one within `threshold` of an earlier KEPT one (and, given
    thumbnails, whose thumbnail differs by at most `max_thumb_difference`).

    Returns (kept mask, index of the kept hash each dropped one matched (-1 if kept), distance).
    Identical (hash, thumbnail) pairs are collapsed first: a million blank images cost one probe.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    n = len(hashes)
    kept = np.ones(n, bool)
    match = np.full(n, -1, np.int64)
    dist = np.full(n, -1, np.int64)
    if n == 0:
        return kept, match, dist
    if thumbs is None:
        thumbs = np.zeros((n, 0), np.uint8)
    # distinct (hash, thumbnail) pairs, numbered by first occurrence (u_first ascending)
    rep = _first_of_equal(hashes, thumbs)
    u_first = np.flatnonzero(rep == np.arange(n))
    u_of_sample = np.searchsorted(u_first, rep)
    if len(u_first) == n:  # all distinct (the usual case): no copies of the arrays
        u_hashes, u_thumbs = hashes, thumbs
    else:
        u_hashes, u_thumbs = hashes[u_first], thumbs[u_first]
    u_kept = np.ones(len(u_hashes), bool)
    u_match = np.full(len(u_hashes), -1, np.int64)  # matched distinct hash (by rank)
    u_dist = np.zeros(len(u_hashes), np.int64)
    if len(u_hashes) > 1:

        def similar(q: np.ndarray, d: np.ndarray) -> np.ndarray:
            # only pairs with an earlier hash are kept, so the search's results (every hash
            # matches itself) stay about as many as the near-duplicates, not the samples
            earlier = d < q
            if u_thumbs.shape[1] == 0:
                return earlier
            close = np.zeros(len(q), bool)
            close[earlier] = (
                thumb_difference(u_thumbs[q[earlier]], u_thumbs[d[earlier]]) <= max_thumb_difference
            )
            return close

        q, d, dd = HashIndex(u_hashes, threshold).search(u_hashes, similar)  # d < q only
        order = np.lexsort((d, q))
        for qi, di, ddi in zip(
            q[order].tolist(), d[order].tolist(), dd[order].tolist(), strict=True
        ):
            if u_kept[qi] and u_kept[di]:
                u_kept[qi], u_match[qi], u_dist[qi] = False, di, ddi
    # a distinct hash's first sample shares its fate; later copies match the first (distance 0)
    # unless the whole group was dropped, in which case they match what the group matched
    is_first = rep == np.arange(n)
    group_kept = u_kept[u_of_sample]
    kept = is_first & group_kept
    copy = ~is_first & group_kept
    match[copy], dist[copy] = rep[copy], 0
    gone = ~group_kept
    match[gone] = u_first[u_match[u_of_sample[gone]]]
    dist[gone] = u_dist[u_of_sample[gone]]
    return kept, match, dist


def _first_of_equal(hashes: np.ndarray, thumbs: np.ndarray) -> np.ndarray:
    """Per sample, the first sample with the same hash and thumbnail. Indices are sorted by hash
    alone; only the samples whose hash repeats are then sorted by hash and thumbnail, as 8-byte
    words compared in place: a few arrays of 8 bytes a sample at the peak, where np.unique over
    56-byte records copied them twice (about 190 bytes a sample)."""
    n = len(hashes)
    rep = np.arange(n)
    order = np.argsort(hashes, kind="stable")
    equal = hashes[order[1:]] == hashes[order[:-1]]
    repeats = np.zeros(n, bool)
    repeats[1:] |= equal
    repeats[:-1] |= equal
    rows = np.sort(order[repeats])  # ascending: a stable sort keeps each group's first first
    del order, equal, repeats
    if not len(rows):
        return rep
    width = thumbs.shape[1]
    padded = np.zeros((len(rows), -(-width // 8) * 8), np.uint8)
    padded[:, :width] = thumbs[rows]
    words = [hashes[rows], *padded.view(np.uint64).T]
    within = np.lexsort(words[::-1])
    same = np.ones(len(rows) - 1, bool)
    for word in words:
        same &= word[within[1:]] == word[within[:-1]]
    starts = np.flatnonzero(np.concatenate([[True], ~same]))
    first = np.empty(len(rows), np.int64)
    first[within] = within[np.repeat(starts, np.diff(np.append(starts, len(rows))))]
    rep[rows] = rows[first]
    return rep


@dataclass
class EvalSet:
    """The pHashes of every image under some evaluation folders (name: `folder/relative/path`)."""

    hashes: np.ndarray
    thumbs: np.ndarray
    names: list[str]
    unreadable: list[str]


def _list_images(url: str) -> list[str]:
    fs, root = filesystem(url)
    if not fs.isdir(root):
        raise FileNotFoundError(f"{url}: evaluation folder not found")
    paths = [p for p in fs.find(root) if p.lower().endswith(EVAL_IMAGE_EXTENSIONS)]
    return sorted(p[len(root.rstrip("/")) + 1 :] for p in paths)


def load_eval_sets(dirs: Iterable[str]) -> EvalSet:
    """Hash every image under each folder (recursively); unreadable files are listed, not fatal."""
    hashes, thumbs, names, unreadable = [], [], [], []
    for url in dirs:
        fs, _ = filesystem(url)
        for rel in _list_images(url):
            path = join(url, rel)
            try:
                with fs.open(filesystem(path)[1], "rb") as f:
                    im = decode_image(f.read(), path)
            except (OSError, ImageDecodeError):
                unreadable.append(path)
                continue
            hashes.append(phash64(im))
            thumbs.append(thumbnail(im))
            names.append(path)
    thumbs = np.stack(thumbs) if thumbs else np.zeros((0, THUMB_BYTES), np.uint8)
    return EvalSet(np.asarray(hashes, dtype=np.uint64), thumbs, names, unreadable)


def eval_sets_digest(dirs: Iterable[str]) -> list[dict]:
    """What the decontamination ran against: per folder, its image count and a content digest."""
    import hashlib

    out = []
    for url in dirs:
        fs, _ = filesystem(url)
        h = hashlib.sha256()
        rels = _list_images(url)
        for rel in rels:
            with fs.open(filesystem(join(url, rel))[1], "rb") as f:
                h.update(rel.encode() + b"\0" + hashlib.sha256(f.read()).digest())
        out.append({"dir": str(url), "images": len(rels), "digest": "sha256:" + h.hexdigest()})
    return out
