"""Streaming shards into embeddings plus a Parquet table, resumably and across processes.

Layout of the output folder::

    embed.json              model, checkpoint, load, fingerprint, shards, counts, errors, status
    parts/<shard>.parquet   one part per shard (the unit of resume), embeddings included
    parts/<shard>.json      written after its part: the shard's size and row count
    metadata.parquet        all rows in shard order: id, key, split, source, caption, text,
                            labels (JSON), one column per task, meta (JSON), origin, shard
    image_embeddings.npy    (N, D) float32, L2-normalised, row i <-> metadata row i
    text_embeddings.npy     the same for the sample texts (when texts are embedded)
    index.faiss, index.json the search index (see clip_med.inference.index)

Loader workers decode and transform (the evaluation transform) while the main process runs the
model. Shards are read by the same stages as training and evaluation (``clip_med.data.pipeline``):
only image, txt and json members are decoded, nothing is unpickled. Batches never straddle two
shards, so a shard's rows are complete when its last batch is in; its part is then written
atomically. A rerun skips every shard whose part is complete and unchanged; under ``torchrun``
the remaining shards are dealt round-robin to the processes and rank 0 joins the parts when all
are done. The result does not depend on the process count.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import webdataset as wds
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from clip_med.core import distributed
from clip_med.core.bounds import bounded
from clip_med.core.counting import merge_counts
from clip_med.core.io import atomic_write
from clip_med.data import pipeline
from clip_med.data.manifest import MANIFEST_SUFFIX, ManifestError, read_manifest, write_json_atomic
from clip_med.data.pipeline import (
    IMAGE_KEYS,
    SHARD_MEMBERS,
    ErrorCounter,
    SampleError,
    ShardErrorCounter,
    expand_urls,
    is_local,
)
from clip_med.inference.index import (
    EMBED_INFO,
    IMAGE_EMBEDDINGS,
    METADATA,
    TEXT_EMBEDDINGS,
    IndexConfig,
    write_index,
)
from clip_med.labels import taxonomy

log = logging.getLogger(__name__)

PARTS = "parts"
TASK_COLUMNS = tuple(taxonomy.TASKS)
TEXT_COLUMNS = ("id", "key", "split", "source", "caption", "text", "labels", *TASK_COLUMNS, "meta", "origin",
                "shard")


class ExtractionError(ValueError):
    """An output folder that cannot be resumed with these settings, or shards that cannot be found."""


@dataclass
class ExtractConfig:
    batch_size: int = bounded(64, minimum=1)
    # Loader processes that read and decode while the model runs. -1: automatic — none on CPU
    # (the model's threads already use every core; decoding beside them slows both), and up to 8
    # on a GPU.
    workers: int = bounded(-1, minimum=-1)
    texts: bool = True  # also embed each sample's text (text_embeddings.npy)
    progress: bool = True
    index: IndexConfig = field(default_factory=IndexConfig)  # built over the image embeddings at the end


# ---------------------------------------------------------------------------------------------
# Shard lists


def resolve_shards(shards: str | Sequence[str]) -> list[str]:
    """Brace patterns, globs, folders (every ``*.tar`` in them), URLs and ``pipe:`` commands.

    What is a local path and what is opened by webdataset's ``gopen`` (a ``pipe:`` command, an
    ``http(s)://`` URL) is decided as for training (:func:`clip_med.data.pipeline.is_local`).
    """
    patterns = [shards] if isinstance(shards, str) else list(shards)
    urls: list[str] = []
    for pattern in patterns:
        if not is_local(pattern):
            urls.extend(expand_urls(pattern))
        elif Path(pattern).is_dir():
            urls.extend(sorted(str(path) for path in Path(pattern).glob("*.tar")))
        else:
            for expanded in expand_urls(pattern):
                matches = sorted(glob(expanded)) if any(ch in expanded for ch in "*?[") else [expanded]
                urls.extend(matches)
    missing = [url for url in urls if is_local(url) and not Path(url).is_file()]
    if missing:
        raise ExtractionError(f"shard(s) not found: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if not urls:
        raise ExtractionError(f"no shards match {shards!r}")
    return list(dict.fromkeys(urls))


def manifest_counts(urls: Sequence[str]) -> dict[str, int]:
    """Samples per shard, from the manifests next to local shards (for the progress bar)."""
    counts: dict[str, int] = {}
    for folder in {str(Path(url).parent) for url in urls if is_local(url)}:
        for path in Path(folder).glob(f"*{MANIFEST_SUFFIX}"):
            try:
                manifest = read_manifest(path)
            except ManifestError as exc:  # only the progress bar needs it: say so and go on without it
                log.warning("%s; its shards are embedded without a known length", exc)
                continue
            for shard in manifest.shards:
                counts[os.path.normpath(Path(folder) / shard.name)] = int(shard.count)
    return {url: counts[os.path.normpath(url)] for url in urls if os.path.normpath(url) in counts}


def part_name(url: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(url.split("::")[0]).name.removesuffix(".tar"))
    return f"{stem}-{hashlib.sha1(url.encode()).hexdigest()[:10]}"


def shard_state(url: str) -> dict[str, Any]:
    if not is_local(url):
        return {"url": url}
    stat = os.stat(url)
    return {"url": url, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def part_done(out_dir: Path, url: str) -> dict[str, Any] | None:
    marker = out_dir / PARTS / f"{part_name(url)}.json"
    if not marker.is_file() or not (out_dir / PARTS / f"{part_name(url)}.parquet").is_file():
        return None
    try:
        done = json.loads(marker.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    return done if done.get("shard") == shard_state(url) else None


# ---------------------------------------------------------------------------------------------
# The loader: batches that never straddle shards


def _to_row(transform: Callable) -> Callable[[dict], dict]:
    def apply(sample: dict) -> dict:
        image_key = next((key for key in IMAGE_KEYS.split(";") if key in sample), None)
        if image_key is None:
            raise SampleError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no image")
        text = sample.get("txt") or ""
        return {"image": transform(sample[image_key]), "text": text, "key": sample["__key__"],
                "url": sample["__url__"], "meta": sample.get("json") or {}}

    return apply


def _shard_batches(batch_size: int) -> Callable:
    """Batch consecutive samples of one shard; ``last`` marks a shard's final batch."""

    def stage(src):
        batch: list[dict] = []
        for sample in src:
            if batch and (sample["url"] != batch[0]["url"] or len(batch) == batch_size):
                yield {"rows": batch, "last": sample["url"] != batch[0]["url"]}
                batch = []
            batch.append(sample)
        if batch:
            yield {"rows": batch, "last": True}

    return stage


def _collate(tokenizer: Callable | None, counter: ErrorCounter,
             stream_counter: ErrorCounter | None = None) -> Callable[[dict], dict]:
    def apply(batch: dict) -> dict:
        rows = batch["rows"]
        texts = [row["text"] for row in rows]
        stream_counts = dict(stream_counter.counts) if stream_counter is not None else {}
        return {"images": torch.stack([row["image"] for row in rows]),
                "tokens": tokenizer(texts) if tokenizer is not None else None,
                "texts": texts, "keys": [row["key"] for row in rows], "meta": [row["meta"] for row in rows],
                "url": rows[0]["url"], "last": batch["last"],
                "errors": merge_counts(stream_counts, counter.counts),
                "worker": worker.id if (worker := torch.utils.data.get_worker_info()) else 0}

    return apply


class _Dataset(torch.utils.data.IterableDataset):
    def __init__(self, urls: list[str], transform: Callable, tokenizer: Callable | None, batch_size: int):
        self.urls, self.transform, self.tokenizer, self.batch_size = urls, transform, tokenizer, batch_size

    def __iter__(self):
        # The stages of training and evaluation (clip_med.data.pipeline); batches kept within one shard.
        stream_errors, sample_errors = ShardErrorCounter(), ErrorCounter(shard_errors=False)
        return iter(wds.DataPipeline(
            *pipeline.open_shards(self.urls, stream_errors),
            pipeline.read_tar(stream_errors, SHARD_MEMBERS),
            pipeline.decode(SHARD_MEMBERS, sample_errors),
            pipeline.transform(_to_row(self.transform), sample_errors),
            _shard_batches(self.batch_size),
            pipeline.tokenize(_collate(self.tokenizer, sample_errors, stream_errors), sample_errors),
        ))


def loader_workers(requested: int, device: torch.device) -> int:
    """Loader processes for extraction: ``requested``, or automatically none on the CPU and, on a GPU,
    this process's share of the cores (``LOCAL_WORLD_SIZE`` processes per node under torchrun), at most 8."""
    if requested >= 0:
        return requested
    if device.type == "cpu":
        return 0
    local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return min(8, max(1, (os.cpu_count() or 2) // local_processes - 1))


def create_loader(urls: list[str], transform: Callable, tokenizer: Callable | None, batch_size: int,
                  workers: int, pin_memory: bool = False) -> DataLoader:
    workers = min(workers, len(urls))
    return DataLoader(_Dataset(urls, transform, tokenizer, batch_size), batch_size=None, num_workers=workers,
                      prefetch_factor=4 if workers else None, pin_memory=pin_memory)


# ---------------------------------------------------------------------------------------------
# Parts


def _rows_table(url: str, keys: list[str], texts: list[str], metas: list[dict], image: np.ndarray,
                text: np.ndarray | None) -> pa.Table:
    columns: dict[str, Any] = {
        "id": [str(meta.get("id", key)) for meta, key in zip(metas, keys)],
        "key": keys,
        "split": [str(meta.get("split", "")) for meta in metas],
        "source": [str(meta.get("source", "")) for meta in metas],
        "caption": [str(meta.get("caption", "")) for meta in metas],
        "text": texts,
        "labels": [json.dumps(meta.get("labels") or {}, sort_keys=True) for meta in metas],
    }
    for task in TASK_COLUMNS:
        columns[task] = [str((meta.get("labels") or {}).get(task, taxonomy.UNKNOWN)) for meta in metas]
    columns["meta"] = [json.dumps(meta.get("meta") or {}, sort_keys=True, ensure_ascii=False) for meta in metas]
    columns["origin"] = [str(meta.get("origin", "")) for meta in metas]
    columns["shard"] = [url] * len(keys)
    dim = image.shape[1]
    columns["image_embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(image.reshape(-1), pa.float32()), dim)
    if text is not None:
        columns["text_embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(text.reshape(-1), pa.float32()), dim)
    return pa.table(columns)


@dataclass
class _ShardBuffer:
    keys: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    metas: list[dict] = field(default_factory=list)
    image: list[np.ndarray] = field(default_factory=list)
    text: list[np.ndarray] = field(default_factory=list)


def write_part(out_dir: Path, url: str, buffer: _ShardBuffer, dim: int, with_text: bool) -> int:
    parts = out_dir / PARTS
    parts.mkdir(parents=True, exist_ok=True)
    image = np.concatenate(buffer.image) if buffer.image else np.zeros((0, dim), np.float32)
    text = (np.concatenate(buffer.text) if buffer.text else np.zeros((0, dim), np.float32)) if with_text else None
    table = _rows_table(url, buffer.keys, buffer.texts, buffer.metas, image, text)
    name = part_name(url)
    with atomic_write(parts / f"{name}.parquet", "path") as tmp:
        pq.write_table(table, tmp)
    write_json_atomic(parts / f"{name}.json", {"shard": shard_state(url), "rows": table.num_rows})
    return table.num_rows


# ---------------------------------------------------------------------------------------------
# One process's share


def embed_shards(model, urls: list[str], out_dir: Path, cfg: ExtractConfig, progress_total: int | None = None,
                 show_progress: bool = True) -> dict[str, int]:
    """Embed ``urls`` into parts under ``out_dir``; returns the read errors by kind."""
    tokenizer = model.tokenizer if cfg.texts else None
    loader = create_loader(urls, model.transform, tokenizer, cfg.batch_size, loader_workers(cfg.workers, model.device),
                           pin_memory=model.device.type == "cuda")
    buffers: dict[str, _ShardBuffer] = {}
    errors_by_worker: dict[int, dict[str, int]] = {}
    bar = tqdm(total=progress_total, desc="embed", unit="img", disable=not (cfg.progress and show_progress),
               dynamic_ncols=True)
    done: set[str] = set()
    for batch in loader:
        buffer = buffers.setdefault(batch["url"], _ShardBuffer())
        buffer.image.append(model.encode_image_tensors(batch["images"]))
        if batch["tokens"] is not None:
            buffer.text.append(model.encode_token_tensors(batch["tokens"]))
        buffer.keys += batch["keys"]
        buffer.texts += batch["texts"]
        buffer.metas += batch["meta"]
        errors_by_worker[batch["worker"]] = batch["errors"]
        bar.update(len(batch["keys"]))
        if batch["last"]:
            write_part(out_dir, batch["url"], buffers.pop(batch["url"]), model.dim, cfg.texts)
            done.add(batch["url"])
    bar.close()
    for url in urls:
        if url not in done:  # every sample unreadable (or an empty shard): record it as done, empty
            log.warning("shard %s gave no readable samples", url)
            write_part(out_dir, url, buffers.pop(url, _ShardBuffer()), model.dim, cfg.texts)
    return merge_counts(*errors_by_worker.values())


# ---------------------------------------------------------------------------------------------
# The whole extraction


def run_settings(model, cfg: ExtractConfig) -> dict[str, Any]:
    """What must match for a rerun to resume into the same folder."""
    return {"model": model.name, "checkpoint": str(model.info.path), "model_fingerprint": model.fingerprint,
            "step": model.info.step, "dim": model.dim, "texts": cfg.texts, "image_size": model.bundle.image_size,
            "load": model.info.reload_args()}  # clip_med.load's arguments for this model (search uses them)


def _check_resumable(out_dir: Path, settings: dict[str, Any]) -> None:
    path = out_dir / EMBED_INFO
    if not path.is_file():
        return
    previous = json.loads(path.read_text(encoding="utf-8"))
    differing = [key for key in ("model_fingerprint", "dim", "texts") if previous.get(key) != settings[key]]
    if differing:
        raise ExtractionError(
            f"{out_dir} holds embeddings made with other settings ({', '.join(differing)} differ; it was made from "
            f"{previous.get('checkpoint')}). Use another out= folder, or delete {out_dir} to start over."
        )


def consolidate(out_dir: Path, urls: Sequence[str], dim: int, with_text: bool) -> int:
    """Join the parts, in shard order, into metadata.parquet and the embedding arrays; returns N."""
    # each output goes through atomic_write: renamed into place at the end, removed on any error
    with contextlib.ExitStack() as outputs:
        return _join_parts(out_dir, urls, dim, with_text,
                           lambda name: outputs.enter_context(atomic_write(out_dir / name, "path")))


def _join_parts(out_dir: Path, urls: Sequence[str], dim: int, with_text: bool, output: Callable[[str], Path]) -> int:
    parts = [out_dir / PARTS / f"{part_name(url)}.parquet" for url in urls]
    total = sum(pq.ParquetFile(path).metadata.num_rows for path in parts)
    if not total:
        raise ExtractionError(f"none of the {len(parts)} shard(s) held a readable sample: nothing was embedded")
    image = np.lib.format.open_memmap(output(IMAGE_EMBEDDINGS), "w+", np.float32, (total, dim))
    text = (np.lib.format.open_memmap(output(TEXT_EMBEDDINGS), "w+", np.float32, (total, dim))
            if with_text else None)
    writer, position = None, 0
    for path in parts:
        table = pq.read_table(path)
        rows = table.num_rows
        if rows:
            image[position:position + rows] = _vectors(table, "image_embedding", dim)
            if text is not None:
                text[position:position + rows] = _vectors(table, "text_embedding", dim)
        metadata = table.select(list(TEXT_COLUMNS))
        writer = writer or pq.ParquetWriter(output(METADATA), metadata.schema)
        writer.write_table(metadata)
        position += rows
    assert writer is not None  # parts is not empty (total > 0), so the loop opened it
    writer.close()
    for array in (image, text):
        if array is not None:
            array.flush()
    return total


def _vectors(table: pa.Table, column: str, dim: int) -> np.ndarray:
    return table.column(column).combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)


def extract(model, shards: str | Sequence[str], out: str | Path, cfg: ExtractConfig | None = None,
            info: distributed.DistInfo | None = None) -> dict[str, Any]:
    """Embed every sample of ``shards`` into ``out`` (see the module docstring); returns embed.json's content."""
    cfg, info = cfg or ExtractConfig(), info or distributed.DistInfo()
    out_dir = Path(out)
    urls = resolve_shards(shards)
    settings = run_settings(model, cfg)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _check_resumable(out_dir, settings)
        write_json_atomic(out_dir / EMBED_INFO, {**settings, "status": "running", "shards": urls})
    # Before the barrier: no rank writes a part until every rank has listed the same pending shards.
    pending = [url for url in urls if part_done(out_dir, url) is None]
    distributed.barrier(info)
    mine = pending[info.rank::info.world_size]
    if len(pending) < len(urls) and info.is_main:
        log.info("resuming: %d of %d shards already embedded", len(urls) - len(pending), len(urls))
    counts = manifest_counts(mine)
    total = sum(counts.get(url, 0) for url in mine) if all(url in counts for url in mine) else None
    errors = embed_shards(model, mine, out_dir, cfg, total, show_progress=info.is_main) if mine else {}
    errors = _gather_errors(errors, info)
    distributed.barrier(info)
    result: dict[str, Any] = {}
    if info.is_main:
        result = _finish(model, out_dir, urls, settings, errors, cfg)
    distributed.barrier(info)
    return result


def _gather_errors(errors: dict[str, int], info: distributed.DistInfo) -> dict[str, int]:
    if not info.distributed:
        return errors
    gathered: list[Any] = [None] * info.world_size
    torch.distributed.all_gather_object(gathered, errors)
    return merge_counts(*gathered)


def _finish(model, out_dir: Path, urls: list[str], settings: dict[str, Any], errors: dict[str, int],
            cfg: ExtractConfig) -> dict[str, Any]:
    total = consolidate(out_dir, urls, model.dim, cfg.texts)
    rows = {url: (part_done(out_dir, url) or {}).get("rows", 0) for url in urls}
    result = {**settings, "status": "complete", "count": total, "shards": urls,
              "empty_shards": [url for url, count in rows.items() if count == 0], "read_errors": errors,
              "rows_per_shard": rows,
              # relative shard URLs in metadata.parquet are relative to this folder (the service reads images there)
              "workdir": os.getcwd()}
    write_json_atomic(out_dir / EMBED_INFO, result)
    log.info("%d embeddings from %d shards in %s%s", total, len(urls), out_dir,
             f" (read errors: {errors})" if errors else "")
    if total:
        write_index(out_dir, cfg.index, cfg.progress)
    return result
