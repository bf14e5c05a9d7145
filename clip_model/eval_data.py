"""Readers for evaluation datasets: classification (images, labels, classnames, templates) and
retrieval (images, captions per image).

Three layouts, named by the `format` of an eval suite task:

``sample``: the held-out set of the sample web (tasks/sample_web/, DIR/eval/README.md)::

    <task>/<class name>/*.png      classification, one folder per class
    <task>/classnames.txt          class names in label order (= folder names); optional here
    <task>/templates.txt           zero-shot templates with {c}, one per line; required
    retrieval/images/*.png
    retrieval/captions.jsonl       {"image": "images/0000.png", "captions": ["...", ...]} per line

``folder``: any image folder per class, ``root/<class name>/*.{jpg,jpeg,png,webp}``; classes in
sorted folder order, or the order of ``root/classnames.txt`` when there is one;
``root/templates.txt`` is read when present.

``clip_benchmark``: LAION CLIP_benchmark's WebDataset export (clip_benchmark/datasets/builder.py,
``build_wds_dataset``; written by ``clip_benchmark.webdataset_builder``)::

    <split>/nshards.txt            number of shards n (required)
    <split>/0.tar ... <n-1>.tar    per sample: webp, png, jpg or jpeg (first present, in that
                                   order) and cls (integer label) or txt (captions, one a line)
    classnames.txt                 class names in label order
    zeroshot_classification_templates.txt
    dataset_type.txt               "retrieval" for retrieval; absent or "classification" otherwise

Images are returned as references (a `Path`, or a `TarMember` read lazily from its shard), so a
50k-image benchmark costs a list of small objects until `load_image` opens each one.
"""

from __future__ import annotations

import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import NamedTuple

from PIL import Image

from clip_model.images import decode_image
from clip_model.templates import check_templates

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
# CLIP_benchmark's order of preference when a sample holds several images
CLIP_BENCHMARK_IMAGE_KEYS = ("webp", "png", "jpg", "jpeg")
DEFAULT_TEMPLATES = ("a photo of a {c}.",)


class EvalDataError(ValueError):
    """An evaluation dataset is missing a file or holds something we cannot read."""


@dataclass(frozen=True)
class TarMember:
    """An image stored inside a tar shard: read on demand from (shard, offset, size)."""

    shard: Path
    name: str
    offset: int
    size: int

    def read_bytes(self) -> bytes:
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)

    def __str__(self) -> str:
        return f"{self.shard}:{self.name}"


ImageRef = Path | TarMember


class ClassificationData(NamedTuple):
    images: list[ImageRef]
    labels: list[int]
    classnames: list[str]
    templates: list[str] | None  # None: the dataset has none (use a suite's or the default)


class RetrievalData(NamedTuple):
    images: list[ImageRef]
    captions: list[list[str]]  # captions[i]: every caption of images[i]


def load_image(ref: ImageRef) -> Image.Image:
    """An image reference decoded to RGB by clip_model.images; its errors name the reference
    (ImageDecodeError with reason `undecodable` or `too_large`; EvalDataError if unreadable)."""
    try:
        data = ref.read_bytes()
    except OSError as err:
        raise EvalDataError(f"{ref}: cannot be read ({err})") from err
    return decode_image(data, str(ref))


# --- small text files ------------------------------------------------------------------------


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise EvalDataError(f"{path}: missing; expected {what}")
    return path


def read_lines(path: Path, *, what: str) -> list[str]:
    """Non-empty stripped lines of a UTF-8 text file (blank lines only at the end)."""
    lines = [line.strip() for line in _require_file(path, what).read_text("utf-8").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise EvalDataError(f"{path}: empty; expected {what}")
    for number, line in enumerate(lines, 1):
        if not line:
            raise EvalDataError(f"{path}:{number}: blank line; expected {what}, one a line")
    return lines


def read_classnames(path: Path) -> list[str]:
    names = read_lines(path, what="class names, one a line, in label order")
    seen = set()
    for number, name in enumerate(names, 1):
        if name in seen:
            raise EvalDataError(f"{path}:{number}: class name {name!r} appears twice")
        seen.add(name)
    return names


def read_templates(path: Path) -> list[str]:
    templates = read_lines(path, what="zero-shot templates with {c}, one a line")
    try:
        return check_templates(templates, source=str(path))
    except ValueError as err:
        raise EvalDataError(str(err)) from None


def _check_labels(labels: list[int], classnames: list[str], source: str) -> None:
    bad = [label for label in labels if not 0 <= label < len(classnames)]
    if bad:
        raise EvalDataError(
            f"{source}: label {bad[0]} has no class name; {len(classnames)} class names give "
            f"labels 0..{len(classnames) - 1}"
        )


# --- image folder per class ------------------------------------------------------------------


def _class_folders(root: Path) -> list[str]:
    if not root.is_dir():
        raise EvalDataError(f"{root}: missing; expected a folder with one sub-folder per class")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise EvalDataError(f"{root}: no class folders; expected {root}/<class name>/*.jpg")
    return folders


def _images_in(folder: Path) -> list[Path]:
    images = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not images:
        raise EvalDataError(
            f"{folder}: class folder has no images; expected files ending in "
            f"{', '.join(IMAGE_EXTENSIONS)}"
        )
    return images


def read_image_folder(root: Path | str, *, templates_required: bool = False) -> ClassificationData:
    """`root/<class name>/*.{jpg,jpeg,png,webp}`; classnames.txt (if any) fixes the label order."""
    root = Path(root)
    folders = _class_folders(root)
    if (root / "classnames.txt").is_file():
        classnames = read_classnames(root / "classnames.txt")
        missing = [c for c in classnames if c not in folders]
        extra = [f for f in folders if f not in classnames]
        if missing or extra:
            raise EvalDataError(
                f"{root / 'classnames.txt'}: must list exactly the class folders of {root}; "
                f"without a folder: {missing}, folders not listed: {extra}"
            )
    else:
        classnames = folders
    images, labels = [], []
    for label, name in enumerate(classnames):
        found = _images_in(root / name)
        images.extend(found)
        labels.extend([label] * len(found))
    if templates_required or (root / "templates.txt").is_file():
        templates = read_templates(root / "templates.txt")
    else:
        templates = None
    return ClassificationData(images, labels, classnames, templates)


def read_sample_classification(root: Path | str) -> ClassificationData:
    """A sample-web classification task: an image folder per class with templates.txt."""
    return read_image_folder(root, templates_required=True)


def _inside(name: str) -> bool:
    """A relative path that stays inside its folder by its spelling: no root, drive or "..".
    (A symlink inside the dataset is followed: whoever wrote the folder put it there.)"""
    path = PurePath(name)
    return bool(name.strip()) and not path.anchor and ".." not in path.parts


def read_sample_retrieval(root: Path | str) -> RetrievalData:
    """The sample web's retrieval set: `root/captions.jsonl` naming images under `root`."""
    root = Path(root)
    path = _require_file(
        root / "captions.jsonl",
        'one JSON object a line: {"image": "images/0000.png", "captions": ["...", ...]}',
    )
    images, captions = [], []
    for number, line in enumerate(path.read_text("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise EvalDataError(f"{where}: not JSON ({err})") from None
        if not isinstance(record, dict) or set(record) != {"image", "captions"}:
            raise EvalDataError(
                f'{where}: expected exactly the keys "image" (a path under {root}) and '
                f'"captions" (a list of strings)'
            )
        image, texts = record["image"], record["captions"]
        if not isinstance(image, str) or not _inside(image):
            raise EvalDataError(
                f"{where}: image {image!r} is not a relative path inside {root}; expected a "
                'path such as "images/0000.png" (no absolute path, no "..")'
            )
        if not (root / image).is_file():
            raise EvalDataError(f"{where}: image {image!r} is not a file under {root}")
        if (
            not isinstance(texts, list)
            or not texts
            or not all(isinstance(t, str) and t.strip() for t in texts)
        ):
            raise EvalDataError(f"{where}: captions must be a non-empty list of non-empty strings")
        images.append(root / image)
        captions.append([t.strip() for t in texts])
    if not images:
        raise EvalDataError(f"{path}: no images listed")
    return RetrievalData(images, captions)


# --- CLIP_benchmark WebDataset export --------------------------------------------------------

# WebDataset's split of a member name into sample key and extension: the key runs to the first
# dot of the file name, the extension (lower-cased) is the rest.
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def clip_benchmark_type(root: Path | str) -> str:
    """ "classification" or "retrieval", from dataset_type.txt (absent: classification)."""
    path = Path(root) / "dataset_type.txt"
    if not path.is_file():
        return "classification"
    kind = path.read_text("utf-8").strip().lower() or "classification"
    if kind not in ("classification", "retrieval"):
        raise EvalDataError(
            f"{path}: dataset type {kind!r} is not supported; expected classification or retrieval"
        )
    return kind


def clip_benchmark_shards(root: Path | str, split: str = "test") -> list[Path]:
    """The shard files `<split>/0.tar .. <n-1>.tar` that `<split>/nshards.txt` announces."""
    folder = Path(root) / split
    path = _require_file(folder / "nshards.txt", "the number of shards n (files 0.tar..n-1.tar)")
    text = path.read_text("utf-8").strip()
    if not text.isdigit() or int(text) < 1:
        raise EvalDataError(f"{path}: {text!r} is not a positive number of shards")
    shards = [folder / f"{i}.tar" for i in range(int(text))]
    for shard in shards:
        _require_file(shard, f"shard {shard.name} of {text} announced by {path}")
    return shards


def _tar_samples(shard: Path) -> list[tuple[str, dict[str, tarfile.TarInfo]]]:
    """(key, {extension: member}) per sample, in shard order."""
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(shard) as tar:
            for member in tar:
                match = _KEY_EXT.match(member.name)
                if not member.isfile() or not match:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                samples.setdefault(key, {})[ext] = member
    except tarfile.TarError as err:
        raise EvalDataError(f"{shard}: not a readable tar file ({err})") from err
    return list(samples.items())


def _read_member(shard: Path, member: tarfile.TarInfo) -> bytes:
    return TarMember(shard, member.name, member.offset_data, member.size).read_bytes()


def _sample_image(shard: Path, key: str, members: dict[str, tarfile.TarInfo]) -> TarMember:
    for ext in CLIP_BENCHMARK_IMAGE_KEYS:
        if ext in members:
            member = members[ext]
            return TarMember(shard, member.name, member.offset_data, member.size)
    raise EvalDataError(
        f"{shard}: sample {key!r} has no image; expected one of "
        f"{', '.join('.' + e for e in CLIP_BENCHMARK_IMAGE_KEYS)} (it has {sorted(members)})"
    )


def read_clip_benchmark_classification(
    root: Path | str, *, split: str = "test", classnames: list[str] | None = None
) -> ClassificationData:
    """Samples with an image and `cls`; classnames.txt required unless `classnames` is given,
    the templates file optional."""
    root = Path(root)
    if clip_benchmark_type(root) != "classification":
        raise EvalDataError(
            f"{root / 'dataset_type.txt'}: says retrieval; a classification task needs a "
            "classification dataset"
        )
    names_source = "the classnames given"
    if classnames is None:
        classnames = read_classnames(root / "classnames.txt")
        names_source = str(root / "classnames.txt")
    templates_path = root / "zeroshot_classification_templates.txt"
    templates = read_templates(templates_path) if templates_path.is_file() else None
    images, labels = [], []
    for shard in clip_benchmark_shards(root, split):
        for key, members in _tar_samples(shard):
            if "cls" not in members:
                raise EvalDataError(
                    f"{shard}: sample {key!r} has no .cls (integer label); it has {sorted(members)}"
                )
            text = _read_member(shard, members["cls"]).decode("utf-8", "replace").strip()
            try:
                label = int(text)
            except ValueError:
                raise EvalDataError(
                    f"{shard}: sample {key!r}: .cls {text!r} is not an integer label"
                ) from None
            images.append(_sample_image(shard, key, members))
            labels.append(label)
        _check_labels(labels, classnames, f"{shard} with {names_source}")
    if not images:
        raise EvalDataError(f"{root / split}: the shards hold no samples")
    return ClassificationData(images, labels, classnames, templates)


def read_clip_benchmark_retrieval(root: Path | str, *, split: str = "test") -> RetrievalData:
    """Samples with an image and `txt`, one caption a line (blank lines dropped)."""
    root = Path(root)
    if clip_benchmark_type(root) != "retrieval":
        raise EvalDataError(
            f"{root / 'dataset_type.txt'}: missing or not 'retrieval'; a CLIP_benchmark "
            "retrieval dataset says 'retrieval' there"
        )
    images, captions = [], []
    for shard in clip_benchmark_shards(root, split):
        for key, members in _tar_samples(shard):
            if "txt" not in members:
                raise EvalDataError(
                    f"{shard}: sample {key!r} has no .txt (captions, one a line); it has "
                    f"{sorted(members)}"
                )
            text = _read_member(shard, members["txt"]).decode("utf-8")
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            if not lines:
                raise EvalDataError(f"{shard}: sample {key!r}: .txt holds no caption")
            images.append(_sample_image(shard, key, members))
            captions.append(lines)
    if not images:
        raise EvalDataError(f"{root / split}: the shards hold no samples")
    return RetrievalData(images, captions)


# --- one entry point per task type -----------------------------------------------------------

FORMATS = ("sample", "folder", "clip_benchmark")


def read_classification(
    path: Path | str,
    *,
    format: str,
    split: str = "test",
    classnames: list[str] | None = None,
    templates: list[str] | None = None,
) -> ClassificationData:
    """Classification data of `path` in `format` ("sample", "folder" or "clip_benchmark").

    `classnames` replaces the dataset's names in label order (for folders: one per class folder,
    in the folder order); `templates` replaces its templates. Both are checked like the files.
    """
    if format == "sample":
        data = read_sample_classification(path)
    elif format == "folder":
        data = read_image_folder(path)
    elif format == "clip_benchmark":
        data = read_clip_benchmark_classification(path, split=split, classnames=classnames)
    else:
        raise EvalDataError(f"format {format!r} is not one of {', '.join(FORMATS)}")
    if classnames is not None and format != "clip_benchmark":
        if len(classnames) != len(data.classnames):
            raise EvalDataError(
                f"{path}: {len(classnames)} class names given for {len(data.classnames)} class "
                f"folders ({', '.join(data.classnames)}); give one name per folder, in that order"
            )
        data = data._replace(classnames=list(classnames))
    if templates is not None:
        try:
            data = data._replace(templates=check_templates(templates, source=f"{path} templates"))
        except ValueError as err:
            raise EvalDataError(str(err)) from None
    return data


def read_retrieval(path: Path | str, *, format: str, split: str = "test") -> RetrievalData:
    """Retrieval data of `path` in `format` ("sample" or "clip_benchmark")."""
    if format == "sample":
        return read_sample_retrieval(path)
    if format == "clip_benchmark":
        return read_clip_benchmark_retrieval(path, split=split)
    raise EvalDataError(
        f"format {format!r} has no retrieval layout; expected sample or clip_benchmark"
    )
