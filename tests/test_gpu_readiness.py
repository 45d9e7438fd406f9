"""What a GPU run needs that a CPU can check: precision by capability, refused DDP combinations, the
non-finite flag kept on the device, background checkpoints, and a loader sized for GPUs (uint8 images
normalised on the device, persistent workers, automatic worker counts, the /dev/shm check)."""

import multiprocessing

import pytest
import torch

from clip_med.core import precision
from clip_med.training.config import TrainerConfig


@pytest.mark.parametrize("capability, expected", [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp16"),
                                                  ((7, 0), "fp16")])
def test_auto_precision_follows_the_gpus_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert precision.resolve_precision("auto", torch.device("cuda", 0)) == expected


def test_precision_on_the_cpu_and_bad_names(caplog):
    cpu = torch.device("cpu")
    assert precision.resolve_precision("auto", cpu) == "fp32"
    assert precision.resolve_precision("bf16", cpu) == "fp32"
    with pytest.raises(ValueError, match="unknown precision"):
        precision.resolve_precision("fp8", cpu)


def test_emulated_bf16_is_allowed_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert precision.resolve_precision("bf16", torch.device("cuda", 0)) == "bf16"
    assert any("emulated" in record.getMessage() for record in caplog.records)


def test_static_graph_with_accumulation_is_refused_before_any_work():
    with pytest.raises(ValueError, match="ddp_static_graph=true cannot be combined with trainer.accum_freq=2"):
        TrainerConfig(ddp_static_graph=True, accum_freq=2)
    TrainerConfig(ddp_static_graph=True)  # each alone is fine
    TrainerConfig(accum_freq=4)


def test_the_run_and_its_evaluation_resolve_precision_in_one_place():
    from clip_med.inference.model import resolve_precision as inference_resolve
    from clip_med.training import evaluation, step

    assert step.resolve_precision is precision.resolve_precision is inference_resolve
    assert evaluation.resolve_precision is precision.resolve_precision


@pytest.mark.parametrize("cores, local, expected", [(16, "1", 8), (16, "8", 1), (64, "8", 7), (16, "4", 3),
                                                    (2, "1", 1)])
def test_extraction_workers_share_the_cores_between_local_ranks(monkeypatch, cores, local, expected):
    from clip_med.inference import extract

    monkeypatch.setattr(extract.os, "cpu_count", lambda: cores)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    assert extract.loader_workers(-1, torch.device("cuda", 0)) == expected
    assert extract.loader_workers(-1, torch.device("cpu")) == 0
    assert extract.loader_workers(3, torch.device("cuda", 0)) == 3


# ---------------------------------------------------------------------------------------------
# The GPU never waits for Python: the non-finite flag stays on the device


class _NoHostRead(torch.Tensor):
    """A step flag that must stay on the device: reading it on the host fails the test."""

    def __bool__(self):
        raise AssertionError("the step flag was read on the host")

    def item(self):
        raise AssertionError("the step flag was read on the host")

    def tolist(self):
        raise AssertionError("the step flag was read on the host")


def _tiny_parts():
    from clip_med.modeling.factory import ModelConfig, create_model
    from clip_med.modeling.losses import LossConfig, create_loss
    from clip_med.training.optim import OptimConfig, create_optimizer
    from clip_med.training.step import StepParts

    torch.manual_seed(0)
    bundle = create_model(ModelConfig(name="medclip-tiny", image_size=32), "cpu")
    optimizer = create_optimizer(bundle.model, OptimConfig())
    return StepParts(bundle.model, bundle.model, None, create_loss(LossConfig()), optimizer, None, "fp32",
                     torch.device("cpu"), 1.0)


@pytest.mark.parametrize("finite", [True, False])
def test_fused_adamw_applies_or_skips_the_step_on_the_device(finite):
    import copy

    from clip_med.training.nonfinite import apply_update_if, is_fused, local_ok, use_fused_optimizer
    from clip_med.training.step import forward_backward

    parts = _tiny_parts()
    assert use_fused_optimizer(parts.optimizer, True) and is_fused(parts.optimizer)
    generator = torch.Generator().manual_seed(1)
    batch = {"images": torch.randn(4, 3, 32, 32, generator=generator),
             "texts": torch.randint(1, 4000, (4, 32), generator=generator)}
    loss = forward_backward(parts, [batch])
    if not finite:
        loss = loss * float("nan")
    ok = local_ok(parts, loss)
    before = copy.deepcopy(parts.raw.state_dict())
    reference_model, reference_optimizer = copy.deepcopy((parts.raw, parts.optimizer))
    for param, copied in zip(parts.raw.parameters(), reference_model.parameters()):
        copied.grad = None if param.grad is None else param.grad.clone()  # deepcopy leaves gradients out
    reference_optimizer.step()  # what an applied step gives (the gradients were clipped by local_ok)

    apply_update_if(parts, ok.to(torch.int32).as_subclass(_NoHostRead))

    state = next(iter(parts.optimizer.state.values()))
    expected = reference_model.state_dict() if finite else before
    for name, value in parts.raw.state_dict().items():
        assert torch.equal(value, expected[name]), name
    assert float(state["step"]) == (1.0 if finite else 0.0)
    assert bool(state["exp_avg"].abs().sum() > 0) == finite


def test_non_finite_steps_are_skipped_on_the_device_read_a_step_late_and_five_in_a_row_abort(tmp_path, monkeypatch):
    from helpers import tiny_train_config

    import clip_med.training.trainer as trainer
    from clip_med.training.checkpoint import list_checkpoints, load_checkpoint

    # No log step reads the flags at once (logging every 100 steps); fused AdamW takes the flag as found_inf.
    cfg = tiny_train_config(tmp_path, log_every_steps=100, fused_optimizer=True)
    cfg.eval.tasks = ["modality"]
    bad = {2} | set(range(5, 100))  # one bad step, training goes on; then a run of them
    calls, handled = {"n": 0}, []
    real_forward, real_apply, real_handle = trainer.forward_backward, trainer.apply_update_if, trainer._handle_nonfinite

    def forward(parts, group):
        calls["n"] += 1
        loss = real_forward(parts, group)
        return loss * float("nan") if calls["n"] in bad else loss

    def handle(run, step):
        handled.append((step, calls["n"]))
        return real_handle(run, step)

    monkeypatch.setattr(trainer, "forward_backward", forward)
    monkeypatch.setattr(trainer, "apply_update_if", lambda parts, ok: real_apply(parts, ok.as_subclass(_NoHostRead)))
    monkeypatch.setattr(trainer, "_handle_nonfinite", handle)
    with pytest.raises(FloatingPointError, match=r"5 consecutive non-finite losses \(last at step 9\)"):
        trainer.train(cfg)
    # Step 2's flag was read after step 3 ran; the abort came one step after the fifth bad step. At a
    # checkpoint (steps 4, 6, 8) the flags are read at once, so that the checkpoint counts them.
    assert handled[0] == (2, 3) and handled[-1] == (9, 10) and calls["n"] == 10
    checkpoints = {load_checkpoint(path)["train_state"]["step"]: load_checkpoint(path)
                   for path in list_checkpoints(cfg.run_dir)}
    assert sorted(checkpoints) == [4, 6, 8]
    updates = {step: int(float(next(iter(checkpoint["optimizer"]["state"].values()))["step"]))
               for step, checkpoint in checkpoints.items()}
    assert updates == {4: 3, 6: 3, 8: 3}  # steps 1, 3, 4 applied; 2 and 5-8 skipped
    assert checkpoints[8]["train_state"]["nonfinite_skipped"] == 5
    for name, _ in _tiny_parts().raw.named_parameters():  # skipped steps changed no weight (BatchNorm's statistics
        assert torch.equal(checkpoints[4]["state_dict"][name], checkpoints[8]["state_dict"][name]), name  # move)


def test_the_step_flags_are_read_lag_steps_late():
    from clip_med.core.distributed import DistInfo
    from clip_med.training.agreement import GroupFeed, StepAgreement

    agreement = StepAgreement(DistInfo(), lag=1)
    for step, ok in ((1, True), (2, False)):
        agreement.agree(step, torch.tensor(ok), data_until=step + 2, go_on=True, not_due=step != 2, writer_ok=True)
        ready = agreement.ready()
        assert [agreed.step for agreed in ready] == ([] if step == 1 else [1])
    [last] = agreement.flush()
    assert (last.step, last.ok, last.data_until, last.go_on, last.not_due) == (2, False, 4, True, False)

    groups = iter([[{"n": n}] for n in range(3)])  # 3 groups for an epoch of 5 steps: the data runs short
    feed = GroupFeed(groups, first_step=0, steps=5, ahead=2)
    assert feed.data_until == 2
    assert feed.pop() == [{"n": 0}] and feed.data_until == 3
    feed.pop()
    feed.pop()
    assert feed.data_until == 3


# ---------------------------------------------------------------------------------------------
# Background checkpoints


def test_a_snapshot_is_a_copy_and_a_failed_background_write_is_kept_for_the_next_step(tmp_path):
    from clip_med.training.async_checkpoint import BackgroundWriter, snapshot_to_cpu
    from clip_med.training.checkpoint import load_checkpoint, save_checkpoint

    weight = torch.ones(3)
    payload = {"state_dict": {"w": weight, "tied": weight}, "train_state": {"step": 1}, "rng": [torch.zeros(2)]}
    snapshot = snapshot_to_cpu(payload)
    weight.add_(1)  # training goes on changing the original
    assert torch.equal(snapshot["state_dict"]["w"], torch.ones(3))
    assert snapshot["state_dict"]["w"] is snapshot["state_dict"]["tied"]  # shared stays shared

    writer = BackgroundWriter(save_checkpoint)
    writer.submit(snapshot, tmp_path, 1, 2)
    assert writer.wait() is None
    assert load_checkpoint(tmp_path / "checkpoints" / "step-00000001.pt")["train_state"]["step"] == 1

    def failing(*args):
        raise RuntimeError("could not write checkpoint (disk full)")

    writer.save = failing
    writer.submit(snapshot, tmp_path, 2, 2)
    assert writer.wait() == "could not write checkpoint (disk full)"
    writer.submit(snapshot, tmp_path, 3, 2)  # nothing more is written after a failure
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000001.pt"]


def test_checkpoints_by_steps_on_the_cpu_by_time_on_a_gpu():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert TrainerConfig().checkpoint_intervals(cpu) == (50, None)
    assert TrainerConfig().checkpoint_intervals(gpu) == (None, 15.0)
    assert TrainerConfig(checkpoint_every_steps=100).checkpoint_intervals(gpu) == (100, 15.0)
    assert TrainerConfig(checkpoint_every_minutes=5).checkpoint_intervals(cpu) == (50, 5)
    assert not TrainerConfig().use_fused_optimizer(cpu) and TrainerConfig().use_fused_optimizer(gpu)


# ---------------------------------------------------------------------------------------------
# A loader sized for GPUs


def _images():
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8), "RGB"),
            Image.fromarray(rng.integers(0, 256, (36, 30), dtype=np.uint8), "L"),
            Image.fromarray(rng.integers(0, 65536, (33, 41), dtype=np.uint16))]


@pytest.mark.parametrize("train", [True, False])
def test_uint8_images_normalised_on_the_device_equal_the_float_path(train):
    from clip_med.data.loader import seeded_rngs
    from clip_med.data.transforms import AugmentConfig, create_transform, split_normalize

    transform = create_transform(32, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711),
                                 train=train, augment=AugmentConfig())
    to_uint8, normalize = split_normalize(transform)
    expected, got = [], []
    for seed, image in enumerate(_images()):
        with seeded_rngs(seed):
            expected.append(transform(image))
        with seeded_rngs(seed):
            got.append(to_uint8(image))
    assert all(image.dtype == torch.uint8 for image in got)
    assert torch.equal(normalize(torch.stack(got)), torch.stack(expected))  # bit-identical, as a batch


def test_split_normalize_refuses_a_transform_it_cannot_split():
    from clip_med.data.transforms import split_normalize

    with pytest.raises(ValueError, match="ending in ToTensor and Normalize"):
        split_normalize(lambda image: image)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from clip_med.data.shardset import prepare_shards
    from clip_med.data.sources.synthetic import SyntheticSourceConfig
    from clip_med.data.writer import ShardConfig

    out = tmp_path_factory.mktemp("shards")
    return prepare_shards(SyntheticSourceConfig(image_size=32, sizes={"train": 96, "dev": 8}),
                          ShardConfig(out=str(out), max_samples=12, workers=0, progress=False))


def _stream(shards, persistent, uint8, resume=None, first_worker=0, first_epoch=0):
    from clip_med.data.loader import LoaderConfig, TrainStream
    from clip_med.data.transforms import AugmentConfig, create_transform, split_normalize
    from clip_med.modeling.factory import ModelConfig, create_model

    bundle = create_model(ModelConfig(name="medclip-tiny", image_size=32), "cpu")
    transform = create_transform(32, bundle.mean, bundle.std, train=True, augment=AugmentConfig())
    normalize = None
    if uint8:
        transform, normalize = split_normalize(transform)
    cfg = LoaderConfig(batch_size=8, workers=2, shuffle_buffer=16, prefetch_factor=2, persistent_workers=persistent)
    stream = TrainStream(shards.urls("train"), transform, bundle.tokenizer, cfg, 0, 2, first_epoch=first_epoch,
                         resume=resume, first_worker=first_worker, shard_counts=shards.shard_counts("train"))
    return stream, normalize


def _epochs(stream, normalize, epochs, stop_after=None):
    """(keys, images) of each batch, epoch after epoch; ``stop_after`` batches per epoch (as a trainer stops)."""
    seen = []
    for epoch in epochs:
        for index, batch in enumerate(stream.epoch(epoch)):
            if stop_after is not None and index == stop_after:
                break
            images = normalize(batch["images"]) if normalize is not None else batch["images"]
            seen.append((batch["keys"], images, batch["worker"], batch["worker_samples"]))
    stream.close()
    return seen


def test_persistent_workers_and_uint8_images_replay_every_epoch_exactly(shards):
    fresh = _epochs(*_stream(shards, persistent=False, uint8=False), [0, 1, 2], stop_after=4)
    persistent = _epochs(*_stream(shards, persistent=True, uint8=True), [0, 1, 2], stop_after=4)
    assert not multiprocessing.active_children()  # closing the stream stopped its workers
    assert len(fresh) == len(persistent) == 12
    for (keys, images, worker, samples), (keys2, images2, worker2, samples2) in zip(fresh, persistent):
        assert keys == keys2 and (worker, samples) == (worker2, samples2)
        assert torch.equal(images, images2)
    assert [batch[0] for batch in fresh[:4]] != [batch[0] for batch in fresh[4:8]]  # epochs differ


def test_a_persistent_stream_resumes_its_first_epoch_where_it_stopped(shards):
    from clip_med.data.loader import batch_position

    whole = _epochs(*_stream(shards, persistent=False, uint8=True), [1, 2])
    stream, normalize = _stream(shards, persistent=True, uint8=True, first_epoch=1)
    consumed = {}
    for index, batch in enumerate(stream.epoch(1)):  # three batches of epoch 1, then the run stops
        consumed[batch["worker"]] = batch_position(batch)
        next_worker = (batch["worker"] + 1) % 2
        if index == 2:
            break
    stream.close()
    resumed = _epochs(*_stream(shards, persistent=True, uint8=True, resume=consumed, first_worker=next_worker,
                               first_epoch=1), [1, 2])
    assert [keys for keys, *_ in resumed] == [keys for keys, *_ in whole[3:]]
    for (_, images, *_), (_, images2, *_) in zip(resumed, whole[3:]):
        assert torch.equal(images, images2)


def test_automatic_loader_workers_share_the_nodes_cores(monkeypatch):
    from clip_med.data import loader

    monkeypatch.setattr(loader.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert loader.train_workers(None, torch.device("cuda", 0)) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert loader.train_workers(None, torch.device("cuda", 0)) == 15
    assert loader.train_workers(None, torch.device("cpu")) == 2  # the CPU default of earlier versions
    assert loader.train_workers(3, torch.device("cuda", 0)) == 3


def test_too_little_shared_memory_is_refused_with_what_to_do(monkeypatch):
    import collections

    from clip_med.data import loader

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(loader.shutil, "disk_usage", lambda path: usage(64 * 2**20, 0, 64 * 2**20))
    per_batch = loader.batch_bytes(256, 224, uint8_images=True)
    assert per_batch == 256 * (3 * 224 * 224 + 77 * 8)
    assert loader.batch_bytes(256, 224, uint8_images=False) > 3.9 * per_batch  # float32: four times the pixels
    with pytest.raises(ValueError, match=r"/dev/shm has 64 MiB free, but 12 loader workers x prefetch 4 .*"
                                         r"--shm-size=.*data.loader.workers"):
        loader.check_shared_memory(12, 4, per_batch)
    loader.check_shared_memory(0, 4, per_batch)  # no workers: nothing crosses shared memory
    loader.check_shared_memory(1, 1, 1024)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_training_step_never_waits_for_the_gpu(tmp_path, precision):
    """CUDA's sync debug mode raises on any host synchronisation inside the steps (after a first, warm-up step)."""
    import types

    from helpers import tiny_train_config

    import clip_med.training.trainer as trainer
    from clip_med.core import distributed

    cfg = tiny_train_config(tmp_path, device="cuda", precision=precision)
    info = distributed.init_distributed("cuda")
    run, _, _ = trainer._build_run(cfg, info, tmp_path / "run")
    groups = trainer._micro_batch_groups(run.stream.epoch(0), 1)
    batches = [next(groups) for _ in range(4)]  # fetched (and pinned) beforehand: only the steps are watched
    run.feed = types.SimpleNamespace(data_until=len(batches))
    run.parts.model.train()
    trainer._train_step(run, batches[0])  # lazy CUDA set-up, the normaliser's constants, cuBLAS handles
    run.state.step += 1
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for group in batches[1:]:
            trainer._train_step(run, group)
            run.state.step += 1
    finally:
        torch.cuda.set_sync_debug_mode("default")
        run.stream.close()
    agreed = run.agreement.flush()
    assert [flags.step for flags in agreed] == [1, 2, 3, 4] and all(flags.ok for flags in agreed)
    applied = float(next(iter(run.parts.optimizer.state.values()))["step"])  # fused AdamW's own count
    assert applied == 4 if precision == "bf16" else applied <= 4  # fp16: the scaler may skip overflows
