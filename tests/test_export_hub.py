"""Export back to the hub layout: a folder that ``hf-hub:`` (once uploaded) and ``local-dir:`` load in plain
open_clip, with a Hugging Face text tower's tokenizer files.

The model is BiomedCLIP's layout (a timm ViT and a Hugging Face BERT with its own hub repo) from the
fake hub of :mod:`hub_fixtures`; the "upload" is the export folder served as a new repo of that hub.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_train_config
from hub_fixtures import HUB_MODEL, FakeHub, hub_env, standard_repos, subprocess_env

from clip_med.core.io import temporaries
from clip_med.modeling.export import ExportConfig, export_checkpoint
from clip_med.modeling.factory import ModelBundle, ModelConfig, create_model
from clip_med.training.checkpoint import rng_state, save_checkpoint
from clip_med.training.state import TrainState, checkpoint_payload

TEXTS = ["an axial ct scan of the head", "a chest x ray", "mri of the spine showing a mass"]
UPLOADED = "clipmed-test/exported-biomedclip"

# Runs without clip_med (and without peft): what a user of plain open_clip does with the folder or the repo.
PLAIN_OPEN_CLIP = r"""
import sys
import open_clip, torch
name, images, result = sys.argv[1:4]
model, _, _ = open_clip.create_model_and_transforms(name)
model.eval()
tokens = open_clip.get_tokenizer(name)(__TEXTS__)
pixels = torch.load(images, weights_only=True)
with torch.no_grad():
    found = {"tokens": tokens, "image": model.encode_image(pixels, normalize=True),
             "text": model.encode_text(tokens, normalize=True)}
assert not any(module.split(".")[0] in ("clip_med", "peft") for module in sys.modules), "clip_med or peft imported"
torch.save(found, result)
""".replace("__TEXTS__", repr(TEXTS))


@pytest.fixture(scope="module")
def hub():
    with FakeHub(standard_repos()) as server:
        yield server


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("hf")


@pytest.fixture
def online(hub, cache, monkeypatch):
    hub_env(monkeypatch, hub.url, cache)
    return hub


def _fine_tuned_checkpoint(run_dir: Path) -> ModelBundle:
    """A checkpoint of the hub model as the trainer writes it, with weights moved away from the hub's."""
    cfg = tiny_train_config(run_dir)
    cfg.model = ModelConfig(name=HUB_MODEL)
    torch.manual_seed(3)
    bundle = create_model(cfg.model)
    with torch.no_grad():
        for param in bundle.model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    meta = {"model_name": bundle.name, "model_cfg": bundle.model_cfg, "config": dataclasses.asdict(cfg),
            "world_size": 1, "workers": 0, "batch_size": 16, "accum_freq": 1}
    payload = checkpoint_payload(bundle.model, torch.optim.AdamW(bundle.model.parameters()), None,
                                 TrainState(step=4), [rng_state()], meta)
    save_checkpoint(payload, run_dir, 4, keep_last=3)
    bundle.model.eval()
    return bundle


def _plain_open_clip(name: str, tmp_path: Path, env: dict[str, str], pixels: torch.Tensor) -> dict:
    import subprocess

    (tmp_path / "plain.py").write_text(PLAIN_OPEN_CLIP)
    torch.save(pixels, tmp_path / "pixels.pt")
    result = subprocess.run([sys.executable, str(tmp_path / "plain.py"), name, str(tmp_path / "pixels.pt"),
                             str(tmp_path / "plain.pt")], env={**env, "OMP_NUM_THREADS": "1"}, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(tmp_path / "plain.pt", weights_only=True)


def _assert_same_model(plain: dict, bundle: ModelBundle, pixels: torch.Tensor) -> None:
    tokens = bundle.tokenizer(TEXTS)
    assert torch.equal(plain["tokens"], tokens)  # open_clip's tokenizer for the folder tokenizes as clip_med's
    with torch.no_grad():
        torch.testing.assert_close(plain["image"], bundle.model.encode_image(pixels, normalize=True),
                                   rtol=0, atol=1e-5)
        torch.testing.assert_close(plain["text"], bundle.model.encode_text(tokens, normalize=True), rtol=0, atol=1e-5)


def test_export_of_a_hugging_face_text_tower_writes_its_tokenizer_and_loads_back(online, cache, tmp_path):
    bundle = _fine_tuned_checkpoint(tmp_path / "run")
    out = export_checkpoint(ExportConfig(checkpoint=str(tmp_path / "run"), out=str(tmp_path / "exported")))
    names = {path.name for path in out.iterdir()}
    assert {"open_clip_model.safetensors", "open_clip_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    info = json.loads((out / "export_info.json").read_text())
    assert "tokenizer.json" in info["tokenizer_files"] and info["lora_merged"] is None
    config = json.loads((out / "open_clip_config.json").read_text())
    assert config["model_cfg"]["text_cfg"]["hf_tokenizer_name"] == bundle.model_cfg["text_cfg"]["hf_tokenizer_name"]
    assert set(config["preprocess_cfg"]) >= {"size", "mean", "std", "interpolation", "resize_mode"}
    umask = os.umask(0)
    os.umask(umask)
    for path in out.iterdir():  # every file readable by others (atomic_write's mode, not a temporary's 0600)
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name
    assert temporaries(out) == []

    pixels = torch.randn(2, 3, bundle.image_size, bundle.image_size, generator=torch.Generator().manual_seed(0))
    plain = _plain_open_clip(f"local-dir:{out}", tmp_path, subprocess_env(online.url, cache), pixels)
    _assert_same_model(plain, bundle, pixels)


def test_the_export_uploaded_as_a_hub_repo_loads_with_hf_hub(online, cache, tmp_path):
    bundle = _fine_tuned_checkpoint(tmp_path / "run")
    out = export_checkpoint(ExportConfig(checkpoint=str(tmp_path / "run"), out=str(tmp_path / "exported")))
    online.add_repo(UPLOADED, {path.name: path.read_bytes() for path in out.iterdir()})
    online.requests.clear()
    pixels = torch.randn(2, 3, bundle.image_size, bundle.image_size, generator=torch.Generator().manual_seed(1))
    plain = _plain_open_clip(f"hf-hub:{UPLOADED}", tmp_path, subprocess_env(online.url, tmp_path / "fresh-cache"),
                             pixels)
    _assert_same_model(plain, bundle, pixels)
    assert any(path.endswith("/open_clip_model.safetensors") for path in online.downloads(UPLOADED))


def test_export_of_a_model_with_open_clip_s_tokenizer_writes_no_tokenizer_files(tmp_path):
    cfg = tiny_train_config(tmp_path)
    bundle = create_model(cfg.model)
    meta = {"model_name": bundle.name, "model_cfg": bundle.model_cfg, "config": dataclasses.asdict(cfg)}
    save_checkpoint(checkpoint_payload(bundle.model, torch.optim.AdamW(bundle.model.parameters()), None,
                                       TrainState(step=1), [rng_state()], meta), tmp_path / "run", 1, keep_last=1)
    out = export_checkpoint(ExportConfig(checkpoint=str(tmp_path / "run"), out=str(tmp_path / "exported")))
    assert not any(path.name.startswith(("tokenizer", "vocab", "special_tokens")) for path in out.iterdir())
