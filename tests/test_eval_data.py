"""Eval dataset readers (sample, image folder, CLIP_benchmark WebDataset), suites, and a suite run."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from clip_model.eval_data import (
    EvalDataError,
    TarMember,
    load_image,
    read_classification,
    read_clip_benchmark_classification,
    read_clip_benchmark_retrieval,
    read_image_folder,
    read_retrieval,
    read_sample_classification,
    read_sample_retrieval,
)
from clip_model.eval_suite import EvalSuite, EvalSuiteError, load_suite

REPO = Path(__file__).resolve().parents[1]
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def png(colour, size=(12, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def encode(colour, fmt: str) -> bytes:
    buffer = io.BytesIO()
    options = {"webp": {"lossless": True}}.get(fmt, {})
    Image.new("RGB", (8, 8), colour).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def write_sample_task(root: Path, classes: dict[str, int], *, templates=("a {c} square.",)):
    """The sample web's layout: <class>/NNNN.png, classnames.txt in label order, templates.txt."""
    root.mkdir(parents=True)
    for name, count in classes.items():
        (root / name).mkdir()
        for k in range(count):
            (root / name / f"{k:04d}.png").write_bytes(png(COLOURS.get(name, (9, 9, 9))))
    (root / "classnames.txt").write_text("\n".join(classes) + "\n")
    (root / "templates.txt").write_text("\n".join(templates) + "\n")
    return root


def write_sample_retrieval(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    lines = []
    for k, (name, colour) in enumerate(COLOURS.items()):
        (root / "images" / f"{k:04d}.png").write_bytes(png(colour))
        captions = [f"a {name} square", f"something {name}"]
        lines.append(json.dumps({"image": f"images/{k:04d}.png", "captions": captions}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def write_clip_benchmark(root: Path, samples_per_shard: list[list[dict]], **files: str) -> Path:
    """CLIP_benchmark's export: <split>/0.tar.. with nshards.txt, plus metadata files."""
    import webdataset as wds

    (root / "test").mkdir(parents=True)
    index = 0
    for shard, samples in enumerate(samples_per_shard):
        with wds.TarWriter(str(root / "test" / f"{shard}.tar")) as sink:
            for sample in samples:
                sink.write({"__key__": f"s{index:07d}", **sample})
                index += 1
    (root / "test" / "nshards.txt").write_text(f"{len(samples_per_shard)}\n")
    for name, text in files.items():
        (root / f"{name}.txt").write_text(text)
    return root


# --- sample layout and image folders ---------------------------------------------------------


def test_sample_task_labels_follow_classnames_txt_order(tmp_path):
    root = write_sample_task(tmp_path / "colors", {"red": 2, "blue": 1, "green": 3})
    data = read_sample_classification(root)
    assert data.classnames == ["red", "blue", "green"]  # file order, not sorted
    assert data.labels == [0, 0, 1, 2, 2, 2]
    assert [p.parent.name for p in data.images] == ["red", "red", "blue", "green", "green", "green"]
    assert data.templates == ["a {c} square."]
    assert load_image(data.images[2]).getpixel((0, 0)) == (0, 0, 255)


def test_image_folder_takes_sorted_folders_and_every_image_extension(tmp_path):
    root = tmp_path / "folder"
    for name in COLOURS:
        (root / name).mkdir(parents=True)
    (root / "red" / "a.JPG").write_bytes(encode((255, 0, 0), "jpeg"))
    (root / "red" / "b.webp").write_bytes(encode((255, 0, 0), "webp"))
    (root / "green" / "c.jpeg").write_bytes(encode((0, 255, 0), "jpeg"))
    (root / "blue" / "d.png").write_bytes(encode((0, 0, 255), "png"))
    (root / "blue" / "notes.txt").write_text("not an image")
    (root / "blue" / ".hidden.png").write_bytes(b"")
    data = read_image_folder(root)
    assert data.classnames == ["blue", "green", "red"]
    assert [(p.name, label) for p, label in zip(data.images, data.labels, strict=True)] == [
        ("d.png", 0),
        ("c.jpeg", 1),
        ("a.JPG", 2),
        ("b.webp", 2),
    ]
    assert data.templates is None
    assert load_image(data.images[3]).getpixel((4, 4)) == (255, 0, 0)


def test_a_class_folder_without_images_is_named(tmp_path):
    root = write_sample_task(tmp_path / "colors", {"red": 1, "blue": 0})
    (root / "blue" / "readme.txt").write_text("x")
    with pytest.raises(EvalDataError, match=r"colors/blue: class folder has no images.*\.webp"):
        read_sample_classification(root)


def test_templates_without_placeholder_name_the_file(tmp_path):
    root = write_sample_task(tmp_path / "t", {"red": 1}, templates=("a {c}.", "a photo."))
    with pytest.raises(EvalDataError, match=r"t/templates.txt: template 'a photo.' has no \{c\}"):
        read_sample_classification(root)


def test_sample_task_requires_templates_txt(tmp_path):
    root = write_sample_task(tmp_path / "t", {"red": 1})
    (root / "templates.txt").unlink()
    with pytest.raises(EvalDataError, match=r"t/templates.txt: missing; expected zero-shot"):
        read_sample_classification(root)


def test_classnames_txt_that_disagrees_with_the_folders_is_refused(tmp_path):
    root = write_sample_task(tmp_path / "t", {"red": 1, "blue": 1})
    (root / "classnames.txt").write_text("red\ngreen\n")
    with pytest.raises(
        EvalDataError, match=r"without a folder: \['green'\].*not listed: \['blue'\]"
    ):
        read_sample_classification(root)


def test_classnames_override_must_name_every_class_folder(tmp_path):
    root = write_sample_task(tmp_path / "t", {"red": 1, "blue": 1})
    data = read_classification(root, format="sample", classnames=["rot", "blau"])
    assert data.classnames == ["rot", "blau"]
    with pytest.raises(EvalDataError, match="1 class names given for 2 class folders"):
        read_classification(root, format="folder", classnames=["rot"])


def test_missing_dataset_folder_is_named(tmp_path):
    with pytest.raises(EvalDataError, match=r"nowhere: missing; expected a folder with one sub"):
        read_image_folder(tmp_path / "nowhere")


def test_sample_retrieval_reads_captions_per_image(tmp_path):
    root = write_sample_retrieval(tmp_path / "retrieval")
    data = read_retrieval(root, format="sample")
    assert [p.name for p in data.images] == ["0000.png", "0001.png", "0002.png"]
    assert data.captions[1] == ["a green square", "something green"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "captions.jsonl:2: not JSON"),
        (
            '{"image": "images/none.png", "captions": ["x"]}',
            "image 'images/none.png' is not a file",
        ),
        ('{"image": "images/0000.png", "captions": []}', "captions must be a non-empty list"),
        ('{"image": "images/0000.png", "text": ["x"]}', 'expected exactly the keys "image"'),
    ],
)
def test_bad_captions_lines_are_named_with_file_and_line(tmp_path, line, message):
    root = write_sample_retrieval(tmp_path / "retrieval")
    lines = (root / "captions.jsonl").read_text().splitlines()
    lines[1] = line
    (root / "captions.jsonl").write_text("\n".join(lines))
    with pytest.raises(EvalDataError, match=message.replace("[", r"\[")):
        read_sample_retrieval(root)


def test_missing_captions_file_is_named(tmp_path):
    with pytest.raises(EvalDataError, match=r"captions.jsonl: missing; expected one JSON object"):
        read_sample_retrieval(tmp_path)


# --- CLIP_benchmark WebDataset layout --------------------------------------------------------


def test_clip_benchmark_classification_written_by_webdataset_reads_back(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    shards = [
        [
            {"webp": encode(colours[0], "webp"), "cls": 0},
            {"png": encode(colours[2], "png"), "cls": 2},
        ],
        [{"jpg": encode(colours[1], "jpeg"), "cls": 1}],
    ]
    root = write_clip_benchmark(
        tmp_path / "wds_colours",
        shards,
        classnames="red\ngreen\nblue\n",
        zeroshot_classification_templates="a photo of a {c}.\na {c} thing.\n",
    )
    data = read_clip_benchmark_classification(root)
    assert data.labels == [0, 2, 1]
    assert data.classnames == ["red", "green", "blue"]
    assert data.templates == ["a photo of a {c}.", "a {c} thing."]
    assert all(isinstance(ref, TarMember) for ref in data.images)
    assert [ref.shard.name for ref in data.images] == ["0.tar", "0.tar", "1.tar"]
    pixels = [load_image(ref).getpixel((3, 3)) for ref in data.images]
    assert pixels[0] == (255, 0, 0) and pixels[1] == (0, 0, 255)
    assert max(abs(a - b) for a, b in zip(pixels[2], (0, 255, 0), strict=True)) < 8  # jpeg


def test_clip_benchmark_prefers_webp_then_png_then_jpg(tmp_path):
    sample = {"jpg": encode((0, 0, 255), "jpeg"), "png": encode((0, 255, 0), "png"), "cls": 0}
    root = write_clip_benchmark(tmp_path / "d", [[sample]], classnames="x\n")
    (ref,) = read_classification(root, format="clip_benchmark").images
    assert ref.name.endswith(".png")


def test_clip_benchmark_retrieval_has_one_caption_per_line(tmp_path):
    shards = [
        [
            {"png": encode((255, 0, 0), "png"), "txt": "a red square\nsomething red\n"},
            {"webp": encode((0, 255, 0), "webp"), "txt": "a green square"},
        ]
    ]
    root = write_clip_benchmark(tmp_path / "flickr_like", shards, dataset_type="retrieval\n")
    data = read_clip_benchmark_retrieval(root)
    assert data.captions == [["a red square", "something red"], ["a green square"]]
    assert load_image(data.images[1]).getpixel((0, 0)) == (0, 255, 0)
    with pytest.raises(EvalDataError, match="says retrieval"):
        read_clip_benchmark_classification(root)


def test_clip_benchmark_label_without_classname_names_shard_and_file(tmp_path):
    shards = [
        [{"png": encode((1, 2, 3), "png"), "cls": 0}, {"png": encode((1, 2, 3), "png"), "cls": 2}]
    ]
    root = write_clip_benchmark(tmp_path / "d", shards, classnames="a\nb\n")
    with pytest.raises(
        EvalDataError, match=r"0.tar with .*classnames.txt: label 2 has no class name"
    ):
        read_clip_benchmark_classification(root)
    # classnames given in a suite replace the file, and are checked the same way
    data = read_classification(root, format="clip_benchmark", classnames=["a", "b", "c"])
    assert data.classnames == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda r: (r / "test" / "nshards.txt").unlink(), r"test/nshards.txt: missing"),
        (lambda r: (r / "test" / "nshards.txt").write_text("3"), r"test/1.tar: missing; expected"),
        (lambda r: (r / "classnames.txt").unlink(), r"classnames.txt: missing; expected class"),
        (lambda r: (r / "test" / "0.tar").write_bytes(b"junk" * 200), "not a readable tar"),
        (lambda r: (r / "dataset_type.txt").write_text("multilabel"), "'multilabel' is not"),
    ],
)
def test_broken_clip_benchmark_layouts_are_named(tmp_path, breakage, message):
    shards = [[{"png": encode((1, 2, 3), "png"), "cls": 0}]]
    root = write_clip_benchmark(tmp_path / "d", shards, classnames="a\n")
    breakage(root)
    with pytest.raises(EvalDataError, match=message):
        read_clip_benchmark_classification(root)


def test_clip_benchmark_sample_without_label_or_image_is_named(tmp_path):
    root = write_clip_benchmark(
        tmp_path / "d", [[{"png": encode((1, 2, 3), "png")}]], classnames="a\n"
    )
    with pytest.raises(EvalDataError, match=r"sample 's0000000' has no .cls"):
        read_clip_benchmark_classification(root)
    root = write_clip_benchmark(tmp_path / "e", [[{"cls": 0}]], classnames="a\n")
    with pytest.raises(
        EvalDataError, match=r"sample 's0000000' has no image; expected one of .webp"
    ):
        read_clip_benchmark_classification(root)


# --- suites ----------------------------------------------------------------------------------


def test_sample_suite_resolves_root_given_at_run_time(tmp_path):
    suite = load_suite(REPO / "configs" / "eval" / "sample.yaml", root=tmp_path)
    assert [(t.name, t.type) for t in suite.tasks] == [
        ("digits", "classification"),
        ("colors", "classification"),
        ("shapes", "classification"),
        ("retrieval", "retrieval"),
        ("digits_probe", "linear_probe"),
    ]
    assert suite.tasks[0].dataset == str(tmp_path / "eval" / "digits")
    with pytest.raises(EvalSuiteError, match=r"task digits: '\{root\}/eval/digits' uses \{root\}"):
        load_suite(REPO / "configs" / "eval" / "sample.yaml")


def test_relative_paths_are_relative_to_the_suite_file(tmp_path):
    (tmp_path / "suite.yaml").write_text(
        "name: s\nroot: data\ntasks:\n"
        "  - {name: a, type: classification, dataset: '{root}/a', format: folder}\n"
        "  - {name: b, type: classification, dataset: /abs/b, format: folder}\n"
    )
    suite = load_suite(tmp_path / "suite.yaml")
    assert [t.dataset for t in suite.tasks] == [str(tmp_path / "data" / "a"), "/abs/b"]


@pytest.mark.parametrize(
    ("task", "message"),
    [
        ("{name: a, type: classification, dataset: x, format: folder, colour: red}", "colour"),
        (
            "{name: a, type: classification, dataset: x, format: folder, templates: [a]}",
            "has no {c}",
        ),
        ("{name: a, type: retrieval, dataset: x, format: folder}", "not folder"),
        ("{name: a, type: zero_shot, dataset: x, format: folder}", "type"),
        ("{name: 'a b', type: retrieval, dataset: x, format: sample}", "letters, digits"),
    ],
)
def test_invalid_suites_are_refused_with_the_file_named(tmp_path, task, message):
    (tmp_path / "bad.yaml").write_text(f"name: s\ntasks:\n  - {task}\n")
    with pytest.raises(EvalSuiteError, match=r"bad.yaml: not a valid eval suite"):
        load_suite(tmp_path / "bad.yaml")
    try:
        load_suite(tmp_path / "bad.yaml")
    except EvalSuiteError as err:
        assert message in str(err)


def test_duplicate_task_names_are_refused():
    task = {"name": "a", "type": "retrieval", "dataset": "x", "format": "sample"}
    with pytest.raises(ValueError, match=r"repeated: \['a'\]"):
        EvalSuite(name="s", tasks=[task, task])


# --- a whole suite on a real (tiny, hand-built) model ----------------------------------------


class ColourWords(nn.Module):
    """A stand-in CLIP: an image is its mean colour (a fixed identity projection of the pooled
    pixels); a text is the sum of fixed vectors for the colour words it contains."""

    def __init__(self, vocabulary: dict[str, int]):
        super().__init__()
        self.vocabulary = vocabulary
        table = torch.zeros(len(vocabulary) + 1, 3)
        for word, vector in (("red", 0), ("green", 1), ("blue", 2)):
            table[vocabulary[word], vector] = 1.0
        self.words = nn.Embedding.from_pretrained(table, freeze=True)
        self.project = nn.Linear(3, 3, bias=False)
        with torch.no_grad():
            self.project.weight.copy_(torch.eye(3))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.project(images.mean(dim=(2, 3)))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.words(tokens).sum(dim=1)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        rows = []
        for text in texts:
            ids = [self.vocabulary.get(w, 0) for w in text.replace(".", " ").split()][:6]
            rows.append(ids + [0] * (6 - len(ids)))
        return torch.tensor(rows)


def test_run_suite_scores_a_model_that_knows_colours(tmp_path):
    from clip_model.embedder import Embedder
    from clip_model.evaluate import (
        flat_metrics,
        plot_confusion_matrix,
        plot_retrieval_examples,
        run_suite,
    )

    write_sample_task(tmp_path / "eval" / "colors", {"red": 4, "green": 3, "blue": 5})
    write_sample_retrieval(tmp_path / "eval" / "retrieval")
    (tmp_path / "suite.yaml").write_text(
        "name: colours\ntasks:\n"
        "  - {name: colors, type: classification, dataset: '{root}/eval/colors', format: sample}\n"
        "  - {name: retrieval, type: retrieval, dataset: '{root}/eval/retrieval', format: sample}\n"
        "  - {name: probe, type: linear_probe, dataset: '{root}/eval/colors', format: sample,\n"
        "     test_fraction: 0.4, val_fraction: 0.3, cs: [10.0, 1000.0]}\n"
    )
    suite = load_suite(tmp_path / "suite.yaml", root=tmp_path)
    model = ColourWords({"red": 1, "green": 2, "blue": 3, "something": 4})
    model.train()
    embedder = Embedder(model, model.tokenize, image_size=16, device=None, batch_size=5)
    results = run_suite(embedder, suite)
    assert model.training  # the caller's mode is restored

    colours = results["colors"]
    assert colours.metrics == {"acc1": 1.0, "acc5": 1.0, "mean_per_class_recall": 1.0}
    assert colours.confusion.tolist() == [[4, 0, 0], [0, 3, 0], [0, 0, 5]]
    retrieval = results["retrieval"]
    assert retrieval.metrics["image_retrieval_recall@1"] == 1.0
    assert retrieval.metrics["text_retrieval_recall@1"] == 1.0
    first = retrieval.examples[0]
    assert first.correct[:2] == [True, True] and set(first.texts[:2]) == set(first.captions)
    assert results["probe"].metrics["acc1"] == 1.0
    assert flat_metrics(results)["retrieval/text_retrieval_recall@5"] == 1.0
    json.dumps({name: r.to_dict() for name, r in results.items()})  # JSON-ready

    png_path = plot_confusion_matrix(colours.confusion, colours.classnames, tmp_path / "cm.png")
    grid_path = plot_retrieval_examples(retrieval.examples, tmp_path / "grid.png")
    for path in (png_path, grid_path):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 100

    # a quick subset: max_images spreads over the classes instead of taking the first folder
    quick = suite.model_copy(
        update={"tasks": [suite.tasks[0].model_copy(update={"max_images": 4})]}
    )
    subset = run_suite(embedder, quick)
    assert subset["colors"].num_images == 4
    assert subset["colors"].confusion.sum(dim=1).tolist() == [1, 1, 2]
