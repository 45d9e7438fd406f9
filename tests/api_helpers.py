"""Fixture builders for the model-use tests: tiny checkpoints in the trainer's format, shards, images."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clip_med.data.shardset import prepare_shards
from clip_med.data.sources.medpix import MedPixSourceConfig
from clip_med.data.sources.synthetic import SyntheticSourceConfig
from clip_med.data.writer import ShardConfig
from clip_med.modeling.factory import ModelConfig, create_model
from clip_med.training.config import TrainConfig

TINY = dict(name="medclip-tiny", image_size=32)


def save_checkpoint(run_dir: Path, max_side: int | None = None, image_format: str = "png", seed: int = 0,
                    step: int = 5, source=None, shards_out: str | None = None) -> Path:
    """An untrained medclip-tiny (32 px) saved exactly as the trainer saves checkpoints."""
    torch.manual_seed(seed)
    bundle = create_model(ModelConfig(**TINY))
    shards = ShardConfig(out=shards_out or str(run_dir / "no-shards"), max_side=max_side, image_format=image_format)
    config = TrainConfig(source=source or SyntheticSourceConfig(image_size=32), shards=shards,
                         model=ModelConfig(**TINY))
    payload = {"state_dict": bundle.model.state_dict(), "optimizer": {}, "train_state": {"step": step},
               "model_name": bundle.name, "model_cfg": bundle.model_cfg, "config": dataclasses.asdict(config)}
    path = run_dir / "checkpoints" / f"step-{step:08d}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


def synthetic_shards(out: Path, sizes: dict[str, int] | None = None, max_samples: int = 16):
    """Synthetic shards (32 px images), several per split."""
    source = SyntheticSourceConfig(image_size=32, sizes=sizes or {"train": 48, "dev": 24})
    return prepare_shards(source, ShardConfig(out=str(out), max_samples=max_samples, workers=0, progress=False))


def medpix_source(root: Path) -> MedPixSourceConfig:
    return MedPixSourceConfig(root=str(root))


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def gradient(height: int = 48, width: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.add.outer(np.arange(height), np.arange(width)).astype(np.float64)
    return np.clip(base * 255 / base.max() + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


def medpix_images(root: Path, split: str) -> list[tuple[str, Path]]:
    """(image name, path) of a MedPix split, in the order of its jsonl."""
    rows = [json.loads(line) for line in (root / "splitted_dataset" / f"descriptions_{split}.jsonl").open()]
    return [(row["image"], root / "images" / f"{row['image']}.png") for row in rows]
