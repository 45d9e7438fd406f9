"""The typed configuration of a training run (the schema behind ``conf/train.yaml``).

These dataclasses are the one home of every default: ``train(TrainConfig())`` is the run that
``python -m clip_med.train`` makes (the synthetic source, model medclip-tiny, the CLIP loss).
``conf/train.yaml`` only picks the config-group options (``source``, ``model``, ``loss``) and the
Hydra run folder, and ``conf/exp/*.yaml`` hold each experiment's deltas from these defaults;
``tests/test_config_defaults.py`` checks both, and refuses a YAML value that copies a default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from clip_med.core.bounds import bounded
from clip_med.data.loader import LoaderConfig
from clip_med.data.sources.synthetic import SyntheticSourceConfig
from clip_med.data.transforms import AugmentConfig
from clip_med.data.writer import ShardConfig
from clip_med.eval.evaluator import EvalConfig
from clip_med.modeling.factory import ModelConfig
from clip_med.modeling.losses import LossConfig
from clip_med.training.optim import OptimConfig


@dataclass
class DataConfig:
    train_split: str = "train"
    # Shards written elsewhere, read instead of sharding the source: a local path, a brace
    # pattern (shards/roco/train-{000000..000031}.tar), an http(s):// URL, a <split>.manifest.json
    # URL or a pipe: command; the manifest must sit next to the shards. eval_shards: the held-out split.
    train_shards: Optional[str] = None
    eval_shards: Optional[str] = None
    # Training's shuffle buffer: 500 samples (LoaderConfig's own default is 1000).
    loader: LoaderConfig = field(default_factory=lambda: LoaderConfig(shuffle_buffer=500))
    augment: AugmentConfig = field(default_factory=AugmentConfig)


# The device-dependent defaults of TrainerConfig.checkpoint_every_steps / checkpoint_every_minutes.
CPU_CHECKPOINT_EVERY_STEPS = 50
GPU_CHECKPOINT_EVERY_MINUTES = 15.0


@dataclass
class TrainerConfig:
    epochs: int = bounded(12, minimum=1)
    # Stop after this many optimizer steps even if epochs remain (None: run all epochs).
    max_steps: Optional[int] = bounded(None, minimum=1)
    device: str = "auto"  # auto | cpu | cuda
    # auto: bf16 autocast on GPUs with native bf16 (compute capability >= 8), fp16 with a grad scaler
    # on older ones, fp32 on CPU. Also fp32 | bf16 | fp16. Evaluation and inference use the same.
    precision: str = "auto"
    dist_backend: Optional[str] = None  # None: nccl on CUDA, gloo on CPU
    # How long a process waits for the others at a collective (every training step's exchanges).
    dist_timeout_minutes: float = bounded(30, above=0)
    # How long the others wait while rank 0 alone works (writes the shards, evaluates); a failing
    # rank still ends the others at once, with its message.
    dist_phase_timeout_minutes: float = bounded(1440, above=0)
    # Gradient accumulation keeping the full contrastive batch (open_clip's accum_freq): one
    # optimizer step covers accum_freq batches per process, whose features all meet in one loss.
    accum_freq: int = bounded(1, minimum=1)
    # DDP options: SyncBatchNorm for BatchNorm towers (CUDA only), DDP's static_graph optimisation.
    sync_batchnorm: bool = False
    ddp_static_graph: bool = False
    # Checkpoints are written in the background. Every this many steps (None: 50 on the CPU, none on a GPU),
    checkpoint_every_steps: Optional[int] = bounded(None, minimum=1)
    # and when this many minutes passed since the last one (None: 15 on a GPU, none on the CPU).
    checkpoint_every_minutes: Optional[float] = bounded(None, above=0)
    keep_checkpoints: int = bounded(3, minimum=1)
    log_every_steps: int = bounded(10, minimum=1)
    # Abort after this many consecutive steps with a non-finite loss (each one is skipped).
    max_nonfinite_steps: int = bounded(5, minimum=0)
    # Fused AdamW, which skips a non-finite step on the device (None: on CUDA; the CPU keeps the for-loop AdamW).
    fused_optimizer: Optional[bool] = None
    # Read each step's agreed flags (finite loss, data left, stop, checkpoint due) at once instead of one
    # step later: the per-step GPU synchronisation of earlier versions, kept to measure what it costs.
    sync_every_step: bool = False
    # Keep the host memory a step frees for the next one (glibc's mallopt, clip_med/core/memory.py) instead
    # of faulting it back in every step (about a tenth of a CPU step); the process keeps its peak heap.
    reuse_freed_memory: bool = True
    progress: bool = True
    tensorboard: bool = True

    def checkpoint_intervals(self, device: torch.device) -> tuple[Optional[int], Optional[float]]:
        """(every so many steps, every so many minutes), each None for never: by default steps on the CPU,
        where they keep runs reproducible, and time on a GPU, where steps fly by."""
        gpu = device.type == "cuda"
        steps = self.checkpoint_every_steps
        minutes = self.checkpoint_every_minutes
        return (steps if steps is not None else None if gpu else CPU_CHECKPOINT_EVERY_STEPS,
                minutes if minutes is not None else GPU_CHECKPOINT_EVERY_MINUTES if gpu else None)

    def use_fused_optimizer(self, device: torch.device) -> bool:
        return self.fused_optimizer if self.fused_optimizer is not None else device.type == "cuda"

    def __post_init__(self) -> None:
        # DDP's static graph and no_sync() (gradient accumulation) fail on the first backward
        # (an INTERNAL ASSERT in its reducer; pytorch#143580): refuse the pair before any work.
        if self.ddp_static_graph and self.accum_freq > 1:
            raise ValueError(f"trainer.ddp_static_graph=true cannot be combined with trainer.accum_freq="
                             f"{self.accum_freq} (DDP's static graph breaks under no_sync(), pytorch#143580): "
                             "drop one of the two")


@dataclass
class TrainConfig:
    # A SourceConfig subclass, chosen by the `source` config group (default: the synthetic set
    # the package generates itself, no download).
    source: Any = field(default_factory=SyntheticSourceConfig)
    # Training writes shards of 200 samples (the shard command keeps ShardConfig's 1000).
    shards: ShardConfig = field(default_factory=lambda: ShardConfig(max_samples=200))
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    # Where checkpoints, metrics and the report go (the Hydra entry point sets it to
    # hydra.run.dir); None means runs/<run_name>/<time stamp>.
    run_dir: Optional[str] = None
    # Names the default run folder runs/<run_name>/<time stamp> (conf/train.yaml's hydra.run.dir
    # and resolve_run_dir); None means the source's name.
    run_name: Optional[str] = None
    # Continue from a checkpoint: "latest" (this run's folder, then its siblings) or a path.
    resume: Optional[str] = None

    def resolved_run_name(self) -> str:
        """``run_name``, or the source's name when it is None ("run" without a source)."""
        if self.run_name is not None:
            return self.run_name
        return getattr(self.source, "name", None) or "run"
