"""open_clip models by name, plus clip_med's small configurations for CPU training.

clip_med's own architectures live as open_clip JSON configs in ``clip_med/modeling/configs``
and are registered with open_clip on import, so ``open_clip.create_model("medclip-small")``
works too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol, cast

import open_clip
import torch

from clip_med.core.bounds import bounded
from clip_med.data.transforms import create_transform
from clip_med.modeling.hub import has_schema, resolve_source, starts_pretrained
from clip_med.modeling.lora import LoraConfig, apply_lora

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
open_clip.add_model_config(CONFIG_DIR)


@dataclass
class ModelConfig:
    # What open_clip accepts: an architecture name, clip_med's (medclip-tiny, medclip-small) or
    # open_clip's own (RN50, ViT-B-16, ...: `python -c "import open_clip; print(open_clip.list_models())"`),
    # a Hugging Face hub model `hf-hub:<org>/<repo>` (its config, weights and tokenizer; BiomedCLIP:
    # model=biomedclip) or an open_clip folder `local-dir:<path>` (e.g. written by clip_med.export).
    name: str = "medclip-tiny"
    # With an architecture name: the weights to start from. One of open_clip's pretrained tags
    # (laion2b_s34b_b88k, openai, ...: open_clip.list_pretrained_tags_by_model(name)), downloaded
    # through huggingface_hub's cache (HF_HOME / HF_HUB_CACHE; HF_HUB_OFFLINE=1 reads only the
    # cache), or a local file: .pt/.bin/.safetensors (open_clip's own, open_clip_train's
    # epoch_N.pt, a clip_med training checkpoint) or an exported folder. Read with
    # weights_only=True (or safetensors). Ignored for hf-hub: and local-dir: models (their own weights).
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
    # LoRA adapters (peft) on the towers, the rest frozen: model.lora.r=16 (see clip_med/modeling/lora.py).
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class ModelBundle:
    model: torch.nn.Module
    tokenizer: Callable
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str
    model_cfg: dict[str, Any]
    # open_clip's PreprocessCfg of the model (size, mode, mean, std, interpolation, resize_mode,
    # fill_color): the model's own, from its config, pretrained tag or hub repo.
    preprocess_cfg: dict[str, Any] = field(default_factory=dict)
    weights: Optional[str] = None  # the file the CLIP weights came from (None: random, or a checkpoint's follow)
    pretrained: bool = False  # started from weights trained elsewhere (a tag, a hub model, a file)

    def transform(self, train: bool, augment: Any = None) -> Callable:
        """The image transform the model was trained with (open_clip's ``image_transform_v2`` settings)."""
        preprocess = self.preprocess_cfg or {"size": self.image_size, "mean": self.mean, "std": self.std}
        return create_transform(preprocess["size"], preprocess["mean"], preprocess["std"], train=train,
                                augment=augment, resize_mode=preprocess.get("resize_mode", "shortest"),
                                interpolation=preprocess.get("interpolation"),
                                fill_color=preprocess.get("fill_color", 0))


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
    if has_schema(name):
        return
    if name not in open_clip.list_models():
        known = ", ".join(model for model in open_clip.list_models() if not model.startswith("EVA"))
        raise ValueError(f"unknown model {name!r}: give an open_clip architecture ({known}), "
                         "hf-hub:<org>/<repo> or local-dir:<folder>")


def _with_overrides(model_cfg: dict[str, Any], cfg: ModelConfig) -> dict[str, Any]:
    if cfg.image_size:
        model_cfg.setdefault("vision_cfg", {})["image_size"] = cfg.image_size
    if cfg.context_length:
        model_cfg.setdefault("text_cfg", {})["context_length"] = cfg.context_length
    return model_cfg


def model_config(cfg: ModelConfig) -> dict[str, Any]:
    """The open_clip architecture dict after clip_med's overrides (an hf-hub: model's from its hub config)."""
    _check_name(cfg.name)
    return _with_overrides(resolve_source(cfg.name, cfg.pretrained, load_weights=False).model_cfg, cfg)


def create_model(cfg: ModelConfig, device: torch.device | str = "cpu", load_weights: bool = True,
                 **model_kwargs: Any) -> ModelBundle:
    """Build the model; ``model_kwargs`` go to open_clip (e.g. the loss's ``init_logit_bias``).

    ``load_weights=False`` builds the architecture with its preprocessing but without any
    pretrained weights (nothing but configs and tokenizer files is downloaded): for rebuilding a
    model whose weights come from a checkpoint. Files missing from the cache that cannot be
    downloaded raise :class:`~clip_med.modeling.hub.ModelUnavailable`.
    """
    _check_name(cfg.name)
    source = resolve_source(cfg.name, cfg.pretrained, load_weights)
    with source.errors():
        model = open_clip.create_model(
            source.open_clip_name,
            pretrained=source.weights if not has_schema(cfg.name) else None,
            device=device,
            output_dict=True,
            force_image_size=cfg.image_size,
            force_context_length=cfg.context_length,
            require_pretrained=bool(source.weights),
            weights_only=True,
            **source.create_kwargs,
            **model_kwargs,
        )
    if source.weights:
        log.info("model %s starts from %s", cfg.name, source.weights)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.lock_image:
        model.lock_image_tower(unlocked_groups=cfg.lock_image_unlocked_groups, freeze_bn_stats=True)
    if cfg.lock_text:
        model.lock_text_tower(unlocked_layers=cfg.lock_text_unlocked_layers)
    apply_lora(model, cfg.lora, pretrained=starts_pretrained(cfg.name, cfg.pretrained))
    with source.errors():
        tokenizer = open_clip.get_tokenizer(source.tokenizer_name, context_length=cfg.context_length)
    preprocess = dict(model.visual.preprocess_cfg)
    size = preprocess["size"]
    return ModelBundle(
        model=model,
        tokenizer=tokenizer,
        image_size=size if isinstance(size, int) else size[0],
        mean=tuple(preprocess["mean"]),
        std=tuple(preprocess["std"]),
        name=cfg.name,
        model_cfg=_with_overrides(source.model_cfg, cfg),
        preprocess_cfg=preprocess,
        weights=source.weights,
        pretrained=starts_pretrained(cfg.name, cfg.pretrained),
    )


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
