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
from clip_med.models import ModelConfig, create_model


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
