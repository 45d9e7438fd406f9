"""Image transforms: open_clip's own, with augmentation settings suited to medical images.

open_clip's transform already converts grayscale to three channels (``_convert_to_rgb``),
resizes and crops, and normalises with the model's mean and std. Training adds a mild random
resized crop and brightness/contrast jitter (window and level vary between scanners); no
flips by default, because captions talk about left and right.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
from open_clip.transform import AugmentationCfg, image_transform
from torchvision.transforms import Compose, Normalize, ToTensor
from torchvision.transforms.functional import pil_to_tensor

from clip_med.core.bounds import bounded


@dataclass
class AugmentConfig:
    scale: list[float] = field(default_factory=lambda: [0.7, 1.0])
    # Brightness, contrast, saturation, hue jitter strengths (saturation and hue stay 0 for scans).
    color_jitter: Optional[list[float]] = field(default_factory=lambda: [0.2, 0.2, 0.0, 0.0])
    color_jitter_prob: float = bounded(0.8, minimum=0, maximum=1)


def create_transform(image_size: int | tuple[int, int], mean, std, train: bool, augment: AugmentConfig | None = None,
                     resize_mode: str = "shortest", interpolation: str | None = None, fill_color: int = 0) -> Callable:
    """open_clip's transform (an ``image_transform_v2`` Compose ending in ToTensor + Normalize).

    ``image_size``, ``mean``, ``std``, ``resize_mode``, ``interpolation`` and ``fill_color`` are
    the model's ``preprocess_cfg`` (:meth:`clip_med.modeling.factory.ModelBundle.transform` passes
    them all); ``train`` adds clip_med's augmentation (``augment``).
    """
    aug_cfg = None
    if train:
        augment = augment or AugmentConfig()
        aug_cfg = AugmentationCfg(
            scale=tuple(augment.scale),
            color_jitter=tuple(augment.color_jitter) if augment.color_jitter else None,
            color_jitter_prob=augment.color_jitter_prob if augment.color_jitter else None,
        )
    with warnings.catch_warnings():
        # open_clip warns that colour-jitter settings are "unused" although it applies them.
        warnings.filterwarnings("ignore", message="Unused augmentation cfg items")
        return image_transform(image_size, is_train=train, mean=mean, std=std, resize_mode=resize_mode,
                               interpolation=interpolation, fill_color=fill_color, aug_cfg=aug_cfg)


class Normalizer:
    """The float conversion and Normalize split off a transform (:func:`split_normalize`), applied to a
    batch of uint8 images where it is cheap: on the training device. The operations are those of
    torchvision's ``ToTensor`` (``float().div(255)``) and ``Normalize`` (``sub_(mean).div_(std)``), in
    that order, so the result is bit-identical to normalising each image in the loader."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        dtype = torch.get_default_dtype()
        if images.device not in self._on:
            self._on[images.device] = (torch.as_tensor(self.mean, dtype=dtype, device=images.device).view(-1, 1, 1),
                                       torch.as_tensor(self.std, dtype=dtype, device=images.device).view(-1, 1, 1))
        mean, std = self._on[images.device]
        return images.to(dtype=dtype).div(255).sub_(mean).div_(std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


class _ToUint8Tensor:
    """PIL image -> contiguous uint8 CHW tensor (ToTensor without the float division)."""

    def __call__(self, image) -> torch.Tensor:
        tensor = pil_to_tensor(image)
        if tensor.dtype != torch.uint8:
            raise TypeError(f"a {image.mode} image gives {tensor.dtype} pixels, not uint8; convert it to RGB first")
        return tensor.contiguous()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def split_normalize(transform: Callable) -> tuple[Callable, Normalizer]:
    """Split an open_clip transform ``Compose([..., ToTensor, Normalize])`` into the part that makes
    uint8 image tensors (a quarter of the bytes through the loader's shared memory and to the GPU)
    and the :class:`Normalizer` that finishes the job on the device."""
    steps = list(getattr(transform, "transforms", []))
    if len(steps) < 2 or not isinstance(steps[-2], ToTensor) or not isinstance(steps[-1], Normalize):
        raise ValueError(f"expected a Compose ending in ToTensor and Normalize, got {transform!r}")
    return Compose([*steps[:-2], _ToUint8Tensor()]), Normalizer(steps[-1].mean, steps[-1].std)
