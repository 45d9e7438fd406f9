"""MedMNIST v2/v3 (medmnist.com, github.com/MedMNIST/MedMNIST) in its published ``.npz`` files.

::

    <root>/<subset>.npz          28 x 28 images (MedMNIST v2)
    <root>/<subset>_<size>.npz   64, 128 or 224 px (MedMNIST+, v3)

Each file holds ``train_images``, ``train_labels``, ``val_images``, ``val_labels``,
``test_images`` and ``test_labels``: images ``(N, H, W)`` (grey) or ``(N, H, W, 3)``, labels
``(N, 1)`` class numbers, or ``(N, 14)`` 0/1 columns for the multi-label ChestMNIST. The 2D subsets
are read: pathmnist, chestmnist, dermamnist, octmnist, pneumoniamnist, retinamnist, breastmnist,
bloodmnist, tissuemnist, organamnist, organcmnist, organsmnist. ``medmnist``'s downloader puts the
files in ``~/.medmnist``; ``source.root`` may also be one ``.npz`` file.

The splits are ``train``, ``val`` and ``test``. A subset's classes are its own task (the subset's
name; ChestMNIST: one binary task per finding), named as in ``medmnist.INFO``
(:mod:`clip_med.labels.benchmarks`). Images stay in the file: a record names the file, the array
and the row, and the ``npz_array`` decoder reads that row (:mod:`clip_med.data.sources.arrays`).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

import numpy as np

from clip_med.core.bounds import bounded
from clip_med.core.errors import UnknownName
from clip_med.data.record import Record
from clip_med.data.sources import SourceConfig, register_source
from clip_med.data.sources.arrays import array_locator, npy_header
from clip_med.data.sources.classes import class_record, findings_caption, multiclass_labels
from clip_med.data.sources.common import check_root
from clip_med.labels.benchmarks import CHESTMNIST_FINDINGS, MEDMNIST_SUBSETS, NEGATIVE, POSITIVE, MedMnistSubset

SPLITS = ("train", "val", "test")
SIZES = (28, 64, 128, 224)
DOWNLOAD_HELP = ("MedMNIST is published at https://medmnist.com (files on Zenodo, "
                 "https://zenodo.org/records/10519652; `pip install medmnist` then `python -m medmnist download` "
                 "puts them in ~/.medmnist). Pass source.root=<the folder of the .npz files> (or set MEDMNIST_ROOT) "
                 "and source.subset=<name>.")
# Taxonomy labels every image of a subset has (those not named stay unknown).
FIXED_LABELS = {
    "chestmnist": {"modality": "xray", "anatomy": "thorax"},
    "pneumoniamnist": {"modality": "xray", "anatomy": "thorax"},
    "breastmnist": {"modality": "ultrasound", "anatomy": "thorax"},
    "organamnist": {"modality": "ct"}, "organcmnist": {"modality": "ct"}, "organsmnist": {"modality": "ct"},
}


@dataclass
class MedMnistSourceConfig(SourceConfig):
    name: str = "medmnist"
    root: Optional[str] = None  # the folder of the .npz files, or one .npz file
    subset: Optional[str] = None  # pathmnist, chestmnist, ... (None: from the file name when root is a file)
    size: Optional[int] = bounded(None, minimum=28)  # None or 28: <subset>.npz; 64, 128, 224: <subset>_<size>.npz

    def chosen_subset(self) -> MedMnistSubset:
        name = self.subset or (Path(self.root).stem.split("_")[0] if self.root and self.root.endswith(".npz")
                               else None)
        if not name:
            raise ValueError(f"choose a MedMNIST subset: source.subset=<{', '.join(MEDMNIST_SUBSETS)}>")
        if name not in MEDMNIST_SUBSETS:
            raise UnknownName(f"unknown MedMNIST subset {name!r}; the 2D subsets: {', '.join(MEDMNIST_SUBSETS)}")
        return MEDMNIST_SUBSETS[name]

    captions_from_class_names: ClassVar[bool] = True  # made from the class names: no retrieval on them

    def class_tasks(self) -> list[str]:
        subset = self.chosen_subset()
        return list(CHESTMNIST_FINDINGS) if subset.multilabel else [subset.task]


def npz_file(cfg: MedMnistSourceConfig) -> Path:
    root = check_root(cfg.root, "MedMNIST", DOWNLOAD_HELP)
    if root.is_file():
        return root
    subset = cfg.chosen_subset().name
    if cfg.size not in (None, *SIZES):
        raise ValueError(f"source.size={cfg.size}: MedMNIST files come in sizes {', '.join(map(str, SIZES))}")
    name = f"{subset}.npz" if cfg.size in (None, 28) else f"{subset}_{cfg.size}.npz"
    path = root / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist. {DOWNLOAD_HELP}")
    return path


def image_shape(path: Path, member: str) -> tuple[int, ...]:
    """The shape of an ``.npz`` member, from its ``.npy`` header (nothing else is read)."""
    with zipfile.ZipFile(path) as archive, archive.open(f"{member}.npy") as handle:
        shape, _, _ = npy_header(handle)
    return shape


def _records(path: Path, split: str, labels: np.ndarray, subset: MedMnistSubset, cfg: MedMnistSourceConfig
             ) -> list[Record]:
    fixed = FIXED_LABELS.get(subset.name, {})
    records = []
    for row, values in enumerate(labels):
        where = f"{path.name}:{split}_labels[{row}]"
        problem, detail = None, ""
        if subset.multilabel:
            found = {finding: POSITIVE if value == 1 else NEGATIVE
                     for finding, value in zip(CHESTMNIST_FINDINGS, values.tolist())}
            caption = findings_caption(found)
        else:
            found, caption, problem, detail = multiclass_labels(subset.task, values.reshape(-1).tolist()[0], where)
        records.append(class_record(f"{split}-{row:06d}", split, array_locator(str(path), f"{split}_images", row),
                                    "npz_array", found, caption, fixed, {"subset": subset.name, "row": row},
                                    cfg.text_template, problem, detail, input_file=str(path)))
    return records


@register_source("medmnist", MedMnistSourceConfig)
def read_medmnist(cfg: MedMnistSourceConfig) -> dict[str, list[Record]]:
    path = npz_file(cfg)
    subset = cfg.chosen_subset()
    splits: dict[str, list[Record]] = {}
    with np.load(path, allow_pickle=False) as arrays:
        for split in SPLITS:
            if f"{split}_labels" not in arrays.files or f"{split}_images" not in arrays.files:
                continue
            labels = np.asarray(arrays[f"{split}_labels"])
            width = len(CHESTMNIST_FINDINGS) if subset.multilabel else 1
            if labels.ndim == 1:
                labels = labels.reshape(-1, 1)
            if labels.ndim != 2 or labels.shape[1] != width:
                raise ValueError(f"{path}: {split}_labels has shape {labels.shape}; {subset.name} needs (N, {width})")
            shape = image_shape(path, f"{split}_images")
            if shape[:1] != labels.shape[:1]:
                raise ValueError(f"{path}: {split}_images holds {shape[0] if shape else 0} images but "
                                 f"{split}_labels {labels.shape[0]} labels")
            splits[split] = _records(path, split, labels, subset, cfg)
    if not splits:
        raise ValueError(f"{path} holds none of the arrays {', '.join(f'{s}_images/{s}_labels' for s in SPLITS)}. "
                         f"{DOWNLOAD_HELP}")
    return splits
