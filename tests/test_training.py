import json

import pytest
import torch
from helpers import tiny_train_config

from clip_med.training.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from clip_med.training.metrics_log import read_metrics
from clip_med.training.trainer import train


def _losses(run_dir):
    return [row["train/loss"] for row in read_metrics(run_dir) if "train/loss" in row]


def test_training_lowers_the_loss_and_writes_a_report(tmp_path):
    cfg = tiny_train_config(tmp_path)
    cfg.trainer.epochs = 6
    report = train(cfg)
    losses = _losses(cfg.run_dir)
    assert len(losses) == 6 * 6  # 96 samples / 16 per batch, logged every step
    assert sum(losses[-6:]) / 6 < sum(losses[:6]) / 6 - 0.3
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    for task in ("modality", "anatomy"):
        assert 0 <= saved["zero_shot"][task]["accuracy"] <= 1
        assert 0 <= saved["linear_probe"][task]["accuracy"] <= 1
    for direction in ("image_to_text", "text_to_image"):
        assert set(saved["retrieval"][direction]) >= {"R@1", "R@5", "R@10"}
    assert saved["split"] == "dev" and report["step"] == 36
    assert (tmp_path / "run" / "report.md").is_file()
    assert (tmp_path / "run" / "confusion_zero_shot_anatomy.png").is_file()
    assert all("step" in row for row in read_metrics(cfg.run_dir))


def test_checkpoints_are_safe_to_load_and_pruned(tmp_path):
    cfg = tiny_train_config(tmp_path)
    cfg.trainer.keep_checkpoints = 2
    train(cfg)
    checkpoints = list_checkpoints(cfg.run_dir)
    assert [p.name for p in checkpoints] == ["step-00000008.pt", "step-00000012.pt"]
    payload = load_checkpoint(checkpoints[-1])  # weights_only=True
    assert payload["train_state"]["step"] == 12 and payload["model_name"] == "medclip-tiny"
    assert "state_dict" in payload and "optimizer" in payload and "rng" in payload


def _crash_after(monkeypatch, steps):
    import clip_med.training.trainer as trainer

    original, calls = trainer._train_step, {"n": 0}

    def step(run, batch):
        calls["n"] += 1
        if calls["n"] > steps:
            raise RuntimeError("simulated crash")
        return original(run, batch)

    monkeypatch.setattr(trainer, "_train_step", step)


def test_resume_latest_continues_instead_of_restarting(tmp_path, monkeypatch):
    cfg = tiny_train_config(tmp_path)
    with monkeypatch.context() as patch:
        _crash_after(patch, 9)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(cfg)
    assert latest_checkpoint(cfg.run_dir).name == "step-00000008.pt"
    resumed = tiny_train_config(tmp_path)
    resumed.run_dir = str(tmp_path / "run2")
    resumed.resume = "latest"  # found in the sibling folder, as Hydra makes one per invocation
    report = train(resumed)
    steps = [row["step"] for row in read_metrics(resumed.run_dir) if "train/loss" in row]
    assert steps[0] == 9 and steps[-1] == 12
    assert report["resumed_from"].endswith("step-00000008.pt") and report["step"] == 12


def test_resume_mid_epoch_matches_uninterrupted_run(tmp_path, monkeypatch):
    reference = tiny_train_config(tmp_path / "a")
    train(reference)
    crashed = tiny_train_config(tmp_path / "b")
    crashed.trainer.checkpoint_every_steps = 3  # a checkpoint inside epoch 1 (6 steps per epoch)
    with monkeypatch.context() as patch:
        _crash_after(patch, 4)
        with pytest.raises(RuntimeError):
            train(crashed)
    resumed = tiny_train_config(tmp_path / "b")
    resumed.resume = "latest"
    train(resumed)
    losses = _losses(resumed.run_dir)
    assert len(losses) == 3 + 9  # 3 steps before the crash's last checkpoint, 9 after resuming
    assert losses[-9:] == pytest.approx(_losses(reference.run_dir)[-9:], abs=1e-5)


def test_max_steps_ends_the_schedule_early(tmp_path):
    cfg = tiny_train_config(tmp_path)
    cfg.trainer.max_steps = 8
    report = train(cfg)
    rows = [row for row in read_metrics(cfg.run_dir) if "train/lr" in row]
    assert report["step"] == 8 and rows[-1]["step"] == 8 and rows[-1]["train/lr"] < 3e-4


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    save_checkpoint({"x": torch.ones(2)}, tmp_path, 1, keep_last=3)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(RuntimeError, match="No space left.*step-00000001.pt is intact"):
        save_checkpoint({"x": torch.ones(2)}, tmp_path, 2, keep_last=3)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000001.pt"]
    assert torch.equal(load_checkpoint(tmp_path / "checkpoints" / "step-00000001.pt")["x"], torch.ones(2))


def _weights(cfg):
    return load_checkpoint(latest_checkpoint(cfg.run_dir))["state_dict"]


def test_locked_image_tower_stays_fixed_while_the_text_tower_learns(tmp_path):
    from clip_med.modeling.factory import create_model

    cfg = tiny_train_config(tmp_path)
    cfg.model.lock_image = True
    cfg.trainer.max_steps = 4
    torch.manual_seed(cfg.seed)
    initial = create_model(cfg.model).model.state_dict()  # train() builds the same model from the same seed
    train(cfg)
    after = _weights(cfg)
    # open_clip locks a timm tower's trunk; its projection head stays trainable (as in open_clip_train).
    visual = [name for name in initial if name.startswith("visual.trunk.")]
    text = [name for name in initial if name.startswith(("transformer.", "token_embedding"))]
    assert visual and text
    assert all(torch.equal(initial[name], after[name]) for name in visual)  # weights and BatchNorm statistics
    assert any(not torch.equal(initial[name], after[name]) for name in text)


@pytest.mark.slow
def test_torch_compile_trains_the_same_as_eager(tmp_path):
    eager = tiny_train_config(tmp_path / "eager")
    eager.trainer.max_steps = 3
    train(eager)
    compiled = tiny_train_config(tmp_path / "compiled")
    compiled.trainer.max_steps = 3
    compiled.model.torch_compile = True
    train(compiled)
    assert _losses(compiled.run_dir) == pytest.approx(_losses(eager.run_dir), abs=1e-3)
