"""LC25000 (lung and colon histopathology, Borkowski et al. 2019) in its published class folders.

::

    <root>/lung_colon_image_set/colon_image_sets/colon_aca/colonca1.jpeg ...
    <root>/lung_colon_image_set/colon_image_sets/colon_n/colonn1.jpeg ...
    <root>/lung_colon_image_set/lung_image_sets/lung_aca/lungaca1.jpeg ...
    <root>/lung_colon_image_set/lung_image_sets/lung_n/lungn1.jpeg ...
    <root>/lung_colon_image_set/lung_image_sets/lung_scc/lungscc1.jpeg ...

``root`` may be the folder holding ``lung_colon_image_set`` or that folder itself. ``organ=lung``
or ``organ=colon`` reads one organ's classes (BiomedCLIP reports them apart; tasks
``lc25000_lung`` and ``lc25000_colon``), none reads the five classes (task ``lc25000``).

The set has no split: ``holdout`` (0.2) of the images, by a seeded hash of their name
(``holdout_seed``, default 0), form the ``test`` split (``holdout_split``); the same seed gives the
same split on every machine. Its 25,000 images are augmentations (rotations, flips) of 750 lung and
500 colon originals, and the published files do not say which image came from which (they are
numbered ``lungaca1.jpeg`` ... ``lungaca5000.jpeg`` with no group in the name), so the split cannot
be by original image: near-copies of a test image are in ``train``, and linear-probe and k-shot
scores are optimistic. Zero-shot is not affected. The suite's report repeats this
(:data:`SPLIT_CAVEAT`), and the reader logs it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

from clip_med.core.bounds import bounded
from clip_med.data.record import Record
from clip_med.data.sources import register_source
from clip_med.data.sources.classes import class_record
from clip_med.data.sources.common import IMAGE_EXTENSIONS, HoldoutSourceConfig, check_root, list_files, split_records
from clip_med.labels import benchmarks

log = logging.getLogger(__name__)

SET_FOLDER = "lung_colon_image_set"
ORGAN_FOLDERS = {"colon": "colon_image_sets", "lung": "lung_image_sets"}
DOWNLOAD_HELP = ("LC25000 is published at https://github.com/tampapath/lung_colon_image_set (download: "
                 "https://www.kaggle.com/datasets/andrewmvd/lung-and-colon-cancer-histopathological-images). Unzip it "
                 "and pass source.root=<the folder holding lung_colon_image_set> (or set LC25000_ROOT).")

SPLIT_CAVEAT = ("LC25000 has no published split: test is a seeded hash holdout of single images (source.holdout, "
                "holdout_seed). Its images are augmentations of 1,250 originals with no record of which came from "
                "which, so near-copies of test images are in train: linear-probe and k-shot numbers are optimistic; "
                "zero-shot is unaffected.")


@dataclass
class Lc25000SourceConfig(HoldoutSourceConfig):
    name: str = "lc25000"
    root: Optional[str] = None
    organ: Optional[str] = None  # lung | colon | None (all five classes)
    holdout: float = bounded(0.2, minimum=0, below=1)
    holdout_split: str = "test"

    captions_from_class_names: ClassVar[bool] = True  # made from the class names: no retrieval on them
    split_caveat: ClassVar[str] = SPLIT_CAVEAT

    def class_tasks(self) -> list[str]:
        if self.organ not in benchmarks.LC25000_TASKS:
            raise ValueError(f"source.organ={self.organ!r}: use lung, colon or null (both organs, five classes)")
        return [benchmarks.LC25000_TASKS[self.organ]]


def set_folder(root: Optional[str]) -> Path:
    path = check_root(root, "LC25000", DOWNLOAD_HELP)
    for candidate in (path / SET_FOLDER, path):
        if any((candidate / folder).is_dir() for folder in ORGAN_FOLDERS.values()):
            return candidate
    raise FileNotFoundError(f"{path} does not look like LC25000: expected {SET_FOLDER}/colon_image_sets or "
                            f"lung_image_sets inside it. {DOWNLOAD_HELP}")


@register_source("lc25000", Lc25000SourceConfig)
def read_lc25000(cfg: Lc25000SourceConfig) -> dict[str, list[Record]]:
    task = cfg.class_tasks()[0]
    folder = set_folder(cfg.root)
    records = []
    for label in benchmarks.TASKS[task].ids:
        class_dir = folder / ORGAN_FOLDERS[label.split("_")[0]] / label
        images = list_files(class_dir, IMAGE_EXTENSIONS) if class_dir.is_dir() else []
        if not images:
            raise FileNotFoundError(f"no images in {class_dir}. {DOWNLOAD_HELP}")
        caption = benchmarks.caption(task, label)
        records += [class_record(f"{label}/{image.stem}", "train", str(image), "pil", {task: label}, caption,
                                 meta={"class_folder": label}, template=cfg.text_template) for image in images]
    if cfg.holdout > 0:
        log.warning("%s", SPLIT_CAVEAT)
    return split_records(records, cfg)
