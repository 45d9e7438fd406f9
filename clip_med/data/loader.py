"""Streaming shards into batches: a webdataset pipeline of small named stages.

Training pipeline, per epoch::

    epoch_shards (shuffled by seed+epoch) -> split_by_node -> split_by_worker
    -> tarfile_to_samples -> seeded_shuffle -> skip_consumed -> decode -> to_sample
    -> batched -> collate (tokenize, tag with worker position and error counts)

Every stage gets the same error handler, which logs the problem (with the shard URL and
sample key) and counts it; batches carry each worker's running counts to the trainer.

Determinism and resume: shard order, the sample shuffle, augmentation and text sampling are
seeded by (seed, epoch, rank, worker, sample key), so an epoch replays identically, and a
resumed run skips, in each worker, exactly the batches it had already delivered.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset
from webdataset.utils import pytorch_worker_info

log = logging.getLogger(__name__)

IMAGE_KEYS = "png;jpg;jpeg;webp;tif;tiff"
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+")


@dataclass
class LoaderConfig:
    batch_size: int = 64
    workers: int = 2
    shuffle_buffer: int = 1000
    # "full" uses the whole training text; "sentences" keeps each sentence with probability
    # sentence_keep_prob (at least one), a text augmentation that also teaches the text tower
    # that short prompts and long reports describe the same image.
    text_sampling: str = "sentences"
    sentence_keep_prob: float = 0.5
    prefetch_factor: int = 4


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Local paths, brace patterns, ``http(s)://`` URLs and ``pipe:`` commands, as webdataset reads them."""
    if isinstance(urls, str):
        urls = [urls]
    expanded = []
    for url in urls:
        expanded.extend(wds.shardlists.expand_urls(url))
    return expanded


def _stable_seed(*parts: Any) -> int:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFFFFFF


# ---------------------------------------------------------------------------------------------
# Error handling


class ErrorCounter:
    """A webdataset handler: log the exception, count it by kind, keep going."""

    def __init__(self, max_logged: int = 20):
        self.counts: Counter = Counter()
        self.max_logged = max_logged

    @staticmethod
    def kind(exn: BaseException) -> str:
        text = f"{type(exn).__name__} {exn}".lower()
        if "tar" in text or "unexpected end" in text or isinstance(exn, EOFError):
            return "bad_shard"
        if "decod" in text or "image" in text or "truncated" in text:
            return "bad_image"
        return "bad_sample"

    def __call__(self, exn: BaseException) -> bool:
        kind = self.kind(exn)
        self.counts[kind] += 1
        if sum(self.counts.values()) <= self.max_logged:
            log.warning("skipping %s: %s: %s", kind, type(exn).__name__, exn)
        return True


# ---------------------------------------------------------------------------------------------
# Epoch planning (identical on every rank: it only uses the manifest's per-shard counts)


def assign_shards(urls: Sequence[str], epoch: int, seed: int, shuffle: bool) -> list[str]:
    urls = list(urls)
    if shuffle:
        random.Random(_stable_seed(seed, "shards", epoch)).shuffle(urls)
    return urls


def worker_shards(urls: Sequence[str], rank: int, world_size: int, worker: int, workers: int) -> list[str]:
    """The same split webdataset's split_by_node then split_by_worker make."""
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
    """Full batches every rank can deliver this epoch: the minimum over ranks."""
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


def epoch_shards(urls: Sequence[str], epoch: int, seed: int, shuffle: bool) -> Callable[[], Iterator[dict]]:
    def source():
        for url in assign_shards(urls, epoch, seed, shuffle):
            yield {"url": url}

    return source


def seeded_shuffle(bufsize: int, seed: int, epoch: int) -> Callable[[Iterator], Iterator]:
    def stage(src):
        rank, _, worker, _ = pytorch_worker_info()
        rng = random.Random(_stable_seed(seed, "samples", epoch, rank, worker))
        return wds.filters.shuffle(bufsize, initial=bufsize, rng=rng)(src)

    return stage


def skip_consumed(batches_done: dict[int, int], batch_size: int) -> Callable[[Iterator], Iterator]:
    """Drop the samples behind batches this worker already delivered (resume)."""

    def stage(src):
        _, _, worker, _ = pytorch_worker_info()
        to_skip = batches_done.get(worker, 0) * batch_size
        for index, sample in enumerate(src):
            if index >= to_skip:
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
    """Seed torch's and Python's global RNGs (torchvision and open_clip transforms use both), then restore them."""
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)


def to_sample(transform: Callable, seed: int, epoch: int, text_sampling: str,
              keep_prob: float) -> Callable[[dict], dict]:
    """Decoded webdataset sample -> {image tensor, text, metadata}, augmentation seeded per sample."""

    def apply(sample: dict) -> dict:
        image_key = next((key for key in IMAGE_KEYS.split(";") if key in sample), None)
        if image_key is None or "txt" not in sample:
            raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no image or no txt")
        sample_seed = _stable_seed(seed, epoch, sample["__key__"])
        with seeded_rngs(sample_seed):
            image = transform(sample[image_key])
        text = sample["txt"]
        if text_sampling == "sentences":
            text = sample_sentences(text, keep_prob, random.Random(sample_seed))
        return {"image": image, "text": text, "json": sample.get("json") or {}, "key": sample["__key__"]}

    return apply


def collate(tokenizer: Callable, counter: ErrorCounter, skipped_batches: dict[int, int]) -> Callable:
    """Stack images, tokenize texts, and tag the batch with where it came from."""
    state = {"index": None}

    def apply(samples: list[dict]) -> dict:
        _, _, worker, _ = pytorch_worker_info()
        if state["index"] is None:
            state["index"] = skipped_batches.get(worker, 0)
        batch = {
            "images": torch.stack([sample["image"] for sample in samples]),
            "texts": tokenizer([sample["text"] for sample in samples]),
            "raw_texts": [sample["text"] for sample in samples],
            "keys": [sample["key"] for sample in samples],
            "meta": [sample["json"] for sample in samples],
            "worker": worker,
            "worker_batch": state["index"],
            "errors": dict(counter.counts),
        }
        state["index"] += 1
        return batch

    return apply


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


def create_train_loader(urls: Sequence[str], transform: Callable, tokenizer: Callable, cfg: LoaderConfig,
                        epoch: int, seed: int, workers: int,
                        batches_done: Optional[dict[int, int]] = None) -> DataLoader:
    batches_done = dict(batches_done or {})

    def build():
        counter = ErrorCounter()
        return wds.DataPipeline(
            epoch_shards(urls, epoch, seed, shuffle=True),
            wds.split_by_node,
            wds.split_by_worker,
            wds.tarfile_to_samples(handler=counter),
            seeded_shuffle(cfg.shuffle_buffer, seed, epoch),
            skip_consumed(batches_done, cfg.batch_size),
            wds.decode("pil", handler=counter),
            wds.map(to_sample(transform, seed, epoch, cfg.text_sampling, cfg.sentence_keep_prob), handler=counter),
            wds.batched(cfg.batch_size, collation_fn=_identity, partial=False),
            wds.map(collate(tokenizer, counter, batches_done), handler=counter),
        )

    return _data_loader(_Pipeline(build), workers, cfg.prefetch_factor)


def create_eval_loader(urls: Sequence[str], transform: Callable, tokenizer: Callable, batch_size: int,
                       workers: int, split_by_node: bool = False) -> DataLoader:
    """Every sample once, in shard order per worker, unaugmented and with its full text."""

    def build():
        counter = ErrorCounter()
        stages = [wds.SimpleShardList(list(urls))]
        if split_by_node:
            stages.append(wds.split_by_node)
        stages += [
            wds.split_by_worker,
            wds.tarfile_to_samples(handler=counter),
            wds.decode("pil", handler=counter),
            wds.map(to_sample(transform, 0, 0, "full", 1.0), handler=counter),
            wds.batched(batch_size, collation_fn=_identity, partial=True),
            wds.map(collate(tokenizer, counter, {}), handler=counter),
        ]
        return wds.DataPipeline(*stages)

    workers = min(workers, len(urls))
    return _data_loader(_Pipeline(build), workers, 2)


def _data_loader(dataset: IterableDataset, workers: int, prefetch_factor: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        prefetch_factor=prefetch_factor if workers > 0 else None,
        persistent_workers=False,
        collate_fn=None,
    )
