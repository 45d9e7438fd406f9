"""Reading a checkpoint for inference: clip_med's own format or a plain open_clip state dict.

clip_med checkpoints (``checkpoints/step-NNNNNNNN.pt`` from the trainer) carry the architecture
name, its open_clip config and the training config, so nothing has to be named by hand. A plain
open_clip state dict (``.pt``/``.bin``/``.safetensors``, or open_clip_train's ``{"state_dict":
...}``) needs the architecture: ``load(path, model_name="ViT-B-16")``. Files are read with
``weights_only=True`` or safetensors; nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch

from clip_med.data.images import ImageLimits
from clip_med.modeling.factory import ModelBundle, ModelConfig, create_model, model_config
from clip_med.modeling.hub import has_schema, portable_name, portable_pretrained
from clip_med.modeling.lora import load_trained_state, lora_rebuild_fields, merge_lora
from clip_med.modeling.losses import LossConfig, model_kwargs_for

log = logging.getLogger(__name__)

# The shard writer's options that change the pixels a model sees (see ShardConfig).
PIXEL_OPTIONS = ("max_side", "image_format", "jpeg_quality", "min_side", "max_pixels", "max_file_bytes")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with the reason and what to do about it."""


@dataclass(frozen=True)
class Preprocessing:
    """What the shard writer did to an image before training saw it; inference repeats it.

    ``max_side`` shrinks the longer side (LANCZOS), ``image_format`` is the encoding in the
    shards (a lossy ``jpeg`` is reproduced by a JPEG round trip), ``limits`` the size guards.
    """

    max_side: int | None = None
    image_format: str = "png"
    jpeg_quality: int = 95
    limits: ImageLimits = field(default_factory=ImageLimits)

    @classmethod
    def from_shard_options(cls, options: dict[str, Any] | None) -> Preprocessing:
        options = options or {}
        defaults = ImageLimits()
        return cls(
            max_side=options.get("max_side"),
            image_format=options.get("image_format", "png"),
            jpeg_quality=int(options.get("jpeg_quality", 95)),
            limits=ImageLimits(
                min_side=int(options.get("min_side", defaults.min_side)),
                max_pixels=int(options.get("max_pixels", defaults.max_pixels)),
                max_file_bytes=int(options.get("max_file_bytes", defaults.max_file_bytes)),
            ),
        )

    def shard_options(self) -> dict[str, Any]:
        return {"max_side": self.max_side, "image_format": self.image_format, "jpeg_quality": self.jpeg_quality,
                "min_side": self.limits.min_side, "max_pixels": self.limits.max_pixels,
                "max_file_bytes": self.limits.max_file_bytes}


@dataclass
class CheckpointInfo:
    path: Path
    format: str  # "clip_med" | "open_clip" | "pretrained" (a model by name: hf-hub:, local-dir:, tag)
    model_name: str
    step: int | None = None
    config: dict[str, Any] = field(default_factory=dict)  # the training config ({} for open_clip files)

    @property
    def run_dir(self) -> Path | None:
        """The training run folder (``<run>/checkpoints/step-*.pt``), when the layout says so."""
        if self.format == "clip_med" and self.path.parent.name == "checkpoints":
            return self.path.parent.parent
        return None

    def reload_args(self) -> dict[str, Any]:
        """The arguments of :func:`open_model` (``clip_med.load``) that load this model again, from any working
        directory (an embedding folder records them, so that search needs no model options)."""
        if self.format == "clip_med":
            return {"checkpoint": str(self.path.resolve())}
        pretrained = portable_pretrained(self.model_name, (self.config.get("model") or {}).get("pretrained"))
        checkpoint = str(self.path.resolve()) if self.format == "open_clip" else None
        return {"checkpoint": checkpoint, "model_name": portable_name(self.model_name), "pretrained": pretrained}


def read_weights_file(path: Path) -> Any:
    """The file's contents, loaded safely; raises :class:`CheckpointError` with a readable reason."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (give the path of a .pt or .safetensors file)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"checkpoint {path} is not a readable safetensors file: {exc}") from None
    _check_looks_like_torch_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"checkpoint {path} holds Python objects other than tensors and plain containers; clip_med only "
            f"loads with weights_only=True and will not unpickle it ({str(exc).splitlines()[0]}). Re-save its "
            "state dict (torch.save(model.state_dict(), path)) or convert it to safetensors."
        ) from None
    except (RuntimeError, KeyError, EOFError, ValueError, OSError) as exc:
        raise CheckpointError(f"checkpoint {path} is truncated or not a PyTorch file ({type(exc).__name__}: "
                              f"{exc})") from None


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6
_PICKLE_PROTOCOL = 0x80  # the legacy format starts with a pickle (protocol 2 and later)


def _check_looks_like_torch_file(path: Path) -> None:
    """Refuse a file that is plainly not a PyTorch file (a text file, say) with a reason, rather than
    with whatever torch.load makes of its first bytes (``KeyError: 101`` for an ``e``)."""
    with open(path, "rb") as handle:
        head = handle.read(512)
    if not head or head.startswith(_ZIP_MAGIC) or head[0] == _PICKLE_PROTOCOL or head[257:262] == b"ustar":
        return  # empty (torch.load's EOFError says "truncated"), or a PyTorch file (zip, pickle, old tar)
    if head[8:9] == b"{" and b'"' in head[9:16]:
        raise CheckpointError(f"checkpoint {path} looks like a safetensors file: give it a .safetensors name")
    try:
        head.decode("utf-8")
        text = b"\0" not in head
    except UnicodeDecodeError as exc:
        text = exc.start >= len(head) - 3  # only a character cut off at the end of the 512 bytes
    kind = "a text file" if text else "not a PyTorch file (no zip or pickle header)"
    raise CheckpointError(f"checkpoint {path} is {kind}, not a checkpoint: give a .pt file written by the trainer "
                          "(<run>/checkpoints/step-*.pt), a PyTorch state dict or a .safetensors file")


def is_clip_med_checkpoint(payload: Any) -> bool:
    return isinstance(payload, dict) and "state_dict" in payload and "model_name" in payload


def _model_config_from(payload: dict[str, Any], model_name: str | None) -> ModelConfig:
    trained = (payload.get("config") or {}).get("model") or {}
    name = payload["model_name"]
    if model_name and model_name != name:
        raise CheckpointError(f"model_name={model_name!r} was given but the checkpoint holds a {name!r} model")
    # model.pretrained: a tag's preprocessing (and QuickGELU) belong to the architecture; its weights follow.
    fields = {"pretrained": trained.get("pretrained"), **lora_rebuild_fields(payload)}
    return ModelConfig(name=name, image_size=trained.get("image_size"), context_length=trained.get("context_length"),
                       **fields)


def _check_model_cfg(expected: dict[str, Any], stored: dict[str, Any] | None, path: Path) -> None:
    if stored is None or stored == expected:
        return
    differing = sorted(key for key in set(expected) | set(stored) if expected.get(key) != stored.get(key))
    raise CheckpointError(
        f"checkpoint {path} was trained with a different architecture config than open_clip now gives for "
        f"this name (differs in: {', '.join(differing)}). Checkpoint: {stored}; now: {expected}. Restore the "
        "model's JSON config the checkpoint was trained with."
    )


def _loss_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    loss_name = ((config.get("loss") or {}).get("name")) or "clip"
    return model_kwargs_for(LossConfig(name=loss_name))


class _WeightsFollow(logging.Filter):
    """open_clip warns that a model without ``pretrained=`` is randomly initialised; here weights follow."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextlib.contextmanager
def _weights_follow():
    root, quiet = logging.getLogger(), _WeightsFollow()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def is_model_name(value: str | Path) -> bool:
    """Whether ``value`` names a model rather than a checkpoint file: ``hf-hub:``/``local-dir:``, or an open_clip
    architecture that is not also a file here."""
    text = str(value)
    return has_schema(text) or (text in open_clip.list_models() and not Path(text).expanduser().exists())


def open_model(checkpoint: str | Path | None = None, model_name: str | None = None, pretrained: str | None = None,
               image_size: int | None = None, context_length: int | None = None,
               device: torch.device | str = "cpu") -> tuple[ModelBundle, CheckpointInfo]:
    """The model a command or ``clip_med.load`` names, in eval mode: the one way to get one.

    * ``checkpoint``: a clip_med checkpoint, or a plain open_clip state dict whose architecture
      ``model_name`` names (``pretrained``, a tag, then gives its preprocessing);
    * no checkpoint: the pretrained model ``model_name`` itself: ``hf-hub:<org>/<repo>``,
      ``local-dir:<folder>``, or an architecture with ``pretrained`` (a tag or a weights file).
      ``checkpoint`` may hold such a name too (``clip_med.load("hf-hub:...")``).
    """
    if checkpoint is not None and is_model_name(checkpoint):
        if model_name and model_name != str(checkpoint):
            raise ValueError(f"{checkpoint} names a model, and model_name={model_name!r} another: give one")
        checkpoint, model_name = None, str(checkpoint)
    if checkpoint is None:
        if not model_name:
            raise ValueError("give a checkpoint (checkpoint=<runs/.../checkpoints/step-*.pt>) or a pretrained "
                             "model (model=hf-hub:<org>/<repo>, model=local-dir:<folder>, or model=<architecture> "
                             "pretrained=<tag>)")
        return pretrained_bundle(model_name, pretrained, image_size, context_length, device)
    return load_bundle(checkpoint, model_name, image_size, context_length, device, pretrained)


def pretrained_bundle(name: str, pretrained: str | None = None, image_size: int | None = None,
                      context_length: int | None = None,
                      device: torch.device | str = "cpu") -> tuple[ModelBundle, CheckpointInfo]:
    """A model by name with its pretrained weights (no clip_med checkpoint), in eval mode."""
    cfg = ModelConfig(name=name, pretrained=pretrained, image_size=image_size, context_length=context_length)
    bundle = create_model(cfg, device)
    if bundle.weights is None:
        if has_schema(name):
            hint = "its folder holds no open_clip weights file"
        else:
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
            hint = f"add pretrained=<tag> (open_clip's tags for it: {tags}) or pretrained=<weights file>"
        raise CheckpointError(f"model {name} has no weights to use: {hint}; or give checkpoint=<a trained checkpoint>")
    bundle.model.eval()
    info = CheckpointInfo(Path(name), "pretrained", name, None,
                          {"model": {"name": name, "pretrained": pretrained, "image_size": image_size,
                                     "context_length": context_length}})
    log.info("loaded pretrained model %s%s (weights %s)", name, f" ({pretrained})" if pretrained else "",
             bundle.weights)
    return bundle, info


def load_bundle(checkpoint: str | Path, model_name: str | None = None, image_size: int | None = None,
                context_length: int | None = None, device: torch.device | str = "cpu",
                pretrained: str | None = None) -> tuple[ModelBundle, CheckpointInfo]:
    """Recreate the model of ``checkpoint`` with its weights, in eval mode."""
    path = Path(checkpoint).expanduser()
    return bundle_from_payload(read_weights_file(path), path, model_name, image_size, context_length, device,
                               pretrained)


def bundle_from_payload(payload: Any, path: Path, model_name: str | None = None, image_size: int | None = None,
                        context_length: int | None = None, device: torch.device | str = "cpu",
                        pretrained: str | None = None) -> tuple[ModelBundle, CheckpointInfo]:
    """The one way clip_med rebuilds a model from a checkpoint's contents (inference, evaluation, export).

    The architecture is built without pretrained weights (they follow from the checkpoint), except
    for a LoRA checkpoint, which holds only what was trained on top of them.
    """
    if is_clip_med_checkpoint(payload):
        cfg = _model_config_from(payload, model_name)
        config = payload.get("config") or {}
        with _weights_follow():
            bundle = create_model(cfg, device, load_weights=bool(lora_rebuild_fields(payload)),
                                  **_loss_kwargs(config))
        _check_model_cfg(bundle.model_cfg, payload.get("model_cfg"), path)
        try:
            load_trained_state(bundle.model, payload)
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint {path} does not fit {cfg.name}: {str(exc)[:500]}") from None
        merge_lora(bundle.model)  # LoRA adapters folded into plain open_clip weights
        step = (payload.get("train_state") or {}).get("step")
        info = CheckpointInfo(path, "clip_med", cfg.name, step, config)
    else:
        if not model_name:
            raise CheckpointError(
                f"{path} is a plain state dict without an architecture name: name it, e.g. "
                f"clip_med.load({str(path)!r}, model_name='ViT-B-16') or model_name=... on the command line"
            )
        del payload
        cfg = ModelConfig(name=model_name, pretrained=pretrained, image_size=image_size,
                          context_length=context_length)
        with _weights_follow():
            bundle = create_model(cfg, device, load_weights=False)
        try:
            open_clip.load_checkpoint(bundle.model, str(path), weights_only=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{path} does not fit open_clip model {model_name}: {str(exc)[:500]}") from None
        info = CheckpointInfo(path, "open_clip", model_name, config={"model": {"name": model_name,
                                                                              "pretrained": pretrained}})
    bundle.model.eval()
    log.info("loaded %s (%s, %s format%s)", path, info.model_name, info.format,
             f", step {info.step}" if info.step is not None else "")
    return bundle, info


def expected_model_cfg(name: str, image_size: int | None = None, context_length: int | None = None) -> dict:
    return model_config(ModelConfig(name=name, image_size=image_size, context_length=context_length))


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A SHA-256 over the model's parameters and buffers (names, shapes, dtypes, bytes).

    Heads and extracted embeddings record it so that they are never mixed with another model's
    embedding space.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def shard_preprocessing(info: CheckpointInfo) -> Preprocessing:
    """The shard options of the training run (defaults for open_clip checkpoints)."""
    shards = info.config.get("shards") or {}
    return Preprocessing.from_shard_options({key: shards[key] for key in PIXEL_OPTIONS if key in shards})


CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"step-(\d{8})\.pt")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in folder.iterdir() if (match := _NAME.fullmatch(path.name))]
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def load_checkpoint(path: str | Path) -> Any:
    """A checkpoint's payload, read with ``weights_only=True`` (see :func:`read_weights_file`)."""
    return read_weights_file(Path(path))


def find_resume_checkpoint(resume: str, run_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """Resolve ``resume`` (``latest``, a checkpoint file or a run folder) to a loadable checkpoint.

    ``latest`` looks in this run's folder, then in sibling run folders (Hydra gives each
    invocation its own folder under ``runs/<run_name>/``), most recently written first, and skips a file
    that cannot be read (with a warning) in favour of the one before it.
    """
    if resume != "latest":
        path = Path(resume)
        if path.is_dir():  # a run folder: its newest readable checkpoint, and there must be one
            candidates = list_checkpoints(path)
            found = _newest_readable(candidates)
            if found is None:
                raise FileNotFoundError(
                    f"resume={resume}: " + (f"none of its {len(candidates)} checkpoint(s) can be read (see the "
                                            "warnings above)" if candidates else "the folder holds no checkpoint")
                    + "; point resume= at another run folder or checkpoint, or leave it out to start over")
            return found
        if not path.is_file():
            raise FileNotFoundError(f"resume={resume}: no such checkpoint file or run folder")
        return path, load_checkpoint(path)
    run_dir = Path(run_dir)
    candidates = list_checkpoints(run_dir)
    if not candidates and run_dir.parent.is_dir():
        siblings = [sibling for sibling in run_dir.parent.iterdir() if sibling.is_dir() and sibling != run_dir]
        candidates = sorted((path for sibling in siblings for path in list_checkpoints(sibling)),
                            key=lambda path: path.stat().st_mtime)
    found = _newest_readable(candidates)
    if found is None and candidates:  # checkpoints exist but every one is broken: not a first run
        raise FileNotFoundError(f"resume=latest: none of the {len(candidates)} checkpoint(s) of {run_dir.parent} "
                                "can be read (see the warnings above); resume= a readable one, or move them away "
                                "to start over")
    return found


def _newest_readable(candidates: list[Path]) -> tuple[Path, dict[str, Any]] | None:
    for path in reversed(candidates):
        try:
            return path, load_checkpoint(path)
        except (RuntimeError, OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as exc:
            log.warning("checkpoint %s cannot be read (%s); trying an older one", path, exc)
    return None
