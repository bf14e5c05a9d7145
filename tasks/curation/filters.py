"""The filters: each a small function over the surviving samples' table that says why it drops each
row (a string) or keeps it (null). They are applied in the spec's order by `tasks.curation.run`.

    basic            DataComp basic filter over the ORIGINAL image size and the caption
    language         caption language by langid.py (batched), keep configured languages
    dedup_url        same URL string as an earlier sample
    dedup_sha256     same image bytes (sha256) as an earlier sample
    near_duplicates  pHash within `threshold` bits of an eval image, or of an earlier kept sample
    clip_score       cosine(image, caption) under a CLIP model: below threshold / outside top fraction

Column filters use pyarrow.compute, so a million rows take a fraction of a second. Image filters read
the columns `_phash` and `clip_score` that the image pass (`tasks.curation.images`) adds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks.curation.near_dup import EvalSet, HashIndex, greedy_dedup, thumb_difference
from tasks.curation.spec import (
    Basic,
    ClipScore,
    DedupSha256,
    DedupUrl,
    Language,
    NearDuplicates,
)

__all__ = ["FILTERS", "FilterContext", "LanguageIdentifier", "basic", "language"]


@dataclass
class FilterContext:
    """What filters need beyond the table: evaluation hashes, a language identifier."""

    eval_set: EvalSet | None = None
    langid: LanguageIdentifier | None = None
    extra: dict[str, Any] = field(default_factory=dict)


Filter = Callable[[pa.Table, Any, FilterContext], pa.Array]
_WS, _NWS = r"[\s\p{Z}]", r"[^\s\p{Z}]"  # whitespace incl. Unicode separators (NBSP...)


def _column(table: pa.Table, *names: str) -> pa.ChunkedArray:
    """The first present column of `names`, coalesced with the later ones where null."""
    present = [table.column(n) for n in names if n in table.column_names]
    if not present:
        raise KeyError(
            f"the input Parquet has none of the columns {list(names)}; is it an img2dataset crawl?"
        )
    return present[0] if len(present) == 1 else pc.coalesce(*present)


def _captions(table: pa.Table) -> pa.ChunkedArray:
    return pc.fill_null(table.column("caption").cast(pa.string()), "")


def basic(table: pa.Table, cfg: Basic, ctx: FilterContext) -> pa.Array:
    """DataComp's basic filter: shorter original side, aspect ratio, caption words and characters."""
    width = _column(table, "original_width", "width").cast(pa.float64())
    height = _column(table, "original_height", "height").cast(pa.float64())
    short, long = pc.min_element_wise(width, height), pc.max_element_wise(width, height)
    caption = _captions(table)
    chars = pc.utf8_length(pc.utf8_trim_whitespace(caption))
    # ">= k words" as an anchored regex: RE2 stops after k words, no list of words is built
    k = cfg.min_words
    few_words = (
        pc.invert(pc.match_substring_regex(caption, rf"^{_WS}*(?:{_NWS}+{_WS}+){{{k - 1}}}{_NWS}"))
        if k > 0
        else pa.array(np.zeros(table.num_rows, bool))
    )
    reasons = [
        (pc.is_null(short), "original size unknown"),
        (pc.less(short, cfg.min_side), f"shorter side < {cfg.min_side} px"),
        (pc.greater(pc.divide(long, short), cfg.max_aspect), f"aspect ratio > {cfg.max_aspect:g}"),
        (few_words, f"caption < {cfg.min_words} words"),
        (pc.less(chars, cfg.min_chars), f"caption < {cfg.min_chars} characters"),
    ]
    return _first_reason(table.num_rows, reasons)


def _first_reason(n: int, reasons: list[tuple[Any, str]]) -> pa.Array:
    """Per row, the first reason whose condition holds (null: none holds)."""
    conds = [pc.fill_null(c, False) for c, _ in reasons]
    if n == 0:
        return pa.array([], pa.string())
    struct = pa.StructArray.from_arrays(
        [c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c for c in conds],
        names=[f"c{i}" for i in range(len(conds))],
    )
    return pc.case_when(struct, *[pa.scalar(text) for _, text in reasons])


class LanguageIdentifier:
    """langid.py's naive Bayes model scored in batches (one sparse matmul, not a loop of dots)."""

    def __init__(self, candidates: list[str] | None = None, prior: dict[str, float] | None = None):
        from langid.langid import LanguageIdentifier as _LangId
        from langid.langid import model as langid_model  # bundled model string: no download

        ident = _LangId.from_modelstring(langid_model, norm_probs=True)
        self._ident = ident
        classes = list(ident.nb_classes)
        cols = [classes.index(c) for c in candidates] if candidates else range(len(classes))
        self.classes = np.asarray([classes[i] for i in cols])
        self._ptc = np.ascontiguousarray(ident.nb_ptc[:, list(cols)], dtype=np.float64)
        self._pc = np.asarray(ident.nb_pc[list(cols)], dtype=np.float64).copy()
        for lang, nats in (prior or {}).items():  # log-prior bonus: "most captions are English"
            self._pc[list(self.classes).index(lang)] += nats

    def classify(self, texts: list[str], batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """(language code, probability) per text, as langid.classify with norm_probs gives."""
        from scipy import sparse

        langs = np.empty(len(texts), dtype=object)
        probs = np.empty(len(texts), dtype=np.float64)
        for start in range(0, len(texts), batch):
            part = texts[start : start + batch]
            fv = sparse.csr_matrix(np.stack([self._ident.instance2fv(t) for t in part]))
            scores = np.asarray(fv @ self._ptc) + self._pc
            best = scores.argmax(1)
            # normalised probability of the best class: 1 / sum(exp(s_j - s_best))
            top = scores[np.arange(len(part)), best]
            probs[start : start + len(part)] = 1.0 / np.exp(scores - top[:, None]).sum(1)
            langs[start : start + len(part)] = self.classes[best]
        return langs, probs


def language_prior(cfg: Language) -> dict[str, float]:
    return dict.fromkeys(cfg.languages, cfg.prior) if cfg.prior else {}


def language(table: pa.Table, cfg: Language, ctx: FilterContext) -> pa.Array:
    """Keep captions whose most likely language is configured, with at least min_confidence."""
    ident = ctx.langid or LanguageIdentifier(cfg.candidates, language_prior(cfg))
    captions = _captions(table)
    unique = pc.unique(captions)
    langs, probs = ident.classify(unique.to_pylist())
    ok = np.isin(langs, cfg.languages) & (probs >= cfg.min_confidence)
    why = [
        None if keep else f"language {lang} ({p:.2f})"
        for keep, lang, p in zip(ok.tolist(), langs.tolist(), probs.tolist(), strict=True)
    ]
    return pa.array(why, pa.string()).take(pc.index_in(captions, value_set=unique))


def _first_occurrence(table: pa.Table, column: str, what: str) -> pa.Array:
    """Rows whose `column` value appeared in an earlier row: 'duplicate WHAT of KEY'."""
    if column not in table.column_names:
        raise KeyError(f"the input Parquet has no {column!r} column; {what} deduplication needs it")
    values = table.column(column).combine_chunks()
    n = len(values)
    if n == 0:
        return pa.array([], pa.string())
    # dictionary codes are numbered in order of first appearance, so a row holds a value's first
    # occurrence exactly when its code exceeds every code before it: O(n), no sort
    codes = pc.fill_null(pc.dictionary_encode(values).indices, -1).to_numpy(zero_copy_only=False)
    seen_max = np.maximum.accumulate(np.concatenate([[-1], codes[:-1]]))
    first = codes > seen_max
    first_pos = np.flatnonzero(first)  # first_pos[c]: the row where code c first appears
    dup = ~first & (codes >= 0)
    original = first_pos[codes[dup]]
    keys = table.column("key").combine_chunks()
    text = pc.binary_join_element_wise(f"same {what} as ", keys.take(pa.array(original)), "")
    return pc.replace_with_mask(pa.nulls(n, pa.string()), pa.array(dup), text)


def dedup_url(table: pa.Table, cfg: DedupUrl, ctx: FilterContext) -> pa.Array:
    """Drop a sample whose URL an earlier sample already has."""
    return _first_occurrence(table, "url", "url")


def dedup_sha256(table: pa.Table, cfg: DedupSha256, ctx: FilterContext) -> pa.Array:
    """Drop a sample whose image bytes (sha256) an earlier sample already has."""
    return _first_occurrence(table, "sha256", "image bytes")


def near_duplicates(table: pa.Table, cfg: NearDuplicates, ctx: FilterContext) -> pa.Array:
    """Drop images near an evaluation image (decontamination), then near an earlier kept one."""
    hashes = table.column("_phash").to_numpy().astype(np.uint64)
    thumbs = _thumbs(table.column("_thumb").combine_chunks())
    tol = cfg.max_thumb_difference
    why = np.full(len(hashes), None, dtype=object)
    ev = ctx.eval_set
    if ev is not None and len(ev.hashes):

        def same_colours(q: np.ndarray, d: np.ndarray) -> np.ndarray:
            return thumb_difference(thumbs[q], ev.thumbs[d]) <= tol

        best, dist = HashIndex(ev.hashes, cfg.threshold).nearest(hashes, same_colours)
        for i in np.flatnonzero(best >= 0).tolist():
            why[i] = f"near eval image {ev.names[best[i]]} (distance {dist[i]})"
    if cfg.within_dataset:
        rest = np.flatnonzero(why == None)  # noqa: E711  (object array: elementwise)
        kept, match, dist = greedy_dedup(hashes[rest], cfg.threshold, thumbs[rest], tol)
        dropped = np.flatnonzero(~kept)
        # only the matched keys become Python strings, not every sample's
        keys = table.column("key").take(pa.array(rest[match[dropped]], pa.int64())).to_pylist()
        for j, key in zip(dropped.tolist(), keys, strict=True):
            why[rest[j]] = f"near {key} (distance {dist[j]})"
    return pa.array(why.tolist(), pa.string())


def _thumbs(column: pa.FixedSizeBinaryArray) -> np.ndarray:
    width = column.type.byte_width
    data = np.frombuffer(column.buffers()[1], np.uint8)
    return data[column.offset * width : (column.offset + len(column)) * width].reshape(-1, width)


def clip_score(table: pa.Table, cfg: ClipScore, ctx: FilterContext) -> pa.Array:
    """Drop a sample scoring below `threshold`, or outside the best `top_fraction`."""
    scores = table.column("clip_score").to_numpy(zero_copy_only=False).astype(np.float64)
    n = len(scores)
    if cfg.threshold is not None:
        drop = scores < cfg.threshold
        rule = f"< threshold {cfg.threshold:g}"
    elif cfg.top_fraction is not None and n:
        keep_n = math.ceil(cfg.top_fraction * n)
        order = np.lexsort((np.arange(n), -scores))  # best first; ties: earlier sample first
        drop = np.ones(n, bool)
        drop[order[:keep_n]] = False
        cutoff = scores[order[keep_n - 1]]
        rule = f"outside top {cfg.top_fraction:g} (cutoff {cutoff:.4f})"
    else:
        drop = np.zeros(n, bool)
        rule = ""
    why = [f"clip score {s:.4f} {rule}" if d else None for s, d in zip(scores, drop, strict=True)]
    return pa.array(why, pa.string())


# the columns each filter reads (select_samples hands it only these, for the surviving rows)
COLUMNS: dict[str, tuple[str, ...]] = {
    "basic": ("caption", "original_width", "original_height", "width", "height"),
    "language": ("caption",),
    "dedup_url": ("key", "url"),
    "dedup_sha256": ("key", "sha256"),
    "near_duplicates": ("key", "_phash", "_thumb"),
    "clip_score": ("clip_score",),
}
FILTERS: dict[str, Filter] = {
    "basic": basic,
    "language": language,
    "dedup_url": dedup_url,
    "dedup_sha256": dedup_sha256,
    "near_duplicates": near_duplicates,
    "clip_score": clip_score,
}
