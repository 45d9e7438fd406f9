"""A training checkpoint -> a folder in the hub's open_clip layout (what ``hf-hub:`` and ``local-dir:`` load).

The folder holds:

- ``open_clip_model.safetensors``: the model's weights (a LoRA run's adapters merged into them, so
  loading needs neither peft nor clip_med); open_clip's ``hf-hub:`` loader looks for this name
  before ``open_clip_pytorch_model.bin``, so no pickle file is written;
- ``open_clip_config.json``: ``{"model_cfg": ..., "preprocess_cfg": ...}``, which is what
  ``open_clip.create_model_and_transforms("local-dir:<folder>")`` (or ``"hf-hub:<repo>"`` once the
  folder is uploaded as ``<repo>``) reads;
- for a Hugging Face text tower, its tokenizer's files (``tokenizer.save_pretrained``):
  ``local-dir:`` reads the tokenizer from the folder itself, and ``hf-hub:`` from
  ``text_cfg.hf_tokenizer_name`` (kept as trained: the tower's own hub repo, as BiomedCLIP does);
  the text tower's architecture is read from ``text_cfg.hf_model_name`` as for the original model;
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
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import open_clip
import torch
from safetensors.torch import save_file

from clip_med.core.io import atomic_write, write_bytes_atomic, write_text_atomic
from clip_med.modeling.checkpoint import bundle_from_payload, find_resume_checkpoint, is_clip_med_checkpoint
from clip_med.modeling.factory import ModelBundle, clip_model
from clip_med.modeling.lora import BASE_SHA256

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


def _write_tokenizer_files(bundle: ModelBundle, model_cfg: dict[str, Any], out: Path) -> list[str]:
    """A Hugging Face tokenizer's files into ``out`` (open_clip's default tokenizer needs none); their names."""
    if not model_cfg.get("text_cfg", {}).get("hf_tokenizer_name"):
        return []
    if not hasattr(bundle.tokenizer, "save_pretrained"):
        raise ExportError(f"the model's config names a Hugging Face tokenizer but clip_med's tokenizer is a "
                          f"{type(bundle.tokenizer).__name__}, which cannot save its files")
    names = []
    with tempfile.TemporaryDirectory(prefix="clip_med_tokenizer_") as folder:
        bundle.tokenizer.save_pretrained(folder)
        for path in sorted(Path(folder).iterdir()):
            if path.is_file():
                write_bytes_atomic(out / path.name, path.read_bytes())
                names.append(path.name)
    return names


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
    name = cfg.name or out.resolve().name
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / WEIGHTS, "path") as tmp:  # readable by others: the umask's mode, not safetensors' 0600
        save_file(state_dict, str(tmp), metadata={"format": "pt", "source": "clip_med"})
    tokenizer_files = _write_tokenizer_files(bundle, configs["model_cfg"], out)
    _write_json(out / CONFIG, configs)
    _write_json(out / f"{name}.json", configs["model_cfg"])
    trained_model = (payload.get("config") or {}).get("model") or {}
    _write_json(out / INFO, {
        "source_checkpoint": str(source.resolve()), "step": (payload.get("train_state") or {}).get("step"),
        "model_name": payload["model_name"], "name": name, "weights_sha256": _sha256(out / WEIGHTS),
        "tokenizer_files": tokenizer_files,
        "lora_merged": trained_model.get("lora") if BASE_SHA256 in payload else None,
        "load": {"local_dir": f"open_clip.create_model_and_transforms('local-dir:{out}')",
                 "by_name": f"open_clip.add_model_config('{out}'); open_clip.create_model_and_transforms("
                            f"'{name}', pretrained='{out / WEIGHTS}')"},
    })
    if cfg.verify:
        verify_export(out, bundle)
    log.info("exported %s (step %s) to %s", source, (payload.get("train_state") or {}).get("step"), out)
    return out


def verify_export(out: Path, bundle: ModelBundle, atol: float = 1e-5) -> float:
    """Load ``out`` with open_clip's local-dir: loader; weights and tokens must be equal, embeddings within ``atol``."""
    loaded, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    loaded.eval()
    expected, got = bundle.model.state_dict(), loaded.state_dict()
    if expected.keys() != got.keys() or any(not torch.equal(expected[k], got[k]) for k in expected):
        raise ExportError(f"{out} does not load back into open_clip with the same weights")
    generator = torch.Generator().manual_seed(0)
    size = bundle.image_size
    images = torch.randn(2, 3, size, size, generator=generator)
    sentences = ["a CT of the head", "chest X-ray"]
    texts = open_clip.get_tokenizer(f"local-dir:{out}")(sentences)
    if not torch.equal(texts, bundle.tokenizer(sentences)):
        raise ExportError(f"{out}: open_clip's tokenizer for the folder does not tokenize as clip_med's does")
    with torch.no_grad():
        diff = max(float((clip_model(bundle.model).encode_image(images, normalize=True)
                          - loaded.encode_image(images, normalize=True)).abs().max()),
                   float((clip_model(bundle.model).encode_text(texts, normalize=True)
                          - loaded.encode_text(texts, normalize=True)).abs().max()))
    if diff > atol:
        raise ExportError(f"{out}: open_clip's embeddings differ from clip_med's by {diff:.2e} (> {atol})")
    return diff
