"""Evaluating a model during or after training, on the run's own shards."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypedDict

import torch

from clip_med.core import distributed
from clip_med.core.precision import resolve_precision
from clip_med.data.shardset import ShardSet
from clip_med.eval.embeddings import embed_split
from clip_med.eval.evaluator import evaluate_embeddings
from clip_med.eval.report import write_report
from clip_med.eval.zero_shot import prompt_style_for
from clip_med.modeling.factory import ModelBundle
from clip_med.training.config import TrainConfig
from clip_med.training.metrics_log import MetricsLogger

log = logging.getLogger(__name__)


def headline(report: dict[str, Any]) -> dict[str, float]:
    """The numbers worth a line in the log and in metrics.jsonl."""
    values = {}
    for method in ("zero_shot", "linear_probe"):
        for task, metrics in report.get(method, {}).items():
            values[f"{method}/{task}/accuracy"] = metrics["accuracy"]
    for direction in ("image_to_text", "text_to_image"):
        for key, value in report.get("retrieval", {}).get(direction, {}).items():
            if key.startswith("R@"):
                values[f"retrieval/{direction}/{key}"] = value
    return values


class _EmbedOptions(TypedDict):
    """The options both embed_split calls of :func:`_evaluate` share."""

    transform: Callable
    tokenizer: Callable
    device: torch.device
    batch_size: int
    workers: int
    precision: str
    tasks: Sequence[str]
    progress: bool


def evaluate_run(bundle: ModelBundle, shard_set: ShardSet, cfg: TrainConfig, info: distributed.DistInfo,
                 run_dir: Path, logger: MetricsLogger, step: int, write_files: bool = True,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Rank 0 evaluates on the held-out split (the others wait); returns the report."""
    report: dict[str, Any] = {}
    if info.is_main:
        report = _evaluate(bundle, shard_set, cfg, info, step)
        report.update(extra or {})
        report["run_dir"] = str(run_dir)
        logger.log(step, headline(report), prefix="eval")
        for key, value in headline(report).items():
            log.info("step %d  %-40s %.4f", step, key, value)
        if write_files:
            paths = write_report(report, run_dir)
            log.info("report written to %s", paths["md"])
    distributed.barrier(info)
    return report


def _evaluate(bundle: ModelBundle, shard_set: ShardSet, cfg: TrainConfig, info: distributed.DistInfo,
              step: int) -> dict[str, Any]:
    split = shard_set.held_out_split(cfg.data.train_split, cfg.eval.split)
    transform = bundle.transform(train=False)  # the model's own preprocess_cfg
    precision = resolve_precision(cfg.trainer.precision, info.device)  # the run's own precision
    common = _EmbedOptions(transform=transform, tokenizer=bundle.tokenizer, device=info.device,
                  batch_size=cfg.eval.batch_size, workers=cfg.eval.workers, precision=precision,
                  tasks=cfg.eval.tasks, progress=cfg.trainer.progress)
    held_out = embed_split(bundle.model, shard_set.urls(split), description=f"embed {split}", **common)
    train = embed_split(bundle.model, shard_set.urls(cfg.data.train_split),
                        description=f"embed {cfg.data.train_split}", **common)
    eval_cfg = dataclasses.replace(cfg.eval, prompt_style=prompt_style_for(cfg.eval.prompt_style, bundle.pretrained))
    report = evaluate_embeddings(bundle.model, bundle.tokenizer, info.device, held_out, train, eval_cfg)
    report.update({"split": split, "train_split": cfg.data.train_split, "source": shard_set.source,
                   "model": bundle.name, "step": step, "read_errors": held_out.errors})
    return report
