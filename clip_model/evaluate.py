"""Run an eval suite on a CLIP: embed, score, and keep what the plots need.

    from clip_model.checkpoint import load_clip
    from clip_model.embedder import Embedder
    from clip_model.eval_suite import load_suite
    from clip_model.evaluate import run_suite, flat_metrics

    suite = load_suite("configs/eval/sample.yaml", root="data/sample")
    embedder = Embedder.of(load_clip("run/checkpoints/last.ckpt"), device="auto", batch_size=256)
    results = run_suite(embedder, suite)
    print(flat_metrics(results))        # {"digits/acc1": ..., "retrieval/image_retrieval_recall@1": ...}

Images and texts are embedded by clip_model.embedder (decoding, `eval_transform`, device and
precision, L2 norm, a progress bar per task). Logits are 100 x cosine, as in CLIP_benchmark (the
scale changes no metric). The model's train/eval mode is restored afterwards, so a training
callback can call this in between steps. Plots use matplotlib's Agg canvas directly (no pyplot
state, no display needed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clip_model.embedder import Embedder
from clip_model.eval_data import (
    DEFAULT_TEMPLATES,
    ClassificationData,
    ImageRef,
    RetrievalData,
    load_image,
    read_classification,
    read_classnames,
    read_retrieval,
    read_templates,
)
from clip_model.eval_suite import EvalSuite, EvalTask
from clip_model.linear_probe import DEFAULT_CS, linear_probe, split_train_val
from clip_model.retrieval import retrieval_metrics, topk_texts_for_images
from clip_model.zero_shot import (
    classification_metrics,
    confusion_matrix,
    predict,
    zero_shot_classifier,
)


@dataclass
class RetrievalExample:
    """An image query with its top texts; `correct[i]`: texts[i] is one of its captions."""

    image: ImageRef
    texts: list[str]
    scores: list[float]
    correct: list[bool]
    captions: list[str]  # the image's own captions


@dataclass
class TaskResult:
    name: str
    type: str
    metrics: dict[str, float]
    num_images: int
    classnames: list[str] | None = None
    confusion: torch.Tensor | None = None  # [C, C], row = true class, column = predicted
    examples: list[RetrievalExample] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready form (the results file the evaluate flow writes)."""
        return {
            "name": self.name,
            "type": self.type,
            "metrics": self.metrics,
            "num_images": self.num_images,
            "classnames": self.classnames,
            "confusion": None if self.confusion is None else self.confusion.tolist(),
            "examples": [{**vars(e), "image": str(e.image)} for e in self.examples],
        }


def flat_metrics(results: dict[str, TaskResult]) -> dict[str, float]:
    """{"<task>/<metric>": value}: the names logged to MLflow."""
    return {f"{name}/{k}": v for name, r in results.items() for k, v in r.metrics.items()}


# --- tasks -----------------------------------------------------------------------------------


def spread_subset(n: int, limit: int | None) -> list[int]:
    """`limit` indexes spread evenly over range(n) (all of them when limit is None or >= n)."""
    if limit is None or limit >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / max(limit - 1, 1)) for i in range(limit)})


def _subset_classification(data: ClassificationData, limit: int | None) -> ClassificationData:
    keep = spread_subset(len(data.images), limit)
    return data._replace(
        images=[data.images[i] for i in keep], labels=[data.labels[i] for i in keep]
    )


def evaluate_classification(
    embedder: Embedder, data: ClassificationData, *, name: str = "classification"
) -> TaskResult:
    """Zero-shot classification: acc1, acc5, mean_per_class_recall and the confusion matrix."""
    templates = data.templates or list(DEFAULT_TEMPLATES)
    with embedder.inference():
        classifier = zero_shot_classifier(
            embedder.model,
            embedder.tokenizer,
            data.classnames,
            templates,
            batch_size=embedder.batch_size,
            device=embedder.device,
        ).cpu()
    features = embedder.images(data.images, desc=f"{name}: images")
    logits = 100.0 * features @ classifier
    labels = torch.tensor(data.labels, dtype=torch.long)
    num_classes = len(data.classnames)
    return TaskResult(
        name=name,
        type="classification",
        metrics=classification_metrics(logits, labels, num_classes=num_classes),
        num_images=len(data.images),
        classnames=list(data.classnames),
        confusion=confusion_matrix(labels, predict(logits), num_classes=num_classes),
    )


def evaluate_retrieval(
    embedder: Embedder,
    data: RetrievalData,
    *,
    name: str = "retrieval",
    ks: Sequence[int] = (1, 5, 10),
    num_examples: int = 8,
    examples_k: int = 5,
) -> TaskResult:
    """Image<->text recall@k, plus `num_examples` image queries with their top texts."""
    texts = [caption for captions in data.captions for caption in captions]
    text_to_image = torch.tensor(
        [i for i, captions in enumerate(data.captions) for _ in captions], dtype=torch.long
    )
    image_features = embedder.images(data.images, desc=f"{name}: images")
    text_features = embedder.texts(texts, desc=f"{name}: captions")
    metrics = retrieval_metrics(image_features, text_features, text_to_image, ks=ks)
    chosen = spread_subset(len(data.images), num_examples)
    scores, index = topk_texts_for_images(image_features[chosen], text_features, k=examples_k)
    examples = [
        RetrievalExample(
            image=data.images[i],
            texts=[texts[j] for j in index[row].tolist()],
            scores=[round(s, 4) for s in scores[row].tolist()],
            correct=[int(text_to_image[j]) == i for j in index[row].tolist()],
            captions=list(data.captions[i]),
        )
        for row, i in enumerate(chosen)
    ]
    return TaskResult(
        name=name,
        type="retrieval",
        metrics=metrics,
        num_images=len(data.images),
        examples=examples,
    )


def evaluate_linear_probe(
    embedder: Embedder,
    train: ClassificationData,
    test: ClassificationData | None,
    *,
    name: str = "linear_probe",
    test_fraction: float = 0.5,
    val_fraction: float = 0.2,
    cs: Sequence[float] = DEFAULT_CS,
    seed: int = 0,
) -> TaskResult:
    """Logistic regression on frozen normalised image features; `test` None: split `train`."""
    x = embedder.images(train.images, desc=f"{name}: images")
    y = torch.tensor(train.labels, dtype=torch.long)
    if test is None:
        train_idx, test_idx = split_train_val(y.numpy(), val_fraction=test_fraction, seed=seed)
        x_train, y_train, x_test, y_test = x[train_idx], y[train_idx], x[test_idx], y[test_idx]
    else:
        x_train, y_train = x, y
        x_test = embedder.images(test.images, desc=f"{name}: test images")
        y_test = torch.tensor(test.labels, dtype=torch.long)
    result = linear_probe(
        x_train, y_train, x_test, y_test, val_fraction=val_fraction, cs=cs, seed=seed
    )
    return TaskResult(
        name=name,
        type="linear_probe",
        metrics={"acc1": result.acc1, "C": result.C},
        num_images=len(train.images) + (len(test.images) if test is not None else 0),
        classnames=list(train.classnames),
    )


def _task_classification_data(task: EvalTask, split: str) -> ClassificationData:
    classnames = task.classnames
    if task.classnames_file is not None:
        classnames = read_classnames(Path(task.classnames_file))
    templates = task.templates
    if task.templates_file is not None:
        templates = read_templates(Path(task.templates_file))
    return read_classification(
        task.dataset, format=task.format, split=split, classnames=classnames, templates=templates
    )


def run_task(embedder: Embedder, task: EvalTask) -> TaskResult:
    """Read one task's dataset (paths already resolved) and evaluate it."""
    if task.type == "classification":
        data = _subset_classification(_task_classification_data(task, task.split), task.max_images)
        return evaluate_classification(embedder, data, name=task.name)
    if task.type == "retrieval":
        data = read_retrieval(task.dataset, format=task.format, split=task.split)
        keep = spread_subset(len(data.images), task.max_images)
        data = RetrievalData([data.images[i] for i in keep], [data.captions[i] for i in keep])
        return evaluate_retrieval(embedder, data, name=task.name)
    if task.type == "linear_probe":
        test = _subset_classification(_task_classification_data(task, task.split), task.max_images)
        train = None
        if task.train_split is not None:
            train = _subset_classification(
                _task_classification_data(task, task.train_split), task.max_images
            )
        return evaluate_linear_probe(
            embedder,
            train if train is not None else test,
            test if train is not None else None,
            name=task.name,
            test_fraction=task.test_fraction,
            val_fraction=task.val_fraction,
            cs=task.cs or DEFAULT_CS,
            seed=task.seed,
        )
    raise ValueError(f"task {task.name}: unknown type {task.type!r}")


def run_suite(
    embedder: Embedder, suite: EvalSuite, *, tasks: Sequence[str] | None = None
) -> dict[str, TaskResult]:
    """Every task of `suite` (or only those named in `tasks`), in suite order, by name."""
    if tasks is not None:
        unknown = sorted(set(tasks) - {t.name for t in suite.tasks})
        if unknown:
            raise ValueError(
                f"suite {suite.name} has no task {unknown}; it has {[t.name for t in suite.tasks]}"
            )
    return {
        task.name: run_task(embedder, task)
        for task in suite.tasks
        if tasks is None or task.name in tasks
    }


# --- plots -----------------------------------------------------------------------------------


def _save(figure, path: str | Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, format="png", dpi=100)
    return path


def plot_confusion_matrix(
    confusion: torch.Tensor, classnames: Sequence[str], path: str | Path, *, title: str = ""
) -> Path:
    """A PNG of the confusion matrix (rows true, columns predicted), counts written in cells."""
    from matplotlib.figure import Figure

    counts = torch.as_tensor(confusion).cpu().numpy()
    n = len(classnames)
    if counts.shape != (n, n):
        raise ValueError(f"confusion {counts.shape} does not match {n} class names")
    side = min(max(4.0, 0.45 * n + 2.5), 40.0)
    figure = Figure(figsize=(side, side))
    ax = figure.add_subplot()
    image = ax.imshow(counts, cmap="Blues")
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(n), labels=list(classnames), rotation=90)
    ax.set_yticks(range(n), labels=list(classnames))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    if n <= 30:
        high = counts.max() if counts.size else 0
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    color = "white" if counts[i, j] > high / 2 else "black"
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", color=color)
    figure.tight_layout()
    return _save(figure, path)


def plot_retrieval_examples(
    examples: Sequence[RetrievalExample], path: str | Path, *, title: str = ""
) -> Path:
    """A PNG grid: one row per query image, its top texts beside it (its own captions in green,
    marked ✓), and its true captions below them in grey."""
    import textwrap

    from matplotlib.figure import Figure

    if not examples:
        raise ValueError("plot_retrieval_examples: no examples")
    rows = len(examples)
    figure = Figure(figsize=(11, 2.2 * rows))
    grid = figure.add_gridspec(rows, 2, width_ratios=[1, 4])
    for row, example in enumerate(examples):
        ax = figure.add_subplot(grid[row, 0])
        ax.imshow(load_image(example.image))
        ax.set_axis_off()
        text_ax = figure.add_subplot(grid[row, 1])
        text_ax.set_axis_off()
        lines = len(example.texts) + 1
        for rank, (text, score, ok) in enumerate(
            zip(example.texts, example.scores, example.correct, strict=True)
        ):
            line = textwrap.shorten(f"{rank + 1}. {'✓' if ok else '✗'} {text}", 110)
            text_ax.text(
                0.0,
                1.0 - rank / lines,
                f"{line}  ({score:.3f})",
                va="top",
                fontsize=9,
                color="green" if ok else "black",
                transform=text_ax.transAxes,
            )
        truth = textwrap.shorten("true: " + " | ".join(example.captions), 120)
        text_ax.text(
            0.0,
            1.0 - len(example.texts) / lines,
            truth,
            va="top",
            fontsize=8,
            style="italic",
            color="grey",
            transform=text_ax.transAxes,
        )
    if title:
        figure.suptitle(title)
    figure.tight_layout(rect=(0, 0, 1, 0.97) if title else None)
    return _save(figure, path)
