"""Random access to the images of embedded shards: a sample's image member by its shard and key.

The service's page shows the archive's own pictures, read from the shards the embedding folder
was made from (``metadata.parquet`` names each row's ``shard`` URL and sample ``key``), never from
a copy. A shard is a plain, uncompressed tar, so Python's :mod:`tarfile` gives each member's data
offset; the first request for a shard reads its member headers once (no member data) and keeps
``key -> (extension, offset, size)`` for its image members, in a bounded LRU cache keyed by the
shard's path, size and modification time. A request then costs one ``seek`` + ``read``.

Only the image members clip_med writes are ever read (:data:`clip_med.data.pipeline.IMAGE_EXTENSIONS`,
the same key/extension split as webdataset), and only decoded through the writer's guards
(:func:`clip_med.data.images.open_image_bytes`: member size and pixel count from the header,
before pixels are decoded). Rows are named by their integer position in the index; a shard path
comes from the embedding folder, never from a request.

A shard that is gone, was replaced (its size or modification time differs from what
``parts/<shard>.json`` recorded at embedding time), is not a local file, or no longer holds the
sample is an :class:`ArchiveError` with an HTTP status (404, 410, 501) and a message that says so.
Thumbnails are made on demand with Pillow and kept in a bounded LRU cache (by count and bytes).
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from webdataset.tariterators import base_plus_ext

from clip_med.data.images import ImageLimits, ImageRejected, normalize_mode, open_image_bytes
from clip_med.data.pipeline import IMAGE_EXTENSIONS, is_local

log = logging.getLogger(__name__)

PARTS = "parts"  # the per-shard markers of clip_med.inference.extract (parts/<shard>.json)


class ArchiveError(Exception):
    """An archive image that cannot be served, with the HTTP status that says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Member:
    extension: str
    offset: int
    size: int


def recorded_shard_states(folder: Path | None) -> dict[str, dict[str, Any]]:
    """``url -> {"bytes", "mtime_ns"}`` of each local shard, as recorded when it was embedded."""
    states: dict[str, dict[str, Any]] = {}
    if folder is None or not (folder / PARTS).is_dir():
        return states
    for marker in sorted((folder / PARTS).glob("*.json")):
        try:
            shard = json.loads(marker.read_text(encoding="utf-8")).get("shard") or {}
        except (OSError, ValueError):
            continue
        if isinstance(shard, dict) and isinstance(shard.get("url"), str):
            states[shard["url"]] = shard
    return states


def index_members(path: Path) -> dict[str, Member]:
    """Sample key -> its image member, from the tar's member headers (no member data is read)."""
    members: dict[str, Member] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:  # "r:": uncompressed only; random access needs it
            for info in tar:
                if not info.isfile():
                    continue
                key, extension = base_plus_ext(info.name)
                if key is None or extension is None or extension.lower() not in IMAGE_EXTENSIONS:
                    continue
                members.setdefault(key, Member(extension.lower(), info.offset_data, info.size))
    except (tarfile.TarError, OSError) as exc:
        raise ArchiveError(422, f"shard {path.name} cannot be read as an uncompressed tar ({exc})") from None
    return members


class ShardArchive:
    """Image members of the shards of one embedding folder, by (shard URL, key)."""

    def __init__(self, folder: Path | None = None, info: dict[str, Any] | None = None,
                 limits: ImageLimits | None = None, max_shards: int = 64):
        self.folder, self.info = folder, dict(info or {})
        self.limits = limits or ImageLimits()
        self.max_shards = max(1, int(max_shards))
        self.recorded = recorded_shard_states(folder)
        workdir = self.info.get("workdir")
        self.workdir = Path(workdir) if isinstance(workdir, str) and workdir else None
        self._shards: OrderedDict[str, tuple[tuple[int, int], dict[str, Member]]] = OrderedDict()
        self._lock = threading.Lock()

    def locate(self, url: str) -> tuple[Path, os.stat_result]:
        """The local file of a shard URL from the metadata, checked against what was embedded."""
        if not url:
            raise ArchiveError(404, "this row names no shard: the embedding folder predates shard locations")
        if not is_local(url):
            raise ArchiveError(501, f"shard {url} is not a local file: the page shows images only from local shards "
                                    "(embed local copies to browse them)")
        path = Path(url)
        if not path.is_absolute():
            # relative URLs are relative to where `embed` ran (embed.json's workdir), else to this process
            path = (self.workdir or Path.cwd()) / path
        try:
            stat = path.stat()
        except OSError:
            raise ArchiveError(410, f"shard {url} is no longer where it was embedded from (moved or deleted): "
                                    "re-embed the shards where they now are") from None
        recorded = self.recorded.get(url)
        if recorded and (recorded.get("bytes") != stat.st_size or recorded.get("mtime_ns") != stat.st_mtime_ns):
            raise ArchiveError(410, f"shard {url} has changed since it was embedded (its size or modification time "
                                    "differs): re-embed it so that rows and images agree")
        return path, stat

    def _members(self, path: Path, stat: os.stat_result) -> dict[str, Member]:
        state = (stat.st_size, stat.st_mtime_ns)
        name = str(path)
        with self._lock:
            cached = self._shards.get(name)
            if cached is not None and cached[0] == state:
                self._shards.move_to_end(name)
                return cached[1]
        members = index_members(path)
        with self._lock:
            self._shards[name] = (state, members)
            self._shards.move_to_end(name)
            while len(self._shards) > self.max_shards:
                self._shards.popitem(last=False)
        return members

    def read(self, url: str, key: str) -> tuple[str, bytes]:
        """(extension, encoded bytes) of the image member of sample ``key`` in shard ``url``."""
        path, stat = self.locate(url)
        member = self._members(path, stat).get(key)
        if member is None:
            raise ArchiveError(410, f"shard {url} holds no image for sample {key!r} (rewritten since embedding?)")
        if member.size > self.limits.max_file_bytes:
            raise ArchiveError(413, f"the image of sample {key!r} is {member.size} bytes, over the limit of "
                                    f"{self.limits.max_file_bytes}")
        with open(path, "rb") as handle:
            handle.seek(member.offset)
            data = handle.read(member.size)
        if len(data) != member.size:
            raise ArchiveError(410, f"shard {url} is shorter than when it was indexed (truncated?)")
        return member.extension, data

    def image(self, url: str, key: str) -> Image.Image:
        """The sample's image, decoded with the writer's guards, as 8-bit L or RGB."""
        extension, data = self.read(url, key)
        try:
            return normalize_mode(open_image_bytes(data, self.limits, f"sample {key!r}"))
        except ImageRejected as rejected:
            raise ArchiveError(422, f"the image of sample {key!r} cannot be shown ({rejected})") from None


def encode(image: Image.Image, max_side: int, image_format: str = "JPEG", quality: int = 85) -> bytes:
    """A copy of ``image`` shrunk to fit ``max_side`` (never enlarged), encoded as JPEG, PNG or WebP."""
    if max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    options: dict[str, Any] = {"quality": quality} if image_format in ("JPEG", "WEBP") else {}
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


MEDIA_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}


class BytesCache:
    """A thread-safe LRU of encoded images, bounded by entry count and total bytes."""

    def __init__(self, max_items: int, max_bytes: int):
        self.max_items, self.max_bytes = max(0, int(max_items)), max(0, int(max_bytes))
        self._items: OrderedDict[Any, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get_or_make(self, key: Any, make: Callable[[], bytes]) -> bytes:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return found
            self.misses += 1
        data = make()
        if self.max_items and len(data) <= self.max_bytes:
            with self._lock:
                if key not in self._items:
                    self._items[key] = data
                    self._bytes += len(data)
                while len(self._items) > self.max_items or self._bytes > self.max_bytes:
                    _, dropped = self._items.popitem(last=False)
                    self._bytes -= len(dropped)
        return data

    def __len__(self) -> int:
        return len(self._items)

