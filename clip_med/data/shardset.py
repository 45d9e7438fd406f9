"""A written data set: its shards (local or remote) and their per-split manifests.

Shards can be read from anywhere webdataset's ``gopen`` reads: local paths, ``http(s)://`` URLs
(through curl) and ``pipe:`` commands (``pipe:aws s3 cp s3://bucket/roco/train-000000.tar -``),
so object stores work through their command-line tools. What a run needs besides the shard
URLs is the number of samples in each shard (to plan epochs and resume exactly); that comes
from the ``<split>.manifest.json`` the shard command writes next to the shards, fetched with the
same ``gopen``. A shard list is given as any of::

    shards/roco/train-{000000..000031}.tar                  brace pattern (local)
    https://host/roco/train-{000000..000031}.tar             brace pattern (remote)
    https://host/roco/train.manifest.json                    the manifest: every shard it lists
    pipe:aws s3 cp s3://bucket/roco/train-{000000..000031}.tar -
    pipe:aws s3 cp s3://bucket/roco/train.manifest.json -

In each, the manifest is found by replacing the shard name ``<split>-NNNNNN.tar`` (or the brace
range) with ``<split>.manifest.json``; the shard URLs of a manifest spec are found the other way.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, cast

from clip_med.core.errors import UnknownName
from clip_med.data.manifest import MANIFEST_SUFFIX, Manifest, load_manifest, parse_manifest
from clip_med.data.pipeline import is_local
from clip_med.data.sources import SourceConfig, read_source
from clip_med.data.sources.synthetic import SyntheticSourceConfig
from clip_med.data.writer import ShardConfig, write_shards

log = logging.getLogger(__name__)

_NAME_START = r"(?:^|(?<=[/\s:=]))"
_SHARD_NAME = re.compile(_NAME_START + r"(?P<split>[^/\s{}]+?)-(?:\d{6}|\{\d{6}\.\.\d{6}\})\.tar")
_MANIFEST_NAME = re.compile(_NAME_START + r"(?P<split>[^/\s{}]+?)" + re.escape(MANIFEST_SUFFIX))


@dataclass
class ShardSet:
    out_dir: Optional[Path]
    manifests: dict[str, Manifest]
    # Per split, the shard URLs when they are not <out_dir>/<shard name> (remote or pattern lists).
    shard_urls: dict[str, list[str]] = field(default_factory=dict)

    @property
    def splits(self) -> list[str]:
        return list(self.manifests)

    @property
    def source(self) -> str:
        """The source the shards were written from (as their manifests say)."""
        return next(iter(self.manifests.values())).source if self.manifests else "?"

    def manifest(self, split: str) -> Manifest:
        try:
            return self.manifests[split]
        except KeyError:
            raise UnknownName(f"no split {split!r} in {self.out_dir or 'this shard set'}; "
                           f"it has {sorted(self.manifests)}") from None

    def urls(self, split: str) -> list[str]:
        manifest = self.manifest(split)
        if split in self.shard_urls:
            return list(self.shard_urls[split])
        # A shard set without a folder is built from shard lists, with shard_urls for every split.
        assert self.out_dir is not None
        return [str(self.out_dir / shard.name) for shard in manifest.shards]

    def shard_counts(self, split: str) -> dict[str, int]:
        counts = {shard.name: shard.count for shard in self.manifest(split).shards}
        return {url: counts[shard_name(url)] for url in self.urls(split)}

    def held_out_split(self, train_split: str, requested: str | None) -> str:
        if requested:
            self.manifest(requested)
            return requested
        others: list[str] = [split for split in ("dev", "validation", "val", "valid", "test")
                             if split in self.manifests]
        others += [split for split in self.manifests if split != train_split and split not in others]
        others = [split for split in others if split != train_split]
        if not others:
            raise ValueError(f"{self.out_dir or 'the shard set'} has only the {train_split!r} split: there is nothing "
                             "to evaluate on (give data.eval_shards, or a source with a held-out split)")
        return others[0]


def prepare_shards(source: SourceConfig, shards: ShardConfig) -> ShardSet:
    """Read a source and write (or reuse) its shards; returns the shard set."""
    out_dir = shards.out_dir(source.name)
    records = read_source(source)
    manifests = write_shards(records, out_dir, shards, source.name)
    return ShardSet(out_dir, manifests)


@dataclass
class ShardCommandConfig:
    """``python -m clip_med.shard source=<name> source.root=<path> out=shards/<name>``."""

    # A SourceConfig subclass, chosen by the `source` config group (default: the synthetic set).
    source: Any = field(default_factory=SyntheticSourceConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    # Output folder (the same as shards.out); None: <shards.root>/<source name>.
    out: Optional[str] = None


def shard_source(cfg: ShardCommandConfig) -> ShardSet:
    """The shard command as a function: read ``cfg.source``, write or reuse its shards."""
    if cfg.source is None:
        raise ValueError("no source given: python -m clip_med.shard source=<name> source.root=<path> "
                         "(see conf/source/)")
    shards = dataclasses.replace(cfg.shards, out=cfg.out) if cfg.out else cfg.shards
    return prepare_shards(cfg.source, shards)


def describe(shard_set: ShardSet) -> str:
    """A plain-text table per split: input, written, skipped by reason, label coverage."""
    lines = []
    for split, manifest in shard_set.manifests.items():
        skipped = manifest.skipped_by_reason()
        lines.append(f"{split}: {manifest.written_count} of {manifest.input_count} written in "
                     f"{len(manifest.shards)} shard(s) to {shard_set.out_dir or 'remote'}")
        for reason, count in skipped.items():
            lines.append(f"  skipped {count:>8}  {reason}")
        for task, coverage in manifest.label_coverage().items():
            origins = ", ".join(f"{origin} {count}" for origin, count in manifest.label_origins.get(task, {}).items())
            lines.append(f"  {task:<10} labelled {coverage:.1%}" + (f" ({origins})" if origins else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Opening shards written elsewhere


def shard_name(url: str) -> str:
    """The ``<split>-NNNNNN.tar`` name inside a shard URL (path, http URL or pipe command)."""
    matches = list(_SHARD_NAME.finditer(url))
    if not matches:
        raise ValueError(f"{url!r} does not name a shard (<split>-NNNNNN.tar, as the shard command writes them)")
    return matches[-1].group(0)


def _is_local_dir(location: str | Path) -> bool:
    text = str(location)
    return is_local(text) and Path(text).is_dir()


def fetch_manifest(url: str) -> Manifest:
    """Read a manifest through webdataset's gopen (local path, http(s) URL, pipe: command)."""
    from webdataset import gopen

    try:
        with gopen(url, "rb") as stream:
            data = stream.read()
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(
            f"cannot read the manifest {url} ({exc}). A shard list needs the <split>.manifest.json written with its "
            "shards, in the same place: copy it there along with the .tar files (python -m clip_med.shard writes "
            "both)") from None
    return parse_manifest(data, url)  # ManifestError (a ValueError) naming the URL when it is not a manifest


@dataclass
class ShardList:
    split: str
    manifest: Manifest
    urls: list[str]


def resolve_shard_list(spec: str) -> ShardList:
    """A shard list spec (see the module docstring) -> its manifest and shard URLs."""
    from webdataset.shardlists import expand_urls

    spec = spec.strip()
    manifest_match = list(_MANIFEST_NAME.finditer(spec))
    if manifest_match:
        match = manifest_match[-1]
        manifest = fetch_manifest(spec)
        urls = [spec[: match.start()] + shard.name + spec[match.end():] for shard in manifest.shards]
        return ShardList(manifest.split, manifest, urls)
    shard_match = list(_SHARD_NAME.finditer(spec))
    if not shard_match:
        raise ValueError(f"{spec!r} names neither shards (<split>-NNNNNN.tar, a brace range like "
                         "train-{000000..000031}.tar) nor a <split>.manifest.json")
    match = shard_match[-1]
    manifest_url = spec[: match.start()] + match.group("split") + MANIFEST_SUFFIX + spec[match.end():]
    manifest = fetch_manifest(manifest_url)
    listed = {shard.name for shard in manifest.shards}
    urls = expand_urls(spec)
    unknown = [url for url in urls if shard_name(url) not in listed]
    if unknown:
        raise ValueError(f"{unknown[0]} is not in {manifest_url} (which lists {len(listed)} shards: "
                         f"{', '.join(sorted(listed)[:3])}, ...); fix the shard range")
    return ShardList(manifest.split, manifest, urls)


def open_shard_lists(train: str, held_out: Optional[str] = None, train_split: str = "train") -> ShardSet:
    """A shard set from shard list specs: ``train`` (used as ``train_split``) and an optional
    held-out list (keeping its manifest's split name)."""
    lists = {train_split: resolve_shard_list(train)}
    if held_out:
        other = resolve_shard_list(held_out)
        if other.split == train_split:
            raise ValueError(f"the held-out shards {held_out} are the {train_split!r} split: give another split")
        lists[other.split] = other
    for split, shard_list in lists.items():
        counts = {shard.name: shard.count for shard in shard_list.manifest.shards}
        log.info("split %s: %d shards, %d samples, e.g. %s", split, len(shard_list.urls),
                 sum(counts[shard_name(url)] for url in shard_list.urls),
                 shard_list.urls[0] if shard_list.urls else "-")
    return ShardSet(None, {split: item.manifest for split, item in lists.items()},
                    {split: item.urls for split, item in lists.items()})


def open_shard_set(location: str | Path, splits: Optional[list[str]] = None) -> ShardSet:
    """Shards written earlier: a local folder holding ``<split>.manifest.json`` files, or one
    shard list spec (pattern, URL, manifest URL, pipe: command) for a single split."""
    if _is_local_dir(location):
        out_dir = Path(location)
        manifests = {}
        for path in sorted(out_dir.glob(f"*{MANIFEST_SUFFIX}")):
            split = path.name[: -len(MANIFEST_SUFFIX)]
            if splits is None or split in splits:
                # the manifest file was just listed, so load_manifest finds it (None means no file)
                manifests[split] = cast(Manifest, load_manifest(out_dir, split))
        if not manifests:
            raise FileNotFoundError(
                f"no *{MANIFEST_SUFFIX} in {out_dir}: write shards there first (python -m clip_med.shard)"
            )
        return ShardSet(out_dir, manifests)
    text = str(location)
    if is_local(text) and not _SHARD_NAME.search(text) and not _MANIFEST_NAME.search(text):
        raise FileNotFoundError(f"{text} is not a folder of shards, a shard pattern or a manifest URL")
    shard_list = resolve_shard_list(text)
    return ShardSet(None, {shard_list.split: shard_list.manifest}, {shard_list.split: shard_list.urls})
