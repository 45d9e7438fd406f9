"""open_clip models by name, plus clip_med's small configurations for CPU training.

clip_med's own architectures live as open_clip JSON configs in ``clip_med/modeling/configs``
and are registered with open_clip on import, so ``open_clip.create_model("medclip-small")``
works too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol, cast

import open_clip
import torch

from clip_med.core.bounds import bounded

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
open_clip.add_model_config(CONFIG_DIR)


@dataclass
class ModelConfig:
    # Any open_clip architecture name: clip_med's (medclip-tiny, medclip-small) or open_clip's
    # own (RN50, ViT-B-16, ...). `python -c "import open_clip; print(open_clip.list_models())"`.
    name: str = "medclip-tiny"
    # A local open_clip checkpoint to start from: a .pt/.bin/.safetensors file (open_clip's own,
    # open_clip_train's epoch_N.pt, a clip_med training checkpoint) or a folder written by
    # `python -m clip_med.export`. Loaded with weights_only=True (or safetensors); nothing is ever
    # downloaded.
    pretrained: Optional[str] = None
    image_size: Optional[int] = None
    context_length: Optional[int] = None
    grad_checkpointing: bool = False
    # LiT-style fine-tuning: freeze a tower (unlocked_* keeps the last groups/layers trainable).
    lock_image: bool = False
    lock_image_unlocked_groups: int = bounded(0, minimum=0)
    lock_text: bool = False
    lock_text_unlocked_layers: int = bounded(0, minimum=0)
    torch_compile: bool = False


@dataclass
class ModelBundle:
    model: torch.nn.Module
    tokenizer: Callable
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str
    model_cfg: dict[str, Any]


class VisualTower(Protocol):
    preprocess_cfg: dict[str, Any]


class ClipModel(Protocol):
    """What clip_med uses of an open_clip ``CLIP`` / ``CustomTextCLIP`` beyond ``torch.nn.Module``.

    ``nn.Module.__getattr__`` types every attribute as ``Tensor | Module``, which hides these from
    mypy; look at a model through :func:`clip_model` to use them.
    """

    visual: VisualTower
    logit_scale: torch.Tensor
    text_projection: torch.Tensor

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor: ...

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor: ...


def clip_model(model: torch.nn.Module) -> ClipModel:
    """``model`` (an open_clip model) as a :class:`ClipModel`: a typing-only cast, the same object."""
    return cast(ClipModel, model)


def _check_name(name: str) -> None:
    if name.startswith(("local-dir:", "hf-hub:")):
        return
    if name not in open_clip.list_models():
        known = ", ".join(model for model in open_clip.list_models() if not model.startswith("EVA"))
        raise ValueError(f"unknown model {name!r}. Known open_clip models: {known}")


# Weights files of an exported (or open_clip hub-style) folder, most preferred first.
_FOLDER_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                   "model.safetensors", "pytorch_model.bin")


def resolve_pretrained(path: str | None) -> str | None:
    """The weights file ``model.pretrained`` names (a file, or the weights file inside a folder)."""
    if not path:
        return None
    candidate = Path(path).expanduser()
    if candidate.is_dir():
        for name in _FOLDER_WEIGHTS:
            if (candidate / name).is_file():
                return str(candidate / name)
        raise FileNotFoundError(f"model.pretrained={path} is a folder without open_clip weights "
                                f"(looked for {', '.join(_FOLDER_WEIGHTS)})")
    if not candidate.is_file():
        raise FileNotFoundError(
            f"model.pretrained={path} is not a file. Give the path of a local open_clip checkpoint "
            "(.pt, .bin or .safetensors) or an exported folder; clip_med never downloads weights."
        )
    return str(candidate)


def model_config(cfg: ModelConfig) -> dict[str, Any]:
    """The open_clip architecture dict after clip_med's overrides."""
    model_cfg = open_clip.get_model_config(cfg.name) or {}
    if cfg.image_size:
        model_cfg.setdefault("vision_cfg", {})["image_size"] = cfg.image_size
    if cfg.context_length:
        model_cfg.setdefault("text_cfg", {})["context_length"] = cfg.context_length
    return model_cfg


def create_model(cfg: ModelConfig, device: torch.device | str = "cpu", **model_kwargs: Any) -> ModelBundle:
    """Build the model; ``model_kwargs`` go to open_clip (e.g. the loss's ``init_logit_bias``)."""
    _check_name(cfg.name)
    pretrained = resolve_pretrained(cfg.pretrained)
    model = open_clip.create_model(
        cfg.name,
        pretrained=pretrained,
        device=device,
        output_dict=True,
        force_image_size=cfg.image_size,
        force_context_length=cfg.context_length,
        require_pretrained=bool(pretrained),
        weights_only=True,
        **model_kwargs,
    )
    if pretrained:
        log.info("model %s starts from %s", cfg.name, pretrained)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.lock_image:
        model.lock_image_tower(unlocked_groups=cfg.lock_image_unlocked_groups, freeze_bn_stats=True)
    if cfg.lock_text:
        model.lock_text_tower(unlocked_layers=cfg.lock_text_unlocked_layers)
    tokenizer = open_clip.get_tokenizer(cfg.name, context_length=cfg.context_length)
    preprocess = model.visual.preprocess_cfg
    size = preprocess["size"]
    return ModelBundle(
        model=model,
        tokenizer=tokenizer,
        image_size=size if isinstance(size, int) else size[0],
        mean=tuple(preprocess["mean"]),
        std=tuple(preprocess["std"]),
        name=cfg.name,
        model_cfg=model_config(cfg),
    )


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
