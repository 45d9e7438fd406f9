"""PMC-OA (huggingface.co/datasets/axiong/pmc_oa, the PMC-CLIP paper) in its published layout.

::

    <root>/pmc_oa.jsonl          the main release: sub-figures with their own sub-captions
    <root>/pmc_oa_beta.jsonl     the beta release: sub-figures with the whole compound caption
    <root>/train.jsonl, valid.jsonl, test.jsonl   the earlier split files (same row format)
    <root>/images/               images.zip unpacked (``image_dir`` when it is elsewhere)

Each row is ``{"image": "PMC212319_Fig3_4.jpg", "caption": "...", "pmcid": "PMC212319",
"url_name": "1471-2121-4-13-3.jpg"}`` (``pmcid`` and ``url_name`` optional). ``release`` picks
``pmc_oa`` or ``pmc_oa_beta``; when its file is absent but the split files exist, those are read
as the splits ``train``/``valid``/``test``. The single-file releases have no split: ``holdout``
moves that fraction of *papers* (by PMC id) to ``holdout_split``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from clip_med.core.bounds import bounded
from clip_med.data.record import Record, SkipReason
from clip_med.data.sources import register_source
from clip_med.data.sources.common import (
    BadRow,
    HoldoutSourceConfig,
    PairInput,
    bad_row_pair,
    build_records,
    check_root,
    path_problem,
    read_table,
    require_columns,
    split_records,
)

log = logging.getLogger(__name__)

RELEASES = ("pmc_oa", "pmc_oa_beta")
SPLIT_FILES = {"train": "train.jsonl", "valid": "valid.jsonl", "test": "test.jsonl"}
IMAGE_DIRS = ("images", "caption_T060_filtered_top4_sep_v0_subfigures")
DOWNLOAD_HELP = (
    "PMC-OA is published at https://huggingface.co/datasets/axiong/pmc_oa: download pmc_oa.jsonl (or "
    "pmc_oa_beta.jsonl) and images.zip into one folder, unzip the images there, and pass source.root=<that "
    "folder> (or set PMC_OA_ROOT)."
)


@dataclass
class PmcOaSourceConfig(HoldoutSourceConfig):
    name: str = "pmc_oa"
    root: Optional[str] = None
    release: str = "pmc_oa"
    # Folder of the images; None: <root>/images or the folder images.zip unpacks to.
    image_dir: Optional[str] = None
    holdout: float = bounded(0.02, minimum=0, below=1)

    def input_roots(self) -> list[str]:
        roots = [self.root] if self.root else []
        if self.root and self.image_dir:  # a configured image folder may lie anywhere
            roots.append(str(_image_dir(Path(self.root).expanduser(), self.image_dir)))
        return roots


def _image_dir(root: Path, configured: Optional[str]) -> Path:
    if configured:
        path = Path(configured).expanduser()
        return path if path.is_absolute() else root / path
    for name in IMAGE_DIRS:
        if (root / name).is_dir():
            return root / name
    raise FileNotFoundError(f"no image folder in {root} (looked for {', '.join(IMAGE_DIRS)}): unzip images.zip "
                            f"there or set source.image_dir. {DOWNLOAD_HELP}")


def _table_files(root: Path, release: str) -> dict[str, Path]:
    if release not in RELEASES:
        raise ValueError(f"source.release={release!r}: use one of {list(RELEASES)}")
    if (root / f"{release}.jsonl").is_file():
        return {"train": root / f"{release}.jsonl"}
    split_files = {split: root / name for split, name in SPLIT_FILES.items() if (root / name).is_file()}
    if split_files:
        log.info("PMC-OA: %s.jsonl not found, reading the split files %s", release, sorted(split_files))
        return split_files
    raise FileNotFoundError(f"neither {release}.jsonl nor train/valid/test.jsonl in {root}. {DOWNLOAD_HELP}")


def _pmcid(row: dict, image: str) -> str:
    value = str(row.get("pmcid") or "")
    if value:
        return value if value.upper().startswith("PMC") else f"PMC{value}"
    head = os.path.basename(image).split("_", 1)[0]
    return head if head.upper().startswith("PMC") else ""


def _records(path: Path, split: str, images: Path, files: set[str], template: str) -> list[Record]:
    pairs = []
    for line_number, row in read_table(path, "jsonl"):
        if isinstance(row, BadRow):
            pairs.append(bad_row_pair(row, line_number, path, split))
            continue
        require_columns(row, ["image", "caption"], path)
        image = str(row["image"] or "")
        pmcid = _pmcid(row, image)
        location = images / image
        meta = {"case_id": pmcid or Path(image).stem, "pmcid": pmcid, "url_name": str(row.get("url_name") or ""),
                "line": line_number}
        pair = PairInput(id=Path(image).stem or f"{path.stem}_{line_number}", split=split, image=str(location),
                         caption=row["caption"], meta=meta)
        if not image:
            pair.problem, pair.problem_detail = SkipReason.MISSING_FILE, f"{path}:{line_number} has no image name"
        elif problem := path_problem(image, f"{path}:{line_number}"):
            pair.problem, pair.problem_detail = problem
        elif image not in files and not location.is_file():
            pair.problem, pair.problem_detail = SkipReason.MISSING_FILE, f"{location} does not exist"
        pairs.append(pair)
    return build_records(pairs, template)


@register_source("pmc_oa", PmcOaSourceConfig)
def read_pmc_oa(cfg: PmcOaSourceConfig) -> dict[str, list[Record]]:
    root = check_root(cfg.root, "PMC-OA", DOWNLOAD_HELP)
    tables = _table_files(root, cfg.release)
    images = _image_dir(root, cfg.image_dir)
    files = set(os.listdir(images))
    template = cfg.text_template or "{caption}"
    records = [record for split, path in tables.items() for record in _records(path, split, images, files, template)]
    if len(tables) > 1:
        splits: dict[str, list[Record]] = {}
        for record in records:
            splits.setdefault(record.split, []).append(record)
        return splits
    return split_records(records, cfg)
