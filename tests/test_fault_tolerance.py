"""Training holds up: broken shards, non-finite losses, a full disk, unreadable checkpoints, SIGTERM."""

from __future__ import annotations

import logging
import os
import resource
import signal
from pathlib import Path

import pytest
import torch
from helpers import tiny_train_config

import clip_med.training.trainer as trainer
from clip_med.training.checkpoint import (
    find_resume_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from clip_med.training.metrics_log import read_metrics


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _fast_config(tmp_path: Path, workers: int = 0):
    cfg = tiny_train_config(tmp_path)
    cfg.data.loader.workers = workers
    cfg.eval.tasks = ["modality"]
    return cfg


def test_truncated_shard_is_skipped_counted_and_training_completes(tmp_path, monkeypatch, caplog, one_thread):
    cfg = _fast_config(tmp_path, workers=2)
    original = trainer.prepare_data
    broken = {}

    def prepare_then_truncate(cfg, info):  # the shard goes bad after it was written and checked
        shard_set = original(cfg, info)
        path = Path(shard_set.urls("train")[1])
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        broken["url"] = str(path)
        return shard_set

    monkeypatch.setattr(trainer, "prepare_data", prepare_then_truncate)
    report = trainer.train(cfg)

    # 4 shards of 24, 2 workers, batches of 16: 6 steps planned per epoch, 5 possible with half a shard gone.
    assert report["step"] == 10
    assert report["data_errors"]["bad_shard"] == 2  # met once per epoch
    assert set(report["data_errors"]) <= {"bad_shard", "bad_sample"}
    assert report["data_errors"].get("bad_sample", 0) <= 2  # at most the sample cut in two, once per epoch
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("skipping bad_shard" in w and broken["url"] in w for w in warnings)
    assert any("ended after 5 of its 6 planned steps" in w for w in warnings)
    rows = [row for row in read_metrics(cfg.run_dir) if "train/data_errors" in row]
    assert rows[-1]["train/data_errors"] == sum(report["data_errors"].values())


def _poison(monkeypatch, bad_steps, where="loss"):
    """Make the loss (or one gradient) non-finite on the given steps (1-based); returns the call count."""
    original, calls = trainer.forward_backward, {"n": 0}

    def poisoned(parts, group):
        calls["n"] += 1
        loss = original(parts, group)
        if calls["n"] in bad_steps:
            if where == "loss":
                return loss * float("nan")
            next(p for p in parts.raw.parameters() if p.grad is not None).grad[0] = float("inf")
        return loss

    monkeypatch.setattr(trainer, "forward_backward", poisoned)
    return calls


def applied_updates(checkpoint: dict) -> int:
    """The optimizer steps AdamW applied (its step count: a skipped step leaves it as it was)."""
    return int(float(next(iter(checkpoint["optimizer"]["state"].values()))["step"]))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_a_non_finite_step_is_skipped(tmp_path, monkeypatch, caplog, one_thread, where, fused):
    cfg = _fast_config(tmp_path)
    cfg.trainer.fused_optimizer = fused  # the CPU's for-loop AdamW reads the flag; fused AdamW skips on the device
    _poison(monkeypatch, {3, 7}, where)
    report = trainer.train(cfg)
    assert report["step"] == 12 and report["nonfinite_skipped"] == 2
    assert applied_updates(load_checkpoint(latest_checkpoint(cfg.run_dir))) == 10
    assert sum("non-finite loss or gradient at step" in r.getMessage() for r in caplog.records) == 2
    final = load_checkpoint(latest_checkpoint(cfg.run_dir))["state_dict"]
    assert all(torch.isfinite(value).all() for value in final.values() if value.is_floating_point())


def test_non_finite_losses_in_a_row_abort_with_a_clear_error(tmp_path, monkeypatch, one_thread):
    cfg = _fast_config(tmp_path)
    cfg.trainer.max_nonfinite_steps = 3
    calls = _poison(monkeypatch, set(range(5, 100)))
    with pytest.raises(FloatingPointError, match=r"3 consecutive non-finite losses \(last at step 7\).*Lower optim.lr"):
        trainer.train(cfg)
    assert calls["n"] == 7  # steps 5 and 6 (epoch 1) and 7 (epoch 2) were skipped; logging every step reads at once
    after_four, after_six = (load_checkpoint(path) for path in list_checkpoints(cfg.run_dir))
    assert after_four["train_state"]["step"] == 4 and after_six["train_state"]["step"] == 6
    assert applied_updates(after_four) == applied_updates(after_six) == 4
    for name, _ in trainer.create_model(cfg.model).model.named_parameters():  # skipped steps changed nothing
        assert torch.equal(after_four["state_dict"][name], after_six["state_dict"][name]), name


@pytest.fixture
def file_size_limit():
    """Lower RLIMIT_FSIZE on demand: writes past it fail with EFBIG, as a full disk fails with ENOSPC."""
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    def limit(size):  # None: back to what it was
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft if size is None else size, hard))

    yield limit
    limit(None)
    signal.signal(signal.SIGXFSZ, previous_handler)


def test_running_out_of_space_while_checkpointing_fails_loudly_and_keeps_the_last_one(
        tmp_path, monkeypatch, file_size_limit, one_thread):
    cfg = _fast_config(tmp_path)
    real_save, calls = trainer.save_checkpoint, {"n": 0}

    def save(payload, run_dir, step, keep_last):
        calls["n"] += 1
        if calls["n"] == 2:  # the disk fills up after the first checkpoint
            file_size_limit(1_000_000)
        return real_save(payload, run_dir, step, keep_last)

    monkeypatch.setattr(trainer, "save_checkpoint", save)
    with pytest.raises(RuntimeError, match=r"could not write checkpoint .*step-00000006.pt \(\[Errno 27\] File too "
                                           r"large\).*step-00000004.pt is intact"):
        trainer.train(cfg)
    file_size_limit(None)
    assert [path.name for path in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-00000004.pt"]
    assert load_checkpoint(latest_checkpoint(cfg.run_dir))["train_state"]["step"] == 4
    resumed = _fast_config(tmp_path)
    resumed.resume = "latest"
    assert trainer.train(resumed)["step"] == 12


def test_unreadable_newest_checkpoint_falls_back_to_the_one_before(tmp_path, caplog):
    save_checkpoint({"train_state": {"step": 4}}, tmp_path, 4, keep_last=3)
    good = save_checkpoint({"train_state": {"step": 8}}, tmp_path, 8, keep_last=3)
    data = good.read_bytes()
    (tmp_path / "checkpoints" / "step-00000012.pt").write_bytes(data[: len(data) // 2])  # truncated
    (tmp_path / "checkpoints" / ".step-00000016.pt.tmp").write_bytes(data[:100])  # an interrupted write
    path, payload = find_resume_checkpoint("latest", tmp_path)
    assert path == good and payload["train_state"]["step"] == 8
    assert any("cannot be read" in r.getMessage() for r in caplog.records)
    assert find_resume_checkpoint(str(tmp_path), tmp_path / "elsewhere")[0] == good  # a run folder works too
    save_checkpoint({"train_state": {"step": 20}}, tmp_path, 20, keep_last=2)
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000012.pt", "step-00000020.pt"]


def test_sigterm_writes_a_checkpoint_and_stops_then_resume_finishes(tmp_path, monkeypatch, one_thread):
    cfg = _fast_config(tmp_path)
    cfg.trainer.checkpoint_every_steps = 100
    original = trainer._train_step

    def step(run, group):
        if run.state.step == 4:  # pre-emption notice arrives during step 5
            os.kill(os.getpid(), signal.SIGTERM)
        return original(run, group)

    handler_before = signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as patch:
        patch.setattr(trainer, "_train_step", step)
        with pytest.raises(trainer.TrainingInterrupted, match="at step 5.*resume=latest"):
            trainer.train(cfg)
    assert [p.name for p in list_checkpoints(cfg.run_dir)] == ["step-00000005.pt"]
    resumed = _fast_config(tmp_path)
    resumed.resume = "latest"
    report = trainer.train(resumed)
    assert report["step"] == 12 and report["resumed_from"].endswith("step-00000005.pt")
    assert signal.getsignal(signal.SIGTERM) == handler_before
