"""Distributed training on CPU: two gloo processes under torchrun, checked against one process.

The two-rank run is the real trainer (``train(cfg)`` under ``python -m torch.distributed.run``);
this file is also its driver script (see ``__main__``), which records each rank's batches and
final parameters. The single-process reference replays the same global batches (rank 0's
samples then rank 1's, rebuilt by key with the same per-sample augmentation) through the
trainer's own step functions, with the same learning-rate schedule.

A tiny ViT is used for the comparison because BatchNorm (in medclip-tiny's ResNet) normalises
over each process's own batch, which a single process with the global batch cannot reproduce.

Also here: rank 0's long work (sharding, evaluation) outlasting the training's collective timeout,
a failing rank ending the other with its message, and (on two GPUs) NCCL against a CUDA reference.
"""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from helpers import tiny_train_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VIT_TEST = "medclip-vit-test"
VIT_TEST_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def register_vit_test(folder: Path) -> None:
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{VIT_TEST}.json").write_text(json.dumps(VIT_TEST_CFG))
    open_clip.add_model_config(folder)


def dist_config(tmp: Path, settings: dict):
    """The run both the two-rank job and the reference use (64 training pairs in 4 shards)."""
    cfg = tiny_train_config(tmp)
    cfg.trainer.epochs = settings.get("epochs", 2)
    cfg.source.sizes = {"train": 64, "dev": 16}
    cfg.shards.max_samples = 16
    cfg.data.loader.batch_size = 8
    cfg.data.loader.workers = settings.get("workers", 2)
    cfg.data.loader.prefetch_factor = 2
    cfg.model.name = settings.get("model", VIT_TEST)
    cfg.model.grad_checkpointing = settings.get("grad_checkpointing", False)
    cfg.loss.name = settings.get("loss", "clip")
    for key in ("local_loss", "gather_with_grad"):
        if key in settings:
            setattr(cfg.loss, key, settings[key])
    cfg.trainer.accum_freq = settings.get("accum_freq", 1)
    cfg.trainer.checkpoint_every_steps = 3
    cfg.trainer.dist_timeout_minutes = settings.get("dist_timeout_minutes", 30)
    # Logging every step reads each step's agreed flags at once; otherwise they are read a step late.
    cfg.trainer.log_every_steps = settings.get("log_every_steps", 1)
    cfg.resume = settings.get("resume")
    if settings.get("device") == "cuda":  # fp32 on both sides: NCCL against a one-process CUDA reference
        cfg.trainer.device, cfg.trainer.precision, cfg.trainer.dist_backend = "cuda", "fp32", "nccl"
    # Adam is nearly blind to the scale of gradients; a large eps makes each update proportional to its
    # gradient, so that a gradient off by a factor (e.g. 1/world_size) cannot pass for the right one.
    cfg.optim.eps = 1e-2
    cfg.optim.lr = 2e-2
    cfg.eval.tasks = ["modality"]
    return cfg


# ---------------------------------------------------------------------------------------------
# Driver: runs inside each torchrun process


def _driver(out: Path, settings: dict) -> None:
    import clip_med.training.trainer as trainer

    torch.set_num_threads(1)
    register_vit_test(out / "model_configs")
    rank = int(os.environ["RANK"])
    logging.basicConfig(level=logging.INFO, format=f"[rank{rank}] %(levelname)s %(name)s: %(message)s")
    steps: list[list[list[str]]] = []
    original_step, original_eval = trainer.forward_backward, trainer.evaluate_run

    def recording_step(parts, group):
        steps.append([batch["keys"] for batch in group])
        return original_step(parts, group)

    def saving_eval(bundle, *args, **kwargs):
        torch.save(bundle.model.state_dict(), out / f"params-rank{rank}.pt")
        (out / f"steps-rank{rank}.json").write_text(json.dumps(steps))
        return original_eval(bundle, *args, **kwargs)

    trainer.forward_backward, trainer.evaluate_run = recording_step, saving_eval
    if settings.get("truncate_a_shard_of_rank"):
        trainer.prepare_data = _prepare_then_truncate(trainer.prepare_data, settings["truncate_a_shard_of_rank"])
    if settings.get("slow_rank0_phases") and rank == 0:
        _slow_down_rank0_phases(settings["slow_rank0_phases"])
    if settings.get("fail_on_rank") == rank:
        trainer._train_step = _failing_step(trainer._train_step, settings["fail_at_step"])
    if settings.get("device") == "cuda":
        trainer._setup_backends = _exact_fp32
    trainer.train(dist_config(out, settings))


def _slow_down_rank0_phases(seconds: float) -> None:
    """Rank 0 takes ``seconds`` longer to write the shards and to evaluate (the others wait for it)."""
    import clip_med.training.evaluation as evaluation
    import clip_med.training.trainer as trainer

    def slower(function):
        def wrapped(*args, **kwargs):
            time.sleep(seconds)
            return function(*args, **kwargs)
        return wrapped

    trainer.prepare_shards = slower(trainer.prepare_shards)
    evaluation._evaluate = slower(evaluation._evaluate)


def _failing_step(step, at_step: int):
    def failing(run, group):
        if run.state.step + 1 == at_step:
            raise RuntimeError("injected failure in a training step")
        return step(run, group)

    return failing


def _exact_fp32(info) -> None:
    """No TF32 (the trainer's CUDA default): the comparison with the reference is at fp32's precision."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _prepare_then_truncate(prepare, victim: int):
    """Rank 0 writes the shards, then cuts in half the first shard ``victim`` reads in epoch 1."""
    from clip_med.core import distributed
    from clip_med.data.loader import assign_shards, worker_shards

    def prepare_then_truncate(cfg, info):
        shard_set = prepare(cfg, info)
        if info.is_main:
            order = assign_shards(shard_set.urls("train"), 0, cfg.seed, True)
            path = Path(worker_shards(order, victim, info.world_size, 0, cfg.data.loader.workers)[0])
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
        distributed.barrier(info)
        return shard_set

    return prepare_then_truncate


# ---------------------------------------------------------------------------------------------
# The test side


def _launch(out: Path, settings: dict, succeeds: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               __file__, str(out), json.dumps(settings)]
    # (a hang guard only: the runs take a minute or two on a loaded 2-core machine)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert (result.returncode == 0) == succeeds, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def _samples_by_key(urls: list[str]) -> dict[str, dict]:
    import webdataset as wds

    pipeline = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(), wds.decode("pil"))
    return {sample["__key__"]: sample for sample in pipeline}


def _reference_params(out: Path, settings: dict, rank_steps: list[list]) -> dict[str, torch.Tensor]:
    """One process, fed rank 0's then rank 1's samples as one batch per step."""
    from clip_med.core import distributed
    from clip_med.data.loader import to_sample
    from clip_med.training import trainer
    from clip_med.training.optim import create_scheduler
    from clip_med.training.step import apply_update, finite_flag, forward_backward, skip_update

    register_vit_test(out / "model_configs")
    cfg = dist_config(out, settings)
    cfg.run_dir = str(out / "reference")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    device = torch.device("cuda", 0) if settings.get("device") == "cuda" else torch.device("cpu")
    run, shard_set, _ = trainer._build_run(cfg, distributed.DistInfo(device=device), Path(cfg.run_dir))
    samples = _samples_by_key(shard_set.urls("train"))
    total = len(rank_steps[0])
    scheduler = create_scheduler(run.parts.optimizer, cfg.optim, total)
    per_epoch = total // cfg.trainer.epochs
    loader_cfg = cfg.data.loader
    run.parts.model.train()
    for step, groups in enumerate(zip(*rank_steps)):
        make = to_sample(run.train_transform, cfg.seed, step // per_epoch, loader_cfg.text_sampling,
                         loader_cfg.sentence_keep_prob)
        micro = []
        for j in range(len(groups[0])):
            items = [make(samples[key]) for rank_group in groups for key in rank_group[j]]
            micro.append({"images": torch.stack([item["image"] for item in items]),
                          "texts": run.bundle.tokenizer([item["text"] for item in items])})
        scheduler(step)
        loss = forward_backward(run.parts, micro)
        (apply_update if bool(finite_flag(run.parts, loss)) else skip_update)(run.parts)
    run.stream.close()
    return {name: value.cpu() for name, value in run.bundle.model.state_dict().items()}


def _check_two_ranks(tmp_path: Path, settings: dict) -> None:
    out = tmp_path / "job"
    out.mkdir()
    _launch(out, settings)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the rank processes
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    _exact_fp32(None)
    try:
        _compare(out, settings)
    finally:
        torch.set_num_threads(threads)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def _compare(out: Path, settings: dict) -> None:
    params = [torch.load(out / f"params-rank{rank}.pt", weights_only=True, map_location="cpu") for rank in range(2)]
    steps = [json.loads((out / f"steps-rank{rank}.json").read_text()) for rank in range(2)]
    cfg = dist_config(out, settings)

    # Both ranks hold the same model.
    assert params[0].keys() == params[1].keys()
    for name in params[0]:
        assert torch.equal(params[0][name], params[1][name]), name

    # Per epoch the ranks' samples are disjoint and together are the whole training set.
    per_epoch = len(steps[0]) // cfg.trainer.epochs
    assert len(steps[0]) == len(steps[1]) == per_epoch * cfg.trainer.epochs > 0
    every_key = {f"synthetic_train_{i:06d}" for i in range(64)}
    for epoch in range(cfg.trainer.epochs):
        keys = [[key for group in rank_steps[epoch * per_epoch:(epoch + 1) * per_epoch] for batch in group
                 for key in batch] for rank_steps in steps]
        assert not set(keys[0]) & set(keys[1])
        assert len(keys[0]) + len(keys[1]) == 64 and set(keys[0]) | set(keys[1]) == every_key

    # The same as one process training on the global batch.
    reference = _reference_params(out, settings, steps)
    rtol, atol = (1e-3, 1e-4) if settings.get("device") == "cuda" else (1e-4, 2e-5)  # GPU kernels sum in other orders
    for name, value in params[0].items():
        torch.testing.assert_close(value, reference[name], rtol=rtol, atol=atol, msg=name)
    final = torch.load(sorted((out / "run" / "checkpoints").glob("*.pt"))[-1], weights_only=True, map_location="cpu")
    assert final["train_state"]["step"] == len(steps[0]) and final["world_size"] == 2
    for name, value in final["state_dict"].items():
        assert torch.equal(value, params[0][name]), name

    # Only rank 0 wrote metrics: one line per logged step.
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    every = settings.get("log_every_steps", 1)
    logged = [step for step in range(1, len(steps[0]) + 1) if step % every == 0 or step % per_epoch == 0]
    assert [row["step"] for row in rows if "train/loss" in row] == logged


@pytest.mark.parametrize("log_every_steps", [1, 100])
def test_two_gloo_ranks_match_one_process_and_split_the_data(tmp_path, log_every_steps):
    _check_two_ranks(tmp_path, {"loss": "clip", "epochs": 2, "log_every_steps": log_every_steps})


def test_two_ranks_with_siglip_accumulation_and_grad_checkpointing(tmp_path):
    _check_two_ranks(tmp_path, {"loss": "siglip", "epochs": 2, "accum_freq": 2, "grad_checkpointing": True})


@pytest.mark.parametrize("log_every_steps", [1, 100])  # the agreed flags read at once, or one step late
def test_a_rank_that_runs_short_of_data_ends_the_epoch_for_all_without_hanging(tmp_path, log_every_steps):
    out = tmp_path / "job"
    out.mkdir()
    _launch(out, {"loss": "clip", "epochs": 2, "workers": 1, "truncate_a_shard_of_rank": 1,
                  "log_every_steps": log_every_steps})
    steps = [json.loads((out / f"steps-rank{rank}.json").read_text()) for rank in range(2)]
    # 64 pairs in 4 shards of 16, batches of 8, one worker per rank: 4 steps per epoch planned. The rank holding
    # the half shard (rank 1 in epoch 1) has 3 batches, so both ranks end each epoch after 3 steps.
    assert len(steps[0]) == len(steps[1]) == 3 + 3
    report = json.loads((out / "run" / "report.json").read_text())
    assert report["step"] == 6
    assert report["data_errors"]["bad_shard"] == 2  # once per epoch; in epoch 1 counted on rank 1, logged by rank 0
    if log_every_steps == 1:
        log = (out / "run" / "metrics.jsonl").read_text()
        assert '"train/data_errors": 0' not in log.splitlines()[-2]


# ---------------------------------------------------------------------------------------------
# No hang: rank 0's long work, a failing rank


def test_rank0_work_longer_than_the_collective_timeout_does_not_end_the_run(tmp_path):
    out = tmp_path / "job"
    out.mkdir()
    # Collectives time out after 15 s; rank 0 takes 20 s longer to write the shards and to evaluate. The other
    # rank waits through the store (trainer.dist_phase_timeout_minutes), not in a collective.
    _launch(out, {"epochs": 1, "dist_timeout_minutes": 0.25, "slow_rank0_phases": 20})
    report = json.loads((out / "run" / "report.json").read_text())
    assert report["step"] == 4 and "zero_shot" in report


@pytest.mark.parametrize("failure", [
    {"resume": "/nonexistent/step-00000003.pt", "expected": "rank 0: FileNotFoundError: resume=/nonexistent/step-"
                                                            "00000003.pt: no such checkpoint file or run folder",
     "heard_by": 1},
    {"fail_on_rank": 1, "fail_at_step": 2, "expected": "rank 1: RuntimeError: injected failure in a training step",
     "heard_by": 0},
], ids=["rank0-bad-resume", "rank1-step-error"])
def test_a_failing_rank_ends_the_other_with_its_message(tmp_path, failure):
    out = tmp_path / "job"
    out.mkdir()
    settings = {key: value for key, value in failure.items() if key not in ("expected", "heard_by")}
    # The collectives' own timeout stays at 30 minutes: only the failure's message can end the other rank in time.
    result = _launch(out, {"epochs": 1, **settings}, succeeds=False)
    output = result.stdout + result.stderr
    assert f"[rank{failure['heard_by']}] ERROR clip_med.core.store_sync: stopping: {failure['expected']}" in output, \
        output[-6000:]


def test_store_barrier_waits_for_every_rank_and_ends_with_a_failure():
    from torch.distributed import HashStore

    from clip_med.core.store_sync import PeerFailure, announce_failure, first_failure, store_barrier

    store = HashStore()

    def fail(message):
        raise PeerFailure(message)

    store.add("b0", 1)  # the other rank arrived first
    store_barrier(store, "b0", 2, timeout_s=5, what="test", on_failure=fail)
    with pytest.raises(TimeoutError, match="waited 0 minutes.*dist_phase_timeout_minutes"):
        store_barrier(store, "b1", 2, timeout_s=0.05, what="test", on_failure=fail)
    first = announce_failure(store, 1, 2, ValueError("bad input"), wait_s=0.0)
    assert first == first_failure(store) == "rank 1: ValueError: bad input"
    assert announce_failure(store, 0, 2, RuntimeError("connection closed"), wait_s=0.0) == first  # the first stays
    with pytest.raises(PeerFailure, match="rank 1: ValueError: bad input"):
        store_barrier(store, "b2", 2, timeout_s=5, what="test", on_failure=fail)


@pytest.mark.parametrize("stops_in_time", [False, True])
def test_the_failure_watch_ends_a_rank_that_stays_stuck(stops_in_time):
    import threading

    from torch.distributed import HashStore

    from clip_med.core.store_sync import ACKNOWLEDGED, FailureWatch, announce_failure

    store, exits = HashStore(), []
    announce_failure(store, 1, 2, RuntimeError("out of memory"), wait_s=0.0)
    watch = FailureWatch(store, 0, threading.Event(), poll_s=0.01, grace_s=0.2 if not stops_in_time else 30,
                         exit_process=exits.append)
    watch.start()
    while not int(store.add(ACKNOWLEDGED, 0)):  # the watch heard of rank 1's failure
        time.sleep(0.01)
    if stops_in_time:
        watch.stop()  # the rank's own error ended it first
    watch.join()
    assert exits == ([] if stops_in_time else [1])


# ---------------------------------------------------------------------------------------------
# Gradient accumulation keeps the full contrastive batch (in one process)


@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_accumulated_gradients_equal_one_big_batch(tmp_path, loss_name):
    from clip_med.modeling.factory import ModelConfig, create_model
    from clip_med.modeling.losses import LossConfig, create_loss, model_kwargs_for
    from clip_med.training.step import StepParts, forward_backward

    register_vit_test(tmp_path)
    loss_cfg = LossConfig(name=loss_name)
    torch.manual_seed(0)
    bundle = create_model(ModelConfig(name=VIT_TEST), "cpu", **model_kwargs_for(loss_cfg))
    optimizer = torch.optim.SGD(bundle.model.parameters(), lr=0.1)
    parts = StepParts(bundle.model, bundle.model, None, create_loss(loss_cfg), optimizer, None, "fp32",
                      torch.device("cpu"))
    generator = torch.Generator().manual_seed(1)
    batches = [{"images": torch.randn(6, 3, 32, 32, generator=generator),
                "texts": torch.randint(1, 4000, (6, 32), generator=generator)} for _ in range(3)]
    whole = {key: torch.cat([batch[key] for batch in batches]) for key in ("images", "texts")}

    loss_whole = forward_backward(parts, [whole])
    grads_whole = {n: p.grad.clone() for n, p in bundle.model.named_parameters() if p.grad is not None}
    loss_accum = forward_backward(parts, batches)
    grads_accum = {n: p.grad.clone() for n, p in bundle.model.named_parameters() if p.grad is not None}

    assert float(loss_accum) == pytest.approx(float(loss_whole), rel=1e-5)
    assert grads_whole.keys() == grads_accum.keys() and "logit_scale" in grads_whole
    for name, grad in grads_whole.items():
        torch.testing.assert_close(grads_accum[name], grad, rtol=1e-4, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_mixed_precision_training_and_resume(tmp_path, precision):
    from clip_med.training.checkpoint import latest_checkpoint, load_checkpoint
    from clip_med.training.metrics_log import read_metrics
    from clip_med.training.trainer import train

    cfg = tiny_train_config(tmp_path)
    cfg.trainer.device, cfg.trainer.precision = "cuda", precision
    cfg.data.loader.workers = 2
    report = train(cfg)
    losses = [row["train/loss"] for row in read_metrics(cfg.run_dir) if "train/loss" in row]
    assert report["step"] == 12 and len(losses) == 12 and all(loss == loss for loss in losses)
    assert all(row["train/peak_memory_gb"] > 0 for row in read_metrics(cfg.run_dir) if "train/loss" in row)
    checkpoint = load_checkpoint(latest_checkpoint(cfg.run_dir))
    assert bool(checkpoint["scaler"]) == (precision == "fp16")
    resumed = tiny_train_config(tmp_path)
    resumed.trainer.device, resumed.trainer.precision, resumed.trainer.epochs = "cuda", precision, 3
    resumed.resume = "latest"
    assert train(resumed)["step"] == 18


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_two_nccl_ranks_with_accumulation_match_one_cuda_process(tmp_path, loss):
    _check_two_ranks(tmp_path, {"loss": loss, "epochs": 2, "accum_freq": 2, "device": "cuda"})


if __name__ == "__main__":
    _driver(Path(sys.argv[1]), json.loads(sys.argv[2]))
