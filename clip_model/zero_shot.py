"""Zero-shot classification: class embeddings from prompts, and the metrics CLIP_benchmark reports.

Prompt ensembling follows CLIP (Radford et al. 2021, section 3.1.4, https://arxiv.org/abs/2103.00020):
each class is the normalised mean of the normalised text embeddings of its prompts
("a photo of a {c}.", "a drawing of a {c}.", ...).

Metric names and meanings follow LAION's CLIP_benchmark (clip_benchmark/metrics/
zeroshot_classification.py):

- ``acc1``, ``acc5``: fraction of samples whose true class is among the k highest logits;
- ``mean_per_class_recall``: the mean over classes of (correct top-1 predictions of the class) /
  (samples of the class), i.e. scikit-learn's ``balanced_accuracy_score``: a class with no samples
  has no recall and is left out of the mean.

Two choices are ours and differ from a naive ``torch.topk``:

- Ties are broken deterministically towards the lower class index, as ``argmax`` does: the rank of
  the true class is the number of classes with a strictly higher logit plus the number with an
  equal logit and a lower index. So with logits [1, 1, 0] and label 1, top-1 is a miss and top-2 a
  hit, whatever the hardware.
- ``acc5`` with fewer than 5 classes uses k = number of classes (always 1.0 then). CLIP_benchmark
  itself reports NaN for ``acc5`` on datasets with fewer than 5 classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from clip_model.templates import CLASS_PLACEHOLDER, check_templates, fill_template  # noqa: F401


@torch.no_grad()
def zero_shot_classifier(
    model: torch.nn.Module,
    tokenizer,
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Class embeddings [D, C] (float32, unit columns) by prompt ensembling.

    All C x T prompts are encoded in batches of `batch_size`, whatever C and T, so one class
    with many templates or many classes with one template cost the same passes.
    """
    templates = check_templates(templates)
    classnames = list(classnames)
    if not classnames:
        raise ValueError("classnames: empty; a classifier needs at least one class")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompts = [fill_template(t, c) for c in classnames for t in templates]
    embeddings = []
    for start in range(0, len(prompts), batch_size):
        tokens = tokenizer(prompts[start : start + batch_size]).to(device)
        embeddings.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    per_prompt = torch.cat(embeddings).view(len(classnames), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1).t().contiguous()


def _check_logits_labels(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
    if logits.ndim != 2 or logits.shape[1] != num_classes:
        raise ValueError(
            f"logits: expected shape [N, {num_classes}] (num_classes={num_classes}), "
            f"got {tuple(logits.shape)}"
        )
    if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"labels: expected shape [{logits.shape[0]}] (one per logits row), "
            f"got {tuple(labels.shape)}"
        )
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels: values must lie in [0, {num_classes}) for {num_classes} classes; "
            f"got min {int(labels.min())}, max {int(labels.max())}"
        )
    if not torch.isfinite(logits).all():
        raise ValueError("logits: contain NaN or infinity")


def true_class_rank(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """0-based rank [N] of each sample's true class, ties broken towards the lower class index."""
    true_logit = logits.gather(1, labels[:, None])
    class_index = torch.arange(logits.shape[1], device=logits.device)
    ahead = (logits > true_logit) | ((logits == true_logit) & (class_index < labels[:, None]))
    return ahead.sum(dim=1)


def predict(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 class [N]; of tied logits the lowest class index wins (as `argmax` documents)."""
    return logits.argmax(dim=1)


def confusion_matrix(
    labels: torch.Tensor, predictions: torch.Tensor, *, num_classes: int
) -> torch.Tensor:
    """Counts [C, C] (int64): row = true class, column = predicted class."""
    labels = torch.as_tensor(labels, dtype=torch.long).cpu()
    predictions = torch.as_tensor(predictions, dtype=torch.long).cpu()
    if labels.shape != predictions.shape:
        raise ValueError(
            f"labels {tuple(labels.shape)} and predictions {tuple(predictions.shape)} differ"
        )
    for name, values in (("labels", labels), ("predictions", predictions)):
        if values.numel() and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name}: values must lie in [0, {num_classes})")
    flat = labels * num_classes + predictions
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def mean_per_class_recall(confusion: torch.Tensor) -> float:
    """Mean of per-class recall over the classes that have samples (balanced accuracy)."""
    support = confusion.sum(dim=1)
    present = support > 0
    if not present.any():
        raise ValueError("mean_per_class_recall: no samples")
    recall = confusion.diagonal()[present].double() / support[present].double()
    return float(recall.mean())


def classification_metrics(
    logits: torch.Tensor, labels: torch.Tensor, *, num_classes: int
) -> dict[str, float]:
    """{"acc1", "acc5", "mean_per_class_recall"} for logits [N, C] and labels [N].

    Ties count towards the lower class index (see the module docstring); acc5 uses
    k = min(5, num_classes).
    """
    logits = torch.as_tensor(logits).detach().float().cpu()
    labels = torch.as_tensor(labels, dtype=torch.long).cpu()
    _check_logits_labels(logits, labels, num_classes)
    if labels.numel() == 0:
        raise ValueError("classification_metrics: no samples (labels is empty)")
    rank = true_class_rank(logits, labels)
    confusion = confusion_matrix(labels, predict(logits), num_classes=num_classes)
    return {
        "acc1": float((rank < 1).double().mean()),
        "acc5": float((rank < min(5, num_classes)).double().mean()),
        "mean_per_class_recall": mean_per_class_recall(confusion),
    }
