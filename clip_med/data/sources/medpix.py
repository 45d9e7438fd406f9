"""MedPix 2.0 in its published layout (github.com/CHILab1/MedPix-2.0, folder ``MedPix-2-0``).

::

    <root>/Descriptions.json                       one entry per image
    <root>/Case_topic.json                         one entry per clinical case
    <root>/splitted_dataset/descriptions_<split>.jsonl
    <root>/images/<image>.png

Splits are whatever ``descriptions_<split>.jsonl`` files exist. A split whose images are all in
another split (the published ``train_1`` and ``train_2`` halves of ``train``) is left out unless
asked for by name in ``source.splits``, so that no image is sharded twice.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from clip_med.data.record import Record, SkipReason
from clip_med.data.sources import SourceConfig, register_source
from clip_med.data.text import clean_caption, render_text
from clip_med.labels import taxonomy

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "{modality} image of the {anatomy} ({location}), {plane}. {modality_detail}. {caption}"
DOWNLOAD_HELP = (
    "MedPix 2.0 is published at https://github.com/CHILab1/MedPix-2.0 (folder MedPix-2-0). "
    "Clone it (git lfs pull for the images), then point clip_med at the folder that holds "
    "Descriptions.json: `export MEDPIX_ROOT=/path/to/MedPix-2-0` or pass source.root=/path/to/MedPix-2-0."
)


@dataclass
class MedPixSourceConfig(SourceConfig):
    name: str = "medpix"
    root: Optional[str] = None


def check_root(root: str | None) -> Path:
    if not root:
        raise FileNotFoundError(f"No MedPix 2.0 root is set (MEDPIX_ROOT is empty). {DOWNLOAD_HELP}")
    path = Path(root).expanduser()
    if not (path / "splitted_dataset").is_dir() or not (path / "Descriptions.json").is_file():
        raise FileNotFoundError(
            f"{path} does not look like MedPix 2.0: expected Descriptions.json and splitted_dataset/ "
            f"inside it. {DOWNLOAD_HELP}"
        )
    return path


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_number} is not valid JSON ({exc})") from None
    return rows


def _case_info(root: Path) -> dict[str, dict[str, str]]:
    path = root / "Case_topic.json"
    if not path.is_file():
        log.warning("%s is missing: case titles and diagnoses will be empty", path)
        return {}
    with open(path, encoding="utf-8") as handle:
        cases = json.load(handle)
    info = {}
    for case in cases:
        details, topic = case.get("Case") or {}, case.get("Topic") or {}
        info[case["U_id"]] = {
            "case_title": clean_caption(details.get("Title")),
            "diagnosis": clean_caption(details.get("Case Diagnosis")),
            "topic_category": clean_caption(topic.get("Category")),
        }
    return info


def discover_splits(root: Path) -> dict[str, Path]:
    files = sorted((root / "splitted_dataset").glob("descriptions_*.jsonl"))
    splits = {path.stem.removeprefix("descriptions_"): path for path in files}
    if not splits:
        raise FileNotFoundError(f"no splitted_dataset/descriptions_<split>.jsonl files under {root}. {DOWNLOAD_HELP}")
    return splits


def _drop_nested_splits(rows: dict[str, list[dict]]) -> dict[str, list[dict]]:
    images = {split: {row["image"] for row in split_rows} for split, split_rows in rows.items()}
    nested = {
        split for split in rows
        if any(other != split and images[split] < images[other] for other in rows)
    }
    for split in sorted(nested):
        log.info("MedPix split %s is contained in another split: not sharded separately", split)
    return {split: split_rows for split, split_rows in rows.items() if split not in nested}


def _image_files(root: Path) -> dict[str, str]:
    images_dir = root / "images"
    if not images_dir.is_dir():
        raise FileNotFoundError(f"{images_dir} is missing. {DOWNLOAD_HELP}")
    return {Path(name).stem: os.path.join(images_dir, name) for name in sorted(os.listdir(images_dir))}


def _record(row: dict[str, Any], split: str, cases: dict, files: dict[str, str], template: str,
            root: Path) -> Record:
    description = row.get("Description") or {}
    case_id = row.get("U_id", "")
    modality = taxonomy.normalize("modality", row.get("Type"))
    anatomy = taxonomy.normalize("anatomy", row.get("Location Category"))
    caption = clean_caption(description.get("Caption"))
    meta = {
        "case_id": case_id,
        "type": row.get("Type"),
        "modality_detail": clean_caption(description.get("Modality")),
        "plane": clean_caption(description.get("Plane")),
        "location": clean_caption(row.get("Location")),
        "location_category": clean_caption(row.get("Location Category")),
        "age": clean_caption(description.get("Age")),
        "sex": clean_caption(description.get("Sex")),
        "acr_codes": clean_caption(description.get("ACR Codes")),
        **cases.get(case_id, {"case_title": "", "diagnosis": "", "topic_category": ""}),
    }
    fields = {
        **meta,
        "caption": caption,
        "modality": taxonomy.display_name("modality", modality),
        "anatomy": taxonomy.display_name("anatomy", anatomy),
        "plane": f"{meta['plane'].lower()} plane" if meta["plane"] else "",
    }
    text = render_text(template, fields)
    name = row["image"]
    return Record(
        id=name,
        split=split,
        image=files.get(name, str(root / "images" / f"{name}.png")),  # not there: the writer reports it
        caption=caption,
        text=text,
        labels={"modality": modality, "anatomy": anatomy},
        meta=meta,
        problem=None if text else SkipReason.EMPTY_CAPTION,
    )


@register_source("medpix", MedPixSourceConfig)
def read_medpix(cfg: MedPixSourceConfig) -> dict[str, list[Record]]:
    root = check_root(cfg.root)
    split_files = discover_splits(root)
    rows = {split: _read_jsonl(path) for split, path in split_files.items()}
    if cfg.splits is None:
        rows = _drop_nested_splits(rows)
    cases, files = _case_info(root), _image_files(root)
    template = cfg.text_template or DEFAULT_TEMPLATE
    return {
        split: [_record(row, split, cases, files, template, root) for row in split_rows]
        for split, split_rows in rows.items()
    }
