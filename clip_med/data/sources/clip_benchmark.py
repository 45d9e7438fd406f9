"""CLIP_benchmark's custom webdataset layout (github.com/LAION-AI/CLIP_benchmark) as a source.

The layout (``clip_benchmark/datasets/builder.py: build_wds_dataset``; ``clip_benchmark eval
--dataset wds/<name> --dataset_root <folder>``)::

    <folder>/classnames.txt                          one class name per line, in class-index order
    <folder>/zeroshot_classification_templates.txt   one template per line, "{c}" = the class name
    <folder>/dataset_type.txt                        optional: classification | retrieval | multilabel
    <folder>/<split>/nshards.txt                     the number of shards
    <folder>/<split>/0.tar ... <n-1>.tar             samples: an image (webp, png, jpg, jpeg),
                                                     ``cls`` (the class index, ASCII) and/or
                                                     ``txt`` (captions, one per line)

``source=clip_benchmark source.root=<folder>`` reads every split folder it holds into records
(one per sample; the first caption line is the caption, the class name when there is none).
Tar members are chosen by name before anything is read: only the image, ``cls`` and ``txt``
members are used, every other one (``npy``, ``pyd``, ``pth``, ...) is skipped unread and
counted; nothing is ever unpickled or decoded by webdataset's default handlers. An image stays
in its tar: the record's locator names the tar, the member's offset and size, and the
``tar_member`` decoder reads just those bytes through clip_med's image guard
(:func:`clip_med.data.images.open_image_bytes`). Only local folders are read.

A folder written by clip_med (:mod:`clip_med.eval.clip_benchmark_wds`) also holds
``clip_med.json``: the task its classes belong to and their label ids, so the records carry
e.g. ``modality=ct`` rather than the class name ``CT``.
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import webdataset as wds
from PIL import Image

from clip_med.data.images import ImageLimits, ImageRejected, open_image_bytes
from clip_med.data.record import Record, SkipReason
from clip_med.data.sources import SourceConfig, register_source
from clip_med.data.sources.common import check_root

log = logging.getLogger(__name__)

CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
DATASET_TYPE_FILE = "dataset_type.txt"
NSHARDS_FILE = "nshards.txt"
CLIP_MED_INFO_FILE = "clip_med.json"
# The image members CLIP_benchmark reads (in its order of preference), its class index and its captions.
IMAGE_MEMBERS = ("webp", "png", "jpg", "jpeg")
LABEL_MEMBER = "cls"
TEXT_MEMBER = "txt"
USED_MEMBERS = frozenset([*IMAGE_MEMBERS, LABEL_MEMBER, TEXT_MEMBER])
FOREIGN_MEMBER = "foreign_member"
MAX_METADATA_BYTES = 16 * 1024 * 1024  # classnames.txt, templates, clip_med.json, custom template JSON
MAX_TEXT_MEMBER_BYTES = 1024 * 1024  # one txt member (captions)
MAX_SHARDS = 100_000
DEFAULT_TASK = "class"  # the task name of the labels of a folder not written by clip_med


def read_text_file(path: Path, what: str, limit: int = MAX_METADATA_BYTES) -> str:
    """A UTF-8 file of at most ``limit`` bytes (``FileNotFoundError`` when absent)."""
    size = path.stat().st_size
    if size > limit:
        raise ValueError(f"{what} {path} has {size} bytes, more than the {limit} allowed")
    return path.read_text(encoding="utf-8")


def read_lines(path: Path, what: str) -> list[str]:
    """Lines as CLIP_benchmark reads them: ``str.splitlines`` then ``strip`` (empty lines kept)."""
    return [line.strip() for line in read_text_file(path, what).splitlines()]


def read_classnames(root: str | Path) -> list[str]:
    root = Path(root)
    names = read_lines(root / CLASSNAMES_FILE, "class names")
    if not names or any(not name for name in names):
        raise ValueError(f"{root / CLASSNAMES_FILE}: every line must name a class (found an empty one, or none)")
    if len(set(names)) != len(names):
        duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
        raise ValueError(f"{root / CLASSNAMES_FILE}: class names must be unique; repeated: {duplicates[:5]}")
    return names


def read_dataset_type(root: str | Path) -> str:
    try:
        return read_text_file(Path(root) / DATASET_TYPE_FILE, "dataset type").strip().lower()
    except FileNotFoundError:
        return "classification"


def read_clip_med_info(root: str | Path) -> dict[str, Any]:
    """``clip_med.json`` of a folder clip_med wrote ({} for any other folder)."""
    try:
        info = json.loads(read_text_file(Path(root) / CLIP_MED_INFO_FILE, "clip_med.json"))
    except FileNotFoundError:
        return {}
    if not isinstance(info, dict):
        raise ValueError(f"{Path(root) / CLIP_MED_INFO_FILE} is not a JSON object")
    return info


def split_folders(root: str | Path) -> list[str]:
    """The split folders (those holding ``nshards.txt``), sorted."""
    root = Path(root)
    return sorted(entry.name for entry in root.iterdir() if (entry / NSHARDS_FILE).is_file())


def shard_paths(root: str | Path, split: str) -> list[Path]:
    folder = Path(root) / split
    text = read_text_file(folder / NSHARDS_FILE, "shard count").strip()
    if not text.isdigit() or not 0 < int(text) <= MAX_SHARDS:
        raise ValueError(f"{folder / NSHARDS_FILE} must hold a shard count from 1 to {MAX_SHARDS}, not {text[:40]!r}")
    return [folder / f"{index}.tar" for index in range(int(text))]


@dataclass
class TarSample:
    """One sample of a CLIP_benchmark shard: where its image lies in the tar, its class index and texts."""

    key: str
    shard: Path
    image: Optional[tuple[int, int, str]] = None  # (offset, size, extension) of the image member
    label: Optional[int] = None
    texts: Optional[list[str]] = None
    problem: str = ""


def _parse_cls(data: bytes) -> int:
    text = data.decode("ascii").strip()
    if not text.isdigit() or len(text) > 9:
        raise ValueError(f"a cls member must be a class index, not {text[:20]!r}")
    return int(text)


def read_tar_samples(path: Path, counts: Counter) -> list[TarSample]:
    """The samples of one shard in order; only image, ``cls`` and ``txt`` members are read (by name)."""
    samples: dict[str, TarSample] = {}
    with tarfile.open(path, mode="r:") as archive:  # plain tar; members are located, not extracted
        for member in archive:
            if not member.isfile():
                continue
            key, extension = wds.tariterators.base_plus_ext(member.name)
            extension = (extension or "").lower()
            if key is None or extension not in USED_MEMBERS:
                counts[FOREIGN_MEMBER] += 1
                continue
            sample = samples.setdefault(key, TarSample(key, path))
            if extension in IMAGE_MEMBERS:
                rank = IMAGE_MEMBERS.index(extension)
                if sample.image is None or rank < IMAGE_MEMBERS.index(sample.image[2]):
                    sample.image = (member.offset_data, member.size, extension)
                continue
            if member.size > MAX_TEXT_MEMBER_BYTES:
                sample.problem = f"{member.name} has {member.size} bytes, more than {MAX_TEXT_MEMBER_BYTES}"
                continue
            handle = archive.extractfile(member)
            assert handle is not None  # a regular file
            data = handle.read()
            try:
                if extension == LABEL_MEMBER:
                    sample.label = _parse_cls(data)
                else:
                    sample.texts = [line for line in data.decode("utf-8").splitlines() if line.strip()]
            except (UnicodeDecodeError, ValueError) as exc:
                sample.problem = f"{member.name}: {exc}"
    return list(samples.values())


def tar_locator(shard: Path, offset: int, size: int, extension: str) -> str:
    return json.dumps([str(shard), offset, size, extension])


def read_tar_member(locator: str, limits: ImageLimits, max_side: int | None) -> tuple[Image.Image, bytes]:
    """The ``tar_member`` decoder: ``[tar path, offset, size, extension]`` -> the image (size-guarded)."""
    path, offset, size, extension = json.loads(locator)
    if extension not in IMAGE_MEMBERS or not isinstance(offset, int) or not isinstance(size, int):
        raise ValueError(f"not a tar image locator: {locator[:200]}")
    where = f"{path}@{offset}"
    if size > limits.max_file_bytes:
        raise ImageRejected(SkipReason.FILE_TOO_LARGE,
                            f"{where} has {size} bytes > shards.max_file_bytes={limits.max_file_bytes}")
    with open(path, "rb") as handle:
        handle.seek(offset)
        data = handle.read(size)
    return open_image_bytes(data, limits, where, max_side), data


@dataclass
class ClipBenchmarkSourceConfig(SourceConfig):
    name: str = "clip_benchmark"
    root: Optional[str] = None  # the folder given to CLIP_benchmark as --dataset_root
    # The task the classes belong to (a taxonomy task such as modality, or any name); None: the one
    # clip_med.json names, else "class".
    task: Optional[str] = None


def folder_labels(root: str | Path, task: Optional[str] = None) -> tuple[str, list[str]]:
    """(task, label per class index): clip_med.json's label ids when it has them, else the class names."""
    info = read_clip_med_info(root)
    names = read_classnames(root)
    labels = info.get("labels") if task in (None, info.get("task")) else None
    if not (isinstance(labels, list) and len(labels) == len(names) and all(isinstance(x, str) for x in labels)):
        labels = names
    return task or str(info.get("task") or DEFAULT_TASK), list(labels)


@register_source("clip_benchmark", ClipBenchmarkSourceConfig)
def read_clip_benchmark(cfg: ClipBenchmarkSourceConfig) -> dict[str, list[Record]]:
    root = check_root(cfg.root, "CLIP_benchmark webdataset folder",
                      "source.root=<the folder given to clip_benchmark as --dataset_root>")
    dataset_type = read_dataset_type(root)
    if dataset_type == "multilabel":
        raise ValueError(f"{root}: multilabel CLIP_benchmark sets (npy labels) are not read by clip_med")
    classification = dataset_type != "retrieval"
    task, labels = folder_labels(root, cfg.task) if classification else (cfg.task or DEFAULT_TASK, [])
    names = read_classnames(root) if classification else []
    splits: dict[str, list[Record]] = {}
    for split in split_folders(root):
        counts: Counter = Counter()
        records = []
        for shard in shard_paths(root, split):
            for sample in read_tar_samples(shard, counts):
                records.append(_record(sample, split, task, labels, names))
        if counts[FOREIGN_MEMBER]:
            log.warning("%s/%s: %d member(s) other than image, cls and txt skipped unread", root, split,
                        counts[FOREIGN_MEMBER])
        splits[split] = records
    if not splits:
        raise ValueError(f"{root} holds no split folder with {NSHARDS_FILE} (CLIP_benchmark's layout: "
                         f"<root>/<split>/{NSHARDS_FILE}, <root>/<split>/0.tar, ...)")
    return splits


def _record(sample: TarSample, split: str, task: str, labels: list[str], names: list[str]) -> Record:
    record_id = f"{sample.shard.stem}/{sample.key}"
    problem, detail = None, sample.problem
    label_values: dict[str, str] = {}
    if sample.label is not None and labels:
        if sample.label < len(labels):
            label_values[task] = labels[sample.label]
        else:
            detail = f"class index {sample.label} is outside the {len(labels)} classes of classnames.txt"
    elif labels:
        detail = detail or "no cls member"
    texts = sample.texts or []
    caption = texts[0] if texts else (names[sample.label] if label_values and sample.label is not None else "")
    if sample.image is None:
        problem, detail = SkipReason.MISSING_FILE, detail or "no image member (webp, png, jpg, jpeg)"
    elif detail:
        problem = SkipReason.BAD_ROW
    elif not caption:
        problem, detail = SkipReason.EMPTY_CAPTION, "no txt member and no class"
    locator = tar_locator(sample.shard, *sample.image) if sample.image else ""
    origin = f"{sample.shard.parent.name}/{sample.shard.name}:{sample.key}"
    return Record(id=record_id, split=split, image=locator, caption=caption, text=caption, labels=label_values,
                  meta={"captions": len(texts)} if len(texts) > 1 else {}, decoder="tar_member", problem=problem,
                  problem_detail=detail, label_origin={task: "metadata"} if label_values else {},
                  origin=origin, input_file=str(sample.shard))

