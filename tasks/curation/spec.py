"""The filter spec: which filters curation applies, in which order, with which settings (YAML).

    filters:
      - {name: basic, min_side: 200, max_aspect: 3.0}
      - {name: language, languages: [en]}
      - {name: dedup_url}
      - {name: dedup_sha256}
      - {name: near_duplicates, threshold: 6, eval_dirs: [data/sample/eval]}
      - {name: clip_score, checkpoint: runs/clip.pt, top_fraction: 0.9}
    num_shards: 8
    val_fraction: 0.01    # held out by key hash into <output>/val

Every model forbids unknown keys, so a typo is an error naming the field and listing the accepted
ones, and an unknown filter name is an error listing the filters that exist.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

import configs
from clip_model.precision import accepted_spellings, parse_precision

__all__ = [
    "Basic",
    "ClipScore",
    "DedupSha256",
    "DedupUrl",
    "FilterSpec",
    "FilterSpecError",
    "Language",
    "NearDuplicates",
    "load_filter_spec",
    "parse_filter_spec",
]


class FilterSpecError(ValueError):
    """A filter spec that cannot be used; the message names the file, filter and field at fault."""


class _Filter(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: filters that look at pixels (the others read only Parquet columns)
    needs_images: ClassVar[bool] = False


class Basic(_Filter):
    """DataComp's basic filter (Gadre et al. 2023, sec. 3.4): original size, aspect, caption length."""

    name: Literal["basic"]
    min_side: int = Field(200, ge=0, description="shorter ORIGINAL side in px, inclusive")
    max_aspect: float = Field(3.0, ge=1.0, description="longer / shorter original side, inclusive")
    min_words: int = Field(3, ge=0, description="caption words (runs of non-space), inclusive")
    min_chars: int = Field(6, ge=0, description="caption characters after trimming, inclusive")


class Language(_Filter):
    """Caption language by langid.py (its model ships inside the package: no download)."""

    name: Literal["language"]
    languages: list[str] = Field(default_factory=lambda: ["en"], min_length=1)
    min_confidence: float = Field(0.0, ge=0.0, le=1.0, description="langid probability, inclusive")
    candidates: list[str] | None = Field(
        None, description="restrict langid to these languages (None: all 97 it knows)"
    )
    prior: float = Field(
        0.0,
        ge=0.0,
        description="log-prior bonus (nats) for `languages`: short captions are ambiguous to "
        "langid ('a handwritten five' reads as German); a prior says most captions are English",
    )

    @field_validator("languages", "candidates")
    @classmethod
    def _known_codes(cls, codes: list[str] | None) -> list[str] | None:
        if codes is None:
            return None
        known = langid_languages()
        bad = [c for c in codes if c not in known]
        if bad:
            raise ValueError(f"unknown language code(s) {bad}; langid knows {sorted(known)}")
        return codes

    @model_validator(mode="after")
    def _languages_among_candidates(self) -> Language:
        if self.candidates is not None and not set(self.languages) <= set(self.candidates):
            raise ValueError(
                f"languages {self.languages} must all be among candidates {self.candidates}"
            )
        return self


class DedupSha256(_Filter):
    """Exact duplicates: the same image bytes (the crawl's sha256 column); keeps the first."""

    name: Literal["dedup_sha256"]


class DedupUrl(_Filter):
    """Exact duplicates: the same URL string; keeps the first."""

    name: Literal["dedup_url"]


class NearDuplicates(_Filter):
    """Perceptual-hash near duplicates, against evaluation sets and within the dataset."""

    name: Literal["near_duplicates"]
    needs_images: ClassVar[bool] = True
    threshold: int = Field(6, ge=0, le=32, description="max Hamming distance of 64-bit phashes")
    max_thumb_difference: float = Field(
        12.0,
        ge=0.0,
        le=255.0,
        description="a pHash match must also have 4x4 RGB thumbnails within this mean absolute "
        "difference (0-255): pHash sees only grey levels, so a red and a blue circle collide; "
        "255 turns the check off",
    )
    within_dataset: bool = Field(True, description="also drop near-duplicates of earlier samples")
    eval_dirs: list[str] = Field(
        default_factory=list, description="folders of evaluation images (searched recursively)"
    )


class ClipScore(_Filter):
    """Cosine similarity of image and caption under a CLIP model; kept as column `clip_score`."""

    name: Literal["clip_score"]
    needs_images: ClassVar[bool] = True
    checkpoint: str | None = Field(
        None, description="this project's checkpoint or an OpenAI/OpenCLIP state dict (.pt)"
    )
    model: str | None = Field(
        None,
        description="the checkpoint's architecture when its weights do not say it: a preset as "
        "OpenCLIP names it (ViT-B-32 GELU, ViT-B-32-quickgelu OpenAI's) or a config YAML/JSON; "
        "without checkpoint, a RANDOM-weight model (benchmarks; default tiny)",
    )
    tokenizer: str | None = Field(
        None,
        description="'openai' or a trained tokenizer file (default openai if the model uses it)",
    )
    allow_torchscript: bool = Field(
        False,
        description="load a TorchScript checkpoint (OpenAI's .pt releases): it runs the file's code",
    )
    top_fraction: float | None = Field(None, gt=0.0, le=1.0, description="keep the best fraction")
    threshold: float | None = Field(None, ge=-1.0, le=1.0, description="keep score >= threshold")
    batch_size: int = Field(256, ge=1)
    precision: str = Field("bf16", description=f"one of {accepted_spellings()}")
    device: str = Field("auto", description="auto (cuda when available), cpu, cuda, cuda:N")

    @field_validator("precision", mode="before")
    @classmethod
    def _precision(cls, value: Any) -> str:
        return parse_precision(value).name  # one name per behaviour (clip_model.precision)

    @model_validator(mode="after")
    def _one_rule(self) -> ClipScore:
        if self.top_fraction is not None and self.threshold is not None:
            raise ValueError("give top_fraction or threshold, not both (neither: score only)")
        return self


FilterConfig = Annotated[
    Basic | Language | DedupSha256 | DedupUrl | NearDuplicates | ClipScore,
    Field(discriminator="name"),
]
FILTER_MODELS: dict[str, type[_Filter]] = {
    m.model_fields["name"].annotation.__args__[0]: m
    for m in (Basic, Language, DedupSha256, DedupUrl, NearDuplicates, ClipScore)
}


class FilterSpec(BaseModel):
    """Filters applied in order (each sees what the previous ones kept) and the output sharding."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    filters: list[FilterConfig] = Field(default_factory=list)
    num_shards: int = Field(
        8, ge=1, description="output shards (>= training world size x loader workers)"
    )
    val_fraction: float = Field(
        0.01,
        ge=0.0,
        lt=1.0,
        description="kept samples held out as the validation split (the dataset <output>/val), "
        "chosen by a stable hash of the key; 0: none",
    )

    @field_validator("filters")
    @classmethod
    def _each_once(cls, filters: list[_Filter]) -> list[_Filter]:
        names = [f.name for f in filters]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"filter(s) {twice} listed more than once; list each filter once")
        return filters

    def get(self, name: str) -> _Filter | None:
        return next((f for f in self.filters if f.name == name), None)

    def with_eval_dirs(self, eval_dirs: list[str]) -> FilterSpec:
        """The spec with near_duplicates' eval_dirs replaced (the flow's --eval-dir)."""
        near = self.get("near_duplicates")
        if near is None:
            raise FilterSpecError(
                "eval dirs given but the spec has no near_duplicates filter to decontaminate with; "
                "add `- {name: near_duplicates}` to filters"
            )
        filters = [
            f.model_copy(update={"eval_dirs": list(eval_dirs)}) if f is near else f
            for f in self.filters
        ]
        return self.model_copy(update={"filters": filters})


# The 97 languages of the model bundled with langid.py 1.1.6, as a constant: decoding the model
# to list them costs seconds, and a filter spec validates while a command line checks its input.
# tests/test_cli.py compares it with the model.
LANGID_CODES = frozenset(
    (
        "af am an ar as az be bg bn br bs ca cs cy da de dz el en eo es et eu fa fi fo fr ga gl "
        "gu he hi hr ht hu hy id is it ja jv ka kk km kn ko ku ky la lb lo lt lv mg mk ml mn mr "
        "ms mt nb ne nl nn no oc or pa pl ps pt qu ro ru rw se si sk sl sq sr sv sw ta te th tl "
        "tr ug uk ur vi vo wa xh zh zu"
    ).split()
)


def langid_languages() -> frozenset[str]:
    return LANGID_CODES


def _describe(error: dict[str, Any]) -> str:
    loc = list(error["loc"])
    where = ""
    for part in loc:
        where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
    msg = error["msg"]
    if error["type"] == "extra_forbidden" and len(loc) >= 3 and loc[0] == "filters":
        model = FILTER_MODELS.get(str(loc[2]))
        if model is not None:
            accepted = list(model.model_fields)
            msg += f" (filter {loc[2]!r} accepts: {', '.join(accepted)})"
    elif error["type"] == "extra_forbidden":
        msg += f" (the spec accepts: {', '.join(FilterSpec.model_fields)})"
    elif error["type"] == "union_tag_not_found":
        msg += f" (each filter needs `name:` one of {', '.join(FILTER_MODELS)})"
    return f"{where or 'spec'}: {msg}"


def parse_filter_spec(data: Any, source: str = "filter spec") -> FilterSpec:
    """Validate a mapping as a FilterSpec; FilterSpecError lists every problem with its place."""
    if not isinstance(data, dict):
        raise FilterSpecError(f"{source}: expected a mapping with `filters:`, got {data!r:.80}")
    try:
        return FilterSpec.model_validate(data)
    except ValidationError as e:
        problems = "\n  ".join(_describe(err) for err in e.errors())
        raise FilterSpecError(f"{source}: invalid filter spec:\n  {problems}") from None


def load_filter_spec(path: str | Path) -> FilterSpec:
    """Read and validate a filter spec YAML file (a path, or a preset name of configs/filters/)."""
    try:
        found = configs.locate(path, "filters")
    except FileNotFoundError as e:
        raise FilterSpecError(str(e).replace("filters config", "filter spec")) from None
    try:
        data = yaml.safe_load(found.read_text())
    except yaml.YAMLError as e:
        raise FilterSpecError(f"{path}: not valid YAML ({e})") from None
    return parse_filter_spec(data, str(path))
