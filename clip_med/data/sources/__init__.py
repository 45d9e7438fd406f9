"""Source readers: each turns a data set in its published layout into :class:`Record` lists.

A reader registers itself with :func:`register_source` together with its config dataclass, so
the shard command, the trainer and the Hydra schema registration find it by name (no if/elif
chain). ``read_source(cfg)`` returns ``{split: [Record, ...]}`` in a deterministic order.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Optional, TypeVar, cast

from clip_med.core.bounds import bounded
from clip_med.core.errors import UnknownName
from clip_med.data.record import Record, SkipReason

log = logging.getLogger(__name__)


@dataclass
class SourceConfig:
    """Options every source has. Subclasses add their own (``root``, column names, ...)."""

    name: str = "?"
    # Training text built from the caption and metadata; None means the source's default.
    text_template: Optional[str] = None
    # Which splits to read; None means every split the source has.
    splits: Optional[list[str]] = None
    # Keep only the first N records of each split (quick experiments); None keeps all.
    limit: Optional[int] = bounded(None, minimum=0)
    # Image files outside the source's folder(s) (absolute paths or ../ in a table, symlinks that
    # leave the folder) are skipped as outside_root unless this is true.
    allow_outside_root: bool = False
    # True for a classification set whose captions are made from its class names (MedMNIST, PCam, a
    # class-folder tree): image-text retrieval on such captions measures nothing, so `evaluate` and
    # the benchmark suite do not report it. A class attribute, not an option: it is what the source is.
    captions_from_class_names: ClassVar[bool] = False
    # What a reader of this source's results must know about its splits (the benchmark suite's report shows it).
    split_caveat: ClassVar[str] = ""

    def input_roots(self) -> list[str]:
        """The folders this source's image files must lie in (empty: the source reads no files)."""
        root = getattr(self, "root", None)
        return [str(root)] if root else []

    def class_tasks(self) -> list[str]:
        """The label tasks of this source's own classes (a benchmark set's, named in
        :mod:`clip_med.labels.benchmarks`), evaluated beside the taxonomy's; empty for a source of
        captioned pairs."""
        return []


Reader = Callable[[SourceConfig], "dict[str, list[Record]]"]
# A reader takes its own config subclass; the registry stores it as a plain Reader, since
# read_source checks isinstance(cfg, spec.config_class) before calling it.
ConfigT = TypeVar("ConfigT", bound=SourceConfig)
TypedReader = Callable[[ConfigT], "dict[str, list[Record]]"]


@dataclass(frozen=True)
class SourceSpec:
    name: str
    config_class: type
    read: Reader


SOURCES: dict[str, SourceSpec] = {}
_BUILTIN_MODULES = ("synthetic", "medpix", "roco", "pmc_oa", "generic", "dicom", "clip_benchmark",
                    "medmnist", "pcam", "lc25000", "rsna", "chexpert")


def register_source(
    name: str, config_class: type[ConfigT]
) -> Callable[[TypedReader[ConfigT]], TypedReader[ConfigT]]:
    def decorator(read: TypedReader[ConfigT]) -> TypedReader[ConfigT]:
        SOURCES[name] = SourceSpec(name, config_class, cast(Reader, read))
        return read

    return decorator


def _load_builtin() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(f"{__name__}.{module}")


def get_source(name: str) -> SourceSpec:
    _load_builtin()
    try:
        return SOURCES[name]
    except KeyError:
        raise UnknownName(f"unknown source {name!r}; known sources: {', '.join(sorted(SOURCES))}") from None


def all_sources() -> dict[str, SourceSpec]:
    _load_builtin()
    return dict(SOURCES)


FILE_DECODERS = ("pil", "dicom")  # the decoders whose Record.image is a file path


def _inside(path: str, roots: list[str]) -> bool:
    try:
        real = os.path.realpath(path)  # follows symlinks, removes ../
    except (ValueError, OSError):  # a NUL byte, a name the file system refuses: not a path inside
        return False
    return any(os.path.commonpath([root, real]) == root for root in roots)


def confine_to_roots(splits: dict[str, list[Record]], roots: list[str]) -> int:
    """Mark every file record whose image lies outside ``roots`` (after following symlinks) as
    ``outside_root``; returns how many. The writer then skips and reports them; nothing is read."""
    if not roots:
        return 0
    real_roots = [os.path.realpath(os.path.expanduser(root)) for root in roots]
    marked = 0
    for records in splits.values():
        for record in records:
            if record.decoder in FILE_DECODERS and record.problem is None and record.image \
                    and not _inside(record.image, real_roots):
                record.problem = SkipReason.OUTSIDE_ROOT
                record.problem_detail = (f"{record.image} is outside {', '.join(roots)}; move it inside, or set "
                                         "source.allow_outside_root=true if that is intended")
                marked += 1
    if marked:
        log.warning("%d image path(s) lie outside %s and are skipped as outside_root (see the manifests)",
                    marked, ", ".join(roots))
    return marked


def read_source(cfg: SourceConfig) -> dict[str, list[Record]]:
    spec = get_source(cfg.name)
    if not isinstance(cfg, spec.config_class):
        raise TypeError(f"source {cfg.name!r} needs a {spec.config_class.__name__}, got {type(cfg).__name__}")
    splits = spec.read(cfg)
    if cfg.splits is not None:
        missing = [split for split in cfg.splits if split not in splits]
        if missing:
            raise ValueError(
                f"source {cfg.name!r} has no split(s) {missing}; it has {sorted(splits)}. "
                "Set source.splits to a subset of those, or null for all."
            )
        splits = {split: splits[split] for split in cfg.splits}
    if cfg.limit is not None:
        splits = {split: records[: cfg.limit] for split, records in splits.items()}
    if not cfg.allow_outside_root:
        confine_to_roots(splits, cfg.input_roots())
    for split, records in splits.items():
        log.info("source %s: split %s has %d records", cfg.name, split, len(records))
    return splits
