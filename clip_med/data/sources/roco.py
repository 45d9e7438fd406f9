"""ROCO (Radiology Objects in COntext, github.com/razorx89/roco-dataset) in its published layout.

::

    <root>/data/<split>/<kind>/captions.txt    ROCO_ID <tab> caption
    <root>/data/<split>/<kind>/keywords.txt    ROCO_ID <tab><tab> keyword <tab> keyword ...
    <root>/data/<split>/<kind>/semtypes.txt    ROCO_ID <tab><tab> T046 <tab> Pathologic Function <tab> ...
    <root>/data/<split>/<kind>/cuis.txt        ROCO_ID <tab><tab> C0040405 <tab> ...
    <root>/data/<split>/<kind>/dlinks.txt      ROCO_ID <tab> wget ... <archive>.tar.gz ... <tab> <image name>
    <root>/data/<split>/<kind>/licences.txt    ROCO_ID,PMC_ID,CC   (CSV with a header)
    <root>/data/<split>/<kind>/images/         what the repository's scripts/fetch.py downloads

``split`` is train/validation/test and ``kind`` radiology/non-radiology (``source.kinds``).
``root`` may also be the ``data`` folder itself. An image is found as ``images/<ROCO_ID>.jpg``
or under the name the current fetch script gives it, ``images/<PMCID>_<image name>``. Pairs
whose image was never downloaded stay in the records (the writer counts and lists them as
``missing_file``), so the manifest says exactly what is absent.

Keywords, semantic types, CUIs, the licence, the PMC id, the archive link and the image's name
in the paper are kept as sample metadata. Labels come from the caption rules
(:mod:`clip_med.labels.caption_rules`); the PMC id is the group key, so the held-out probe never splits a
paper.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from clip_med.data.record import Record, SkipReason
from clip_med.data.sources import SourceConfig, register_source
from clip_med.data.sources.common import PairInput, build_records, check_root

log = logging.getLogger(__name__)

KINDS = ("radiology", "non-radiology")
SPLITS = ("train", "validation", "test")
DOWNLOAD_HELP = (
    "ROCO is published at https://github.com/razorx89/roco-dataset: clone it and run `python scripts/fetch.py` "
    "there to download the images, then pass source.root=/path/to/roco-dataset (or set ROCO_ROOT)."
)


@dataclass
class RocoSourceConfig(SourceConfig):
    name: str = "roco"
    root: Optional[str] = None
    kinds: list[str] = field(default_factory=lambda: ["radiology"])
    image_dir: str = "images"


def data_dir(root: Optional[str]) -> Path:
    path = check_root(root, "ROCO", DOWNLOAD_HELP)
    for candidate in (path / "data", path):
        if any((candidate / split).is_dir() for split in SPLITS):
            return candidate
    raise FileNotFoundError(f"{path} does not look like ROCO: expected data/<train|validation|test>/ inside it. "
                            f"{DOWNLOAD_HELP}")


def _tab_file(path: Path) -> dict[str, list[str]]:
    """``ROCO_ID <tab> fields...`` -> {id: [fields]}, empty fields dropped (the files use double tabs)."""
    if not path.is_file():
        log.warning("%s is missing: that metadata will be empty", path)
        return {}
    rows = {}
    with open(path, encoding="utf-8", errors="surrogateescape") as handle:
        for line in handle:
            parts = line.rstrip("\r\n").split("\t")
            if parts and parts[0].strip():
                rows[parts[0].strip()] = [part.strip() for part in parts[1:] if part.strip()]
    return rows


def _captions(path: Path) -> list[tuple[str, str]]:
    """(ROCO id, raw caption) in file order; the caption keeps invalid bytes as surrogate escapes."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing. {DOWNLOAD_HELP}")
    rows = []
    with open(path, encoding="utf-8", errors="surrogateescape") as handle:
        for line in handle:
            roco_id, _, caption = line.rstrip("\r\n").partition("\t")
            if roco_id.strip():
                rows.append((roco_id.strip(), caption))
    return rows


def _licences(path: Path) -> dict[str, dict[str, str]]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as handle:
        return {row["ROCO_ID"]: row for row in csv.DictReader(handle) if row.get("ROCO_ID")}


def _semtypes(values: list[str]) -> list[str]:
    """``[T046, Pathologic Function, T061, ...]`` -> ``["T046 Pathologic Function", ...]``."""
    return [f"{code} {name}" for code, name in zip(values[::2], values[1::2])]


def _dlink(values: list[str]) -> tuple[str, str]:
    """(archive URL, image name in the archive) from a dlinks.txt line."""
    if len(values) < 2:
        return "", ""
    archive = next((word for word in values[0].split() if word.endswith(".tar.gz")), "")
    return archive, values[-1]


def _pmcid(archive: str, licence: dict[str, str]) -> str:
    if archive:
        return os.path.basename(archive)[: -len(".tar.gz")]
    return (licence.get("PMC_ID") or "").split("_", 1)[0]


def _find_image(roco_id: str, pmcid: str, image_name: str, files: set[str], folder: Path) -> tuple[str, bool]:
    candidates = [f"{roco_id}.jpg", f"{roco_id}.png", f"{roco_id}.jpeg"]
    if pmcid and image_name:
        candidates.append(f"{pmcid}_{image_name}")
    for name in candidates:
        if name in files:
            return str(folder / name), True
    return str(folder / candidates[0]), False


def _read_kind(folder: Path, split: str, kind: str, image_dir: str, template: str) -> list[Record]:
    captions = _captions(folder / "captions.txt")
    keywords, semtypes = _tab_file(folder / "keywords.txt"), _tab_file(folder / "semtypes.txt")
    cuis, dlinks = _tab_file(folder / "cuis.txt"), _tab_file(folder / "dlinks.txt")
    licences = _licences(folder / "licences.txt")
    images = folder / image_dir
    files = set(os.listdir(images)) if images.is_dir() else set()
    if not files:
        log.warning("ROCO %s/%s: no images in %s (run the ROCO repository's scripts/fetch.py)", split, kind, images)
    pairs = []
    for roco_id, caption in captions:
        archive, image_name = _dlink(dlinks.get(roco_id, []))
        licence = licences.get(roco_id, {})
        pmcid = _pmcid(archive, licence)
        path, found = _find_image(roco_id, pmcid, image_name, files, images)
        meta = {
            "kind": kind, "case_id": pmcid or roco_id, "pmcid": pmcid, "image_name": image_name,
            "archive": archive, "licence": licence.get("CC", ""), "keywords": keywords.get(roco_id, []),
            "semtypes": _semtypes(semtypes.get(roco_id, [])), "cuis": cuis.get(roco_id, []),
        }
        pair = PairInput(id=roco_id, split=split, image=path, caption=caption, meta=meta)
        if not found:
            pair.problem = SkipReason.MISSING_FILE
            pair.problem_detail = (f"{roco_id}: image not downloaded (looked for {images}/{roco_id}.jpg"
                                   f"{f' and {pmcid}_{image_name}' if pmcid and image_name else ''}); "
                                   "run scripts/fetch.py of the ROCO repository")
        pairs.append(pair)
    return build_records(pairs, template)


@register_source("roco", RocoSourceConfig)
def read_roco(cfg: RocoSourceConfig) -> dict[str, list[Record]]:
    root = data_dir(cfg.root)
    unknown = [kind for kind in cfg.kinds if kind not in KINDS]
    if unknown:
        raise ValueError(f"source.kinds has {unknown}; ROCO has {list(KINDS)}")
    template = cfg.text_template or "{caption}"
    splits: dict[str, list[Record]] = {}
    for split in SPLITS:
        if cfg.splits is not None and split not in cfg.splits:
            continue
        for kind in cfg.kinds:
            folder = root / split / kind
            if (folder / "captions.txt").is_file():
                splits.setdefault(split, []).extend(_read_kind(folder, split, kind, cfg.image_dir, template))
    if not splits:
        raise FileNotFoundError(f"no <split>/<kind>/captions.txt under {root} for kinds {cfg.kinds}. {DOWNLOAD_HELP}")
    for split, records in splits.items():
        missing = sum(record.problem == SkipReason.MISSING_FILE for record in records)
        if missing:
            log.warning("ROCO %s: %d of %d images are not downloaded; they are listed as missing_file in the "
                        "manifest", split, missing, len(records))
    return splits
