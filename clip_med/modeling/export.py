"""A training checkpoint -> a folder plain open_clip loads (safetensors weights + open_clip config).

The folder holds:

- ``open_clip_model.safetensors``: the model's weights;
- ``open_clip_config.json``: ``{"model_cfg": ..., "preprocess_cfg": ...}``, which is what
  ``open_clip.create_model_and_transforms("local-dir:<folder>")`` reads;
- ``<name>.json``: the bare architecture config, so that ``open_clip.add_model_config(<folder>)``
  followed by ``open_clip.create_model_and_transforms("<name>", pretrained="<folder>/open_clip_model.safetensors")``
  works too;
- ``export_info.json``: where the weights came from (checkpoint, step, source, SHA-256).

After writing, the folder is loaded back through open_clip's own ``local-dir:`` path and its
weights and embeddings are compared with the checkpoint's; a mismatch is an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import open_clip
import torch
from safetensors.torch import save_file

from clip_med.core.io import atomic_write, write_text_atomic
from clip_med.modeling.checkpoint import bundle_from_payload, find_resume_checkpoint, is_clip_med_checkpoint
from clip_med.modeling.factory import ModelBundle, clip_model

log = logging.getLogger(__name__)

WEIGHTS = "open_clip_model.safetensors"
CONFIG = "open_clip_config.json"
INFO = "export_info.json"


@dataclass
class ExportConfig:
    checkpoint: str = "???"  # a checkpoint file, or a run folder (its newest readable checkpoint)
    out: str = "???"  # the folder to write
    # Architecture name for <name>.json and open_clip.create_model(name, pretrained=...); None: the folder's name.
    name: Optional[str] = None
    overwrite: bool = False
    verify: bool = True  # load the export back through open_clip and compare weights and embeddings


class ExportError(ValueError):
    """A checkpoint that cannot be exported, or an export that does not load back identically."""


def _load_training_checkpoint(path: str) -> tuple[Path, dict[str, Any]]:
    found = find_resume_checkpoint(path, Path(path).parent)
    if found is None:
        raise ExportError(f"checkpoint={path}: no readable checkpoint there")
    source, payload = found
    if not is_clip_med_checkpoint(payload):
        raise ExportError(f"{source} is not a clip_med training checkpoint (it has no model name): if it is an "
                          "open_clip state dict already, load it with open_clip.create_model(<name>, pretrained=...)")
    return source, payload


def open_clip_configs(bundle: ModelBundle, state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``open_clip_config.json``'s content for this model."""
    model_cfg = json.loads(json.dumps(bundle.model_cfg))
    if "logit_bias" in state_dict:  # SigLIP: the model needs a bias parameter to load into
        model_cfg["init_logit_bias"] = float(state_dict["logit_bias"].reshape(-1)[0])
    preprocess = dict(clip_model(bundle.model).visual.preprocess_cfg)
    preprocess["size"] = list(preprocess["size"]) if isinstance(preprocess["size"], (tuple, list)) else \
        preprocess["size"]
    preprocess["mean"], preprocess["std"] = list(preprocess["mean"]), list(preprocess["std"])
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess}


def _check_tokenizer(model_cfg: dict[str, Any]) -> None:
    if model_cfg.get("text_cfg", {}).get("hf_tokenizer_name"):
        raise ExportError(
            "this model uses a Hugging Face tokenizer, which open_clip's local-dir: loader reads from the export "
            "folder itself; exporting its files is not supported yet. Load the weights with "
            "open_clip.create_model(<name>, pretrained=<folder>/open_clip_model.safetensors) instead."
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json(path: Path, value: Any) -> None:
    write_text_atomic(path, json.dumps(value, indent=2) + "\n")


def export_checkpoint(cfg: ExportConfig) -> Path:
    """Write the export folder and return it."""
    source, payload = _load_training_checkpoint(cfg.checkpoint)
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise ExportError(f"out={out} exists and is not empty: choose another folder or pass overwrite=true")
    bundle, _ = bundle_from_payload(payload, source)
    state_dict = {key: value.detach().contiguous() for key, value in bundle.model.state_dict().items()}
    configs = open_clip_configs(bundle, state_dict)
    _check_tokenizer(configs["model_cfg"])
    name = cfg.name or out.resolve().name
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / WEIGHTS, "path") as tmp:  # readable by others: the umask's mode, not safetensors' 0600
        save_file(state_dict, str(tmp), metadata={"format": "pt", "source": "clip_med"})
    _write_json(out / CONFIG, configs)
    _write_json(out / f"{name}.json", configs["model_cfg"])
    _write_json(out / INFO, {
        "source_checkpoint": str(source.resolve()), "step": (payload.get("train_state") or {}).get("step"),
        "model_name": payload["model_name"], "name": name, "weights_sha256": _sha256(out / WEIGHTS),
        "load": {"local_dir": f"open_clip.create_model_and_transforms('local-dir:{out}')",
                 "by_name": f"open_clip.add_model_config('{out}'); open_clip.create_model_and_transforms("
                            f"'{name}', pretrained='{out / WEIGHTS}')"},
    })
    if cfg.verify:
        verify_export(out, bundle)
    log.info("exported %s (step %s) to %s", source, (payload.get("train_state") or {}).get("step"), out)
    return out


def verify_export(out: Path, bundle: ModelBundle, atol: float = 1e-5) -> float:
    """Load ``out`` with open_clip's local-dir: loader; weights must be equal and embeddings within ``atol``."""
    loaded, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    loaded.eval()
    expected, got = bundle.model.state_dict(), loaded.state_dict()
    if expected.keys() != got.keys() or any(not torch.equal(expected[k], got[k]) for k in expected):
        raise ExportError(f"{out} does not load back into open_clip with the same weights")
    generator = torch.Generator().manual_seed(0)
    size = bundle.image_size
    images = torch.randn(2, 3, size, size, generator=generator)
    texts = open_clip.get_tokenizer(f"local-dir:{out}")(["a CT of the head", "chest X-ray"])
    with torch.no_grad():
        diff = max(float((clip_model(bundle.model).encode_image(images, normalize=True)
                          - loaded.encode_image(images, normalize=True)).abs().max()),
                   float((clip_model(bundle.model).encode_text(texts, normalize=True)
                          - loaded.encode_text(texts, normalize=True)).abs().max()))
    if diff > atol:
        raise ExportError(f"{out}: open_clip's embeddings differ from clip_med's by {diff:.2e} (> {atol})")
    return diff
