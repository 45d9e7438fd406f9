"""The data an evaluation (or a probe) runs on: a source's splits, sharded for it, or shards that exist.

A source (MedPix, the synthetic set, and any other registered reader) is read and sharded with
the *checkpoint's* pixel options (``max_side``, image format, size limits), so the evaluation
sees images prepared exactly as in training. The shards go to their own folder,
``<shards.root>/eval/<source>-<hash of the source and pixel options>``, never over a training
run's shards; a rerun on an unchanged source reuses them (the writer's no-op).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from clip_med.data.shardset import ShardSet, open_shard_set
from clip_med.data.sources import SourceConfig, all_sources, get_source, read_source
from clip_med.data.writer import ShardConfig, write_shards

log = logging.getLogger(__name__)


@dataclass
class ShardsData:
    """``data=shards``: evaluate on shards written earlier (a folder holding ``<split>.manifest.json``)."""

    name: str = "shards"
    dir: Optional[str] = None
    split: Optional[str] = None
    train_split: Optional[str] = "train"


@dataclass
class EvalData:
    shard_set: ShardSet
    split: str
    train_split: str | None  # None when the data has no training split (no linear probe then)
    source: str
    # The source's own class tasks (a benchmark set's, SourceConfig.class_tasks), evaluated beside eval.tasks.
    tasks: list[str] = dataclasses.field(default_factory=list)
    # False when the source's captions are made from its class names (SourceConfig.captions_from_class_names):
    # image-text retrieval on them measures nothing, so it is not reported.
    retrieval: bool = True


def eval_shard_config(shards: ShardConfig, pixel_options: dict[str, Any] | None) -> ShardConfig:
    return dataclasses.replace(shards, **(pixel_options or {}))


def eval_shard_dir(source: SourceConfig, shards: ShardConfig) -> Path:
    if shards.out:
        return Path(shards.out)
    fields = {key: value for key, value in dataclasses.asdict(source).items() if key not in ("split", "train_split",
                                                                                           "splits")}
    digest = hashlib.sha256(json.dumps([fields, shards.content_options()], sort_keys=True, default=str).encode())
    return Path(shards.root) / "eval" / f"{source.name}-{digest.hexdigest()[:10]}"


def _source_only(data: SourceConfig) -> SourceConfig:
    """The data node as its plain source config (the evaluation fields dropped)."""
    config_class = get_source(data.name).config_class
    names = [field.name for field in dataclasses.fields(config_class)]
    return config_class(**{name: getattr(data, name) for name in names})


def _read_splits(source: SourceConfig, wanted: list[str]) -> dict[str, list]:
    """Records of the wanted splits (all default splits when ``wanted`` is empty)."""
    if not wanted:
        return read_source(dataclasses.replace(source, splits=None))
    try:
        return read_source(dataclasses.replace(source, splits=wanted))
    except ValueError as exc:
        if len(wanted) == 1:
            raise
        log.warning("%s: evaluating without the training split (%s)", source.name, exc)
        return read_source(dataclasses.replace(source, splits=wanted[1:]))


def evaluation_split(data: SourceConfig) -> str | None:
    """``data.split``, unless the source has a ``split`` option of its own (then: the default held-out split)."""
    if "split" in {field.name for field in dataclasses.fields(get_source(data.name).config_class)}:
        log.warning("source %s has its own `split` option: the evaluated split is chosen automatically "
                    "(dev, validation, val, then test)", data.name)
        return None
    return getattr(data, "split", None)


def prepare_source(data: SourceConfig, shards: ShardConfig) -> EvalData:
    split, train_split = evaluation_split(data), getattr(data, "train_split", "train")
    source = _source_only(data)
    wanted = [name for name in dict.fromkeys([train_split, split]) if name] if split else []
    records = _read_splits(source, wanted)
    out_dir = eval_shard_dir(source, shards)
    log.info("sharding %s (%s) into %s", source.name, ", ".join(records), out_dir)
    manifests = write_shards(records, out_dir, shards, source.name)
    return dataclasses.replace(_resolve(ShardSet(out_dir, manifests), split, train_split, source.name),
                               tasks=source.class_tasks())


def real_captions(source: str) -> bool:
    """Whether the source ``source`` (a name; an unregistered one counts as captioned) has real captions."""
    spec = all_sources().get(source)
    config_class = spec.config_class if spec is not None else SourceConfig
    return not (issubclass(config_class, SourceConfig) and config_class.captions_from_class_names)


def _resolve(shard_set: ShardSet, split: str | None, train_split: str | None, source: str) -> EvalData:
    if train_split and train_split not in shard_set.splits:
        train_split = None
    chosen = shard_set.held_out_split(train_split or "", split)
    if chosen == train_split:
        log.warning("evaluating on the training split %r itself: no linear probe", chosen)
        train_split = None
    return EvalData(shard_set, chosen, train_split, source, retrieval=real_captions(source))


def open_data(data: Any, shards: ShardConfig) -> EvalData:
    """``data``: a :class:`ShardsData` or a source config (with optional ``split``/``train_split``)."""
    if isinstance(data, ShardsData):
        if not data.dir:
            raise ValueError("data=shards needs data.dir=<folder with the shards and their manifests>")
        shard_set = open_shard_set(data.dir)
        return _resolve(shard_set, data.split, data.train_split, shard_set.source)
    if isinstance(data, SourceConfig):
        return prepare_source(data, shards)
    raise TypeError(f"data must be a source config or ShardsData, got {type(data).__name__}")
