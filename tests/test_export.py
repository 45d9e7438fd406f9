"""open_clip interop: exported checkpoints load in plain open_clip; open_clip checkpoints start training."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_train_config, write_png
from hydra import compose, initialize_config_dir
from PIL import Image

from clip_med.cli.config import CONF_DIR, to_object
from clip_med.data.transforms import create_transform
from clip_med.modeling.export import ExportConfig, ExportError, export_checkpoint
from clip_med.modeling.factory import ModelConfig, create_model
from clip_med.modeling.losses import LossConfig, model_kwargs_for
from clip_med.training.checkpoint import rng_state, save_checkpoint
from clip_med.training.state import TrainState, checkpoint_payload

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["Axial CT of the head: no acute abnormality.", "chest X-ray", "MRI of the spine showing a mass."]

# Runs without clip_med: what a user of plain open_clip does with the exported folder.
PLAIN_OPEN_CLIP = r"""
import json, sys
import open_clip, torch
from PIL import Image
assert "clip_med" not in sys.modules
out, inputs, result = sys.argv[1:4]
spec = json.load(open(inputs))
images = [Image.open(path) for path in spec["images"]]
found = {}
for how in ("local_dir", "by_name"):
    if how == "local_dir":
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
        tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    else:
        open_clip.add_model_config(out)
        model, _, preprocess = open_clip.create_model_and_transforms(
            spec["name"], pretrained=f"{out}/open_clip_model.safetensors")
        tokenizer = open_clip.get_tokenizer(spec["name"])
    model.eval()
    pixels = torch.stack([preprocess(image) for image in images])
    tokens = tokenizer(spec["texts"])
    with torch.no_grad():
        found[how] = {"pixels": pixels, "tokens": tokens, "image": model.encode_image(pixels, normalize=True),
                      "text": model.encode_text(tokens, normalize=True)}
torch.save(found, result)
"""


def _train_like_checkpoint(tmp_path: Path, loss: str = "clip") -> tuple[Path, torch.nn.Module]:
    """A checkpoint as the trainer writes it, of a model whose weights are not the initial ones."""
    cfg = tiny_train_config(tmp_path)
    cfg.loss = LossConfig(name=loss)
    torch.manual_seed(1)
    bundle = create_model(cfg.model, "cpu", **model_kwargs_for(cfg.loss))
    with torch.no_grad():
        for param in bundle.model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    optimizer = torch.optim.AdamW(bundle.model.parameters())
    meta = {"model_name": bundle.name, "model_cfg": bundle.model_cfg, "config": dataclasses.asdict(cfg),
            "world_size": 1, "workers": 0, "batch_size": 16, "accum_freq": 1}
    payload = checkpoint_payload(bundle.model, optimizer, None, TrainState(step=7), [rng_state()], meta)
    return save_checkpoint(payload, tmp_path / "run", 7, keep_last=3), bundle.model.eval()


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def _images(tmp_path: Path) -> list[Path]:
    paths = [write_png(tmp_path / "gray.png", size=(48, 40), mode="L", seed=3),
             write_png(tmp_path / "rgb.png", size=(50, 70), mode="RGB", seed=4)]
    return paths


def _clip_med_embeddings(model: torch.nn.Module, image_paths: list[Path]) -> dict[str, torch.Tensor]:
    bundle = create_model(ModelConfig(name="medclip-tiny", image_size=32))
    transform = create_transform(bundle.image_size, bundle.mean, bundle.std, train=False)
    pixels = torch.stack([transform(Image.open(path)) for path in image_paths])
    tokens = bundle.tokenizer(TEXTS)
    with torch.no_grad():
        return {"pixels": pixels, "tokens": tokens, "image": model.encode_image(pixels, normalize=True),
                "text": model.encode_text(tokens, normalize=True)}


def test_export_command_writes_what_plain_open_clip_loads_with_the_same_embeddings(tmp_path):
    checkpoint, model = _train_like_checkpoint(tmp_path)
    out = tmp_path / "exported"
    result = _run(["-m", "clip_med.export", f"checkpoint={tmp_path / 'run'}", f"out={out}", "name=medpix-tiny"],
                  tmp_path)
    assert "exported to" in result.stdout
    assert {p.name for p in out.iterdir()} == {"open_clip_model.safetensors", "open_clip_config.json",
                                              "medpix-tiny.json", "export_info.json"}
    info = json.loads((out / "export_info.json").read_text())
    assert info["step"] == 7 and info["source_checkpoint"] == str(checkpoint.resolve())
    assert not (tmp_path / "outputs").exists() and not (tmp_path / ".hydra").exists()

    images = _images(tmp_path)
    spec = tmp_path / "inputs.json"
    spec.write_text(json.dumps({"images": [str(p) for p in images], "texts": TEXTS, "name": "medpix-tiny"}))
    (tmp_path / "plain.py").write_text(PLAIN_OPEN_CLIP)
    _run([str(tmp_path / "plain.py"), str(out), str(spec), str(tmp_path / "plain.pt")], tmp_path)
    plain = torch.load(tmp_path / "plain.pt", weights_only=True)

    expected = _clip_med_embeddings(model, images)
    for how in ("local_dir", "by_name"):
        assert torch.equal(plain[how]["pixels"], expected["pixels"]), how  # same preprocessing
        assert torch.equal(plain[how]["tokens"], expected["tokens"]), how
        for kind in ("image", "text"):
            torch.testing.assert_close(plain[how][kind], expected[kind], rtol=0, atol=1e-5)
    # ...and clip_med starts fine-tuning from the exported folder with the same weights.
    restarted = create_model(ModelConfig(name="medclip-tiny", image_size=32, pretrained=str(out))).model.eval()
    for name, value in model.state_dict().items():
        assert torch.equal(restarted.state_dict()[name], value), name


def test_siglip_export_keeps_the_bias(tmp_path):
    _, model = _train_like_checkpoint(tmp_path, loss="siglip")
    out = export_checkpoint(ExportConfig(checkpoint=str(tmp_path / "run"), out=str(tmp_path / "exported")))
    config = json.loads((out / "open_clip_config.json").read_text())
    assert config["model_cfg"]["init_logit_bias"] == pytest.approx(float(model.logit_bias.detach()))
    assert config["model_cfg"]["vision_cfg"]["image_size"] == 32
    assert config["preprocess_cfg"]["size"] == [32, 32]
    assert (out / "exported.json").is_file()  # the architecture's name defaults to the folder's


def test_export_refuses_to_overwrite_and_explains_plain_state_dicts(tmp_path):
    _train_like_checkpoint(tmp_path)
    out = tmp_path / "exported"
    out.mkdir()
    (out / "something").write_text("x")
    with pytest.raises(ExportError, match="not empty.*overwrite=true"):
        export_checkpoint(ExportConfig(checkpoint=str(tmp_path / "run"), out=str(out)))
    plain = tmp_path / "plain.pt"
    torch.save(create_model(ModelConfig(name="medclip-tiny", image_size=32)).model.state_dict(), plain)
    with pytest.raises(ExportError, match="not a clip_med training checkpoint"):
        export_checkpoint(ExportConfig(checkpoint=str(plain), out=str(tmp_path / "other")))


def test_export_config_composes_and_requires_its_paths():
    from omegaconf.errors import MissingMandatoryValue

    import clip_med.export  # noqa: F401  (registers export_schema)

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = to_object(compose("export", overrides=["checkpoint=runs/x", "out=exports/y"]))
        assert isinstance(cfg, ExportConfig) and cfg.verify and cfg.name is None
        with pytest.raises(MissingMandatoryValue):
            to_object(compose("export", overrides=["out=exports/y"]))
        with pytest.raises(Exception, match="checkpint"):
            compose("export", overrides=["checkpint=runs/x"])


def test_pretrained_accepts_an_open_clip_train_checkpoint(tmp_path):
    source = create_model(ModelConfig(name="medclip-tiny", image_size=32)).model
    with torch.no_grad():
        source.logit_scale.fill_(3.0)
    optimizer = torch.optim.AdamW(source.parameters())
    # What open_clip_train writes (epoch_N.pt): DDP's "module." prefix, optimizer state, metadata.
    path = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()},
                "optimizer": optimizer.state_dict()}, path)
    loaded = create_model(ModelConfig(name="medclip-tiny", image_size=32, pretrained=str(path))).model
    for name, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    with pytest.raises(FileNotFoundError, match="not a file"):
        create_model(ModelConfig(name="medclip-tiny", pretrained=str(tmp_path / "missing.pt")))


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {_Exploit.marker}",))


def test_a_pickled_payload_in_a_pretrained_file_is_refused_not_run(tmp_path):
    _Exploit.marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": _Exploit()}, handle)
    with pytest.raises(Exception, match="(?i)weights.only|unpickl"):
        create_model(ModelConfig(name="medclip-tiny", image_size=32, pretrained=str(path)))
    assert not _Exploit.marker.exists()
