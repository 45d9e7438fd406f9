"""Fine-tuning controls: LoRA adapters on the towers (peft), per-tower learning rates, step-exact resume."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from helpers import tiny_train_config
from hub_fixtures import HUB_MODEL, FakeHub, hub_env, standard_repos, subprocess_env
from hydra import compose, initialize_config_dir
from open_clip_train.scheduler import cosine_lr

import clip_med
from clip_med.cli.config import CONF_DIR, to_object
from clip_med.modeling.checkpoint import CheckpointError, load_bundle
from clip_med.modeling.export import ExportConfig, export_checkpoint
from clip_med.modeling.factory import ModelConfig, create_model
from clip_med.modeling.hub import portable_pretrained
from clip_med.modeling.lora import BASE_SHA256, LoraConfig, base_fingerprint, load_trained_state, target_modules
from clip_med.training.checkpoint import latest_checkpoint, load_checkpoint
from clip_med.training.metrics_log import read_metrics
from clip_med.training.optim import OptimConfig, create_optimizer, create_scheduler
from clip_med.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["Axial CT of the head: no acute abnormality.", "chest X-ray", "MRI of the spine showing a mass."]
# medclip-tiny's image tower is a ResNet: adapt its last stage's convolutions and its projection.
IMAGE_TARGETS = ["layer4.0.conv1", "layer4.0.conv2", "head.proj"]


def _base_weights(tmp_path: Path) -> Path:
    """The "pretrained" weights a LoRA run adapts (an open_clip state dict of medclip-tiny at 32 px)."""
    path = tmp_path / "base.pt"
    if not path.is_file():
        torch.manual_seed(123)
        torch.save(create_model(ModelConfig(name="medclip-tiny", image_size=32)).model.state_dict(), path)
    return path


def _lora_config(tmp_path: Path, **trainer):
    cfg = tiny_train_config(tmp_path, **trainer)
    cfg.model.pretrained = str(_base_weights(tmp_path.parent))
    cfg.model.lora = LoraConfig(r=4, targets=[*IMAGE_TARGETS, "mlp.c_fc", "mlp.c_proj"])
    cfg.optim.lr = 1e-2
    return cfg


def _losses(run_dir) -> list[float]:
    return [row["train/loss"] for row in read_metrics(run_dir) if "train/loss" in row]


def _trainable(model: torch.nn.Module) -> list[str]:
    return [name for name, param in model.named_parameters() if param.requires_grad]


# ---------------------------------------------------------------------------------------------
# Adapters


def test_lora_trains_only_the_adapters_and_the_temperature(tmp_path):
    cfg = _lora_config(tmp_path / "run")
    model = create_model(cfg.model).model
    trainable = _trainable(model)
    assert "logit_scale" in trainable
    assert all("lora_" in name for name in trainable if name != "logit_scale")
    assert any(name.startswith("visual.trunk.layer4.0.conv1.lora_A") for name in trainable)
    assert any(name.startswith("transformer.resblocks.1.mlp.c_proj.lora_B") for name in trainable)
    assert sum(model.get_parameter(name).numel() for name in trainable) < 0.02 * sum(
        p.numel() for p in model.parameters())

    cfg.trainer.epochs = 4
    report = train(cfg)
    losses = _losses(cfg.run_dir)
    assert sum(losses[-6:]) / 6 < sum(losses[:6]) / 6 - 0.2, losses
    assert report["step"] == 24
    checkpoint = load_checkpoint(latest_checkpoint(cfg.run_dir))
    # The frozen weights after training are bit for bit those of model.pretrained ...
    assert checkpoint[BASE_SHA256] == base_fingerprint(create_model(cfg.model).model)
    # ... and the checkpoint holds only the trained parameters and the buffers (BatchNorm statistics).
    buffers = {name for name, _ in model.named_buffers()}
    assert set(checkpoint["state_dict"]) == set(trainable) | (buffers & set(model.state_dict()))


def test_base_weights_do_not_move_while_the_adapters_do(tmp_path):
    cfg = _lora_config(tmp_path / "run")
    model = create_model(cfg.model).model.train()
    before = {name: value.clone() for name, value in model.named_parameters()}
    optimizer = create_optimizer(model, cfg.optim)
    with torch.no_grad():  # lora_B starts at zero: give the adapters something to move from
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    images, tokens = torch.randn(4, 3, 32, 32), open_clip.get_tokenizer("medclip-tiny")(TEXTS + ["a scan"])
    for _ in range(2):
        out = model(images, tokens)
        logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(4))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    moved = {name for name, value in model.named_parameters() if not torch.equal(before[name], value)}
    assert moved and moved <= set(_trainable(model))
    assert any("lora_A" in name for name in moved) and "logit_scale" in moved


def test_default_targets_per_tower_type(tmp_path):
    """timm ViT qkv/proj, open_clip's transformer's MLP, BERT query/value; a ResNet falls back to Linear."""
    cfg = ModelConfig(name="medclip-tiny", image_size=32, pretrained=str(_base_weights(tmp_path)))
    model = create_model(cfg).model
    names = target_modules(model, LoraConfig(r=2))
    assert "visual.head.proj" in names  # the ResNet's only Linear layer
    assert {"transformer.resblocks.0.mlp.c_fc", "transformer.resblocks.1.mlp.c_proj"} <= set(names)
    assert not any(".attn" in name for name in names)  # nn.MultiheadAttention: not adapted
    assert target_modules(model, LoraConfig(r=2, towers=["text"])) == [n for n in names if not n.startswith("visual")]

    vit = open_clip.CustomTextCLIP(embed_dim=16, vision_cfg={"timm_model_name": "test_vit", "image_size": 160,
                                                             "timm_pool": "", "timm_proj": "linear"},
                                   text_cfg={"context_length": 8, "vocab_size": 100, "width": 16, "heads": 2,
                                             "layers": 1})
    names = target_modules(vit, LoraConfig(r=2, towers=["image"]))
    assert "visual.trunk.blocks.0.attn.qkv" in names and "visual.trunk.blocks.0.attn.proj" in names
    assert not any("patch_embed" in name or "mlp" in name for name in names)


def test_also_train_adds_whole_layers_and_lock_image_does_not_unfreeze(tmp_path):
    base = str(_base_weights(tmp_path))
    model = create_model(ModelConfig(name="medclip-tiny", image_size=32, pretrained=base, lock_image=True,
                                     lock_image_unlocked_groups=1,
                                     lora=LoraConfig(r=2, towers=["text"], also_train=["logit_scale",
                                                                                       "visual.head.*"]))).model
    trainable = _trainable(model)
    assert "visual.head.proj.weight" in trainable  # not adapted (text tower only), trained whole
    assert not any(name.startswith("visual.trunk.") for name in trainable)  # lock's unlocked group stays frozen
    assert all("lora_" in name or name in ("logit_scale", "visual.head.proj.weight") for name in trainable)


def test_layers_whose_weights_are_used_directly_get_no_silent_adapter():
    """A ModifiedResNet's (RN50's) attention pool calls F.multi_head_attention_forward with its Linear layers'
    weights: an adapter there would never run, so it is refused rather than trained for nothing."""
    from clip_med.modeling.lora import apply_lora

    def resnet_clip():
        return open_clip.CLIP(embed_dim=16, vision_cfg={"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
                              text_cfg={"context_length": 8, "vocab_size": 100, "width": 16, "heads": 2, "layers": 1})

    for targets in (None, ["attnpool.c_proj"]):
        with pytest.raises(ValueError, match="never run as modules.*model.lora.targets"):
            apply_lora(resnet_clip(), LoraConfig(r=2, towers=["image"], targets=targets), pretrained=True)
    model = apply_lora(resnet_clip(), LoraConfig(r=2, towers=["image"], targets=["layer4.0.conv2"]), pretrained=True)
    assert any("layer4.0.conv2.lora_A" in name for name in _trainable(model))


def test_lora_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="model.pretrained"):
        create_model(ModelConfig(name="medclip-tiny", image_size=32, lora=LoraConfig(r=4)))
    base = str(_base_weights(tmp_path))
    with pytest.raises(ValueError, match="match no layer of the image tower.*head.proj"):
        create_model(ModelConfig(name="medclip-tiny", image_size=32, pretrained=base,
                                 lora=LoraConfig(r=4, targets=["qkv"])))
    with pytest.raises(ValueError, match="MultiheadAttention.*mlp.c_fc"):
        create_model(ModelConfig(name="medclip-tiny", image_size=32, pretrained=base,
                                 lora=LoraConfig(r=4, towers=["text"], targets=["attn.out_proj"])))
    with pytest.raises(ValueError, match="towers"):
        create_model(ModelConfig(name="medclip-tiny", image_size=32, pretrained=base,
                                 lora=LoraConfig(r=4, towers=["vision"])))


def test_lora_config_composes_from_the_command_line():
    import clip_med.train  # noqa: F401  (registers the train schema)

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = to_object(compose("train", overrides=[
            "model.pretrained=base.pt", "model.lora.r=16", "model.lora.targets=[attn.qkv,query,value]",
            "model.lora.towers=[text]", "model.lora.alpha=32", "optim.lr_image=1e-5", "optim.lr_text=2e-5"]))
    assert cfg.model.lora == LoraConfig(r=16, alpha=32, towers=["text"], targets=["attn.qkv", "query", "value"])
    assert (cfg.optim.lr_image, cfg.optim.lr_text) == (1e-5, 2e-5)


# ---------------------------------------------------------------------------------------------
# Checkpoints: small, step-exact resume, the one rebuild path, export


def _crash_after(monkeypatch, steps):
    import clip_med.training.trainer as trainer

    original, calls = trainer._train_step, {"n": 0}

    def step(run, batch):
        calls["n"] += 1
        if calls["n"] > steps:
            raise RuntimeError("simulated crash")
        return original(run, batch)

    monkeypatch.setattr(trainer, "_train_step", step)


def test_lora_checkpoint_is_small_and_resumes_exactly(tmp_path, monkeypatch):
    reference = _lora_config(tmp_path / "a")
    train(reference)
    crashed = _lora_config(tmp_path / "b")
    crashed.trainer.checkpoint_every_steps = 3  # a checkpoint inside epoch 1 (6 steps per epoch)
    with monkeypatch.context() as patch:
        _crash_after(patch, 4)
        with pytest.raises(RuntimeError):
            train(crashed)
    assert latest_checkpoint(crashed.run_dir).name == "step-00000003.pt"
    logged = _losses(crashed.run_dir)
    other_rates = _lora_config(tmp_path / "b")
    other_rates.resume, other_rates.optim.lr_text = "latest", 1e-3  # one more pair of parameter groups
    with pytest.raises(ValueError, match=r"optim\.lr_text: checkpoint none, this run its own learning rate") as refused:
        train(other_rates)
    assert "\n" not in str(refused.value) and "model.pretrained=" in str(refused.value)
    assert _losses(crashed.run_dir) == logged  # refused before any step
    resumed = _lora_config(tmp_path / "b")
    resumed.resume = "latest"
    train(resumed)
    losses = _losses(resumed.run_dir)
    assert len(losses) == 3 + 9
    assert losses[-9:] == pytest.approx(_losses(reference.run_dir)[-9:], abs=1e-5)
    expected, got = (load_checkpoint(latest_checkpoint(run.run_dir)) for run in (reference, resumed))
    assert expected["train_state"]["step"] == got["train_state"]["step"] == 12
    assert expected["state_dict"].keys() == got["state_dict"].keys()
    for name, value in expected["state_dict"].items():
        assert torch.equal(got["state_dict"][name], value), name

    lora_size = latest_checkpoint(reference.run_dir).stat().st_size
    full_weights = _base_weights(tmp_path).stat().st_size  # a full checkpoint holds these and 2x for AdamW
    assert lora_size * 20 < full_weights, (lora_size, full_weights)


def test_a_relative_model_pretrained_is_recorded_absolute_so_the_checkpoint_loads_elsewhere(tmp_path, monkeypatch):
    cfg = _lora_config(tmp_path / "run", epochs=1)
    monkeypatch.chdir(tmp_path)
    cfg.model.pretrained = "base.pt"  # as typed on the command line, next to the weights
    train(cfg)
    path = latest_checkpoint(cfg.run_dir)
    assert load_checkpoint(path)["config"]["model"]["pretrained"] == str((tmp_path / "base.pt").resolve())
    monkeypatch.chdir(tmp_path / "run")  # no base.pt here: the rebuild reads it by its absolute path
    assert clip_med.load(path, device="cpu").info.step == 6
    # Tags and hub names are names, not paths: recorded as given.
    assert portable_pretrained("RN50", "openai") == "openai"
    assert portable_pretrained(HUB_MODEL, "base.pt") == "base.pt"


@pytest.fixture(scope="module")
def one_epoch_lora_run(tmp_path_factory):
    cfg = _lora_config(tmp_path_factory.mktemp("lora") / "run", epochs=1)
    train(cfg)
    return cfg


def test_lora_checkpoint_rebuilds_merged_and_refuses_another_base(one_epoch_lora_run):
    cfg = one_epoch_lora_run
    path = latest_checkpoint(cfg.run_dir)
    trained = create_model(cfg.model).model.eval()
    load_trained_state(trained, load_checkpoint(path))
    bundle, info = load_bundle(path)  # weights_only=True; base weights from model.pretrained
    assert info.step == 6 and not any("lora" in key or "base_layer" in key for key in bundle.model.state_dict())
    images, tokens = torch.randn(2, 3, 32, 32), bundle.tokenizer(TEXTS[:2])
    with torch.no_grad():
        for encode in ("encode_image", "encode_text"):
            inputs = images if encode == "encode_image" else tokens
            torch.testing.assert_close(getattr(bundle.model, encode)(inputs, normalize=True),
                                       getattr(trained, encode)(inputs, normalize=True), rtol=0, atol=1e-5)

    payload = load_checkpoint(path)
    payload[BASE_SHA256] = "0" * 64  # as if model.pretrained's file had been replaced since
    with pytest.raises(CheckpointError, match="frozen base weights differ"):
        from clip_med.modeling.checkpoint import bundle_from_payload

        bundle_from_payload(payload, path)


PLAIN_OPEN_CLIP = r"""
import sys
import open_clip, torch
out, result = sys.argv[1:3]
model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
model.eval()
tokens = open_clip.get_tokenizer(f"local-dir:{out}")(__TEXTS__)
torch.manual_seed(0)
images = torch.randn(2, 3, 32, 32)
with torch.no_grad():
    found = {"image": model.encode_image(images, normalize=True), "text": model.encode_text(tokens, normalize=True),
             "tokens": tokens, "images": images}
assert not any(name.split(".")[0] in ("clip_med", "peft") for name in sys.modules), "peft or clip_med imported"
torch.save(found, result)
""".replace("__TEXTS__", repr(TEXTS))


def test_lora_export_loads_in_plain_open_clip_without_peft(one_epoch_lora_run, tmp_path):
    cfg = one_epoch_lora_run
    out = export_checkpoint(ExportConfig(checkpoint=cfg.run_dir, out=str(tmp_path / "exported")))
    info = json.loads((out / "export_info.json").read_text())
    assert info["lora_merged"]["r"] == 4 and info["tokenizer_files"] == []
    (tmp_path / "plain.py").write_text(PLAIN_OPEN_CLIP)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(tmp_path / "plain.py"), str(out), str(tmp_path / "plain.pt")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    plain = torch.load(tmp_path / "plain.pt", weights_only=True)

    trained = create_model(cfg.model).model.eval()  # the unmerged adapters, as training left them
    load_trained_state(trained, load_checkpoint(latest_checkpoint(cfg.run_dir)))
    with torch.no_grad():
        torch.testing.assert_close(plain["image"], trained.encode_image(plain["images"], normalize=True),
                                   rtol=0, atol=1e-5)
        torch.testing.assert_close(plain["text"], trained.encode_text(plain["tokens"], normalize=True),
                                   rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def hub():
    with FakeHub(standard_repos()) as server:
        yield server


def test_lora_on_a_biomedclip_layout_model_trains_and_exports_to_plain_open_clip(hub, tmp_path, monkeypatch):
    """BiomedCLIP's layout from the (fake) hub: adapters on the timm ViT's qkv/proj and BERT's query/value."""
    hub_env(monkeypatch, hub.url, tmp_path / "hf")
    cfg = tiny_train_config(tmp_path, epochs=4)
    cfg.source = dataclasses.replace(cfg.source, sizes={"train": 48, "dev": 16})
    cfg.model = ModelConfig(name=HUB_MODEL, lora=LoraConfig(r=8))
    cfg.optim.lr = 5e-3
    model = create_model(cfg.model).model
    adapted = {name.split(".lora_")[0] for name in _trainable(model) if "lora_" in name}
    assert {"visual.trunk.blocks.0.attn.qkv", "visual.trunk.blocks.5.attn.proj",
            "text.transformer.encoder.layer.1.attention.self.query",
            "text.transformer.encoder.layer.0.attention.self.value"} <= adapted
    assert all(".attn." in name or ".attention.self." in name for name in adapted)

    train(cfg)
    losses = _losses(cfg.run_dir)
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    checkpoint = latest_checkpoint(cfg.run_dir)
    full = 3 * sum(p.numel() * 4 for p in model.parameters())  # a full checkpoint: fp32 weights and AdamW's 2 moments
    assert checkpoint.stat().st_size * 10 < full

    out = export_checkpoint(ExportConfig(checkpoint=cfg.run_dir, out=str(tmp_path / "exported")))
    (tmp_path / "plain.py").write_text(PLAIN_OPEN_CLIP.replace("32, 32", "160, 160"))
    env = {**subprocess_env(hub.url, tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(tmp_path / "plain.py"), str(out), str(tmp_path / "plain.pt")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    plain = torch.load(tmp_path / "plain.pt", weights_only=True)
    trained = create_model(cfg.model)
    load_trained_state(trained.model, load_checkpoint(checkpoint))
    trained.model.eval()
    assert torch.equal(plain["tokens"], trained.tokenizer(TEXTS))
    with torch.no_grad():
        torch.testing.assert_close(plain["image"], trained.model.encode_image(plain["images"], normalize=True),
                                   rtol=0, atol=1e-5)
        torch.testing.assert_close(plain["text"], trained.model.encode_text(plain["tokens"], normalize=True),
                                   rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Per-tower learning rates


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(ModelConfig(name="medclip-tiny", image_size=32)).model


def _group_of(optimizer: torch.optim.Optimizer) -> dict[int, dict]:
    return {id(param): group for group in optimizer.param_groups for param in group["params"]}


def test_each_tower_gets_its_learning_rate_and_keeps_weight_decay_grouping():
    model = _model()
    cfg = OptimConfig(lr=1e-3, lr_image=1e-4, lr_text=5e-4, weight_decay=0.2)
    optimizer = create_optimizer(model, cfg)
    groups = _group_of(optimizer)
    for name, param in model.named_parameters():
        group = groups[id(param)]
        expected = 1e-4 if name.startswith("visual.") else 1e-3 if name == "logit_scale" else 5e-4
        assert group["lr"] == expected, name
        no_decay = param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        assert group["weight_decay"] == (0.0 if no_decay else 0.2), name
    assert len(optimizer.param_groups) == 6

    schedule = create_scheduler(optimizer, cfg, total_steps=20)
    for step in (0, 1, 5, 13, 19):
        main = schedule(step)
        for name, param in model.named_parameters():
            ratio = 0.1 if name.startswith("visual.") else 1.0 if name == "logit_scale" else 0.5
            assert groups[id(param)]["lr"] == pytest.approx(main * ratio, rel=1e-12), (step, name)
    assert schedule(19) < schedule(5) < 1e-3


def test_default_single_lr_is_open_clip_s_grouping_and_schedule_exactly():
    model = _model()
    cfg = OptimConfig(lr=2e-3, warmup=3)
    optimizer = create_optimizer(model, cfg)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.0, cfg.weight_decay]
    named = list(model.named_parameters())
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [
        id(p) for n, p in named if p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n]
    reference = torch.optim.AdamW([{"params": [torch.zeros(1)]}], lr=cfg.lr)
    expected = cosine_lr(reference, cfg.lr, 3, 30)
    schedule = create_scheduler(optimizer, cfg, total_steps=30)
    for step in range(30):
        lr = schedule(step)
        assert lr == expected(step) and all(group["lr"] == lr for group in optimizer.param_groups)
    assert math.isclose(schedule(0), cfg.lr / 3)


def test_lora_adapters_take_their_tower_s_learning_rate(tmp_path):
    cfg = _lora_config(tmp_path / "run")
    model = create_model(cfg.model).model
    optimizer = create_optimizer(model, OptimConfig(lr=1e-3, lr_image=1e-5))
    groups = _group_of(optimizer)
    for name in _trainable(model):
        assert groups[id(model.get_parameter(name))]["lr"] == (1e-5 if name.startswith("visual.") else 1e-3), name
    assert not any(id(p) in groups for p in model.parameters() if not p.requires_grad)


def test_optimizer_state_with_other_per_tower_groups_is_refused_in_one_line():
    model = _model()
    saved = create_optimizer(model, OptimConfig(lr=1e-3, lr_image=1e-4)).state_dict()
    create_optimizer(model, OptimConfig(lr=1e-3, lr_image=5e-5)).load_state_dict(saved)  # other value, same groups
    with pytest.raises(ValueError, match=r"\(optim\.lr_image: checkpoint its own learning rate, this run none\)\. "
                                         r"Resume with the optim\.lr_image / optim\.lr_text values"):
        create_optimizer(model, OptimConfig(lr=1e-3)).load_state_dict(saved)
    with pytest.raises(ValueError, match=r"optim\.lr_image: checkpoint its own learning rate, this run none; "
                                         r"optim\.lr_text: checkpoint none, this run its own learning rate"):
        create_optimizer(model, OptimConfig(lr=1e-3, lr_text=1e-4)).load_state_dict(saved)


def test_optimizer_state_of_another_lock_setting_is_refused_in_one_line():
    saved = create_optimizer(_model(), OptimConfig(lr=1e-3)).state_dict()
    locked = create_model(ModelConfig(name="medclip-tiny", image_size=32, lock_image=True)).model
    with pytest.raises(ValueError, match=r"cannot resume: the checkpoint's optimizer trained \d+ tensors, this run "
                                         r"trains \d+ .*Resume with the model settings the checkpoint was trained "
                                         r"with \(model\.lock_image"):
        create_optimizer(locked, OptimConfig(lr=1e-3)).load_state_dict(saved)


def test_a_local_dir_model_is_recorded_by_its_absolute_path(tmp_path, monkeypatch):
    """A checkpoint or embedding folder of a model typed as ``local-dir:<relative folder>`` reloads elsewhere."""
    from clip_med.modeling.checkpoint import CheckpointInfo
    from clip_med.modeling.hub import portable_name
    from clip_med.training.state import _portable_config

    (tmp_path / "export").mkdir()
    monkeypatch.chdir(tmp_path)
    absolute = f"local-dir:{(tmp_path / 'export').resolve()}"
    assert portable_name("local-dir:export") == absolute
    assert portable_name("local-dir:not-here") == "local-dir:not-here"  # refused later, by the loader, as typed
    assert portable_name("ViT-B-16") == "ViT-B-16" and portable_name(HUB_MODEL) == HUB_MODEL
    meta = {"model_name": "local-dir:export",
            "config": {"seed": 3, "model": {"name": "local-dir:export", "pretrained": None, "image_size": 32}}}
    portable = _portable_config(meta)
    assert portable["model_name"] == absolute
    assert portable["config"] == {"seed": 3, "model": {"name": absolute, "pretrained": None, "image_size": 32}}
    info = CheckpointInfo(path=tmp_path / "export", format="pretrained", model_name="local-dir:export")
    assert info.reload_args()["model_name"] == absolute
