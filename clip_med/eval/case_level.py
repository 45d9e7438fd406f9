"""Case-level classification: one prediction per case (or series) from its pooled image embeddings.

Clinical images come in cases and series, and some labels belong to the unit rather than to one
image: a MedPix case is about one body region, however its images are cropped. Each case's image
embeddings are pooled by their mean, re-normalised (the same pooling CLIP uses for a prompt
ensemble: the mean direction of the members), and the pooled embedding is classified by the
same zero-shot weights or probe as single images.

Two numbers per task and method, beside the image-level ones:

* ``accuracy`` (and balanced accuracy) over **cases**: one vote per case whose labelled images
  agree on the label; cases whose images carry different labels (MedPix cases mixing CT and MR)
  have no single true label and are counted as ``mixed_cases``, not scored;
* ``image_accuracy``: every labelled image scored with its case's prediction, directly comparable
  with the image-level accuracy. Pool over the unit the task belongs to: this helps a property
  of the case (anatomy) and hurts one of the image or series (modality, when cases mix them).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from clip_med.eval.embeddings import Embedded
from clip_med.eval.metrics import classification_metrics


def pool_by_group(embeddings: np.ndarray, groups: Sequence[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(group names in first-seen order, (G, D) pooled unit vectors, (N,) group index of each row)``."""
    names = list(dict.fromkeys(groups))
    index = {name: position for position, name in enumerate(names)}
    members = np.array([index[group] for group in groups], dtype=np.int64)
    pooled = np.zeros((len(names), embeddings.shape[1]), dtype=np.float64)
    np.add.at(pooled, members, embeddings.astype(np.float64))
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    return names, (pooled / np.where(norms > 0, norms, 1.0)).astype(np.float32), members


def has_cases(held_out: Embedded) -> bool:
    """Whether some case holds more than one image (otherwise case level is image level)."""
    return bool(held_out.groups) and len(set(held_out.groups)) < len(held_out.groups)


def case_level_metrics(held_out: Embedded, task: str, classes: list[str],
                       scorer: Callable[[np.ndarray], np.ndarray]) -> dict[str, Any]:
    """Case-level metrics of one task; ``scorer`` maps (M, D) embeddings to (M, len(classes)) probabilities."""
    keep = np.array([label in classes for label in held_out.labels[task]])
    labels = [label for label, kept in zip(held_out.labels[task], keep) if kept]
    groups = [group for group, kept in zip(held_out.groups, keep) if kept]
    names, pooled, members = pool_by_group(held_out.image[keep], groups)
    probs = scorer(pooled)
    by_case: dict[int, Counter] = {}
    for member, label in zip(members, labels):
        by_case.setdefault(int(member), Counter())[label] += 1
    consistent = [case for case in range(len(names)) if len(by_case[case]) == 1]
    y_case = [next(iter(by_case[case])) for case in consistent]
    metrics = classification_metrics(y_case, probs[consistent], classes) if consistent else {}
    predicted = np.asarray(classes, dtype=object)[probs.argmax(axis=1)]
    image_accuracy = float(np.mean([predicted[member] == label for member, label in zip(members, labels)]))
    return {"cases": len(consistent), "mixed_cases": len(names) - len(consistent), "images": len(labels),
            "accuracy": metrics.get("accuracy"), "balanced_accuracy": metrics.get("balanced_accuracy"),
            "image_accuracy": image_accuracy, "pooling": "mean of the case's image embeddings, re-normalised"}
