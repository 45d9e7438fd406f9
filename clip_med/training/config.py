"""The typed configuration of a training run (the schema behind ``conf/train.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from clip_med.data.loader import LoaderConfig
from clip_med.data.transforms import AugmentConfig
from clip_med.data.writer import ShardConfig
from clip_med.eval.evaluator import EvalConfig
from clip_med.losses import LossConfig
from clip_med.models import ModelConfig
from clip_med.training.optim import OptimConfig


@dataclass
class DataConfig:
    train_split: str = "train"
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class TrainerConfig:
    epochs: int = 10
    # Stop after this many optimizer steps even if epochs remain (None: run all epochs).
    max_steps: Optional[int] = None
    device: str = "auto"  # auto | cpu | cuda
    # auto: bf16 autocast on CUDA, fp32 on CPU. Also fp32 | bf16 | fp16 (fp16 uses a grad scaler).
    precision: str = "auto"
    dist_backend: Optional[str] = None  # None: nccl on CUDA, gloo on CPU
    checkpoint_every_steps: int = 100
    keep_checkpoints: int = 3
    log_every_steps: int = 10
    # Abort after this many consecutive steps with a non-finite loss (each one is skipped).
    max_nonfinite_steps: int = 5
    progress: bool = True
    tensorboard: bool = True


@dataclass
class TrainConfig:
    source: Any = None  # a SourceConfig subclass, chosen by the `source` config group
    shards: ShardConfig = field(default_factory=ShardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    # Where checkpoints, metrics and the report go (the Hydra entry point sets it to
    # hydra.run.dir); None means runs/<source name>/<time stamp>.
    run_dir: Optional[str] = None
    run_name: str = "run"
    # Continue from a checkpoint: "latest" (this run's folder, then its siblings) or a path.
    resume: Optional[str] = None
