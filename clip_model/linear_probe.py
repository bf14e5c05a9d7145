"""Linear probe: logistic regression on frozen image features.

CLIP's other standard measure (Radford et al. 2021, appendix A.3, https://arxiv.org/abs/2103.00020):
scikit-learn's L-BFGS logistic regression on the image features, its L2 strength chosen on a
validation split. The paper sweeps C over 10^-6..10^6; we use a log-spaced grid (13 points by
default, a parameter), keep the C with the best validation accuracy (the smaller C, i.e. the
stronger regularisation, on a tie), refit on train + validation and score once on test.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_CS = tuple(float(c) for c in np.logspace(-6, 6, 13))


@dataclass(frozen=True)
class LinearProbeResult:
    acc1: float  # top-1 accuracy on the test split, after refitting on train + validation
    C: float  # the chosen inverse regularisation strength
    val_acc1: dict[float, float]  # validation accuracy of every C tried


def _as_arrays(features, labels, name: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(features.cpu() if hasattr(features, "cpu") else features, dtype=np.float64)
    y = np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels, dtype=np.int64)
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{name}: expected features [N, D] and labels [N], got {x.shape} and {y.shape}"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name}: no samples")
    return x, y


def split_train_val(
    labels: np.ndarray, *, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indexes (train, val): a seeded split taking `val_fraction` of every class (at least one
    sample of each class that has two or more) into validation."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_val = int(round(len(members) * val_fraction))
        n_val = min(max(n_val, 1), len(members) - 1) if len(members) > 1 else 0
        val.extend(members[:n_val])
        train.extend(members[n_val:])
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(val, dtype=np.int64))


def _fit(x: np.ndarray, y: np.ndarray, C: float, max_iter: int):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=C, max_iter=max_iter)
    with warnings.catch_warnings():
        # a weakly regularised fit on separable features stops at max_iter; its validation
        # score still says how good that C is
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
    return model


def linear_probe(
    train_features,
    train_labels,
    test_features,
    test_labels,
    *,
    val_features=None,
    val_labels=None,
    val_fraction: float = 0.2,
    cs: Sequence[float] = DEFAULT_CS,
    seed: int = 0,
    max_iter: int = 1000,
) -> LinearProbeResult:
    """Choose C on validation, refit on train + validation, return test acc1 and C.

    Without `val_features`, validation is a seeded per-class split of the training set.
    Features are used as given (normalise them first if the model's are not).
    """
    x_train, y_train = _as_arrays(train_features, train_labels, "train")
    x_test, y_test = _as_arrays(test_features, test_labels, "test")
    if x_test.shape[1] != x_train.shape[1]:
        raise ValueError(
            f"test features have dimension {x_test.shape[1]}, train {x_train.shape[1]}"
        )
    if val_features is None:
        train_idx, val_idx = split_train_val(y_train, val_fraction=val_fraction, seed=seed)
        if len(val_idx) == 0:
            raise ValueError("train: too few samples per class to hold out a validation split")
        x_val, y_val = x_train[val_idx], y_train[val_idx]
        x_train, y_train = x_train[train_idx], y_train[train_idx]
    else:
        x_val, y_val = _as_arrays(val_features, val_labels, "val")
    if len(np.unique(y_train)) < 2:
        raise ValueError("train: logistic regression needs samples of at least two classes")
    cs = sorted(float(c) for c in cs)
    if not cs or cs[0] <= 0:
        raise ValueError(f"cs must be positive values, got {cs}")

    val_acc1 = {}
    for C in cs:
        val_acc1[C] = float((_fit(x_train, y_train, C, max_iter).predict(x_val) == y_val).mean())
    best_C = max(cs, key=lambda C: (val_acc1[C], -C))  # ties: the stronger regularisation
    model = _fit(
        np.concatenate([x_train, x_val]), np.concatenate([y_train, y_val]), best_C, max_iter
    )
    acc1 = float((model.predict(x_test) == y_test).mean())
    return LinearProbeResult(acc1=acc1, C=best_C, val_acc1=val_acc1)
