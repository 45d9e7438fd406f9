"""Results in CLIP_benchmark's JSON shape (github.com/LAION-AI/CLIP_benchmark), one record per task.

CLIP_benchmark writes ``{"dataset", "model", "pretrained", "task", "metrics", "language"}`` per
(dataset, task); its ``build`` command and the usual result notebooks read that shape. The
metric names are CLIP_benchmark's: ``acc1``, ``acc5`` (``null`` below five classes, as there),
``mean_per_class_recall``; ``lp_*`` for linear probes; ``image_retrieval_recall@k`` (text ->
image) and ``text_retrieval_recall@k`` (image -> text) for retrieval.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import accuracy_score, top_k_accuracy_score

from clip_med.eval.evaluator import Predictions


def top_k_accuracy(predictions: Predictions, k: int) -> float | None:
    """scikit-learn's top-k accuracy; ``None`` below ``k`` classes (CLIP_benchmark's ``acc5``).

    Tied probabilities go to the *first* of the tied labels (as ``np.argsort(-probs, kind="stable")``
    ranked them before): scikit-learn ranks ties towards the last column, so it is given the
    columns in reverse order, with the true labels as reversed column numbers.
    """
    n_labels = len(predictions.labels)
    if n_labels < k:
        return None
    truth = np.array([predictions.labels.index(label) for label in predictions.y_true], dtype=np.int64)
    if n_labels <= 2:  # scikit-learn's binary form thresholds one column at 0.5 instead of ranking: top-1 is accuracy
        return float(accuracy_score(truth, predictions.probs.argmax(axis=1))) if k == 1 else 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)  # k == number of classes: 1.0, as intended
        return float(top_k_accuracy_score(n_labels - 1 - truth, predictions.probs[:, ::-1], k=k,
                                          labels=np.arange(n_labels)))


def _classification(method: str, metrics: dict[str, Any], predictions: Predictions | None) -> dict[str, Any]:
    prefix = "lp_" if method == "linear_probe" else ""
    acc5 = top_k_accuracy(predictions, 5) if predictions is not None else None
    return {f"{prefix}acc1": metrics["accuracy"], f"{prefix}acc5": acc5,
            f"{prefix}mean_per_class_recall": metrics["balanced_accuracy"]}


def clip_benchmark_records(report: dict[str, Any], predictions: dict[tuple[str, str], Predictions],
                           dataset: str, model: str, pretrained: str) -> list[dict[str, Any]]:
    records = []
    base = {"model": model, "pretrained": pretrained, "language": "en"}
    tasks = {"zero_shot": "zeroshot_classification", "linear_probe": "linear_probe"}
    for method, benchmark_task in tasks.items():
        for task, metrics in report.get(method, {}).items():
            records.append({**base, "dataset": f"{dataset}/{task}", "task": benchmark_task,
                            "metrics": _classification(method, metrics, predictions.get((method, task)))})
    retrieval = report.get("retrieval")
    if retrieval:
        metrics = {}
        for key, value in retrieval["text_to_image"].items():
            if key.startswith("R@"):
                metrics[f"image_retrieval_recall@{key[2:]}"] = value
        for key, value in retrieval["image_to_text"].items():
            if key.startswith("R@"):
                metrics[f"text_retrieval_recall@{key[2:]}"] = value
        records.append({**base, "dataset": dataset, "task": "zeroshot_retrieval", "metrics": metrics})
    return records
