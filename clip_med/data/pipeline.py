"""The one way shards are read: small named webdataset stages that every command composes.

Training, evaluation, probing (``clip_med.data.loader``) and extraction
(``clip_med.inference.extract``) all read shards as::

    open_shards (list, split by node and by worker)  [training: its seeded, rank-split shard order]
    -> read_tar (only the members the pipeline uses are read: every one clip_med does not write is
                 skipped unread, counted and logged; broken shards counted once each)
    -> ... (training only: check_shard_lengths, seeded_shuffle, skip_consumed)
    -> decode (images, txt and json only, by clip_med's own handlers)
    -> transform -> batch -> tokenize (the loader's collate function)

Nothing in a shard is ever unpickled. webdataset's default decoders would unpickle ``.pyd``/
``.pkl``/``.pickle`` members and ``torch.load`` ``.pth`` ones, so a shard from elsewhere could
run code; here members of any extension but those the writer produces (``IMAGE_KEYS``, ``txt``,
``json``) are never even read, and decoding itself never consults webdataset's default
handler table (``pre=[]``, ``post=[]``, ``only=`` the same extensions).

Where a shard URL points is decided here too (:func:`is_local`): local paths and brace
patterns, or anything webdataset's ``gopen`` opens (``pipe:`` commands, ``http(s)://`` and other
``scheme:`` URLs), the same for every command.
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any, Optional
from urllib.parse import urlparse

import webdataset as wds
from PIL import Image

from clip_med.core.counting import merge_counts as merge_counts  # re-exported (the loader merges with it)

log = logging.getLogger(__name__)

IMAGE_KEYS = "png;jpg;jpeg;webp;tif;tiff"
IMAGE_EXTENSIONS = tuple(IMAGE_KEYS.split(";"))
# Every member extension the shard writer produces (clip_med.data.writer: the image, txt, json).
SHARD_MEMBERS = frozenset([*IMAGE_EXTENSIONS, "txt", "json"])
FOREIGN_MEMBER = "foreign_member"  # the error kind of a dropped member clip_med does not write


# ---------------------------------------------------------------------------------------------
# Shard URLs


def is_local(url: str) -> bool:
    """Whether ``url`` is a local path (or brace pattern of paths) rather than something webdataset's
    ``gopen`` opens by scheme (``pipe:`` commands, ``http(s)://``, ``gs://``, ``file:`` ...).

    The one place every command decides it (gopen decides by ``urlparse(url).scheme``, too).
    """
    return urlparse(str(url)).scheme == ""


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Local paths, brace patterns, ``http(s)://`` URLs and ``pipe:`` commands, as webdataset reads them."""
    if isinstance(urls, str):
        urls = [urls]
    expanded = []
    for url in urls:
        expanded.extend(wds.shardlists.expand_urls(url))
    return expanded


# ---------------------------------------------------------------------------------------------
# Error handling


class ErrorCounter:
    """A webdataset handler: log the exception, count it by kind, keep going.

    ``kind`` fixes the kind every error of this handler's stage is counted as (a stage that
    reads tars only meets broken shards); without it the kind is guessed from the message.
    """

    def __init__(self, max_logged: int = 20, kind: Optional[str] = None, initial: Optional[dict[str, int]] = None,
                 shard_errors: bool = True):
        self.counts: Counter = Counter(initial or {})
        self.max_logged = max_logged
        self.fixed_kind = kind
        self.shard_errors = shard_errors  # False for stages after the tar reader: never "bad_shard"
        self.logged = 0

    @staticmethod
    def kind(exn: BaseException, shard_errors: bool = True) -> str:
        explicit = getattr(exn, "kind", None)
        if isinstance(explicit, str):
            return explicit
        text = f"{type(exn).__name__} {exn}".lower()
        if shard_errors and ("tar" in text or "unexpected end" in text or isinstance(exn, EOFError)):
            return "bad_shard"
        if "decod" in text or "image" in text or "truncated" in text:
            return "bad_image"
        return "bad_sample"

    def __call__(self, exn: BaseException) -> bool:
        kind = self.fixed_kind or self.kind(exn, self.shard_errors)
        self.counts[kind] += 1
        self.logged += 1
        if self.logged <= self.max_logged:
            log.warning("skipping %s: %s: %s", kind, type(exn).__name__, exn)
        return True


class SampleError(ValueError):
    """A sample that cannot be used (counted as ``kind``)."""

    def __init__(self, message: str, kind: str = "bad_sample"):
        super().__init__(message)
        self.kind = kind


class ShardErrorCounter(ErrorCounter):
    """The handler of the tar-reading stage: counts each broken shard once, however many errors it raises."""

    def __init__(self, max_logged: int = 20):
        super().__init__(max_logged, kind="bad_shard")
        self.current: Optional[str] = None
        self.seen: set[Optional[str]] = set()

    def opening(self, url: str) -> None:
        self.current = url

    def __call__(self, exn: BaseException) -> bool:
        self.report(self.current, f"{type(exn).__name__}: {exn}")
        return True

    def report(self, url: Optional[str], problem: str) -> None:
        if url in self.seen:
            log.debug("more trouble with %s: %s", url, problem)
            return
        self.seen.add(url)
        self.counts[self.fixed_kind] += 1
        self.logged += 1
        if self.logged <= self.max_logged:
            log.warning("skipping bad_shard %s (the rest of it is skipped; its samples read so far are kept): %s",
                        url, problem)


# ---------------------------------------------------------------------------------------------
# Stages


def announce_shards(on_shard: Callable[[str], None]) -> Callable[[Iterator], Iterator]:
    """Tell ``on_shard`` of each shard as it is handed on to be opened."""

    def stage(src):
        for item in src:
            on_shard(item["url"])
            yield item

    return stage


def open_shards(urls: Sequence[str], errors: ShardErrorCounter, split_by_node: bool = False) -> list:
    """The shard list, split by node (optionally) and by loader worker, each shard announced to ``errors``."""
    stages: list = [wds.SimpleShardList(list(urls))]
    if split_by_node:
        stages.append(wds.split_by_node)
    return [*stages, wds.split_by_worker, announce_shards(errors.opening)]


def read_tar(errors: ShardErrorCounter, extensions: Collection[str]) -> Callable[[Iterator], Iterator]:
    """Shards -> raw samples holding only the members named by ``extensions`` (member bytes by extension).

    A broken shard is counted once, its samples read so far kept. Members are chosen by name
    before their bytes are read: one clip_med never writes (``.pyd``, ``.pth``, ``.npy``, ...) is
    skipped unread, counted as ``foreign_member`` on ``errors`` (so a replayed stream counts it
    again rather than twice) and logged the first time its extension is met; one clip_med writes
    but this pipeline does not use (training's ``json``) is skipped quietly.
    """
    return wds.tarfile_to_samples(handler=errors, select_files=member_filter(extensions, errors))


def member_filter(extensions: Collection[str], errors: ShardErrorCounter) -> Callable[[str], bool]:
    """The name predicate of :func:`read_tar`: whether to read a tar member (webdataset's key/extension split)."""
    keep = frozenset(extensions)
    logged: set[str] = set()

    def select(name: str) -> bool:
        _, extension = wds.tariterators.base_plus_ext(name)
        extension = extension.lower() if extension else ""
        if extension in keep:
            return True
        if extension not in SHARD_MEMBERS:
            errors.counts[FOREIGN_MEMBER] += 1
            if extension not in logged:
                logged.add(extension)
                log.warning("skipping the member %s of %s unread (clip_med writes only %s; such members are never "
                            "decoded or unpickled; further ones are counted as %s)", name, errors.current,
                            ", ".join(sorted(SHARD_MEMBERS)), FOREIGN_MEMBER)
        return False

    return select


def decode_image(key: str, data: bytes) -> Optional[Image.Image]:
    """webdataset image handler: the image in its own mode (the transform converts to RGB after cropping,
    which for grayscale scans is a third of the work of converting first, as webdataset's "pil" does)."""
    if key.rsplit(".", 1)[-1].lower() not in IMAGE_EXTENSIONS:
        return None
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def decode_member(key: str, data: bytes) -> Any:
    """The only decoder: images (PIL), ``txt`` (UTF-8) and ``json``; None (not decoded) for anything else."""
    extension = key.rsplit(".", 1)[-1].lower()
    if extension in IMAGE_EXTENSIONS:
        return decode_image(key, data)
    if extension == "txt":
        return data.decode("utf-8")
    if extension == "json":
        return json.loads(data)
    return None


def decode(extensions: Collection[str], errors: ErrorCounter) -> Callable[[Iterator], Iterator]:
    """Decode the members named by ``extensions`` (a subset of :data:`SHARD_MEMBERS`) with :func:`decode_member`
    only: no webdataset default handler (pickle, torch, numpy, msgpack ...) is ever consulted."""
    unknown = set(extensions) - SHARD_MEMBERS
    if unknown:
        raise ValueError(f"clip_med decodes only {sorted(SHARD_MEMBERS)}, not {sorted(unknown)}")
    return wds.decode(decode_member, handler=errors, only=sorted(extensions), pre=[], post=[])


def transform(function: Callable[[dict], Any], errors: ErrorCounter) -> Callable[[Iterator], Iterator]:
    """Decoded sample -> what the loader batches (a sample it raises on is counted and skipped)."""
    return wds.map(function, handler=errors)


def _as_list(samples):
    return samples


def batch(size: int, partial: bool) -> Callable[[Iterator], Iterator]:
    """Lists of ``size`` samples (the last one shorter when ``partial``)."""
    return wds.batched(size, collation_fn=_as_list, partial=partial)


def tokenize(collate: Callable[[Any], dict], errors: ErrorCounter) -> Callable[[Iterator], Iterator]:
    """A batch -> tensors: ``collate`` stacks the images and tokenizes the texts."""
    return wds.map(collate, handler=errors)
