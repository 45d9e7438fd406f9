"""A written data set: the shard folder and its per-split manifests."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from clip_med.data.manifest import MANIFEST_SUFFIX, Manifest, load_manifest
from clip_med.data.sources import SourceConfig, read_source
from clip_med.data.writer import ShardConfig, write_shards

log = logging.getLogger(__name__)


@dataclass
class ShardSet:
    out_dir: Path
    manifests: dict[str, Manifest]

    @property
    def splits(self) -> list[str]:
        return list(self.manifests)

    def manifest(self, split: str) -> Manifest:
        try:
            return self.manifests[split]
        except KeyError:
            raise KeyError(f"no split {split!r} in {self.out_dir}; it has {sorted(self.manifests)}") from None

    def urls(self, split: str) -> list[str]:
        return [str(self.out_dir / shard.name) for shard in self.manifest(split).shards]

    def shard_counts(self, split: str) -> dict[str, int]:
        return {str(self.out_dir / shard.name): shard.count for shard in self.manifest(split).shards}

    def held_out_split(self, train_split: str, requested: str | None) -> str:
        if requested:
            self.manifest(requested)
            return requested
        others = [split for split in ("dev", "validation", "val", "test") if split in self.manifests]
        others += [split for split in self.manifests if split != train_split and split not in others]
        if not others:
            raise ValueError(f"{self.out_dir} has only the {train_split!r} split: there is nothing to evaluate on")
        return others[0]


def prepare_shards(source: SourceConfig, shards: ShardConfig) -> ShardSet:
    """Read a source and write (or reuse) its shards; returns the shard set."""
    out_dir = shards.out_dir(source.name)
    records = read_source(source)
    manifests = write_shards(records, out_dir, shards, source.name)
    return ShardSet(out_dir, manifests)


def open_shard_set(out_dir: str | Path) -> ShardSet:
    out_dir = Path(out_dir)
    manifests = {}
    for path in sorted(out_dir.glob(f"*{MANIFEST_SUFFIX}")):
        split = path.name[: -len(MANIFEST_SUFFIX)]
        manifests[split] = load_manifest(out_dir, split)
    if not manifests:
        raise FileNotFoundError(
            f"no *{MANIFEST_SUFFIX} in {out_dir}: write shards there first (python -m clip_med.shard)"
        )
    return ShardSet(out_dir, manifests)
