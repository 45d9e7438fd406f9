"""A fitted linear-probe head, saved as safetensors (weights) with JSON metadata (never pickle).

The head is scikit-learn's logistic regression reduced to its weights: ``probs =
softmax(embeddings @ weight.T + bias)``. A binary scikit-learn model (one coefficient row,
``p1 = sigmoid(w·x + b)``) is stored as the two rows ``[0, w]`` with biases ``[0, b]``, which the
softmax turns into exactly ``[1 - p1, p1]``. The metadata names the task, the labels, the
regularisation chosen, the metrics it scored and the fingerprint of the model whose embeddings
it was fitted on, so that it is never applied to another model's embedding space.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file
from scipy.special import softmax

from clip_med.core.io import atomic_write
from clip_med.eval.linear_probe import FittedProbe

FORMAT = "clip_med.probe_head/1"
SUFFIX = ".safetensors"


class HeadError(ValueError):
    """A head file that cannot be used (unreadable, or fitted on another model)."""


@dataclass
class ProbeHead:
    task: str
    labels: list[str]
    weight: np.ndarray  # (C, D) float32
    bias: np.ndarray  # (C,) float32
    model_fingerprint: str = ""
    model_name: str = ""
    C: float | None = None
    info: dict[str, Any] = field(default_factory=dict)  # metrics, data, checkpoint, ...

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])

    @classmethod
    def from_fitted(cls, fitted: FittedProbe, task: str, model_fingerprint: str = "", model_name: str = "",
                    info: dict[str, Any] | None = None) -> ProbeHead:
        model = fitted.model
        classes = [str(label) for label in model.classes_]
        coef, intercept = np.asarray(model.coef_, dtype=np.float64), np.asarray(model.intercept_, np.float64)
        if coef.shape[0] == 1:  # binary: sigmoid(w·x + b) == softmax([0, w·x + b])[1]
            coef = np.vstack([np.zeros_like(coef), coef])
            intercept = np.concatenate([[0.0], intercept])
        order = [classes.index(label) for label in fitted.labels]
        return cls(task=task, labels=list(fitted.labels), weight=coef[order].astype(np.float32),
                   bias=intercept[order].astype(np.float32), model_fingerprint=model_fingerprint,
                   model_name=model_name, C=fitted.C, info=dict(info or {}))

    def predict_proba(self, embeddings: np.ndarray) -> np.ndarray:
        """(N, C) probabilities in the order of ``labels``."""
        embeddings = np.asarray(embeddings, dtype=np.float64)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
            raise HeadError(f"the {self.task} head expects {self.dim}-d embeddings, got shape {embeddings.shape}")
        return softmax(embeddings @ self.weight.T.astype(np.float64) + self.bias.astype(np.float64), axis=1)

    def check_model(self, fingerprint: str, dim: int) -> None:
        if dim != self.dim:
            raise HeadError(f"this {self.task} head was fitted on {self.dim}-d embeddings; the model gives {dim}-d")
        if self.model_fingerprint and fingerprint and fingerprint != self.model_fingerprint:
            raise HeadError(
                f"this {self.task} head was fitted on embeddings of another model ({self.model_name} "
                f"{self.model_fingerprint[:12]}; loaded model {fingerprint[:12]}): its scores would be meaningless. "
                "Fit a head for this checkpoint with python -m clip_med.probe"
            )

    def metadata(self) -> dict[str, Any]:
        return {"format": FORMAT, "task": self.task, "labels": self.labels, "model_fingerprint": self.model_fingerprint,
                "model_name": self.model_name, "C": self.C, "info": self.info}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.suffix != SUFFIX:
            path = path.with_name(path.name + SUFFIX)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "path") as tmp:
            save_file({"weight": np.ascontiguousarray(self.weight), "bias": np.ascontiguousarray(self.bias)},
                      str(tmp), metadata={"clip_med": json.dumps(self.metadata(), sort_keys=True)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> ProbeHead:
        path = Path(path)
        if not path.is_file():
            raise HeadError(f"head file {path} does not exist (write one with python -m clip_med.probe)")
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), framework="numpy") as handle:
                header = handle.metadata() or {}
        except (SafetensorError, OSError) as exc:
            raise HeadError(f"{path} is not a readable safetensors head: {exc}") from None
        try:
            meta = json.loads(header["clip_med"])
        except (KeyError, json.JSONDecodeError):
            raise HeadError(f"{path} has no clip_med head metadata (was it written by python -m clip_med.probe?)") \
                from None
        if meta.get("format") != FORMAT:
            raise HeadError(f"{path}: unknown head format {meta.get('format')!r} (expected {FORMAT})")
        weight, bias = tensors.get("weight"), tensors.get("bias")
        if weight is None or bias is None or weight.ndim != 2 or bias.shape != (weight.shape[0],) \
                or weight.shape[0] != len(meta["labels"]):
            raise HeadError(f"{path}: weight/bias shapes do not match its {len(meta.get('labels', []))} labels")
        return cls(task=meta["task"], labels=list(meta["labels"]), weight=weight, bias=bias,
                   model_fingerprint=meta.get("model_fingerprint", ""), model_name=meta.get("model_name", ""),
                   C=meta.get("C"), info=meta.get("info") or {})
