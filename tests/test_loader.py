import os
from pathlib import Path

import pytest
import torch

from clip_med.data.loader import (
    ErrorCounter,
    LoaderConfig,
    create_eval_loader,
    create_train_loader,
    effective_workers,
    expand_urls,
    sample_sentences,
    steps_per_epoch,
)
from clip_med.data.shardset import prepare_shards
from clip_med.data.sources.synthetic import SyntheticSourceConfig
from clip_med.data.transforms import create_transform
from clip_med.data.writer import ShardConfig
from clip_med.modeling.factory import ModelConfig, create_model


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    return prepare_shards(SyntheticSourceConfig(image_size=32, sizes={"train": 100, "dev": 20}),
                          ShardConfig(out=str(out), max_samples=12, workers=0, progress=False))


@pytest.fixture(scope="module")
def bundle():
    return create_model(ModelConfig(name="medclip-tiny", image_size=32))


def _train_loader(shard_set, bundle, epoch=0, workers=0, batch=8, done=None, urls=None):
    transform = create_transform(32, bundle.mean, bundle.std, train=True)
    cfg = LoaderConfig(batch_size=batch, workers=workers, shuffle_buffer=16)
    return create_train_loader(urls or shard_set.urls("train"), transform, bundle.tokenizer, cfg, epoch, 0,
                               workers, done)


def _keys(loader):
    return [key for batch in loader for key in batch["keys"]]


def test_eval_loader_reads_every_sample_once(shard_set, bundle):
    transform = create_transform(32, bundle.mean, bundle.std, train=False)
    loader = create_eval_loader(shard_set.urls("train"), transform, bundle.tokenizer, 16, workers=2)
    batches = list(loader)
    keys = [k for b in batches for k in b["keys"]]
    assert sorted(keys) == sorted(f"synthetic_train_{i:06d}" for i in range(100))
    batch = batches[0]
    assert batch["images"].shape[1:] == (3, 32, 32) and batch["texts"].shape[1] == 32
    assert batch["meta"][0]["labels"]["modality"] in ("ct", "mr", "xray", "ultrasound")


def test_train_epoch_has_planned_length_and_shuffles_per_epoch(shard_set, bundle):
    counts, urls = shard_set.shard_counts("train"), shard_set.urls("train")
    for workers in (0, 2):
        planned = steps_per_epoch(counts, urls, 0, 0, True, 1, workers, 8)
        batches = list(_train_loader(shard_set, bundle, workers=workers))
        assert len(batches) >= planned > 0
        assert all(len(b["keys"]) == 8 for b in batches)
    epoch0, epoch0_again, epoch1 = (_keys(_train_loader(shard_set, bundle, epoch=e)) for e in (0, 0, 1))
    assert epoch0 == epoch0_again
    assert epoch0 != epoch1
    assert len(set(epoch0)) == len(epoch0)


def test_augmentation_is_seeded_per_sample(shard_set, bundle):
    first = next(iter(_train_loader(shard_set, bundle)))
    torch.manual_seed(123)  # the global RNG must not matter
    again = next(iter(_train_loader(shard_set, bundle)))
    assert torch.equal(first["images"], again["images"]) and first["raw_texts"] == again["raw_texts"]


def test_resume_skips_exactly_what_was_consumed(shard_set, bundle):
    full = list(_train_loader(shard_set, bundle, workers=2))
    consumed = full[:3]
    done = {}
    for batch in consumed:
        done[batch["worker"]] = batch["worker_batch"] + 1
    rest = list(_train_loader(shard_set, bundle, workers=2, done=done))
    assert sorted(_keys(consumed) + _keys(rest)) == sorted(_keys(full))
    remaining = {(b["worker"], b["worker_batch"]) for b in full[3:]}
    assert {(b["worker"], b["worker_batch"]) for b in rest} == remaining


def test_truncated_shard_is_skipped_and_counted(shard_set, bundle, tmp_path):
    urls = shard_set.urls("train")
    broken = tmp_path / "broken.tar"
    data = Path(urls[0]).read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    batches = list(_train_loader(shard_set, bundle, urls=[str(broken)] + urls[1:], batch=4))
    errors = batches[-1]["errors"]
    assert sum(errors.values()) >= 1
    keys = _keys(batches)
    assert len(keys) >= (sum(shard_set.shard_counts("train").values()) - 12) // 4 * 4


def test_worker_and_shard_split_rules():
    assert effective_workers(8, 2, 2) == 2
    assert effective_workers(3, 2, 4) == 1
    with pytest.raises(ValueError, match="at least as many shards"):
        effective_workers(1, 2, 1)
    counts = {f"s{i}": 10 for i in range(4)}
    assert steps_per_epoch(counts, list(counts), 0, 0, False, 2, 1, 4) == 5  # 20 samples per rank -> 5 batches


def test_sentence_sampling_keeps_at_least_one_sentence():
    import random

    text = "CT image of the head. A mass. No bleed."
    for seed in range(20):
        sampled = sample_sentences(text, 0.5, random.Random(seed))
        assert sampled and set(sampled.split(". ")) <= {"CT image of the head", "A mass", "No bleed."} | {
            "CT image of the head.", "A mass."}
    assert sample_sentences("one sentence only", 0.0, random.Random(0)) == "one sentence only"


def test_expand_urls_brace_patterns():
    assert expand_urls("shards/train-{000000..000002}.tar") == [
        "shards/train-000000.tar", "shards/train-000001.tar", "shards/train-000002.tar"]


def test_error_counter_classifies():
    counter = ErrorCounter()
    counter(OSError("unexpected end of data in tar"))
    counter(ValueError("cannot decode image"))
    assert counter.counts == {"bad_shard": 1, "bad_image": 1}


# ---------------------------------------------------------------------------------------------
# Positions for a step-exact resume, the rank split, and what decoding refuses


def _rewrite_shard(source: str, target: Path, change) -> Path:
    """Copy a shard member by member, letting ``change(name, data)`` return new bytes (or None to drop)."""
    import io
    import tarfile

    with tarfile.open(source) as src, tarfile.open(target, "w") as dst:
        for member in src:
            data = change(member.name, src.extractfile(member).read())
            if data is not None:
                info = tarfile.TarInfo(member.name)
                info.size = len(data)
                dst.addfile(info, io.BytesIO(data))
    return target


def test_resume_by_sample_position_is_exact_with_undecodable_images(shard_set, bundle, tmp_path):
    from clip_med.data.loader import batch_position

    urls = shard_set.urls("train")
    broken = {"synthetic_train_000003", "synthetic_train_000005"}  # both in the first shard
    first = _rewrite_shard(urls[0], tmp_path / "first.tar",
                           lambda name, data: b"not a png" if name.split(".")[0] in broken and
                           name.endswith(".png") else data)
    urls = [str(first)] + urls[1:]
    full = list(_train_loader(shard_set, bundle, workers=2, urls=urls))
    assert not broken & set(_keys(full))
    consumed = full[:5]
    positions = {}
    for batch in consumed:
        positions[batch["worker"]] = batch_position(batch)
    next_worker = (consumed[-1]["worker"] + 1) % 2
    cfg = LoaderConfig(batch_size=8, workers=2, shuffle_buffer=16)
    transform = create_transform(32, bundle.mean, bundle.std, train=True)
    rest = list(create_train_loader(urls, transform, bundle.tokenizer, cfg, 0, 0, 2, resume=positions,
                                    first_worker=next_worker))
    # The same batches, in the same order, with the same pixels and error counts, as the uninterrupted epoch.
    assert [b["keys"] for b in rest] == [b["keys"] for b in full[5:]]
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(rest, full[5:]))
    assert rest[-1]["errors"] == full[-1]["errors"] or rest[-1]["worker"] != full[-1]["worker"]
    total = lambda batches: {w: b["errors"] for b in batches for w in [b["worker"]]}  # noqa: E731
    assert total(consumed + rest) == total(full) and sum(total(full)[w].get("bad_image", 0) for w in (0, 1)) == 2


def test_rank_split_is_disjoint_and_covers_every_shard(shard_set, bundle):
    from clip_med.data.loader import assign_shards, worker_shards

    cfg = LoaderConfig(batch_size=4, workers=2, shuffle_buffer=16)
    transform = create_transform(32, bundle.mean, bundle.std, train=True)
    urls, counts = shard_set.urls("train"), shard_set.shard_counts("train")  # 100 samples, shards of 12
    order = assign_shards(urls, 1, 0, True)
    streams = [worker_shards(order, rank, 2, worker, 2) for rank in (0, 1) for worker in (0, 1)]
    assert sorted(u for stream in streams for u in stream) == sorted(urls)  # every shard, each once
    per_rank = [_keys(create_train_loader(urls, transform, bundle.tokenizer, cfg, 1, 0, 2, rank=rank,
                                          world_size=2)) for rank in (0, 1)]
    assert not set(per_rank[0]) & set(per_rank[1])
    for rank, keys in enumerate(per_rank):
        samples = sum(counts[u] for stream in streams[2 * rank:2 * rank + 2] for u in stream)
        assert samples - 2 * 3 <= len(keys) <= samples  # each of its 2 workers drops less than one batch
        assert len(set(keys)) == len(keys)


def test_a_broken_shard_counts_once_however_many_errors_it_raises(shard_set, bundle, tmp_path, caplog):
    urls = shard_set.urls("train")
    data = Path(urls[2]).read_bytes()
    broken = tmp_path / "cut.tar"
    broken.write_bytes(data[: len(data) // 2])
    counts = {**shard_set.shard_counts("train"), str(broken): shard_set.shard_counts("train")[urls[2]]}
    cfg = LoaderConfig(batch_size=4, workers=0, shuffle_buffer=16)
    transform = create_transform(32, bundle.mean, bundle.std, train=True)
    batches = list(create_train_loader(urls[:2] + [str(broken)], transform, bundle.tokenizer, cfg, 0, 0, 0,
                                       shard_counts=counts))
    assert batches[-1]["errors"].get("bad_shard") == 1
    assert sum("skipping bad_shard" in r.getMessage() and str(broken) in r.getMessage()
               for r in caplog.records) == 1


def test_a_shard_cut_at_a_member_boundary_counts_as_broken(shard_set, bundle, tmp_path, caplog):
    url = shard_set.urls("train")[0]
    kept = {f"synthetic_train_{i:06d}" for i in range(5)}  # a shard that silently lost its tail
    short = _rewrite_shard(url, tmp_path / "short.tar", lambda name, data: data if name.split(".")[0] in kept
                           else None)
    cfg = LoaderConfig(batch_size=4, workers=0, shuffle_buffer=16)
    transform = create_transform(32, bundle.mean, bundle.std, train=True)
    counts = {str(short): shard_set.shard_counts("train")[url]}
    batches = list(create_train_loader([str(short)], transform, bundle.tokenizer, cfg, 0, 0, 0, shard_counts=counts))
    assert len(batches) == 1 and batches[-1]["errors"] == {"bad_shard": 1}
    assert any("ended after 5 of the 12 samples" in r.getMessage() for r in caplog.records)


def test_pickled_members_in_a_shard_are_never_unpickled(shard_set, bundle, tmp_path):
    import io
    import pickle
    import tarfile

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    payload = pickle.dumps(Exploit())
    shard = _rewrite_shard(shard_set.urls("train")[0], tmp_path / "evil.tar", lambda name, data: data)
    with tarfile.open(shard, "a") as tar:  # members webdataset's default decoder would unpickle
        for suffix in ("pyd", "pickle", "pth"):
            info = tarfile.TarInfo(f"synthetic_train_000000.{suffix}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    transform = create_transform(32, bundle.mean, bundle.std, train=False)
    list(create_eval_loader([str(shard)], transform, bundle.tokenizer, 4, workers=0))
    list(_train_loader(shard_set, bundle, urls=[str(shard)], batch=4))
    assert not (tmp_path / "pwned").exists()


class _NicenessOfWorker(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield torch.tensor(os.nice(0))


@pytest.mark.skipif(not hasattr(os, "nice"), reason="os.nice is Unix-only")
def test_loader_workers_run_at_lower_priority_than_the_trainer():
    from clip_med.data.loader import _data_loader

    base = os.nice(0)
    (seen,) = list(_data_loader(_NicenessOfWorker(), workers=1, prefetch_factor=2, worker_niceness=3))
    assert int(seen) == min(base + 3, 19) and os.nice(0) == base
    (same,) = list(_data_loader(_NicenessOfWorker(), workers=1, prefetch_factor=2, worker_niceness=0))
    assert int(same) == base
