"""Classification metrics from scikit-learn: totals and per class."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)


def classification_metrics(y_true: Sequence[str] | np.ndarray, probs: np.ndarray,
                           labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1, AUROC (one-vs-rest, macro), confusion matrix, per class."""
    labels = list(labels)
    y_true = np.asarray(y_true, dtype=object)
    y_pred = np.asarray(labels, dtype=object)[probs.argmax(axis=1)]
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    result: dict[str, Any] = {
        "n": int(len(y_true)),
        "labels": labels,
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "auroc": _auroc(y_true, probs, labels),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "per_class": {
            label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for label, p, r, f, s in zip(labels, precision, recall, f1, support)
        },
    }
    return result


def _auroc(y_true: np.ndarray, probs: np.ndarray, labels: list[str]) -> float | None:
    present = set(y_true)
    if len(present) < 2:
        return None  # undefined with one class
    if len(labels) == 2:
        return float(roc_auc_score(y_true == labels[1], probs[:, 1]))
    columns = [i for i, label in enumerate(labels) if label in present]
    scores = probs[:, columns]
    scores = scores / np.clip(scores.sum(axis=1, keepdims=True), 1e-12, None)
    if len(columns) == 2:  # scikit-learn takes two present classes as a binary problem: one score column
        return float(roc_auc_score(y_true == labels[columns[1]], scores[:, 1]))
    return float(roc_auc_score(y_true, scores, labels=[labels[i] for i in columns], multi_class="ovr",
                               average="macro"))
