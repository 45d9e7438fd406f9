"""Image transforms: open_clip's own, with augmentation settings suited to medical images.

open_clip's transform already converts grayscale to three channels (``_convert_to_rgb``),
resizes and crops, and normalises with the model's mean and std. Training adds a mild random
resized crop and brightness/contrast jitter (window and level vary between scanners); no
flips by default, because captions talk about left and right.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

from open_clip.transform import AugmentationCfg, image_transform

from clip_med.core.bounds import bounded


@dataclass
class AugmentConfig:
    scale: list[float] = field(default_factory=lambda: [0.7, 1.0])
    # Brightness, contrast, saturation, hue jitter strengths (saturation and hue stay 0 for scans).
    color_jitter: Optional[list[float]] = field(default_factory=lambda: [0.2, 0.2, 0.0, 0.0])
    color_jitter_prob: float = bounded(0.8, minimum=0, maximum=1)


def create_transform(image_size: int, mean, std, train: bool, augment: AugmentConfig | None = None,
                     resize_mode: str = "shortest") -> Callable:
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
                               aug_cfg=aug_cfg)
