"""Zero-shot classifier (prompt ensembling) and classification metrics against hand-computed cases."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clip_model.linear_probe import linear_probe, split_train_val
from clip_model.zero_shot import (
    classification_metrics,
    confusion_matrix,
    predict,
    true_class_rank,
    zero_shot_classifier,
)


class WordTokenizer:
    """Each prompt -> one token id per known word (0 for others), padded to 8: a real tokenizer
    for a vocabulary of a few words."""

    def __init__(self, vocabulary: list[str]):
        self.ids = {word: i + 1 for i, word in enumerate(vocabulary)}
        self.calls: list[int] = []

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.calls.append(len(texts))
        rows = []
        for text in texts:
            ids = [self.ids.get(w, 0) for w in text.lower().replace(".", " ").split()][:8]
            rows.append(ids + [0] * (8 - len(ids)))
        return torch.tensor(rows, dtype=torch.long)


class BagOfWords(nn.Module):
    """encode_text: sum of fixed word vectors; encode_image: a fixed linear map of the input."""

    def __init__(self, word_vectors: torch.Tensor, image_projection: torch.Tensor):
        super().__init__()
        table = torch.cat([torch.zeros(1, word_vectors.shape[1]), word_vectors])
        self.words = nn.Embedding.from_pretrained(table, freeze=True, padding_idx=0)
        self.image_projection = nn.Linear(*image_projection.shape, bias=False)
        with torch.no_grad():
            self.image_projection.weight.copy_(image_projection.t())

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.words(tokens).sum(dim=1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_projection(images.flatten(1))


def test_class_embedding_is_the_normalised_mean_of_normalised_prompt_embeddings():
    # "a cat." embeds to [3, 0] and "cat photo" to [3, 0] + [-3, 4] = [0, 4]: normalising each
    # prompt first weighs them equally -> [1, 1] / sqrt(2); averaging the raw embeddings would
    # give [1.5, 2] -> [0.6, 0.8].
    words = torch.tensor([[3.0, 0.0], [-3.0, 4.0], [-2.0, 0.0]])
    model = BagOfWords(words, torch.eye(2))
    tokenizer = WordTokenizer(["cat", "photo", "dog"])
    classifier = zero_shot_classifier(
        model, tokenizer, ["cat", "dog"], ["a {c}.", "{c} photo"], batch_size=3, device="cpu"
    )
    s = 2**-0.5
    dog = F.normalize(torch.tensor([-1.0, 0.0]) + torch.tensor([-5.0, 4.0]) / 41**0.5, dim=0)
    assert classifier.shape == (2, 2)  # [D, C]
    assert torch.allclose(classifier[:, 0], torch.tensor([s, s]), atol=1e-6)
    assert torch.allclose(classifier[:, 1], dog, atol=1e-6)


def test_prompts_are_encoded_in_batches_with_the_same_result():
    g = torch.Generator().manual_seed(0)
    vocabulary = [f"w{i}" for i in range(12)]
    model = BagOfWords(torch.randn(12, 5, generator=g), torch.eye(5))
    classnames = [f"w{i}" for i in range(7)]
    templates = ["a {c} w8.", "w9 {c}", "{c} w10 w11"]
    results = []
    for batch_size in (1, 4, 100):
        tokenizer = WordTokenizer(vocabulary)
        results.append(
            zero_shot_classifier(
                model, tokenizer, classnames, templates, batch_size=batch_size, device="cpu"
            )
        )
        assert tokenizer.calls == [min(batch_size, 21 - i) for i in range(0, 21, batch_size)]
    assert torch.allclose(results[0], results[1], atol=1e-6)
    assert torch.allclose(results[0], results[2], atol=1e-6)
    assert torch.allclose(results[0].norm(dim=0), torch.ones(7))


def test_template_without_placeholder_is_refused_by_name():
    model = BagOfWords(torch.eye(2), torch.eye(2))
    with pytest.raises(ValueError, match="'a photo of a cat.' has no \\{c\\}"):
        zero_shot_classifier(
            model,
            WordTokenizer(["x", "y"]),
            ["x"],
            ["a {c}.", "a photo of a cat."],
            batch_size=8,
            device="cpu",
        )


def test_zero_shot_end_to_end_classifies_images_by_their_prompts():
    # Images are 2x2 single-channel "pictures" whose projection points at their class word.
    words = torch.eye(3)  # red, green, blue
    projection = torch.zeros(4, 3)
    projection[0, 0] = projection[1, 1] = projection[2, 2] = 1.0
    model = BagOfWords(words, projection)
    tokenizer = WordTokenizer(["red", "green", "blue"])
    classifier = zero_shot_classifier(
        model, tokenizer, ["red", "green", "blue"], ["a {c} thing."], batch_size=2, device="cpu"
    )
    images = torch.tensor([[1.0, 0.1, 0, 0], [0, 0, 2.0, 0], [0.2, 1.0, 0, 5.0]]).view(3, 1, 2, 2)
    logits = 100 * F.normalize(model.encode_image(images), dim=-1) @ classifier
    metrics = classification_metrics(logits, torch.tensor([0, 2, 1]), num_classes=3)
    assert metrics == {"acc1": 1.0, "acc5": 1.0, "mean_per_class_recall": 1.0}


def test_ties_go_to_the_lower_class_index():
    logits = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [5.0, 5.0, 5.0]])
    labels = torch.tensor([0, 1, 2, 2])
    assert true_class_rank(logits, labels).tolist() == [0, 1, 1, 2]
    assert predict(logits).tolist() == [0, 0, 1, 0]
    m = classification_metrics(logits, labels, num_classes=3)
    assert m["acc1"] == 0.25
    assert m["acc5"] == 1.0  # k clamped to the 3 classes


def test_acc5_counts_the_true_class_among_the_five_highest():
    # 6 classes; sample 0's class is 5th (hit), sample 1's 6th (miss), sample 2's 1st.
    logits = torch.tensor(
        [
            [6.0, 5.0, 4.0, 3.0, 2.0, 1.0],
            [6.0, 5.0, 4.0, 3.0, 2.0, 1.0],
            [0.0, 0.0, 0.0, 9.0, 0.0, 0.0],
        ]
    )
    labels = torch.tensor([4, 5, 3])
    m = classification_metrics(logits, labels, num_classes=6)
    assert m["acc1"] == pytest.approx(1 / 3)
    assert m["acc5"] == pytest.approx(2 / 3)


def test_k_larger_than_the_class_count_is_clamped():
    logits = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.3, 0.2]])
    m = classification_metrics(logits, torch.tensor([0, 0, 1]), num_classes=2)
    assert m["acc1"] == pytest.approx(1 / 3)
    assert m["acc5"] == 1.0


def test_mean_per_class_recall_leaves_out_classes_without_samples():
    # class 0: 2 of 3 right; class 1: 1 of 1; class 2 has no samples but is predicted once.
    labels = torch.tensor([0, 0, 0, 1])
    predicted = torch.tensor([0, 0, 2, 1])
    logits = F.one_hot(predicted, 3).float()
    m = classification_metrics(logits, labels, num_classes=3)
    assert m["mean_per_class_recall"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["acc1"] == 0.75
    # scikit-learn's balanced accuracy (CLIP_benchmark's definition) agrees
    from sklearn.metrics import balanced_accuracy_score

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true"
        assert m["mean_per_class_recall"] == pytest.approx(
            balanced_accuracy_score(labels.numpy(), predicted.numpy())
        )


def test_metrics_agree_with_topk_and_sklearn_on_random_logits():
    from sklearn.metrics import balanced_accuracy_score

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 10, generator=g)
    labels = torch.randint(0, 10, (500,), generator=g)
    m = classification_metrics(logits, labels, num_classes=10)
    top5 = logits.topk(5, dim=1).indices
    assert m["acc1"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert m["acc5"] == pytest.approx((top5 == labels[:, None]).any(1).float().mean().item())
    assert m["mean_per_class_recall"] == pytest.approx(
        balanced_accuracy_score(labels.numpy(), logits.argmax(1).numpy())
    )


def test_confusion_matrix_rows_are_true_classes():
    cm = confusion_matrix(
        torch.tensor([0, 0, 1, 2, 2]), torch.tensor([0, 1, 1, 0, 2]), num_classes=3
    )
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]


def test_labels_outside_the_classes_are_refused():
    with pytest.raises(ValueError, match=r"labels: values must lie in \[0, 3\)"):
        classification_metrics(torch.zeros(2, 3), torch.tensor([0, 3]), num_classes=3)
    with pytest.raises(ValueError, match=r"expected shape \[N, 4\]"):
        classification_metrics(torch.zeros(2, 3), torch.tensor([0, 1]), num_classes=4)


def test_linear_probe_picks_c_on_validation_and_scores_test():
    # Two gaussian blobs per class in 5-D, a noisy but learnable problem.
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 5)) * 2
    labels = rng.integers(0, 3, size=300)
    features = centres[labels] + rng.normal(size=(300, 5))
    result = linear_probe(
        features[:200], labels[:200], features[200:], labels[200:], cs=[1e-4, 1e-2, 1.0, 100.0]
    )
    best = max(result.val_acc1.values())
    assert sorted(result.val_acc1) == [1e-4, 1e-2, 1.0, 100.0]
    assert result.C == min(c for c, acc in result.val_acc1.items() if acc == best)
    assert result.acc1 > 0.8
    # labels shuffled: nothing to learn, test accuracy near chance
    shuffled = rng.permutation(labels)
    chance = linear_probe(features[:200], shuffled[:200], features[200:], shuffled[200:])
    assert chance.acc1 < 0.55


def test_validation_split_takes_a_share_of_every_class():
    labels = np.array([0] * 10 + [1] * 5 + [2] * 1)
    train, val = split_train_val(labels, val_fraction=0.2, seed=0)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(16))
    assert np.bincount(labels[val], minlength=3).tolist() == [2, 1, 0]
