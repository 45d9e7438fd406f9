"""Chest X-ray label tables: CheXpert and MIMIC-CXR-JPG as published (multi-label, one binary task per finding).

``layout=chexpert`` (stanfordmlgroup.github.io/competitions/chexpert)::

    <root>/train.csv, valid.csv [, test.csv | test_labels.csv]
        Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,...
        CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,1.0,,,...
    <root>/train/patient00001/study1/view1_frontal.jpg ...

``root`` is the ``CheXpert-v1.0[-small]`` folder; a ``Path`` that starts with the folder's
published name is read relative to it. Any CSV of the same shape (an image column, finding
columns) is read with ``files={split: table.csv}`` and ``image_column``.

``layout=mimic`` (physionet.org/content/mimic-cxr-jpg)::

    <root>/mimic-cxr-2.0.0-chexpert.csv[.gz]   subject_id,study_id,<the 14 findings>
    <root>/mimic-cxr-2.0.0-split.csv[.gz]      dicom_id,study_id,subject_id,split (train/validate/test)
    <root>/mimic-cxr-2.0.0-metadata.csv[.gz]   optional: ViewPosition, for frontal_only
    <root>/files/p10/p10000032/s50414267/<dicom_id>.jpg

Every image of a study carries the study's labels. A label cell is ``1`` (positive), ``0``
(negative), ``-1`` (uncertain: ``uncertain`` = ``ignore`` leaves the finding unknown for that
image, U-Ignore; ``positive`` / ``negative`` are U-Ones / U-Zeros) or blank (not mentioned:
``blank`` = ``negative``, the usual reading, or ``ignore``). Findings are the tasks of
:data:`clip_med.labels.benchmarks.CHEXPERT_FINDINGS` (``cardiomegaly``, ``pleural_effusion``, ...)
with labels ``negative`` / ``positive``; an evaluation scores each on its own (per-finding AUROC).
The patient is the record's case, so a probe's folds never split a patient.
"""

from __future__ import annotations

import csv
import gzip
import logging
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

from clip_med.core.errors import UnknownName
from clip_med.core.names import is_safe_name
from clip_med.data.record import Record, SkipReason
from clip_med.data.sources import SourceConfig, register_source
from clip_med.data.sources.classes import class_record, findings_caption
from clip_med.data.sources.common import check_root, path_problem
from clip_med.labels.benchmarks import CHEST_FINDINGS, CHEXPERT_FINDINGS, NEGATIVE, POSITIVE, finding_for_column
from clip_med.labels.taxonomy import UNKNOWN

log = logging.getLogger(__name__)

FIXED = {"modality": "xray", "anatomy": "thorax"}
CHEXPERT_FILES = {"train": ("train.csv",), "valid": ("valid.csv",), "test": ("test.csv", "test_labels.csv")}
MIMIC_PREFIX = "mimic-cxr-2.0.0"
POLICIES = {"uncertain": ("ignore", "positive", "negative"), "blank": ("negative", "ignore")}
DOWNLOAD_HELP = {
    "chexpert": "CheXpert is published at https://stanfordmlgroup.github.io/competitions/chexpert (the test labels: "
                "https://github.com/rajpurkarlab/cheXpert-test-set-labels). Pass source.root=<the CheXpert-v1.0-small "
                "folder> (or set CHEXPERT_ROOT).",
    "mimic": "MIMIC-CXR-JPG is published at https://physionet.org/content/mimic-cxr-jpg/2.0.0/ (credentialed access). "
             "Pass source.root=<the folder holding mimic-cxr-2.0.0-chexpert.csv.gz and files/> (or set MIMIC_CXR_ROOT) "
             "and source.layout=mimic.",
}


@dataclass
class ChexpertSourceConfig(SourceConfig):
    name: str = "chexpert"
    root: Optional[str] = None
    layout: str = "chexpert"  # chexpert | mimic
    # chexpert layout: split -> label CSV (relative to root); empty: train.csv, valid.csv, test.csv / test_labels.csv
    files: dict[str, str] = field(default_factory=dict)
    image_column: str = "Path"  # chexpert layout: the column of image paths
    findings: Optional[list[str]] = None  # finding ids, e.g. [cardiomegaly, edema]; None: CheXpert's 14
    uncertain: str = "ignore"  # a -1 cell: ignore (unknown) | positive (U-Ones) | negative (U-Zeros)
    blank: str = "negative"  # an empty cell (not mentioned): negative | ignore
    frontal_only: bool = False  # keep frontal views only (CheXpert's Frontal/Lateral, MIMIC's ViewPosition PA/AP)

    captions_from_class_names: ClassVar[bool] = True  # made from the class names: no retrieval on them

    def class_tasks(self) -> list[str]:
        findings = list(self.findings) if self.findings is not None else list(CHEXPERT_FINDINGS)
        unknown = [finding for finding in findings if finding not in CHEST_FINDINGS]
        if unknown:
            raise UnknownName(f"unknown finding(s) {unknown}; known: {', '.join(CHEST_FINDINGS)}")
        return findings


def read_csv(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows of a CSV (``.csv`` or ``.csv.gz``) with their line numbers."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        try:
            for row in reader:
                yield reader.line_num, row
        except csv.Error as exc:
            raise ValueError(f"{path}:{reader.line_num} cannot be read as CSV ({exc})") from None


def finding_columns(header: list[str], findings: list[str], path: Path) -> dict[str, str]:
    """finding -> its column in ``header``; a finding asked for by name must be there."""
    columns = {}
    for column in header:
        finding = finding_for_column(column)
        if finding in findings:
            columns[finding] = column
    if not columns:
        raise ValueError(f"{path} has none of the finding columns {findings}; its columns: {header[:20]}")
    return columns


class LabelPolicy:
    """Reads one label cell under the uncertain / blank policies, counting what it saw."""

    def __init__(self, cfg: ChexpertSourceConfig):
        for option, allowed in POLICIES.items():
            if getattr(cfg, option) not in allowed:
                raise ValueError(f"source.{option}={getattr(cfg, option)!r}: use one of {', '.join(allowed)}")
        self.uncertain, self.blank = cfg.uncertain, cfg.blank
        self.counts: Counter = Counter()

    def __call__(self, cell: Any) -> str:
        text = str(cell if cell is not None else "").strip()
        value = {"1": POSITIVE, "1.0": POSITIVE, "0": NEGATIVE, "0.0": NEGATIVE, "-1": "uncertain",
                 "-1.0": "uncertain", "": "blank"}.get(text, "invalid")
        self.counts[value] += 1
        policy = {"uncertain": self.uncertain, "blank": self.blank, "invalid": "ignore"}.get(value, value)
        return UNKNOWN if policy == "ignore" else policy


def _labels(row: dict[str, Any], columns: dict[str, str], policy: LabelPolicy) -> dict[str, str]:
    return {finding: policy(row.get(column)) for finding, column in columns.items()}


def _record(record_id: str, split: str, image: str, labels: dict[str, str], meta: dict[str, Any],
            cfg: ChexpertSourceConfig, problem: tuple[str, str] | None = None) -> Record:
    return class_record(record_id, split, image, "pil", labels, findings_caption(labels), FIXED, meta,
                        cfg.text_template, *(problem or (None, "")))


# ---------------------------------------------------------------------------------------------
# CheXpert layout


def _chexpert_tables(root: Path, cfg: ChexpertSourceConfig) -> dict[str, Path]:
    if cfg.files:
        return {split: root / name for split, name in cfg.files.items()}
    tables = {}
    for split, names in CHEXPERT_FILES.items():
        found = next((root / name for name in names if (root / name).is_file()), None)
        if found is not None:
            tables[split] = found
    if not tables:
        raise FileNotFoundError(f"no train.csv / valid.csv in {root}. {DOWNLOAD_HELP['chexpert']}")
    return tables


def _strips_first(root: Path, first: str) -> bool:
    """Whether the table's paths begin with the root's own (published) folder name, which is then dropped."""
    parts = Path(first).parts
    return len(parts) > 1 and not (root / first).exists() and (root / Path(*parts[1:])).exists()


def _resolve(root: Path, image: str, strip_first: bool) -> str:
    return str(root / Path(*Path(image).parts[1:])) if strip_first else str(root / image)


def _chexpert_split(table: Path, split: str, root: Path, findings: list[str], cfg: ChexpertSourceConfig,
                    policy: LabelPolicy) -> list[Record]:
    if not table.is_file():
        raise FileNotFoundError(f"label table {table} does not exist. {DOWNLOAD_HELP['chexpert']}")
    rows = list(read_csv(table))
    if not rows:
        return []
    if cfg.image_column not in rows[0][1]:
        raise UnknownName(f"{table} has no column {cfg.image_column!r} (set source.image_column); it has "
                          f"{list(rows[0][1])[:12]}")
    columns = finding_columns(list(rows[0][1]), findings, table)
    strip_first = _strips_first(root, str(rows[0][1][cfg.image_column] or ""))
    records = []
    for line, row in rows:
        image = str(row.get(cfg.image_column) or "").strip()
        view = str(row.get("Frontal/Lateral") or "")
        if cfg.frontal_only and view and view != "Frontal":
            continue
        patient = re.search(r"patient\d+", image)
        meta = {"view": view, **({"case_id": patient.group(0)} if patient else {})}
        problem = path_problem(image, f"{table}:{line}") or (
            (SkipReason.MISSING_FILE, f"{table}:{line} has an empty {cfg.image_column}") if not image else None)
        path = _resolve(root, image, strip_first) if problem is None else ""
        records.append(_record(str(Path(image).with_suffix("")) if image else f"{table.stem}_{line}", split, path,
                               _labels(row, columns, policy), meta, cfg, problem))
    return records


# ---------------------------------------------------------------------------------------------
# MIMIC-CXR-JPG layout


def _mimic_table(root: Path, kind: str, required: bool = True) -> Optional[Path]:
    for name in (f"{MIMIC_PREFIX}-{kind}.csv.gz", f"{MIMIC_PREFIX}-{kind}.csv"):
        if (root / name).is_file():
            return root / name
    if required:
        raise FileNotFoundError(f"{root} has no {MIMIC_PREFIX}-{kind}.csv[.gz]. {DOWNLOAD_HELP['mimic']}")
    return None


def _mimic_records(root: Path, findings: list[str], cfg: ChexpertSourceConfig,
                   policy: LabelPolicy) -> dict[str, list[Record]]:
    label_table = _mimic_table(root, "chexpert")
    assert label_table is not None  # required
    studies: dict[tuple[str, str], dict[str, str]] = {}
    columns: dict[str, str] = {}
    for _, row in read_csv(label_table):
        columns = columns or finding_columns(list(row), findings, label_table)
        studies[str(row.get("subject_id")), str(row.get("study_id"))] = _labels(row, columns, policy)
    views = {}
    metadata = _mimic_table(root, "metadata", required=cfg.frontal_only)
    if metadata is not None:
        views = {str(row.get("dicom_id")): str(row.get("ViewPosition") or "") for _, row in read_csv(metadata)}
    split_table = _mimic_table(root, "split")
    assert split_table is not None  # required
    splits: dict[str, list[Record]] = {}
    for line, row in read_csv(split_table):
        dicom, study, subject, split = (str(row.get(key) or "").strip()
                                        for key in ("dicom_id", "study_id", "subject_id", "split"))
        if cfg.frontal_only and views.get(dicom) not in ("PA", "AP"):
            continue
        record_id = dicom
        labels = studies.get((subject, study))
        image = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg"
        problem = None
        if not all(is_safe_name(part) for part in (dicom, study, subject, split)):
            problem = (SkipReason.BAD_ROW, f"{split_table}:{line}: a dicom_id, study_id, subject_id or split that "
                                           "is not a plain name")
            record_id, split = f"{split_table.stem}_{line}", split if is_safe_name(split) else "train"
        elif labels is None:
            problem = (SkipReason.BAD_ROW, f"{split_table}:{line}: study s{study} has no row in {label_table.name}")
        meta = {"case_id": f"p{subject}", "study": f"s{study}", "view": views.get(dicom, "")}
        splits.setdefault(split, []).append(_record(record_id, split, str(image) if problem is None else "",
                                                    labels or {}, meta, cfg, problem))
    return splits


@register_source("chexpert", ChexpertSourceConfig)
def read_chexpert(cfg: ChexpertSourceConfig) -> dict[str, list[Record]]:
    if cfg.layout not in DOWNLOAD_HELP:
        raise ValueError(f"source.layout={cfg.layout!r}: use chexpert or mimic")
    root = check_root(cfg.root, "CheXpert" if cfg.layout == "chexpert" else "MIMIC-CXR-JPG", DOWNLOAD_HELP[cfg.layout])
    findings, policy = cfg.class_tasks(), LabelPolicy(cfg)
    if cfg.layout == "mimic":
        splits = _mimic_records(root, findings, cfg, policy)
    else:
        splits = {split: _chexpert_split(table, split, root, findings, cfg, policy)
                  for split, table in _chexpert_tables(root, cfg).items()}
    log.info("%s labels: %s (uncertain=%s, blank=%s)", cfg.layout, dict(policy.counts), cfg.uncertain, cfg.blank)
    if policy.counts["invalid"]:
        log.warning("%d label cell(s) were neither 1, 0, -1 nor blank: read as unknown", policy.counts["invalid"])
    if not any(splits.values()):
        raise ValueError(f"no images listed under {root}")
    return splits
