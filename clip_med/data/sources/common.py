"""Pieces every reader shares: strict caption checks, labels, held-out splits, table files.

Table files (CSV, TSV, JSONL, JSON) are read with ``errors="surrogateescape"``, so one caption
with invalid UTF-8 bytes does not stop the file: that caption keeps its raw bytes as lone
surrogates, and :func:`check_caption` turns them back into the strict decoder's error, which
becomes the record's skip reason.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from clip_med.core.bounds import bounded
from clip_med.core.errors import UnknownName
from clip_med.core.names import is_safe_name
from clip_med.data.record import Record, SkipReason
from clip_med.data.sources import SourceConfig
from clip_med.data.text import decode_caption, render_text
from clip_med.labels import taxonomy
from clip_med.labels.caption_rules import labels_for_texts

TASKS = tuple(taxonomy.TASKS)  # the taxonomy's tasks, in its order
IMAGE_EXTENSIONS = [".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif", ".dcm", ".dicom"]
DICOM_EXTENSIONS = (".dcm", ".dicom")
SPLIT_DIR_NAMES = ("train", "training", "dev", "val", "valid", "validation", "test", "testing")


@dataclass
class HoldoutSourceConfig(SourceConfig):
    """A source that may hold a single split: ``holdout`` moves that fraction of its groups
    (papers, patients, images) to ``holdout_split``, by a hash of the group, so the split is
    the same on every run and no group is on both sides."""

    holdout: float = bounded(0.0, minimum=0, below=1)
    holdout_split: str = "dev"
    holdout_seed: int = 0


def holdout_split(group: str, split: str, cfg: HoldoutSourceConfig) -> str:
    if cfg.holdout <= 0:
        return split
    if not 0 < cfg.holdout < 1:
        raise ValueError(f"source.holdout={cfg.holdout}: use a fraction between 0 and 1")
    digest = hashlib.sha256(f"{cfg.holdout_seed}:{group}".encode()).digest()
    return cfg.holdout_split if int.from_bytes(digest[:8], "big") / 2**64 < cfg.holdout else split


def split_records(records: list[Record], cfg: HoldoutSourceConfig,
                  from_split: str = "train") -> dict[str, list[Record]]:
    """Group records by their split (in first-seen order), after the hash-based holdout of the
    records of ``from_split``."""
    splits: dict[str, list[Record]] = {}
    for record in records:
        if not is_safe_name(record.split):  # a split value from the data never becomes a file name
            record.problem, record.problem_detail = SkipReason.BAD_SPLIT_NAME, (
                f"its split {record.split[:80]!r} is not a safe name (ASCII letters, digits, _ - .); "
                "fix the split column")
            record.split = from_split
        if record.split == from_split:
            record.split = holdout_split(str(record.meta.get("case_id") or record.id), record.split, cfg)
        splits.setdefault(record.split, []).append(record)
    return splits


def check_caption(raw: Any) -> tuple[str, str | None, str]:
    """``(clean caption, problem, detail)`` for a caption read with ``surrogateescape``."""
    if raw is None:
        return "", SkipReason.EMPTY_CAPTION, "no caption"
    text = str(raw)
    try:
        data = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:
        return "", SkipReason.CAPTION_NOT_UTF8, f"the caption has an unpaired surrogate at character {exc.start}"
    if len(text) > MAX_CAPTION_CHARS:
        return "", SkipReason.CAPTION_TOO_LONG, (f"the caption has {len(text)} characters, more than the "
                                                 f"{MAX_CAPTION_CHARS} allowed: shorten it")
    caption, problem = decode_caption(data)
    if problem:
        reason, _, detail = problem.partition(": ")
        return "", reason, f"invalid UTF-8 in the caption ({detail}); re-save the captions as UTF-8"
    if not caption:
        return "", SkipReason.EMPTY_CAPTION, "the caption is empty: add one, or drop the row"
    return caption, None, ""


def metadata_labels(values: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """Labels from metadata strings (through the taxonomy aliases) and their origin."""
    labels, origin = {}, {}
    for task in TASKS:
        label = taxonomy.normalize(task, values.get(task))
        if label != taxonomy.UNKNOWN:
            labels[task], origin[task] = label, "metadata"
    return labels, origin


def validated_labels(values: dict[str, str], where: str) -> dict[str, str]:
    """Fixed labels from a config: each must be a label id (or alias) of a taxonomy task."""
    labels = {}
    for task, value in values.items():
        label = taxonomy.normalize(task, value)
        if label == taxonomy.UNKNOWN:
            ids = ", ".join(taxonomy.get_task(task).ids)
            raise ValueError(f"{where}: {task}={value!r} is not a {task} label; use one of {ids}")
        labels[task] = label
    return labels


@dataclass
class PairInput:
    """What a reader knows about one pair before the shared record logic runs."""

    id: str
    split: str
    image: str
    caption: Any  # str (possibly with surrogate escapes) or None
    meta: dict[str, Any]
    labels: dict[str, str] | None = None
    label_origin: dict[str, str] | None = None
    decoder: str = "pil"
    problem: str | None = None
    problem_detail: str = ""
    caption_required: bool = True


def build_records(pairs: list[PairInput], template: str, label_texts: list[str] | None = None) -> list[Record]:
    """The shared record logic: caption check, metadata labels then the caption rules (computed
    in bulk, in parallel for large sources), training text from ``template``."""
    checked = [check_caption(pair.caption) for pair in pairs]
    texts = label_texts if label_texts is not None else [caption for caption, _, _ in checked]
    needs_rules = [index for index, pair in enumerate(pairs)
                   if any((pair.labels or {}).get(task, taxonomy.UNKNOWN) == taxonomy.UNKNOWN for task in TASKS)]
    derived = dict(zip(needs_rules, labels_for_texts([texts[index] for index in needs_rules])))
    return [_record(pair, *checked[index], derived.get(index, {}), template) for index, pair in enumerate(pairs)]


def build_record(pair: PairInput, template: str, label_text: str | None = None) -> Record:
    return build_records([pair], template, None if label_text is None else [label_text])[0]


def _record(pair: PairInput, caption: str, problem: str | None, detail: str, derived: dict[str, str],
            template: str) -> Record:
    if not pair.caption_required and problem == SkipReason.EMPTY_CAPTION:
        problem, detail = None, ""
    labels, origin = dict(pair.labels or {}), dict(pair.label_origin or {})
    for task in TASKS:
        if labels.get(task, taxonomy.UNKNOWN) != taxonomy.UNKNOWN:
            origin.setdefault(task, "metadata")
        else:
            labels[task] = derived.get(task, taxonomy.UNKNOWN)
            origin[task] = "caption" if labels[task] != taxonomy.UNKNOWN else origin.get(task, "none")
    fields = {"modality": taxonomy.display_name("modality", labels["modality"]),
              "anatomy": taxonomy.display_name("anatomy", labels["anatomy"]),
              **{key: value for key, value in pair.meta.items() if isinstance(value, str | int | float)},
              "caption": caption}
    if pair.problem:  # the reader already knows the pair is unusable (missing image, not DICOM, ...)
        problem, detail = pair.problem, pair.problem_detail
    text = render_text(template, fields) if problem is None else ""
    if problem is None and not text:
        problem, detail = SkipReason.EMPTY_CAPTION, f"the text template {template!r} gives an empty text"
    return Record(id=pair.id, split=pair.split, image=pair.image, caption=caption, text=text, labels=labels,
                  meta=pair.meta, decoder=pair.decoder, problem=problem, problem_detail=detail,
                  label_origin=origin)


def decoder_for(path: str, decoder: str = "auto") -> str:
    if decoder != "auto":
        return decoder
    return "dicom" if path.lower().endswith(DICOM_EXTENSIONS) else "pil"


# ---------------------------------------------------------------------------------------------
# Files


def table_format(path: Path, fmt: Optional[str]) -> str:
    if fmt:
        return fmt
    suffix = path.suffix.lower().lstrip(".")
    if suffix in ("csv", "tsv", "jsonl", "json"):
        return suffix
    if suffix == "txt":
        return "tsv"
    raise ValueError(f"cannot tell the format of {path} from its extension: set source.format to csv, tsv, "
                     "jsonl or json")


# The csv module's field limit is process-wide; it is raised once (never lowered or toggled) so that
# a long report is read and then judged by MAX_CAPTION_CHARS, with its row named, instead of
# stopping the whole file. A field beyond even this limit makes its row a bad row.
CSV_FIELD_LIMIT = 16 * 1024 * 1024
MAX_CAPTION_CHARS = 65_536
if csv.field_size_limit() < CSV_FIELD_LIMIT:
    csv.field_size_limit(CSV_FIELD_LIMIT)


@dataclass
class BadRow:
    """A table row that could not be read; it becomes a skipped record naming its line."""

    problem: str


def read_table(path: str | Path, fmt: Optional[str] = None) -> Iterator[tuple[int, dict[str, Any] | BadRow]]:
    """Rows of a CSV/TSV (with a header line), JSONL or JSON (a list of objects) file, with
    their line (or item) numbers.

    A row that cannot be read (a CSV field over :data:`CSV_FIELD_LIMIT`, a JSONL line that is
    not a JSON object) is yielded as a :class:`BadRow` with its line number and the rest of
    the file is read on. A UTF-8 byte-order mark (Excel's "CSV UTF-8") is dropped; line endings
    may be mixed; bytes that are not UTF-8 are kept as surrogate escapes for
    :func:`check_caption` to report per row.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"table file {path} does not exist")
    fmt = table_format(path, fmt)
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
        if fmt in ("csv", "tsv"):
            yield from _csv_rows(handle, "," if fmt == "csv" else "\t")
        elif fmt == "jsonl":
            yield from _jsonl_rows(handle)
        elif fmt == "json":
            data = json.load(handle)
            if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
                raise ValueError(f"{path} must hold a JSON list of objects (one per image)")
            yield from enumerate(data, 1)
        else:
            raise ValueError(f"unknown table format {fmt!r}: use csv, tsv, jsonl or json")


def _csv_rows(handle, delimiter: str) -> Iterator[tuple[int, dict[str, Any] | BadRow]]:
    reader = csv.DictReader(handle, delimiter=delimiter)
    while True:
        line = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield line, BadRow(f"the row cannot be read as CSV ({exc})")
            continue
        yield reader.line_num, row


def _jsonl_rows(handle) -> Iterator[tuple[int, dict[str, Any] | BadRow]]:
    for line_number, line in enumerate(handle, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            yield line_number, BadRow(f"the line is not valid JSON ({exc}); fix or delete it")
            continue
        if not isinstance(row, dict):
            yield line_number, BadRow(f"the line holds a JSON {type(row).__name__}, not an object")
            continue
        yield line_number, row


def bad_row_pair(bad: BadRow, line: int, table: Path, split: str) -> PairInput:
    """A skipped record standing for an unreadable row (so that written + skipped = input holds)."""
    return PairInput(id=f"{table.stem}_line{line}", split=split, image="", caption=None, meta={"line": line},
                     problem=SkipReason.BAD_ROW, problem_detail=f"{table}:{line}: {bad.problem}")


def path_problem(image: str, where: str) -> tuple[str, str] | None:
    """Why an image path from a table cannot be used as one (a NUL byte, a control character)."""
    if any(ord(char) < 32 for char in image):
        return SkipReason.BAD_ROW, f"{where}: the image path holds a NUL or control character; fix the row"
    return None


def require_columns(row: dict[str, Any], columns: list[str], path: str | Path) -> None:
    missing = [column for column in columns if column not in row]
    if missing:
        raise UnknownName(f"{path} has no column(s) {missing}; it has {sorted(row)}. "
                       "Set source.image_column / source.caption_column (etc.) to the right names.")


def list_files(root: Path, extensions: list[str], recursive: bool = True,
               extensionless: bool = False) -> list[Path]:
    """Files under ``root`` with one of ``extensions`` (case-insensitive), in sorted order;
    hidden files and folders are skipped."""
    wanted = {ext.lower() for ext in extensions}
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(name for name in dirs if not name.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            suffix = os.path.splitext(name)[1].lower()
            if suffix in wanted or (extensionless and not suffix):
                found.append(Path(folder) / name)
        if not recursive:
            break
    return found


def split_dirs(root: Path) -> list[str]:
    """Sub-folders of ``root`` named like splits (train, val, test, ...), if any."""
    return sorted(path.name for path in root.iterdir() if path.is_dir() and path.name.lower() in SPLIT_DIR_NAMES)


def records_by_split_folder(root: Path, read_folder, cfg: HoldoutSourceConfig,
                            nothing_found: str) -> dict[str, list[Record]]:
    """``read_folder(folder, split)`` per split sub-folder; without any, the whole root as ``train``
    (held out by ``cfg.holdout``). ``nothing_found`` is the error when the root holds no record."""
    splits = split_dirs(root)
    if splits:
        return {split: read_folder(root / split, split) for split in splits}
    records = read_folder(root, "train")
    if not records:
        raise FileNotFoundError(nothing_found)
    return split_records(records, cfg)


def relative_id(path: Path, root: Path) -> str:
    """A record id from a file path: relative to ``root``, without the extension."""
    return str(path.relative_to(root).with_suffix("")).replace(os.sep, "/")


def check_root(root: Optional[str], what: str, help_text: str) -> Path:
    if not root:
        raise FileNotFoundError(f"no {what} root is set: pass source.root=/path/to/it. {help_text}")
    path = Path(root).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{what} root {path} does not exist. {help_text}")
    return path
