"""Series- and case-level classification: one prediction for several images of one series or case.

The images' embeddings are pooled by their mean, re-normalised — the pooling of
:mod:`clip_med.eval.case_level`, which ``evaluate`` uses for its case-level numbers — and the
pooled embedding is classified like one image (zero-shot or a probe head). The per-image
predictions come beside it. Pool over the unit the label belongs to: anatomy is a property of
a case or series, modality of a series (a case may mix CT and MR).

A DICOM folder is grouped into series by ``SeriesInstanceUID`` (slices ordered by
``InstanceNumber``, then ``SliceLocation``); the UID itself is never shown (it identifies the
study): a series is named by its folder and its position. ``python -m clip_med.classify
images=<folder>`` does this by itself when every file of the folder is DICOM; ``series=true``
takes all the inputs as one series or case (PNGs of one patient, say), ``series=false`` never
pools.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from clip_med.data.dicom import read_header
from clip_med.data.images import ImageRejected
from clip_med.eval.case_level import pool_by_group
from clip_med.inference.inputs import is_dicom
from clip_med.inference.results import Classification

POOLING = "mean of the image embeddings, re-normalised"


def pool(embeddings: np.ndarray) -> np.ndarray:
    """(1, D): the series' pooled embedding (:func:`clip_med.eval.case_level.pool_by_group` over one group)."""
    return pool_by_group(embeddings, ["series"] * len(embeddings))[1]


@dataclass
class SeriesClassification:
    """One prediction for a series or case (``probs``: its class probabilities), and each image's beside it."""

    name: str
    task: str
    labels: list[str]
    probs: np.ndarray  # (C,)
    method: str  # zero_shot | linear_probe
    images: Classification  # the per-image predictions (and the inputs that could not be read)
    pooling: str = POOLING

    @property
    def prediction(self) -> str:
        return self.labels[int(np.argmax(self.probs))]

    def top(self, k: int = 1) -> list[tuple[str, float]]:
        order = np.argsort(-self.probs, kind="stable")[:k]
        return [(self.labels[index], float(self.probs[index])) for index in order]

    def to_dict(self) -> dict[str, Any]:
        return {"series": self.name, "task": self.task, "method": self.method, "pooling": self.pooling,
                "images": len(self.images), "prediction": self.prediction,
                "probabilities": {label: float(p) for label, p in zip(self.labels, self.probs)},
                "per_image": self.images.to_records(), "skipped": [skip.to_dict() for skip in self.images.skipped]}


# ---------------------------------------------------------------------------------------------
# DICOM series


@dataclass
class Slice:
    path: str
    series: str
    instance: float = math.inf
    location: float = math.inf

    @property
    def order(self) -> tuple[float, float, str]:
        return self.instance, self.location, self.path


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.inf


def read_slice(path: str) -> Optional[Slice]:
    """The file's series and position, or None when it is not DICOM (or has no SeriesInstanceUID)."""
    try:
        with open(path, "rb") as handle:
            if not is_dicom(handle.read(132)):
                return None
        header = read_header(path)
    except (OSError, ImageRejected):
        return None
    series = str(header.get("SeriesInstanceUID") or "")
    if not series:
        return None
    return Slice(path, series, _number(header.get("InstanceNumber")), _number(header.get("SliceLocation")))


def dicom_series(paths: list[str]) -> Optional[list[list[str]]]:
    """The files grouped by series, each in slice order, the series in the order of their first file;
    None unless every file is a DICOM file with a SeriesInstanceUID."""
    groups: dict[str, list[Slice]] = {}
    for path in paths:
        found = read_slice(path)
        if found is None:
            return None
        groups.setdefault(found.series, []).append(found)
    if not groups:
        return None
    return [[item.path for item in sorted(members, key=lambda item: item.order)] for members in groups.values()]


@dataclass
class SeriesInput:
    name: str
    images: list[str] = field(default_factory=list)


def series_inputs(images: Any, paths: list[str], series: Optional[bool]) -> Optional[list[SeriesInput]]:
    """What ``classify`` pools: ``series=true`` all the inputs as one; ``series=null`` each DICOM series of a
    folder of DICOM files; ``series=false`` (or inputs that are not such a folder) nothing (None)."""
    if series is False:
        return None
    folder = str(images) if isinstance(images, str | Path) and Path(images).expanduser().is_dir() else None
    if series:
        return [SeriesInput(folder or "series", list(paths))]
    if folder is None:
        return None
    groups = dicom_series(paths)
    if groups is None:
        return None
    if len(groups) == 1:
        return [SeriesInput(folder, groups[0])]
    return [SeriesInput(f"{folder} (series {index} of {len(groups)})", members)
            for index, members in enumerate(groups, 1)]


def run_classify_series(cfg: Any, groups: list[SeriesInput]) -> list[SeriesClassification]:
    """``python -m clip_med.classify`` on series: one pooled prediction per series (``cfg``: a ClassifyConfig)."""
    from clip_med.eval.zero_shot import check_labels, check_templates
    from clip_med.inference.evaluation import load_model

    if cfg.labels:  # refused before the model loads, as run_classify does
        check_labels(list(cfg.labels))
    if cfg.prompts:
        check_templates([cfg.prompts] if isinstance(cfg.prompts, str) else list(cfg.prompts))
    model = load_model(cfg)
    return [model.classify_series(group.images, task=cfg.task, labels=cfg.labels, prompts=cfg.prompts, head=cfg.head,
                                  batch_size=cfg.batch_size, on_error="skip", name=group.name) for group in groups]


def format_series(results: list[SeriesClassification], top: int = 3, fmt: str = "table") -> str:
    if fmt == "json":
        return "\n".join(json.dumps(result.to_dict()) for result in results)
    if fmt != "table":
        raise ValueError(f"format must be table or json, got {fmt!r}")
    lines: list[str] = []
    for result in results:
        if lines:
            lines.append("")
        lines.append(f"{result.method.replace('_', '-')} {result.task} over {', '.join(result.labels)}: "
                     f"{result.name}, {len(result.images)} image(s) pooled ({result.pooling})")
        lines.append(f"{'SERIES':48s}  " + "  ".join(f"{label} {p:.3f}" for label, p in result.top(top)))
        for name, best in zip(result.images.inputs, result.images.top(top)):
            shown = name if len(name) <= 46 else "…" + name[-45:]
            lines.append(f"  {shown:46s}  " + "  ".join(f"{label} {p:.3f}" for label, p in best))
        for skip in result.images.skipped:
            lines.append(f"  {skip.input[-46:]:46s}  SKIPPED {skip.reason}: {skip.detail}")
    return "\n".join(lines)
