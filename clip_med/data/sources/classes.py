"""What the readers of classification benchmarks share: one record per image, its class labels and
a caption made from the class names (:mod:`clip_med.labels.benchmarks`).

The caption is a sentence of the set's first prompt template ("a histopathology image of adipose
tissue."), so a set can also be sharded and trained on; neither ``evaluate`` nor the suite measures
retrieval on such captions (:attr:`clip_med.data.sources.SourceConfig.captions_from_class_names`).
"""

from __future__ import annotations

from typing import Any

from clip_med.data.record import Record, SkipReason
from clip_med.data.text import render_text
from clip_med.labels import benchmarks, taxonomy
from clip_med.labels.benchmarks import POSITIVE

DEFAULT_TEMPLATE = "{caption}"


def findings_caption(labels: dict[str, str]) -> str:
    """A chest X-ray caption naming the positive findings of ``labels`` (finding task -> negative/positive)."""
    names = [benchmarks.TASKS[finding].label(POSITIVE).display for finding, value in labels.items()
             if value == POSITIVE and finding != "no_finding"]
    if not names:
        return "a chest X-ray with no finding."
    return f"a chest X-ray showing {', '.join(names[:-1]) + ' and ' if len(names) > 1 else ''}{names[-1]}."


def class_record(record_id: str, split: str, image: str, decoder: str, labels: dict[str, str], caption: str,
                 fixed: dict[str, str] | None = None, meta: dict[str, Any] | None = None,
                 template: str | None = None, problem: str | None = None, detail: str = "",
                 input_file: str = "") -> Record:
    """A record of a classification set. ``fixed``: taxonomy labels every image of the set has
    (``{"modality": "xray", "anatomy": "thorax"}``); the taxonomy tasks not named are unknown.
    ``input_file``: the array file an ``image`` locator points into (:attr:`Record.input_file`)."""
    all_labels = {task: taxonomy.UNKNOWN for task in taxonomy.TASKS}
    all_labels.update(fixed or {})
    all_labels.update(labels)
    origin = {task: "metadata" if value != taxonomy.UNKNOWN else "none" for task, value in all_labels.items()}
    meta = dict(meta or {})
    fields = {**{key: value for key, value in meta.items() if isinstance(value, str | int | float)},
              "caption": caption,
              "modality": taxonomy.display_name("modality", all_labels["modality"]),
              "anatomy": taxonomy.display_name("anatomy", all_labels["anatomy"])}
    text = render_text(template or DEFAULT_TEMPLATE, fields) if problem is None else ""
    if problem is None and not text:
        problem, detail = SkipReason.EMPTY_CAPTION, f"the text template {template!r} gives an empty text"
    return Record(id=record_id, split=split, image=image, caption=caption, text=text, labels=all_labels, meta=meta,
                  decoder=decoder, problem=problem, problem_detail=detail, label_origin=origin, input_file=input_file)


def multiclass_labels(task: str, index: Any, where: str) -> tuple[dict[str, str], str, str | None, str]:
    """``(labels, caption, problem, detail)`` of class number ``index`` of a benchmark task."""
    ids = benchmarks.TASKS[task].ids
    try:
        number = int(index)
    except (TypeError, ValueError):
        number = -1
    if not 0 <= number < len(ids) or str(index).strip() not in (str(number), f"{number}.0"):
        return {}, "", SkipReason.BAD_ROW, f"{where}: class {index!r} is not one of 0..{len(ids) - 1}"
    return {task: ids[number]}, benchmarks.caption(task, ids[number]), None, ""
