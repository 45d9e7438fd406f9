"""The shard writer: records -> webdataset tar shards, one set per split, plus a manifest.

Qualities (each one tested):

* **deterministic**: records are written in the reader's order; images are prepared in worker
  processes but collected in order, so the shards are byte-identical whatever the worker count;
* **atomic**: a shard is written to a temporary file beside it, flushed to disk and renamed when
  complete (:class:`clip_med.core.io.AtomicFile`); so are the manifest and the journal's rewrites;
* **resumable**: after each shard, a line is appended (and fsynced) to ``.progress/<split>.jsonl``;
  a re-run with the same fingerprint continues after the last journaled shard and deletes any
  shard written after it, so killing the writer at any moment (SIGKILL included) loses nothing
  and duplicates nothing, and the result equals an uninterrupted run;
* **no-op on an unchanged source**: a complete manifest with the same fingerprint, whose shards
  are all present, means there is nothing to do;
* **accounting**: every input record is either written or listed as skipped with its reason,
  and ``written + skipped = input`` holds in every manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from tqdm.auto import tqdm
from webdataset import TarWriter

from clip_med.core.bounds import bounded
from clip_med.core.io import AtomicFile, append_text, temporary_target, write_text_atomic
from clip_med.core.names import check_name
from clip_med.core.processes import spawn_pool
from clip_med.data.images import EncodeOptions, ImageJob, ImageLimits, PreparedImage, run_image_job
from clip_med.data.manifest import (
    Manifest,
    ShardInfo,
    SkippedItem,
    load_manifest,
    manifest_is_current,
    save_manifest,
)
from clip_med.data.record import Record, SkipReason

log = logging.getLogger(__name__)

WRITER_VERSION = 1
PROGRESS_DIR = ".progress"


@dataclass
class ShardConfig:
    """How shards are written (the ``shards`` node of the Hydra config)."""

    # Output folder; None means <root>/<source name>.
    out: Optional[str] = None
    root: str = "shards"
    max_samples: int = bounded(1000, minimum=1)
    max_bytes: int = bounded(256 * 1024 * 1024, minimum=1)
    # Shrink images whose longer side exceeds this (None keeps the original size).
    max_side: Optional[int] = bounded(None, minimum=1)
    # png | jpeg | webp | keep (keep the original bytes when nothing had to change).
    image_format: str = "png"
    jpeg_quality: int = bounded(95, minimum=1, maximum=100)
    min_side: int = bounded(16, minimum=1)
    max_pixels: int = bounded(100_000_000, minimum=1)
    max_file_bytes: int = bounded(512 * 1024 * 1024, minimum=1)
    # Worker processes that decode and encode images; 0 decodes in this process, -1 uses all cores.
    workers: int = bounded(-1, minimum=-1)
    # Seconds between progress lines in the log (for runs without a terminal); 0 turns them off.
    log_every_s: float = bounded(60.0, minimum=0)
    dedup: bool = True
    progress: bool = True

    def out_dir(self, source_name: str) -> Path:
        return Path(self.out) if self.out else Path(self.root) / source_name

    def limits(self) -> ImageLimits:
        return ImageLimits(self.min_side, self.max_pixels, self.max_file_bytes)

    def encode_options(self) -> EncodeOptions:
        return EncodeOptions(self.max_side, self.image_format, self.jpeg_quality)

    def content_options(self) -> dict[str, Any]:
        """The options that change what is written (and therefore the fingerprint)."""
        return {key: value for key, value in asdict(self).items()
                if key not in ("out", "root", "workers", "progress", "log_every_s")}

    def worker_count(self) -> int:
        return (os.cpu_count() or 1) if self.workers < 0 else self.workers


# ---------------------------------------------------------------------------------------------
# Fingerprints


def _file_state(record: Record) -> tuple:
    if record.decoder == "synthetic":
        return ()
    try:
        stat = os.stat(record.input_file or record.image)
    except OSError:
        return ("missing",)
    return (stat.st_size, stat.st_mtime_ns)


def fingerprint(records: list[Record], source_name: str, cfg: ShardConfig) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([WRITER_VERSION, source_name, cfg.content_options()], sort_keys=True).encode())
    for record in records:
        digest.update(repr((record.fingerprint_fields(), _file_state(record))).encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Image preparation (in worker processes, collected in input order)


def _prepared_stream(records: list[Record], start: int, cfg: ShardConfig, pool) -> Iterator[tuple]:
    limits, options = cfg.limits(), cfg.encode_options()
    jobs = (
        ImageJob(index, record.image, record.decoder, limits, options)
        for index, record in enumerate(records[start:], start)
        if record.problem is None
    )
    if pool is None:
        return map(run_image_job, jobs)
    return pool.imap(run_image_job, jobs, chunksize=32)


@contextlib.contextmanager
def worker_pool(workers: int):
    """A process pool (see :mod:`clip_med.core.processes`), or None for in-process work (``workers <= 0``)."""
    if workers <= 0:
        yield None
        return
    with spawn_pool(workers) as pool:
        yield pool


# ---------------------------------------------------------------------------------------------
# Progress journal


class _Journal:
    """Append-only record of completed shards, so an interrupted run can continue."""

    def __init__(self, out_dir: Path, split: str):
        self.path = out_dir / PROGRESS_DIR / f"{split}.jsonl"

    def load(self, fingerprint_: str, out_dir: Path) -> list[dict]:
        if not self.path.is_file():
            return []
        entries = []
        with open(self.path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line cut short by a kill: everything after it is redone
        if not entries or entries[0].get("fingerprint") != fingerprint_:
            return []
        valid = []
        for entry in entries[1:]:
            shard = entry.get("shard")
            if shard and not self._shard_intact(out_dir / shard["name"], shard["bytes"]):
                break
            valid.append(entry)
        return valid

    @staticmethod
    def _shard_intact(path: Path, size: int) -> bool:
        return path.is_file() and path.stat().st_size == size

    def start(self, fingerprint_: str, entries: list[dict]) -> None:
        """Rewrite the journal with the entries still valid (atomically: a kill here keeps the old one)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, "".join(json.dumps(entry) + "\n" for entry in [{"fingerprint": fingerprint_},
                                                                                   *entries]))

    def append(self, entry: dict) -> None:
        append_text(self.path, json.dumps(entry) + "\n")  # fsynced; a line cut short by a kill is ignored by load

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Writing one split


def _sample(record: Record, image: PreparedImage, source_name: str) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "id": record.id,
        "source": source_name,
        "split": record.split,
        "caption": record.caption,
        "labels": record.labels,
        "meta": record.meta,
        "origin": record.origin or record.image,
        "image": {"width": image.width, "height": image.height, "mode": image.mode, "sha256": image.pixel_hash},
    }
    if record.label_origin:
        metadata["label_origin"] = record.label_origin
    return {
        "__key__": record.key,
        image.ext: image.data,
        "txt": record.text.encode("utf-8"),
        "json": json.dumps(metadata, sort_keys=True, ensure_ascii=False).encode("utf-8"),
    }


class _SplitWriter:
    """Holds the state of one split being written: the open shard, skips, hashes, labels."""

    # The input record being added, set by write_split before each record (declared, not set here).
    next_input: int

    def __init__(self, out_dir: Path, split: str, cfg: ShardConfig, journal: _Journal, entries: list[dict]):
        self.out_dir, self.split, self.cfg, self.journal = out_dir, split, cfg, journal
        self.shards = [ShardInfo(**entry["shard"]) for entry in entries if entry.get("shard")]
        self.skipped = [SkippedItem(**item) for entry in entries for item in entry["skipped"]]
        self.labels: dict[str, Counter] = {}
        self.origins: dict[str, Counter] = {}
        for entry in entries:
            self._add_labels(entry["labels"])
            _add_counts(self.origins, entry.get("origins", {}))
        # pixel hash -> key of the sample written with it (the journal keeps both lists in step)
        self.hashes = {digest: key for entry in entries for digest, key in zip(entry["hashes"], entry["keys"])}
        self.keys = {key for entry in entries for key in entry["keys"]}
        self._reset_pending()
        self.writer: TarWriter | None = None
        self.shard_file: AtomicFile | None = None

    def _reset_pending(self) -> None:
        self.pending_skipped: list[SkippedItem] = []
        self.pending_hashes: list[str] = []
        self.pending_keys: list[str] = []
        self.pending_labels: dict[str, Counter] = {}
        self.pending_origins: dict[str, Counter] = {}
        self.count = 0
        self.size = 0

    def _add_labels(self, labels: dict[str, dict[str, int]]) -> None:
        _add_counts(self.labels, labels)

    def shard_name(self, index: int) -> str:
        return f"{self.split}-{index:06d}.tar"

    def skip(self, record: Record, reason: str, detail: str = "") -> None:
        if not reason:
            raise ValueError(f"record {record.id!r} skipped without a reason")
        if record.origin:  # the locator must not be written (a DICOM path naming a patient): its public name
            detail = detail.replace(record.image, record.origin)
        self.pending_skipped.append(SkippedItem(record.id, record.origin or record.image, reason, detail))

    def add(self, record: Record, image: PreparedImage, source_name: str) -> None:
        if record.key in self.keys:
            self.skip(record, SkipReason.DUPLICATE_ID, f"sample key {record.key!r} was already written")
            return
        if self.cfg.dedup and image.pixel_hash[:32] in self.hashes:
            self.skip(record, SkipReason.DUPLICATE_IMAGE,
                      f"same pixels as sample {self.hashes[image.pixel_hash[:32]]!r} (sha256 {image.pixel_hash[:16]})")
            return
        sample = _sample(record, image, source_name)
        sample_bytes = sum(len(value) for key, value in sample.items() if key != "__key__")
        if self.writer and (self.count >= self.cfg.max_samples or self.size + sample_bytes > self.cfg.max_bytes):
            self.close_shard(next_input=None)
        if self.writer is None:
            self.shard_file = AtomicFile(self.out_dir / self.shard_name(len(self.shards)), "wb")
            self.writer = TarWriter(self.shard_file.file, encoder=False, mtime=0)
        self.writer.write(sample)
        self.count += 1
        self.size += sample_bytes
        self.hashes[image.pixel_hash[:32]] = record.key
        self.keys.add(record.key)
        self.pending_hashes.append(image.pixel_hash[:32])
        self.pending_keys.append(record.key)
        for task, label in record.labels.items():
            self.pending_labels.setdefault(task, Counter())[label] += 1
        for task, origin in record.label_origin.items():
            self.pending_origins.setdefault(task, Counter())[origin] += 1

    def close_shard(self, next_input: int | None) -> None:
        """Finish the open shard (if any) and journal it with the skips seen so far."""
        shard = None
        if self.writer is not None:
            self.writer.close()  # the tar end blocks; the file itself is closed by commit
            assert self.shard_file is not None  # opened and cleared together with self.writer
            final = self.shard_file.commit()
            shard = ShardInfo(final.name, self.count, final.stat().st_size)
            self.shards.append(shard)
            self.writer, self.shard_file = None, None
        self.skipped.extend(self.pending_skipped)
        labels = {task: dict(counts) for task, counts in self.pending_labels.items()}
        origins = {task: dict(counts) for task, counts in self.pending_origins.items()}
        self._add_labels(labels)
        _add_counts(self.origins, origins)
        self.journal.append({
            "shard": asdict(shard) if shard else None,
            "next_input": next_input if next_input is not None else self.next_input,
            "skipped": [asdict(item) for item in self.pending_skipped],
            "hashes": self.pending_hashes,
            "keys": self.pending_keys,
            "labels": labels,
            "origins": origins,
        })
        self._reset_pending()

    @contextlib.contextmanager
    def removing_open_shard_on_error(self) -> Iterator[None]:
        """On an exception, drop the half-written shard's temporary (the journal says where to resume)."""
        try:
            yield
        except BaseException:
            if self.writer is not None:
                with contextlib.suppress(OSError, ValueError):  # else tarfile's __del__ writes to the closed file
                    self.writer.close()
            if self.shard_file is not None:
                self.shard_file.abort()
            self.writer, self.shard_file = None, None
            raise


def _add_counts(into: dict[str, Counter], counts: dict[str, dict[str, int]]) -> None:
    for task, values in counts.items():
        into.setdefault(task, Counter()).update(values)


def _remove_stale(out_dir: Path, split: str, keep: int) -> None:
    """Delete shards of this split beyond the first ``keep`` and any half-written ones."""
    pattern = re.compile(rf"{re.escape(split)}-(\d{{6}})\.tar")
    for path in out_dir.iterdir():
        target = temporary_target(path.name)  # a shard's temporary, left by a killed writer
        match = pattern.fullmatch(target or path.name)
        if match and (target is not None or int(match.group(1)) >= keep):
            path.unlink()


def write_split(records: list[Record], split: str, out_dir: str | Path, cfg: ShardConfig,
                source_name: str, pool=None) -> Manifest:
    """Write one split's shards and manifest; see the module docstring for the guarantees."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    digest = fingerprint(records, source_name, cfg)
    existing = load_manifest(out_dir, split)
    journal = _Journal(out_dir, split)
    if existing is not None and manifest_is_current(existing, out_dir, digest):
        log.info("%s/%s is up to date (%d samples): nothing to do", out_dir, split, existing.written_count)
        journal.remove()
        return existing

    entries = journal.load(digest, out_dir)
    start = entries[-1]["next_input"] if entries else 0
    state = _SplitWriter(out_dir, split, cfg, journal, entries)
    _remove_stale(out_dir, split, keep=len(state.shards))
    journal.start(digest, entries)
    if start:
        log.info("resuming %s/%s at record %d of %d (%d shards already complete)",
                 out_dir, split, start, len(records), len(state.shards))

    prepared = _prepared_stream(records, start, cfg, pool)
    with state.removing_open_shard_on_error(), tqdm(total=len(records), initial=start, desc=f"shard {split}",
                                                    unit="img", disable=not cfg.progress, dynamic_ncols=True) as bar:
        progress_log = _ProgressLog(f"{out_dir}/{split}", cfg.log_every_s if cfg.progress else 0, bar)
        for index in range(start, len(records)):
            record = records[index]
            state.next_input = index  # a shard closed while adding this record ends before it
            if record.problem is not None:
                reason, _, detail = record.problem.partition(": ")
                state.skip(record, reason, record.problem_detail or detail)
            else:
                _, image, reason, detail = next(prepared)
                if image is None:
                    state.skip(record, reason, detail)
                else:
                    state.add(record, image, source_name)
            bar.update(1)
            progress_log.maybe_log()
    state.close_shard(next_input=len(records))

    manifest = Manifest(
        split=split,
        source=source_name,
        fingerprint=digest,
        options=cfg.content_options(),
        input_count=len(records),
        shards=state.shards,
        skipped=state.skipped,
        label_counts={task: dict(sorted(counts.items())) for task, counts in state.labels.items()},
        label_origins={task: dict(sorted(counts.items())) for task, counts in state.origins.items()},
        deidentification=next((record.deidentification for record in records if record.deidentification), {}),
    )
    assert manifest.written_count + len(manifest.skipped) == len(records), "writer lost track of a record"
    save_manifest(manifest, out_dir)
    journal.remove()
    _log_summary(out_dir, manifest)
    return manifest


class _ProgressLog:
    """Progress lines with rate and ETA in the log, for runs whose tqdm bar nobody sees."""

    def __init__(self, where: str, every_s: float, bar: tqdm):
        self.where, self.every_s, self.bar = where, every_s, bar
        self.last = time.monotonic()

    def maybe_log(self) -> None:
        if not self.every_s or time.monotonic() - self.last < self.every_s:
            return
        self.last = time.monotonic()
        info = self.bar.format_dict
        done, total, rate = info["n"] - info.get("initial", 0), info["total"], info.get("rate")
        rate = rate or (done / info["elapsed"] if info["elapsed"] else 0.0)
        eta = (total - info["n"]) / rate if rate else float("inf")
        log.info("%s: %d/%d records (%.1f/s, ETA %s)", self.where, info["n"], total, rate,
                 tqdm.format_interval(eta) if eta != float("inf") else "?")


def _log_summary(out_dir: Path, manifest: Manifest) -> None:
    log.info("%s/%s: %d of %d written in %d shards", out_dir, manifest.split, manifest.written_count,
             manifest.input_count, len(manifest.shards))
    for reason, count in manifest.skipped_by_reason().items():
        log.warning("%s/%s: skipped %d (%s); see %s.manifest.json for each item", out_dir, manifest.split,
                    count, reason, manifest.split)


def write_shards(records_by_split: dict[str, list[Record]], out_dir: str | Path, cfg: ShardConfig,
                 source_name: str) -> dict[str, Manifest]:
    for split in records_by_split:  # split names become file names: refuse before writing anything
        check_name(split, f"the split name from source {source_name!r}")
    with worker_pool(cfg.worker_count()) as pool:
        return {
            split: write_split(records, split, out_dir, cfg, source_name, pool)
            for split, records in records_by_split.items()
        }
