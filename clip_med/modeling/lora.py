"""LoRA adapters (``peft``) on an open_clip model's image and/or text tower, the rest frozen.

``model.lora.r=16`` injects rank-16 adapters into the chosen towers' layers: by default, per tower
type, timm ViT ``attn.qkv``/``attn.proj``, Hugging Face BERT-style ``attention.self.query``/``value``,
and for open_clip's own transformer (its text tower, its ViTs) the MLP's ``mlp.c_fc``/``mlp.c_proj``;
or the layers ``model.lora.targets`` names. open_clip's attention is an ``nn.MultiheadAttention``,
which is not adapted: peft does it by merging the adapter into the frozen weights before each
forward and subtracting it after, so the frozen weights drift by rounding (and ``out_proj``'s own
forward is never called). Every other parameter is frozen except those ``model.lora.also_train``
names (the temperature by default: the contrastive loss needs it to follow the new domain).

The frozen base weights come from ``model.pretrained`` (or an ``hf-hub:``/``local-dir:`` name), so a
LoRA run's checkpoint holds only what changes (:func:`trained_state_dict`: the trained parameters
and the buffers, such as BatchNorm statistics) plus a SHA-256 of the frozen weights, which
:func:`load_trained_state` checks when the model is rebuilt. :func:`merge_lora` folds the adapters
into plain open_clip weights (what inference and ``export`` use).

``peft`` is imported only when a model has adapters.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from clip_med.core.bounds import bounded

log = logging.getLogger(__name__)

TOWERS = ("image", "text")
# Layers adapted per tower type (module-name suffixes): timm ViT's attention, open_clip's transformer's
# MLP, Hugging Face BERT-style attention. A tower without any gets adapters on its Linear layers.
DEFAULT_TARGETS = ("attn.qkv", "attn.proj", "mlp.c_fc", "mlp.c_proj", "attention.self.query", "attention.self.value")
# The payload key of the frozen weights' SHA-256 (only in LoRA checkpoints).
BASE_SHA256 = "lora_base_sha256"
_REST = ("logit_scale", "logit_bias")


@dataclass
class LoraConfig:
    # Rank of the adapters; 0: no LoRA (all parameters train, unless model.lock_image/lock_text).
    r: int = bounded(0, minimum=0)
    # The adapters' update is scaled by alpha / r (peft's lora_alpha); None: alpha = r.
    alpha: Optional[int] = bounded(None, minimum=1)
    dropout: float = bounded(0.0, minimum=0, below=1)
    # Which towers get adapters (the other one is frozen whole): image, text or both.
    towers: list[str] = field(default_factory=lambda: list(TOWERS))
    # Module-name suffixes of the layers to adapt (e.g. [attn.qkv, mlp.fc1, query, value]);
    # None: DEFAULT_TARGETS (attention of timm ViTs and BERT, the MLP of open_clip's transformer).
    targets: Optional[list[str]] = None
    # Parameters that train along with the adapters (glob patterns over parameter names).
    also_train: list[str] = field(default_factory=lambda: list(_REST))


class LoraStateError(RuntimeError):
    """A LoRA checkpoint that does not fit the rebuilt model."""


def parameter_tower(name: str) -> str:
    """``image``, ``text`` or ``rest`` (temperature, bias) for an open_clip parameter or module name."""
    if name.startswith("visual.") or name == "visual":
        return "image"
    if name in _REST:
        return "rest"
    return "text"  # CLIP's transformer, token_embedding, ... or CustomTextCLIP's text.*


def has_lora(model: torch.nn.Module) -> bool:
    return getattr(model, "peft_config", None) is not None


def _supported_types() -> tuple[type, ...]:
    return (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Embedding)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _tower_modules(model: torch.nn.Module, tower: str) -> list[tuple[str, torch.nn.Module]]:
    return [(name, module) for name, module in model.named_modules() if name and parameter_tower(name) == tower]


def _targets_in(modules: list[tuple[str, torch.nn.Module]], targets: list[str], tower: str,
                user_given: bool) -> list[str]:
    found = [(name, module) for name, module in modules if any(_matches(name, target) for target in targets)]
    attention = {name for name, module in modules if isinstance(module, torch.nn.MultiheadAttention)}
    inside = [name for name, _ in found if name in attention or name.rpartition(".")[0] in attention]
    if user_given and inside:
        raise ValueError(f"model.lora.targets={targets} name {inside[0]}, (part of) an nn.MultiheadAttention, which "
                         "clip_med does not adapt (peft merges into and out of its frozen weights at every forward, "
                         "and its out_proj's forward is never called): adapt open_clip's transformer through "
                         "mlp.c_fc / mlp.c_proj")
    adaptable = [name for name, module in found if isinstance(module, _supported_types()) and name not in inside]
    if user_given and found and not adaptable:
        kinds = sorted({type(module).__name__ for _, module in found})
        raise ValueError(f"model.lora.targets={targets} match only {', '.join(kinds)} layers in the {tower} tower, "
                         "which LoRA cannot adapt: name Linear or Conv layers")
    return adaptable


def target_modules(model: torch.nn.Module, cfg: LoraConfig) -> list[str]:
    """The full names of the modules that get adapters."""
    unknown = [tower for tower in cfg.towers if tower not in TOWERS]
    if unknown or not cfg.towers:
        raise ValueError(f"model.lora.towers={list(cfg.towers)}: choose from {', '.join(TOWERS)}")
    names: list[str] = []
    for tower in dict.fromkeys(cfg.towers):
        modules = _tower_modules(model, tower)
        found = _targets_in(modules, list(cfg.targets or DEFAULT_TARGETS), tower, cfg.targets is not None)
        if not found and cfg.targets is not None:
            linear = [name for name, module in modules if isinstance(module, torch.nn.Linear)][:6]
            raise ValueError(f"model.lora.targets={list(cfg.targets)} match no layer of the {tower} tower; its "
                             f"Linear layers are named like {', '.join(linear) or '(none)'} (give name suffixes, "
                             "e.g. attn.qkv or query)")
        if not found:
            found = [name for name, module in modules if isinstance(module, torch.nn.Linear)]
            log.warning("the %s tower has none of the layers LoRA adapts by default (%s): adapters on its %d Linear "
                        "layer(s); name others with model.lora.targets", tower, ", ".join(DEFAULT_TARGETS), len(found))
        names += found
    return names


def _called_in_forward(model: torch.nn.Module, names: list[str]) -> set[str]:
    """Which of the modules ``names`` a forward pass calls (a layer whose weights are used directly, as in
    ``nn.MultiheadAttention``'s ``out_proj`` or a ResNet's attention pool, would ignore its adapter)."""
    called: set[str] = set()
    hooks = [model.get_submodule(name).register_forward_hook(lambda *_, name=name: called.add(name))
             for name in names]
    clip: Any = model  # an open_clip CLIP / CustomTextCLIP
    param = next(model.parameters())
    size = getattr(clip.visual, "preprocess_cfg", {}).get("size") or clip.visual.image_size
    height, width = (size, size) if isinstance(size, int) else size
    training = model.training
    model.eval()  # no BatchNorm statistics move
    try:
        with torch.no_grad():
            clip.encode_image(torch.zeros(1, 3, height, width, device=param.device, dtype=param.dtype))
            clip.encode_text(torch.ones(1, int(clip.context_length), dtype=torch.long, device=param.device))
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
    return called


def _used_targets(model: torch.nn.Module, names: list[str], user_given: bool) -> list[str]:
    called = _called_in_forward(model, names)
    unused = [name for name in names if name not in called]
    if unused and (user_given or len(unused) == len(names)):
        raise ValueError(f"model.lora: {', '.join(unused[:4])}{' ...' if len(unused) > 4 else ''} never run as "
                         "modules in the forward pass (their weights are used directly), so adapters there would do "
                         "nothing: name other layers with model.lora.targets, or leave the tower out "
                         "(model.lora.towers)")
    if unused:
        log.warning("model.lora: %d layer(s) whose weights are used directly get no adapter: %s", len(unused),
                    ", ".join(unused[:4]))
    return [name for name in names if name in called]


def apply_lora(model: torch.nn.Module, cfg: LoraConfig, pretrained: bool) -> torch.nn.Module:
    """Inject adapters into ``model`` (in place) and freeze all else but ``cfg.also_train``; no-op when ``r=0``."""
    if not cfg.r:
        return model
    if not pretrained:
        raise ValueError("model.lora adapts pretrained weights, and a LoRA checkpoint holds only the adapters: "
                         "start from some with model.pretrained=... (or an hf-hub:/local-dir: model name)")
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    targets = _used_targets(model, target_modules(model, cfg), cfg.targets is not None)
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.r,
                              lora_dropout=cfg.dropout, target_modules=targets, bias="none")
    inject_adapter_in_model(peft_cfg, model)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name or any(fnmatch.fnmatchcase(name, p) for p in cfg.also_train))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA r=%d on %d layer(s) of the %s tower(s): %s of %s parameters train", cfg.r, len(targets),
             "+".join(dict.fromkeys(cfg.towers)), f"{trainable:,}", f"{sum(p.numel() for p in model.parameters()):,}")
    return model


_BASE_FINGERPRINTS: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()


def base_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over the frozen parameters (names, shapes, dtypes, bytes); computed once per model."""
    if model not in _BASE_FINGERPRINTS:
        digest = hashlib.sha256()
        for name, param in sorted(model.named_parameters()):
            if param.requires_grad:
                continue
            tensor = param.detach().cpu().contiguous()
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        _BASE_FINGERPRINTS[model] = digest.hexdigest()
    return _BASE_FINGERPRINTS[model]


def trained_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint must hold: everything, or for a LoRA model its trained parameters and buffers."""
    state = model.state_dict()
    if not has_lora(model):
        return state
    keep = {name for name, param in model.named_parameters() if param.requires_grad}
    keep |= {name for name, _ in model.named_buffers()}
    return {name: value for name, value in state.items() if name in keep}


def checkpoint_extras(model: torch.nn.Module) -> dict[str, Any]:
    """Payload entries beside the state dict: the frozen weights' fingerprint of a LoRA model."""
    return {BASE_SHA256: base_fingerprint(model)} if has_lora(model) else {}


def lora_rebuild_fields(payload: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig fields a LoRA checkpoint's model is rebuilt with (its base weights and adapters); {} otherwise."""
    if BASE_SHA256 not in payload:
        return {}
    trained = (payload.get("config") or {}).get("model") or {}
    return {"pretrained": trained.get("pretrained"), "lora": LoraConfig(**trained["lora"])}


def load_trained_state(model: torch.nn.Module, payload: dict[str, Any]) -> None:
    """Load ``payload["state_dict"]`` (a full one, or a LoRA checkpoint's trained part) into ``model``."""
    state = payload["state_dict"]
    if not has_lora(model):
        if BASE_SHA256 in payload:
            raise LoraStateError("the checkpoint holds LoRA adapters but the model has none: its config must "
                                 "keep model.lora as it was trained")
        model.load_state_dict(state)
        return
    expected = payload.get(BASE_SHA256)
    if expected != base_fingerprint(model):
        raise LoraStateError(
            "the frozen base weights differ from those the adapters were trained on"
            + ("" if expected else " (the checkpoint records none: it is not a LoRA checkpoint)")
            + ": the model must start from the same model.pretrained weights, unchanged")
    missing, unexpected = model.load_state_dict(state, strict=False)
    frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
    not_frozen = [name for name in missing if name not in frozen]
    if unexpected or not_frozen:
        raise LoraStateError(f"the LoRA checkpoint does not fit the model: missing {not_frozen[:5]}, "
                             f"unexpected {list(unexpected)[:5]} (was it trained with other model.lora settings?)")


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Fold the adapters into the base weights (in place): a plain open_clip model, with no peft layer left."""
    if not has_lora(model):
        return model
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapted = [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    outermost = [name for name in adapted if not any(name.startswith(outer + ".") for outer in adapted)]
    for name in outermost:
        layer: Any = model.get_submodule(name)  # a peft layer (nn.Module's typing hides its methods)
        parent_name, _, child = name.rpartition(".")
        layer.merge(safe_merge=True)
        setattr(model.get_submodule(parent_name), child, layer.get_base_layer())
    del model.peft_config
    return model
