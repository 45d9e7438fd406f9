"""PatchCamelyon (PCam, github.com/basveeling/pcam) in its published HDF5 files.

::

    <root>/camelyonpatch_level_2_split_train_x.h5    dataset "x": (262144, 96, 96, 3) uint8
    <root>/camelyonpatch_level_2_split_train_y.h5    dataset "y": (262144, 1, 1, 1) 0/1
    <root>/camelyonpatch_level_2_split_valid_{x,y}.h5
    <root>/camelyonpatch_level_2_split_test_{x,y}.h5
    <root>/camelyonpatch_level_2_split_<split>_meta.csv   optional: its "wsi" column groups patches by slide

The files are published gzipped (``.h5.gz``): unzip them first. The splits are ``train``,
``valid`` and ``test``; the task ``pcam`` has the classes ``normal`` (0) and ``tumor`` (1: the
centre 32 x 32 px holds tumour tissue). Images stay in the files: the ``h5_array`` decoder reads
one patch at a time (:mod:`clip_med.data.sources.arrays`).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

import numpy as np

from clip_med.data.record import Record
from clip_med.data.sources import SourceConfig, register_source
from clip_med.data.sources.arrays import array_locator
from clip_med.data.sources.classes import class_record, multiclass_labels
from clip_med.data.sources.common import check_root

TASK = "pcam"
SPLITS = ("train", "valid", "test")
PREFIX = "camelyonpatch_level_2_split"
DOWNLOAD_HELP = ("PCam is published at https://github.com/basveeling/pcam (files on Zenodo, "
                 "https://zenodo.org/records/2546921). Unzip the .h5.gz files (gunzip) and pass "
                 "source.root=<their folder> (or set PCAM_ROOT).")


@dataclass
class PcamSourceConfig(SourceConfig):
    name: str = "pcam"
    root: Optional[str] = None  # the folder of the camelyonpatch_level_2_split_*.h5 files

    captions_from_class_names: ClassVar[bool] = True  # made from the class names: no retrieval on them

    def class_tasks(self) -> list[str]:
        return [TASK]


def _labels(path: Path) -> np.ndarray:
    import h5py

    with h5py.File(path, "r") as handle:
        if "y" not in handle:
            raise ValueError(f"{path} has no dataset 'y' (PCam's label files hold y: (N, 1, 1, 1))")
        return np.asarray(handle["y"]).reshape(-1)


def _image_count(path: Path) -> int:
    import h5py

    with h5py.File(path, "r") as handle:
        dataset = handle.get("x")
        if dataset is None or dataset.ndim != 4 or dataset.shape[-1] != 3:
            raise ValueError(f"{path} must hold a dataset 'x' of (N, 96, 96, 3) patches")
        return int(dataset.shape[0])


def _slides(root: Path, split: str, count: int) -> list[str]:
    """Each patch's slide (the meta CSV's ``wsi`` column), or nothing when the CSV is absent."""
    path = root / f"{PREFIX}_{split}_meta.csv"
    if not path.is_file():
        return []
    with open(path, encoding="utf-8", newline="") as handle:
        slides = [str(row.get("wsi") or "") for row in csv.DictReader(handle)]
    return slides if len(slides) == count else []


@register_source("pcam", PcamSourceConfig)
def read_pcam(cfg: PcamSourceConfig) -> dict[str, list[Record]]:
    root = check_root(cfg.root, "PCam", DOWNLOAD_HELP)
    splits: dict[str, list[Record]] = {}
    for split in SPLITS:
        images, labels = root / f"{PREFIX}_{split}_x.h5", root / f"{PREFIX}_{split}_y.h5"
        if not images.is_file() or not labels.is_file():
            if images.with_name(images.name + ".gz").is_file():
                raise FileNotFoundError(f"{images}.gz is still gzipped: gunzip it (and the other .h5.gz files)")
            continue
        values, count = _labels(labels), _image_count(images)
        if len(values) != count:
            raise ValueError(f"{images} holds {count} patches but {labels} {len(values)} labels")
        slides = _slides(root, split, count)
        records = []
        for row, value in enumerate(values.tolist()):
            found, caption, problem, detail = multiclass_labels(TASK, value, f"{labels.name}[{row}]")
            meta = {"row": row, **({"case_id": slides[row]} if slides and slides[row] else {})}
            records.append(class_record(f"{split}-{row:06d}", split, array_locator(str(images), "x", row), "h5_array",
                                        found, caption, None, meta, cfg.text_template, problem, detail,
                                        input_file=str(images)))
        splits[split] = records
    if not splits:
        raise FileNotFoundError(f"no {PREFIX}_<split>_x.h5 / _y.h5 pairs in {root}. {DOWNLOAD_HELP}")
    return splits
