"""The RSNA Pneumonia Detection Challenge (kaggle.com/c/rsna-pneumonia-detection-challenge) as published.

::

    <root>/stage_2_train_labels.csv     patientId,x,y,width,height,Target (one row per box; Target 0: none)
    <root>/stage_2_train_images/<patientId>.dcm

One image per patient, one label per patient: ``pneumonia`` when any of its rows has
``Target`` 1, else ``normal`` (task ``rsna_pneumonia``, as BiomedCLIP and MedCLIP report it).
The challenge's test labels were never published, so ``holdout`` (0.2) of the patients, by a
hash of the patient id, form the ``test`` split. Images are read as DICOM (windowing as in the
DICOM reader); the patient id is the record's id and case.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

from clip_med.core.bounds import bounded
from clip_med.core.names import is_safe_name
from clip_med.data.record import Record, SkipReason
from clip_med.data.sources import register_source
from clip_med.data.sources.classes import class_record, multiclass_labels
from clip_med.data.sources.common import (
    BadRow,
    HoldoutSourceConfig,
    check_root,
    read_table,
    require_columns,
    split_records,
)

TASK = "rsna_pneumonia"
LABELS_FILE = "stage_2_train_labels.csv"
IMAGE_DIR = "stage_2_train_images"
FIXED = {"modality": "xray", "anatomy": "thorax"}
DOWNLOAD_HELP = ("The RSNA Pneumonia Detection Challenge data is published at "
                 "https://www.kaggle.com/c/rsna-pneumonia-detection-challenge/data (kaggle competitions download "
                 "-c rsna-pneumonia-detection-challenge). Unzip it and pass source.root=<the folder holding "
                 f"{LABELS_FILE}> (or set RSNA_ROOT).")


@dataclass
class RsnaSourceConfig(HoldoutSourceConfig):
    name: str = "rsna"
    root: Optional[str] = None
    holdout: float = bounded(0.2, minimum=0, below=1)
    holdout_split: str = "test"

    captions_from_class_names: ClassVar[bool] = True  # made from the class names: no retrieval on them

    def class_tasks(self) -> list[str]:
        return [TASK]


def _targets(table: Path) -> tuple[dict[str, int], list[str]]:
    """Per patient, the largest Target of its rows (first-seen order), and the rows that could not be read."""
    targets: dict[str, int] = {}
    bad: list[str] = []
    for line, row in read_table(table, "csv"):
        if isinstance(row, BadRow):
            bad.append(f"{table}:{line}: {row.problem}")
            continue
        require_columns(row, ["patientId", "Target"], table)
        patient, target = str(row["patientId"] or "").strip(), str(row["Target"] or "").strip()
        if not is_safe_name(patient) or target not in ("0", "1"):
            bad.append(f"{table}:{line}: patientId {patient[:60]!r} / Target {target[:20]!r} (Target must be 0 or 1)")
            continue
        targets[patient] = max(targets.get(patient, 0), int(target))
    return targets, bad


@register_source("rsna", RsnaSourceConfig)
def read_rsna(cfg: RsnaSourceConfig) -> dict[str, list[Record]]:
    root = check_root(cfg.root, "RSNA Pneumonia", DOWNLOAD_HELP)
    table = root / LABELS_FILE
    if not table.is_file():
        raise FileNotFoundError(f"{table} does not exist. {DOWNLOAD_HELP}")
    targets, bad = _targets(table)
    records = []
    for patient, target in targets.items():
        found, caption, _, _ = multiclass_labels(TASK, target, patient)
        records.append(class_record(patient, "train", str(root / IMAGE_DIR / f"{patient}.dcm"), "dicom", found,
                                    caption, FIXED, {"case_id": patient}, cfg.text_template))
    records += [class_record(f"{LABELS_FILE}-bad-{index}", "train", "", "dicom", {}, "", FIXED,
                             problem=SkipReason.BAD_ROW, detail=detail) for index, detail in enumerate(bad)]
    if not records:
        raise ValueError(f"{table} has no rows")
    return split_records(records, cfg)
