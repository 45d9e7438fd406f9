"""What the inference API returns: classification results and search hits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Skipped:
    """An input that could not be used, with the reason (a SkipReason value) and the details."""

    index: int
    input: str
    reason: str
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "input": self.input, "reason": self.reason, "detail": self.detail}


@dataclass
class Classification:
    """Class probabilities, one row per classified input, columns in the order of ``labels``."""

    task: str
    labels: list[str]
    probs: np.ndarray  # (N, C)
    method: str  # zero_shot | linear_probe
    inputs: list[str] = field(default_factory=list)  # a name per row
    indices: list[int] = field(default_factory=list)  # position of each row in the caller's input list
    skipped: list[Skipped] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.probs)

    @property
    def predictions(self) -> list[str]:
        if not len(self.probs):
            return []
        return [self.labels[i] for i in self.probs.argmax(axis=1)]

    def top(self, k: int = 1) -> list[list[tuple[str, float]]]:
        """The ``k`` most likely labels per input, with their probabilities."""
        order = np.argsort(-self.probs, axis=1, kind="stable")[:, :k]
        return [[(self.labels[j], float(row[j])) for j in picks] for row, picks in zip(self.probs, order)]

    def __getitem__(self, row: int) -> dict[str, float]:
        """``{label: probability}`` of one input."""
        return {label: float(p) for label, p in zip(self.labels, self.probs[row])}

    def to_records(self) -> list[dict[str, Any]]:
        return [{"input": name, "index": index, "task": self.task, "method": self.method,
                 "prediction": prediction, "probabilities": self[row]}
                for row, (name, index, prediction) in enumerate(zip(self.inputs, self.indices, self.predictions))]


@dataclass
class SearchHit:
    rank: int
    score: float
    position: int  # row in the index's metadata table
    id: str
    caption: str = ""
    text: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    origin: str = ""  # the source image the shard sample came from
    shard: str = ""
    key: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "score": self.score, "position": self.position, "id": self.id,
                "caption": self.caption, "text": self.text, "labels": self.labels, "origin": self.origin,
                "shard": self.shard, "key": self.key}
