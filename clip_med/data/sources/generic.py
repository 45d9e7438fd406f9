"""Readers for data in no published layout: hospital exports, caption folders, classification trees.

``table``
    A CSV, TSV, JSONL or JSON (list of objects) file of image paths and captions, with
    configurable column names: ``source.path=reports.csv source.image_column=file
    source.caption_column=report``. One file for all rows (splits from ``split_column`` or
    ``holdout``) or one file per split (``source.files={train: a.csv, test: b.csv}``). Relative
    image paths are resolved against ``image_root`` (default: the table's folder). ``.dcm`` images
    are read as DICOM, and their Modality/BodyPartExamined tags become labels. Med-MAT's JSON
    ``{"caption": ..., "image": ...}`` records are a table in ``json`` format.
``folder``
    A folder of images, each with a sidecar caption file (``scan01.png`` + ``scan01.txt``).
    Sub-folders named ``train``/``val``/``test``/... are the splits.
``class_folders``
    A classification tree, ``<root>/[<split>/]<class>/<image>`` (MedMNIST exports, ImageFolder
    layouts): every image becomes a pair whose caption is ``caption_template`` filled with the
    class name. ``labels`` gives labels every image has (``{modality: xray, anatomy: thorax}``)
    and ``class_task`` says which taxonomy task the class folders name, if any.

Labels not given by a column, tag or folder come from the caption rules
(:mod:`clip_med.labels.caption_rules`).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

from clip_med.core.templates import fill_template
from clip_med.data import dicom_deid
from clip_med.data.images import ImageRejected
from clip_med.data.record import Record, SkipReason
from clip_med.data.sources import register_source
from clip_med.data.sources.common import (
    IMAGE_EXTENSIONS,
    BadRow,
    HoldoutSourceConfig,
    PairInput,
    bad_row_pair,
    build_records,
    check_root,
    decoder_for,
    list_files,
    metadata_labels,
    path_problem,
    read_table,
    records_by_split_folder,
    relative_id,
    require_columns,
    split_dirs,
    split_records,
    validated_labels,
)
from clip_med.labels import taxonomy

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# table


@dataclass
class TableSourceConfig(HoldoutSourceConfig):
    name: str = "table"
    # One table for every row, or one per split (split -> file); one of the two.
    path: Optional[str] = None
    files: dict[str, str] = field(default_factory=dict)
    format: Optional[str] = None  # csv | tsv | jsonl | json; None: from the file extension
    image_root: Optional[str] = None  # relative image paths start here (default: the table's folder)
    image_column: str = "image"
    caption_column: str = "caption"
    id_column: Optional[str] = None  # default: the image path without its extension
    split_column: Optional[str] = None
    group_column: Optional[str] = None  # e.g. a patient id: keeps a patient on one side of the holdout
    # Columns holding labels, task -> column (values mapped through the taxonomy aliases).
    label_columns: dict[str, str] = field(default_factory=dict)
    # Columns kept as sample metadata, also usable as {fields} in text_template.
    meta_columns: list[str] = field(default_factory=list)
    decoder: str = "auto"  # auto (dicom for .dcm/.dicom) | pil | dicom
    split: str = "train"  # the split of rows without a split column
    # DICOM rows without an id_column get a keyed hash of their image path as id, key and origin
    # (folders are often named after patients; clip_med.data.dicom_deid). false: the paths.
    hash_dicom_paths: bool = True
    id_secret_file: Optional[str] = None  # the hash key's file (None: dicom_deid's default)

    def input_roots(self) -> list[str]:
        if self.image_root:
            return [self.image_root]
        tables = [self.path] if self.path else list(self.files.values())
        return [str(Path(table).expanduser().parent) for table in tables if table]


def _resolve(image: str, base: Path) -> str:
    path = Path(os.path.expanduser(image))
    return str(path if path.is_absolute() else base / path)


def _dicom_labels(path: str) -> tuple[dict[str, str], dict[str, str], dict[str, Any]]:
    from clip_med.data.dicom import dicom_tags

    try:
        info = dicom_tags(path)
    except ImageRejected:
        return {}, {}, {}  # the writer reports the file itself
    labels, origin = info.labels()
    known = {task: label for task, label in labels.items() if label != taxonomy.UNKNOWN}
    return known, {task: origin[task] for task in known}, {"case_id": info.patient_key} if info.patient_key else {}


def _table_pair(row: dict[str, Any] | BadRow, line: int, table: Path, split: str, base: Path,
                cfg: TableSourceConfig, key: Callable[[], bytes]) -> PairInput:
    if isinstance(row, BadRow):
        return bad_row_pair(row, line, table, split)
    require_columns(row, [cfg.image_column, cfg.caption_column, *cfg.label_columns.values(), *cfg.meta_columns],
                    table)
    image = str(row.get(cfg.image_column) or "").strip()
    bad_path = path_problem(image, f"{table}:{line}")
    path = _resolve(image, base) if image and not bad_path else ""
    record_id = str(row.get(cfg.id_column) or "") if cfg.id_column else ""
    record_id = record_id or (str(Path(image).with_suffix("")) if image else f"{table.stem}_{line}")
    meta = {column: row.get(column) for column in cfg.meta_columns}
    if cfg.group_column and row.get(cfg.group_column):
        meta["case_id"] = str(row[cfg.group_column])
    labels, origin = metadata_labels({task: row.get(column) for task, column in cfg.label_columns.items()})
    decoder = decoder_for(path, cfg.decoder)
    if decoder == "dicom" and image and not cfg.id_column and cfg.hash_dicom_paths:
        record_id = "dcm-" + dicom_deid.keyed_hash(key(), "path", image, 24)
    if decoder == "dicom" and path and os.path.isfile(path):
        tag_labels, tag_origin, tag_meta = _dicom_labels(path)
        labels, origin = {**tag_labels, **labels}, {**tag_origin, **origin}
        meta = {**tag_meta, **meta}
    if cfg.split_column:
        split = str(row.get(cfg.split_column) or split)
    pair = PairInput(id=record_id, split=split, image=path, caption=row.get(cfg.caption_column), meta=meta,
                     labels=labels, label_origin=origin, decoder=decoder)
    if bad_path:
        pair.problem, pair.problem_detail = bad_path
    elif not image:
        pair.problem, pair.problem_detail = SkipReason.MISSING_FILE, f"{table}:{line} has an empty {cfg.image_column}"
    return pair


@register_source("table", TableSourceConfig)
def read_table_source(cfg: TableSourceConfig) -> dict[str, list[Record]]:
    if bool(cfg.path) == bool(cfg.files):
        raise ValueError("the table source needs exactly one of source.path=<table> or "
                         "source.files={<split>: <table>, ...}")
    tables = {cfg.split: cfg.path} if cfg.path else dict(cfg.files)
    template = cfg.text_template or "{caption}"
    key = functools.cache(lambda: dicom_deid.load_id_key(cfg.id_secret_file))  # read once, only for DICOM rows
    pairs = []
    for split, table_name in tables.items():
        table = Path(table_name).expanduser()
        base = Path(cfg.image_root).expanduser() if cfg.image_root else table.parent
        pairs += [_table_pair(row, line, table, split, base, cfg, key) for line, row in read_table(table, cfg.format)]
    records = build_records(pairs, template)
    for record in records:
        if record.decoder == "dicom" and record.id.startswith("dcm-") and not cfg.id_column and cfg.hash_dicom_paths:
            record.origin = record.id  # the path stays the locator; what is written names the row by its hash
            record.deidentification = dicom_deid.summary(False, False, True, key())
    if not records:
        raise ValueError(f"no rows in {', '.join(map(str, tables.values()))}")
    return split_records(records, cfg, from_split=cfg.split)


# ---------------------------------------------------------------------------------------------
# folder (images with sidecar captions)


@dataclass
class FolderSourceConfig(HoldoutSourceConfig):
    name: str = "folder"
    root: Optional[str] = None
    extensions: list[str] = field(default_factory=lambda: list(IMAGE_EXTENSIONS))
    caption_suffix: str = ".txt"  # <image name without extension><caption_suffix> holds the caption
    recursive: bool = True


def _read_sidecar(path: Path) -> tuple[Any, str | None, str]:
    """The caption file's text with surrogate escapes, or a problem when it is missing."""
    try:
        return path.read_bytes().decode("utf-8", "surrogateescape"), None, ""
    except FileNotFoundError:
        return None, SkipReason.EMPTY_CAPTION, f"no caption file {path}"
    except OSError as exc:
        return None, SkipReason.EMPTY_CAPTION, f"cannot read caption file {path}: {exc}"


def _folder_records(folder: Path, split: str, cfg: FolderSourceConfig, template: str) -> list[Record]:
    pairs = []
    for image in list_files(folder, cfg.extensions, cfg.recursive):
        caption, problem, detail = _read_sidecar(image.with_suffix(cfg.caption_suffix))
        pair = PairInput(id=relative_id(image, folder), split=split, image=str(image), caption=caption,
                         meta={"file": str(image.relative_to(folder))}, decoder=decoder_for(str(image)),
                         problem=problem, problem_detail=detail)
        pairs.append(pair)
    return build_records(pairs, template)


@register_source("folder", FolderSourceConfig)
def read_folder(cfg: FolderSourceConfig) -> dict[str, list[Record]]:
    root = check_root(cfg.root, "folder", "Point source.root at a folder of images with .txt captions beside them.")
    template = cfg.text_template or "{caption}"
    return records_by_split_folder(root, lambda folder, split: _folder_records(folder, split, cfg, template), cfg,
                                   f"no images with extensions {cfg.extensions} under {root}")


# ---------------------------------------------------------------------------------------------
# class_folders (a classification tree)


@dataclass
class ClassFolderSourceConfig(HoldoutSourceConfig):
    name: str = "class_folders"
    root: Optional[str] = None
    extensions: list[str] = field(default_factory=lambda: list(IMAGE_EXTENSIONS))
    # The caption of every image of a class; {class_name} is the class's words.
    caption_template: str = "{class_name}"
    # Folder name -> words used for {class_name} (default: the folder name, "_" and "-" as spaces).
    class_names: dict[str, str] = field(default_factory=dict)
    # The taxonomy task the class folders name (e.g. modality for folders CT/MRI/X-ray), if any.
    class_task: Optional[str] = None
    # Labels every image gets, task -> label id, e.g. {modality: xray, anatomy: thorax}.
    labels: dict[str, str] = field(default_factory=dict)
    captions_from_class_names: ClassVar[bool] = True


def _class_words(folder: str, cfg: ClassFolderSourceConfig) -> str:
    return cfg.class_names.get(folder) or folder.replace("_", " ").replace("-", " ").strip()


def _class_records(folder: Path, split: str, cfg: ClassFolderSourceConfig, fixed: dict[str, str],
                   template: str) -> list[Record]:
    pairs = []
    for class_dir in sorted(path for path in folder.iterdir() if path.is_dir() and not path.name.startswith(".")):
        words = _class_words(class_dir.name, cfg)
        labels, origin = dict(fixed), {task: "config" for task in fixed}
        labels["class"], origin["class"] = class_dir.name, "folder"
        if cfg.class_task:
            label = taxonomy.normalize(cfg.class_task, class_dir.name)
            if label == taxonomy.UNKNOWN:
                label = taxonomy.normalize(cfg.class_task, words)
            labels[cfg.class_task], origin[cfg.class_task] = label, "folder" if label != taxonomy.UNKNOWN else "none"
        caption = fill_template(cfg.caption_template, {"class_name": words, "class_folder": class_dir.name})
        for image in list_files(class_dir, cfg.extensions, recursive=True):
            pair = PairInput(id=f"{class_dir.name}/{relative_id(image, class_dir)}", split=split, image=str(image),
                             caption=caption, meta={"class_name": words}, labels=labels, label_origin=origin,
                             decoder=decoder_for(str(image)))
            pairs.append(pair)
    return build_records(pairs, template)


@register_source("class_folders", ClassFolderSourceConfig)
def read_class_folders(cfg: ClassFolderSourceConfig) -> dict[str, list[Record]]:
    root = check_root(cfg.root, "class-folder", "Point source.root at <root>/[<split>/]<class>/<image> folders.")
    if cfg.class_task:
        taxonomy.get_task(cfg.class_task)
    fixed = validated_labels(cfg.labels, "source.labels")
    template = cfg.text_template or "{caption}"
    splits = split_dirs(root)
    if splits:
        return {split: _class_records(root / split, split, cfg, fixed, template) for split in splits}
    records = _class_records(root, "train", cfg, fixed, template)
    if not records:
        raise FileNotFoundError(f"no <class>/<image> folders under {root}")
    return split_records(records, cfg)
