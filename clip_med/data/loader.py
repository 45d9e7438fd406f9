"""Streaming shards into batches: the training and evaluation loaders, composed of the shared
stages of ``clip_med.data.pipeline`` (the one shard-reading pipeline; extraction uses it too).

Training pipeline, per epoch::

    epoch_shards (shuffled by seed+epoch) -> split_shards (by rank, then by loader worker)
    -> read_tar (image and text members only) -> check_shard_lengths -> seeded_shuffle -> skip_consumed
    -> decode -> to_sample -> batch
    -> collate (tokenize, tag with worker position and error counts)

Errors are logged (with the shard URL and sample key) and counted: anything that goes wrong
while reading a tar, or a shard that ends before its manifest count, counts once as
``bad_shard``; a sample that cannot be decoded or has no image or text as ``bad_image`` or
``bad_sample``; a member clip_med does not write (``.pyd``, ``.pth``, ...) as ``foreign_member``
(skipped unread).
Batches carry each worker's running counts to the trainer. Only image and text (and, for
evaluation, json) members are decoded, never unpickled (see ``clip_med.data.pipeline``).

Determinism and resume: shard order, the sample shuffle, augmentation and text sampling are
seeded by (seed, epoch, rank, worker, sample key), so an epoch replays identically. Each batch
says which worker made it and how many raw samples that worker had read (after the shuffle,
before decoding), so a resumed run skips exactly what was consumed, even where some samples
were dropped as undecodable. ``first_worker`` rotates the worker numbering so that the
DataLoader's round-robin order continues with the worker that was next when the run stopped.

For a GPU: :class:`TrainStream` keeps one DataLoader's workers from epoch to epoch (each worker
builds every epoch's pipeline afresh from the epoch number the trainer sets, so the epoch is the
same as with a loader made for it alone); :func:`train_workers` gives each training process its
share of the node's cores; images may cross the loader as uint8 (``LoaderConfig.uint8_images``,
normalised on the device by :class:`clip_med.data.transforms.Normalizer`); and
:func:`check_shared_memory` refuses batches in flight that ``/dev/shm`` cannot hold.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import multiprocessing
import os
import random
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset
from webdataset.utils import pytorch_worker_info

from clip_med.core.bounds import bounded
from clip_med.data import pipeline
from clip_med.data.pipeline import (
    IMAGE_KEYS,
    SHARD_MEMBERS,
    ErrorCounter,
    SampleError,
    ShardErrorCounter,
    merge_counts,
)
from clip_med.data.pipeline import expand_urls as expand_urls  # re-exported

log = logging.getLogger(__name__)

# The members each pipeline keeps and decodes; every other one is dropped undecoded (clip_med.data.pipeline).
EVAL_DECODE = sorted(SHARD_MEMBERS)
TRAIN_DECODE = [*IMAGE_KEYS.split(";"), "txt"]  # training does not use the metadata
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+")
CPU_TRAIN_WORKERS = 2  # LoaderConfig.workers=None on the CPU


@dataclass
class LoaderConfig:
    batch_size: int = bounded(64, minimum=1)
    # Loader processes per training process (None: 2 on the CPU; on a GPU this process's share of the
    # node's cores, LOCAL_WORLD_SIZE processes per node, less one for the training process itself).
    workers: Optional[int] = bounded(None, minimum=0)
    shuffle_buffer: int = bounded(1000, minimum=0)
    # "full" uses the whole training text; "sentences" keeps each sentence with probability
    # sentence_keep_prob (at least one), a text augmentation that also teaches the text tower
    # that short prompts and long reports describe the same image.
    text_sampling: str = "sentences"
    sentence_keep_prob: float = bounded(0.5, minimum=0, maximum=1)
    prefetch_factor: int = bounded(4, minimum=1)
    # Added to the loader worker processes' niceness (Unix): >0 lets the training step win a core both
    # want. Off by default: measured on 2 cores (BENCHMARKS.md), +5 made CPU training 3-4 % slower
    # (+exp=medpix, and train_bench's trainer against open_clip_train) and changed no result.
    worker_niceness: int = bounded(0, minimum=0, maximum=19)
    # Keep the worker processes from one epoch to the next (each epoch still replays exactly).
    persistent_workers: bool = True
    # Images cross the loader as uint8 and are normalised on the training device (a quarter of the bytes
    # through shared memory and to the GPU; the same numbers as normalising in the loader).
    uint8_images: bool = True


@dataclass
class WorkerPosition:
    """Where one loader worker stands in an epoch (what a step-exact resume needs from it)."""

    samples: int = 0  # raw samples read after the shuffle, including any that failed to decode
    batches: int = 0  # batches delivered
    # Per-sample error counts so far; shard-level errors are met again when the stream is replayed.
    sample_errors: dict[str, int] = field(default_factory=dict)


def _stable_seed(*parts: Any) -> int:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFFFFFF


# ---------------------------------------------------------------------------------------------
# Error handling (ErrorCounter, ShardErrorCounter, SampleError: clip_med.data.pipeline)


def check_shard_lengths(expected: Optional[dict[str, int]],
                        errors: ShardErrorCounter) -> Callable[[Iterator], Iterator]:
    """Count a shard that ends early as broken: a tar cut at a member boundary reads without any error."""

    def finish(url: Optional[str], seen: int) -> None:
        if url is not None and expected and seen < expected.get(url, 0):
            errors.report(url, f"it ended after {seen} of the {expected[url]} samples its manifest lists")

    def stage(src):
        url, seen = None, 0
        for sample in src:
            if sample.get("__url__") != url:
                finish(url, seen)
                url, seen = sample.get("__url__"), 0
            seen += 1
            yield sample
        finish(url, seen)

    return stage


# ---------------------------------------------------------------------------------------------
# Epoch planning (identical on every rank: it only uses the manifest's per-shard counts)


def assign_shards(urls: Sequence[str], epoch: int, seed: int, shuffle: bool) -> list[str]:
    urls = list(urls)
    if shuffle:
        random.Random(_stable_seed(seed, "shards", epoch)).shuffle(urls)
    return urls


def worker_shards(urls: Sequence[str], rank: int, world_size: int, worker: int, workers: int) -> list[str]:
    """Shards of one loader worker of one rank: every world_size-th for the rank, then every workers-th."""
    return list(urls)[rank::world_size][worker::workers]


def effective_workers(num_shards: int, world_size: int, workers: int) -> int:
    """Workers per rank, reduced so that every worker of every rank has at least one shard."""
    if num_shards < world_size:
        raise ValueError(
            f"{num_shards} shard(s) cannot be split over {world_size} processes: write smaller shards "
            f"(shards.max_samples) so that there are at least as many shards as processes"
        )
    per_rank = num_shards // world_size
    if max(workers, 1) > per_rank:
        log.warning("only %d shard(s) per process: using %d loader worker(s) instead of %d",
                    per_rank, per_rank, workers)
        return per_rank if workers > 0 else 0
    return workers


def steps_per_epoch(shard_counts: dict[str, int], urls: Sequence[str], epoch: int, seed: int, shuffle: bool,
                    world_size: int, workers: int, batch_size: int) -> int:
    """Full batches every rank can deliver this epoch: the minimum over ranks.

    Each worker drops its last partial batch and a rank with more batches than the others
    stops with them, so per epoch at most ``batch_size - 1`` samples per worker plus the ranks'
    imbalance are left out; shard order changes every epoch, so it is not the same ones.
    """
    order = assign_shards(urls, epoch, seed, shuffle)
    streams = max(workers, 1)
    per_rank = []
    for rank in range(world_size):
        batches = 0
        for worker in range(streams):
            samples = sum(shard_counts[url] for url in worker_shards(order, rank, world_size, worker, streams))
            batches += samples // batch_size
        per_rank.append(batches)
    return min(per_rank)


# ---------------------------------------------------------------------------------------------
# Pipeline stages


def logical_worker(first_worker: int = 0) -> tuple[int, int]:
    """(worker, workers) of the calling loader worker, its number rotated by ``first_worker``."""
    info = torch.utils.data.get_worker_info()
    physical, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return (physical + first_worker) % workers, workers


def epoch_shards(urls: Sequence[str], epoch: int, seed: int, shuffle: bool) -> Callable[[], Iterator[dict]]:
    def source():
        for url in assign_shards(urls, epoch, seed, shuffle):
            yield {"url": url}

    return source


def split_shards(rank: int, world_size: int, first_worker: int = 0,
                 on_shard: Optional[Callable[[str], None]] = None) -> Callable[[Iterator], Iterator]:
    """This rank's and this worker's shards (the split ``worker_shards`` plans with).

    ``on_shard`` hears of each shard as it is handed on to be opened.
    """

    def stage(src):
        worker, workers = logical_worker(first_worker)
        for item in worker_shards(list(src), rank, world_size, worker, workers):
            if on_shard is not None:
                on_shard(item["url"])
            yield item

    return stage


def seeded_shuffle(bufsize: int, seed: int, epoch: int, rank: Optional[int] = None,
                   first_worker: int = 0) -> Callable[[Iterator], Iterator]:
    def stage(src):
        worker, _ = logical_worker(first_worker)
        node = pytorch_worker_info()[0] if rank is None else rank
        rng = random.Random(_stable_seed(seed, "samples", epoch, node, worker))
        return wds.filters.shuffle(bufsize, initial=bufsize, rng=rng)(src)

    return stage


def skip_consumed(positions: dict[int, WorkerPosition], first_worker: int = 0) -> Callable[[Iterator], Iterator]:
    """Number the samples of this worker's stream and drop those a previous run already read."""

    def stage(src):
        worker, _ = logical_worker(first_worker)
        to_skip = positions[worker].samples if worker in positions else 0
        for index, sample in enumerate(src):
            if index >= to_skip:
                sample["__index__"] = index
                yield sample

    return stage


def sample_sentences(text: str, keep_prob: float, rng: random.Random) -> str:
    sentences = [s for s in _SENTENCE_END.split(text) if s.strip()]
    if len(sentences) <= 1:
        return text
    kept = [sentence for sentence in sentences if rng.random() < keep_prob]
    return " ".join(kept) if kept else rng.choice(sentences)


@contextlib.contextmanager
def seeded_rngs(seed: int):
    """Seed torch's CPU and Python's global RNGs (torchvision and open_clip transforms use both).

    In the training process (a loader without workers) their states are restored afterwards, so
    that loading data does not move the training's random stream; a loader worker process has
    no other user of them, and every sample reseeds, so there they are left as they are.
    Only the CPU generator is touched: ``torch.manual_seed`` would also queue a lazy seed for
    every accelerator backend, which costs more than decoding a small image.
    """
    in_worker = torch.utils.data.get_worker_info() is not None
    saved = None if in_worker else (random.getstate(), torch.default_generator.get_state())
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        if saved is not None:
            random.setstate(saved[0])
            torch.default_generator.set_state(saved[1])


def to_sample(transform: Callable, seed: int, epoch: int, text_sampling: str,
              keep_prob: float) -> Callable[[dict], dict]:
    """Decoded webdataset sample -> {image tensor, text, metadata}, augmentation seeded per sample."""

    def apply(sample: dict) -> dict:
        image_key = next((key for key in IMAGE_KEYS.split(";") if key in sample), None)
        if image_key is None or "txt" not in sample:
            raise SampleError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no image or no txt")
        sample_seed = _stable_seed(seed, epoch, sample["__key__"])
        with seeded_rngs(sample_seed):
            image = transform(sample[image_key])
        text = sample["txt"]
        if text_sampling == "sentences":
            text = sample_sentences(text, keep_prob, random.Random(sample_seed))
        meta = sample.get("json")
        return {"image": image, "text": text, "json": meta if isinstance(meta, dict) else {}, "key": sample["__key__"],
                "index": sample.get("__index__", -1)}

    return apply


def collate(tokenizer: Callable, counter: ErrorCounter, skipped: dict[int, Any], first_worker: int = 0,
            stream_counter: Optional[ErrorCounter] = None) -> Callable:
    """Stack images, tokenize texts, and tag the batch with where it came from.

    ``skipped`` maps a worker to the batches it delivered before (an int, or a WorkerPosition).
    """
    state: dict[str, Optional[int]] = {"index": None}

    def apply(samples: list[dict]) -> dict:
        worker, _ = logical_worker(first_worker)
        index = state["index"]
        if index is None:
            done = skipped.get(worker, 0)
            index = state["index"] = done.batches if isinstance(done, WorkerPosition) else done
        stream_counts = dict(stream_counter.counts) if stream_counter is not None else {}
        batch = {
            "images": torch.stack([sample["image"] for sample in samples]),
            "texts": tokenizer([sample["text"] for sample in samples]),
            "raw_texts": [sample["text"] for sample in samples],
            "keys": [sample["key"] for sample in samples],
            "meta": [sample["json"] for sample in samples],
            "worker": worker,
            "worker_batch": index,
            "worker_samples": samples[-1]["index"] + 1,
            "sample_errors": dict(counter.counts),
            "errors": merge_counts(stream_counts, counter.counts),
        }
        state["index"] = index + 1
        return batch

    return apply


def batch_position(batch: dict) -> WorkerPosition:
    """The position of the worker that made ``batch`` once the batch has been consumed."""
    return WorkerPosition(samples=batch["worker_samples"], batches=batch["worker_batch"] + 1,
                          sample_errors=dict(batch["sample_errors"]))


def _identity(samples):
    return samples


# ---------------------------------------------------------------------------------------------
# Loaders


class _Pipeline(IterableDataset):
    """Builds the webdataset pipeline lazily, inside each worker (handlers hold worker state)."""

    def __init__(self, build: Callable[[], wds.DataPipeline]):
        self.build = build

    def __iter__(self):
        return iter(self.build())


def _positions(batch_size: int, batches_done: Optional[dict[int, int]],
               resume: Optional[dict[int, WorkerPosition]]) -> dict[int, WorkerPosition]:
    if resume is not None:
        return dict(resume)
    # Batch counts alone: exact while no sample in the consumed part failed to decode.
    return {worker: WorkerPosition(samples=count * batch_size, batches=count)
            for worker, count in (batches_done or {}).items()}


@dataclass
class _TrainPipeline:
    """Builds one epoch's training pipeline inside a loader worker (picklable for spawn)."""

    urls: Sequence[str]
    transform: Callable
    tokenizer: Callable
    cfg: LoaderConfig
    seed: int
    rank: int
    world_size: int
    shard_counts: Optional[dict[str, int]]

    def __call__(self, epoch: int, positions: dict[int, WorkerPosition], first_worker: int) -> wds.DataPipeline:
        worker, _ = logical_worker(first_worker)
        stream_errors = ShardErrorCounter()
        sample_errors = ErrorCounter(initial=positions[worker].sample_errors if worker in positions else None,
                                     shard_errors=False)
        cfg, seed = self.cfg, self.seed
        return wds.DataPipeline(
            epoch_shards(self.urls, epoch, seed, shuffle=True),
            split_shards(self.rank, self.world_size, first_worker, stream_errors.opening),
            pipeline.read_tar(stream_errors, TRAIN_DECODE),
            check_shard_lengths(self.shard_counts, stream_errors),
            seeded_shuffle(cfg.shuffle_buffer, seed, epoch, self.rank, first_worker),
            skip_consumed(positions, first_worker),
            pipeline.decode(TRAIN_DECODE, sample_errors),
            pipeline.transform(to_sample(self.transform, seed, epoch, cfg.text_sampling, cfg.sentence_keep_prob),
                               sample_errors),
            pipeline.batch(cfg.batch_size, partial=False),
            pipeline.tokenize(collate(self.tokenizer, sample_errors, positions, first_worker, stream_errors),
                              sample_errors),
        )


def _loader_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    # The loader's own base seed comes from this generator, not from the global RNG, so
    # creating a loader does not change the training process's random state.
    return torch.Generator().manual_seed(_stable_seed(seed, "loader", epoch, rank))


def create_train_loader(urls: Sequence[str], transform: Callable, tokenizer: Callable, cfg: LoaderConfig,
                        epoch: int, seed: int, workers: int,
                        batches_done: Optional[dict[int, int]] = None, *,
                        resume: Optional[dict[int, WorkerPosition]] = None,
                        rank: Optional[int] = None, world_size: Optional[int] = None,
                        first_worker: int = 0, pin_memory: bool = False,
                        shard_counts: Optional[dict[str, int]] = None) -> DataLoader:
    """One epoch of this rank's training batches (:class:`TrainStream` serves a whole run).

    ``rank``/``world_size`` default to torchrun's environment (or the initialised process
    group). A resumed epoch passes ``resume`` (each worker's position) and ``first_worker``
    (the worker whose batch was due next). ``shard_counts`` (the manifest's samples per shard)
    lets a shard that ends early count as broken.
    """
    if rank is None or world_size is None:
        rank, world_size = pytorch_worker_info()[:2]
    positions = _positions(cfg.batch_size, batches_done, resume)
    build = _TrainPipeline(urls, transform, tokenizer, cfg, seed, rank, world_size, shard_counts)
    return _data_loader(_Pipeline(functools.partial(build, epoch, positions, first_worker)), workers,
                        cfg.prefetch_factor, pin_memory, _loader_generator(seed, epoch, rank),
                        worker_niceness=cfg.worker_niceness)


@dataclass
class _EpochSwitch:
    """Builds the pipeline of the epoch the main process last set (``epoch``, a shared integer, read by
    persistent workers when each epoch's iteration starts); the resume position applies to the first epoch."""

    build: _TrainPipeline
    epoch: Any  # multiprocessing.Value("i")
    first_epoch: int
    positions: dict[int, WorkerPosition]
    first_worker: int

    def __call__(self) -> wds.DataPipeline:
        epoch = self.epoch.value
        if epoch == self.first_epoch:
            return self.build(epoch, self.positions, self.first_worker)
        return self.build(epoch, {}, 0)


class TrainStream:
    """This rank's training batches, epoch after epoch, from one DataLoader whose worker processes persist.

    Every epoch is built afresh in the workers from (seed, epoch, rank, worker), so it replays exactly as
    a loader made for that epoch alone would (``persistent=False`` makes one per epoch instead). The run
    starts at ``first_epoch``, continuing it from ``resume`` / ``first_worker`` as ``create_train_loader``
    does. Call :meth:`close` to stop the workers.
    """

    def __init__(self, urls: Sequence[str], transform: Callable, tokenizer: Callable, cfg: LoaderConfig, seed: int,
                 workers: int, *, first_epoch: int, resume: Optional[dict[int, WorkerPosition]] = None,
                 first_worker: int = 0, rank: int = 0, world_size: int = 1, pin_memory: bool = False,
                 shard_counts: Optional[dict[str, int]] = None, persistent: Optional[bool] = None):
        self.build = _TrainPipeline(urls, transform, tokenizer, cfg, seed, rank, world_size, shard_counts)
        self.workers, self.pin_memory, self.first_epoch = workers, pin_memory, first_epoch
        self.positions, self.first_worker = dict(resume or {}), first_worker
        self.persistent = (cfg.persistent_workers if persistent is None else persistent) and workers > 0
        self._epoch = multiprocessing.get_context().Value("i", first_epoch)
        self._loader: Optional[DataLoader] = None

    def epoch(self, epoch: int) -> DataLoader:
        """The batches of ``epoch`` (epochs are asked for in order)."""
        resumed = epoch == self.first_epoch
        positions, first_worker = (self.positions, self.first_worker) if resumed else ({}, 0)
        cfg, seed, rank = self.build.cfg, self.build.seed, self.build.rank
        if not self.persistent:
            return _data_loader(_Pipeline(functools.partial(self.build, epoch, positions, first_worker)),
                                self.workers, cfg.prefetch_factor, self.pin_memory,
                                _loader_generator(seed, epoch, rank), worker_niceness=cfg.worker_niceness)
        self._epoch.value = epoch
        if self._loader is None:
            switch = _EpochSwitch(self.build, self._epoch, self.first_epoch, self.positions, self.first_worker)
            self._loader = _data_loader(_Pipeline(switch), self.workers, cfg.prefetch_factor, self.pin_memory,
                                        _loader_generator(seed, self.first_epoch, rank),
                                        worker_niceness=cfg.worker_niceness, persistent=True)
        return self._loader

    @property
    def starts_workers(self) -> bool:
        """Whether the next :meth:`epoch` forks new worker processes."""
        return self.workers > 0 and (not self.persistent or self._loader is None)

    def close(self) -> None:
        self._loader = None  # the last reference: its iterator shuts the workers down


def train_workers(requested: Optional[int], device: torch.device) -> int:
    """Loader workers per training process: ``requested``, or automatically 2 on the CPU and, on a GPU,
    this process's share of the node's cores (``LOCAL_WORLD_SIZE`` processes) less one for itself."""
    if requested is not None:
        return requested
    if device.type != "cuda":
        return CPU_TRAIN_WORKERS
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, cores // local_processes - 1)


def batch_bytes(batch_size: int, image_size: int | Sequence[int], uint8_images: bool,
                context_length: int = 77) -> int:
    """About the bytes of one training batch in shared memory: the images and the token ids."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)[:2]
    return batch_size * (3 * height * width * (1 if uint8_images else 4) + context_length * 8)


def check_shared_memory(workers: int, prefetch_factor: int, per_batch: int, folder: str = "/dev/shm") -> None:
    """Refuse to start loader workers whose batches in flight do not fit in ``folder`` (where worker processes
    hand tensors over): a container's default 64 MB would otherwise end the run with a bus error."""
    if workers <= 0:
        return
    try:
        free = shutil.disk_usage(folder).free
    except OSError:  # no /dev/shm (not Linux): tensors are shared another way
        return
    needed = workers * prefetch_factor * per_batch
    if free < needed:
        raise ValueError(
            f"{folder} has {free / 2**20:.0f} MiB free, but {workers} loader workers x prefetch "
            f"{prefetch_factor} x {per_batch / 2**20:.1f} MiB batches need about {needed / 2**20:.0f} MiB: give "
            f"the container more shared memory (docker run --shm-size={_suggest_gib(needed)}g), or lower "
            "data.loader.workers, data.loader.prefetch_factor or data.loader.batch_size")


def _suggest_gib(needed: int) -> int:
    return max(1, -(-2 * needed // 2**30))  # twice the need, in whole GiB


def create_eval_loader(urls: Sequence[str], transform: Callable, tokenizer: Callable, batch_size: int,
                       workers: int, split_by_node: bool = False) -> DataLoader:
    """Every sample once, in shard order per worker, unaugmented and with its full text."""

    def build():
        stream_errors, sample_errors = ShardErrorCounter(), ErrorCounter(shard_errors=False)
        return wds.DataPipeline(
            *pipeline.open_shards(urls, stream_errors, split_by_node),
            pipeline.read_tar(stream_errors, EVAL_DECODE),
            pipeline.decode(EVAL_DECODE, sample_errors),
            pipeline.transform(to_sample(transform, 0, 0, "full", 1.0), sample_errors),
            pipeline.batch(batch_size, partial=True),
            pipeline.tokenize(collate(tokenizer, sample_errors, {}, stream_counter=stream_errors), sample_errors),
        )

    workers = min(workers, len(urls))
    return _data_loader(_Pipeline(build), workers, 2)


class _LowerPriority:
    """A DataLoader ``worker_init_fn`` raising the worker's niceness (picklable for spawn)."""

    def __init__(self, increment: int):
        self.increment = increment

    def __call__(self, worker_id: int) -> None:
        try:
            os.nice(self.increment)
        except (AttributeError, OSError) as exc:  # no os.nice on Windows; a sandbox may refuse it
            log.debug("loader worker %d keeps its priority: %s", worker_id, exc)


def _data_loader(dataset: IterableDataset, workers: int, prefetch_factor: int, pin_memory: bool = False,
                 generator: Optional[torch.Generator] = None, worker_niceness: int = 0,
                 persistent: bool = False) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        prefetch_factor=prefetch_factor if workers > 0 else None,
        persistent_workers=persistent and workers > 0,
        # Batches are already collated in the workers; the default would walk every batch recursively.
        collate_fn=_identity,
        pin_memory=pin_memory,
        generator=generator,
        worker_init_fn=_LowerPriority(worker_niceness) if workers > 0 and worker_niceness > 0 else None,
    )
