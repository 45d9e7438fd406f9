"""``train(cfg)``: shards -> streamed CLIP training -> checkpoints -> held-out report."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from clip_med.data.loader import create_train_loader, effective_workers, steps_per_epoch
from clip_med.data.shardset import ShardSet, open_shard_set, prepare_shards
from clip_med.data.transforms import create_transform
from clip_med.losses import create_loss, model_kwargs_for, total_loss
from clip_med.models import ModelBundle, count_parameters, create_model
from clip_med.training import distributed
from clip_med.training.checkpoint import find_resume_checkpoint, restore_rng_state, rng_state, save_checkpoint
from clip_med.training.config import TrainConfig
from clip_med.training.evaluation import evaluate_run
from clip_med.training.metrics_log import MetricsLogger
from clip_med.training.optim import create_optimizer, create_scheduler

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Everything besides weights and optimizer that a step-exact resume needs."""

    step: int = 0
    epoch: int = 0
    epoch_step: int = 0
    # Per rank, per loader worker: batches of the current epoch already trained on.
    batches_done: dict[int, dict[int, int]] = field(default_factory=dict)
    data_errors: dict[str, int] = field(default_factory=dict)
    nonfinite_skipped: int = 0
    samples_seen: int = 0


@dataclass
class EpochPlan:
    urls: list[str]
    counts: dict[str, int]
    workers: int
    steps: list[int]  # optimizer steps per epoch

    @property
    def total_steps(self) -> int:
        return sum(self.steps)


# ---------------------------------------------------------------------------------------------
# Set-up


def resolve_run_dir(cfg: TrainConfig) -> Path:
    if cfg.run_dir:
        return Path(cfg.run_dir)
    return Path("runs") / cfg.run_name / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def prepare_data(cfg: TrainConfig, info: distributed.DistInfo) -> ShardSet:
    """Rank 0 writes (or reuses) the shards; the other ranks wait and read the manifests."""
    if cfg.source is None:
        raise ValueError("no data source configured: choose one with source=<name> (see conf/source/)")
    if info.is_main:
        shard_set = prepare_shards(cfg.source, cfg.shards)
    distributed.barrier(info)
    if not info.is_main:
        shard_set = open_shard_set(cfg.shards.out_dir(cfg.source.name))
    return shard_set


def plan_epochs(cfg: TrainConfig, shard_set: ShardSet, info: distributed.DistInfo) -> EpochPlan:
    split = cfg.data.train_split
    urls, counts = shard_set.urls(split), shard_set.shard_counts(split)
    loader = cfg.data.loader
    workers = effective_workers(len(urls), info.world_size, loader.workers)
    steps = [steps_per_epoch(counts, urls, epoch, cfg.seed, True, info.world_size, workers, loader.batch_size)
             for epoch in range(cfg.trainer.epochs)]
    if cfg.trainer.max_steps is not None:
        remaining, capped = cfg.trainer.max_steps, []
        for count in steps:
            capped.append(min(count, remaining))
            remaining -= capped[-1]
        steps = capped
    if not sum(steps):
        raise ValueError(
            f"split {split!r} has {sum(counts.values())} samples: not one full batch of "
            f"{loader.batch_size} per process and worker. Lower data.loader.batch_size or data.loader.workers."
        )
    return EpochPlan(urls, counts, workers, steps)


def resolve_precision(requested: str, device: torch.device) -> str:
    if requested == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if requested in ("bf16", "fp16") and device.type != "cuda":
        log.warning("precision=%s asked for on %s: training in fp32", requested, device)
        return "fp32"
    if requested not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"unknown precision {requested!r}: use auto, fp32, bf16 or fp16")
    return requested


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _payload(cfg: TrainConfig, bundle: ModelBundle, optimizer, scaler, state: TrainState, plan: EpochPlan,
             info: distributed.DistInfo) -> dict[str, Any]:
    return {
        "state_dict": _unwrap(bundle.model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "train_state": dataclasses.asdict(state),
        "rng": rng_state(),
        "model_name": bundle.name,
        "model_cfg": bundle.model_cfg,
        "config": dataclasses.asdict(cfg),
        "world_size": info.world_size,
        "workers": plan.workers,
    }


def _gather_positions(state: TrainState, info: distributed.DistInfo, local: dict[int, int]) -> None:
    if not info.distributed:
        state.batches_done = {0: dict(local)}
        return
    gathered = [None] * info.world_size
    torch.distributed.all_gather_object(gathered, dict(local))
    state.batches_done = {rank: positions for rank, positions in enumerate(gathered)}


def _restore(checkpoint: dict[str, Any], bundle: ModelBundle, optimizer, scaler, plan: EpochPlan,
             info: distributed.DistInfo) -> TrainState:
    bundle.model.load_state_dict(checkpoint["state_dict"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    if scaler is not None and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    restore_rng_state(checkpoint["rng"])
    state = TrainState(**checkpoint["train_state"])
    state.batches_done = {int(rank): {int(w): n for w, n in pos.items()} for rank, pos in state.batches_done.items()}
    if (checkpoint.get("world_size"), checkpoint.get("workers")) != (info.world_size, plan.workers):
        log.warning("checkpoint was written with %s processes x %s workers, now %s x %s: the rest of epoch %d "
                    "restarts from its beginning", checkpoint.get("world_size"), checkpoint.get("workers"),
                    info.world_size, plan.workers, state.epoch)
        state.step -= state.epoch_step
        state.epoch_step, state.batches_done = 0, {}
    return state


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class _Run:
    cfg: TrainConfig
    info: distributed.DistInfo
    bundle: ModelBundle
    model: torch.nn.Module
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    precision: str
    plan: EpochPlan
    state: TrainState
    run_dir: Path
    logger: MetricsLogger
    train_transform: Any


def _train_step(run: _Run, batch: dict) -> float | None:
    """One optimizer step; returns the loss, or None when it was not finite (step skipped)."""
    device = run.info.device
    images = batch["images"].to(device, non_blocking=True)
    texts = batch["texts"].to(device, non_blocking=True)
    run.optimizer.zero_grad(set_to_none=True)
    with autocast(run.precision, device):
        terms = run.loss_fn(**run.model(images, texts), output_dict=True)
        loss = total_loss(terms)
    finite = torch.isfinite(loss.detach()).float()
    if run.info.distributed:
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    if finite.item() < 1:
        return None
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
        run.scaler.unscale_(run.optimizer)
    else:
        loss.backward()
    if run.cfg.optim.grad_clip_norm:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.optim.grad_clip_norm)
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    with torch.no_grad():
        _unwrap(run.model).logit_scale.clamp_(0, math.log(100))
    return float(loss.detach())


def _checkpoint(run: _Run, local_positions: dict[int, int]) -> None:
    _gather_positions(run.state, run.info, local_positions)
    if run.info.is_main:
        path = save_checkpoint(_payload(run.cfg, run.bundle, run.optimizer, run.scaler, run.state, run.plan,
                                        run.info), run.run_dir, run.state.step, run.cfg.trainer.keep_checkpoints)
        log.debug("checkpoint %s", path)
    distributed.barrier(run.info)


def _handle_nonfinite(run: _Run, in_row: int) -> int:
    in_row += 1
    run.state.nonfinite_skipped += 1
    log.warning("non-finite loss at step %d: step skipped (%d in a row)", run.state.step, in_row)
    if in_row >= run.cfg.trainer.max_nonfinite_steps:
        raise FloatingPointError(
            f"{in_row} consecutive non-finite losses (last at step {run.state.step}): training diverged. "
            "Lower optim.lr, raise optim.warmup, or use precision=bf16 instead of fp16."
        )
    return in_row


def _run_epoch(run: _Run) -> None:
    state, cfg = run.state, run.cfg
    steps = run.plan.steps[state.epoch]
    positions = dict(state.batches_done.get(run.info.rank, {}))
    loader = create_train_loader(run.plan.urls, run.train_transform, run.bundle.tokenizer, cfg.data.loader,
                                 state.epoch, cfg.seed, run.plan.workers, positions)
    errors_by_worker: dict[int, dict[str, int]] = {}
    base_errors = dict(state.data_errors)
    bar = tqdm(total=steps, initial=state.epoch_step, desc=f"epoch {state.epoch + 1}/{len(run.plan.steps)}",
               unit="step", disable=not (cfg.trainer.progress and run.info.is_main), dynamic_ncols=True)
    in_row, window_start, window_samples = 0, time.perf_counter(), 0
    for batch in loader:
        if state.epoch_step >= steps:
            break
        lr = run.scheduler(state.step)
        loss = _train_step(run, batch)
        in_row = _handle_nonfinite(run, in_row) if loss is None else 0
        batch_size = len(batch["keys"]) * run.info.world_size
        positions[batch["worker"]] = batch["worker_batch"] + 1
        errors_by_worker[batch["worker"]] = batch["errors"]
        state.data_errors = _sum_errors(base_errors, errors_by_worker)
        state.step += 1
        state.epoch_step += 1
        state.samples_seen += batch_size
        window_samples += batch_size
        bar.update(1)
        if state.step % cfg.trainer.log_every_steps == 0 or state.epoch_step == steps:
            rate = window_samples / max(time.perf_counter() - window_start, 1e-9)
            _log_step(run, loss, lr, rate, bar)
            window_start, window_samples = time.perf_counter(), 0
        if state.step % cfg.trainer.checkpoint_every_steps == 0 and state.epoch_step < steps:
            _checkpoint(run, positions)
    bar.close()
    if state.epoch_step < steps:
        raise RuntimeError(f"the loader ran dry after {state.epoch_step} of {steps} steps in epoch {state.epoch}: "
                           f"data errors so far {state.data_errors}")
    state.epoch += 1
    state.epoch_step = 0
    _checkpoint(run, {})


def _sum_errors(base: dict[str, int], by_worker: dict[int, dict[str, int]]) -> dict[str, int]:
    total = dict(base)
    for counts in by_worker.values():
        for kind, count in counts.items():
            total[kind] = total.get(kind, 0) + count
    return total


def _log_step(run: _Run, loss: float | None, lr: float, rate: float, bar) -> None:
    values = {
        "loss": loss if loss is not None else float("nan"),
        "lr": lr,
        "logit_scale": float(_unwrap(run.model).logit_scale.detach().exp()),
        "samples_per_s": rate,
        "epoch": run.state.epoch + run.state.epoch_step / run.plan.steps[run.state.epoch],
        "data_errors": sum(run.state.data_errors.values()),
        "nonfinite_skipped": run.state.nonfinite_skipped,
    }
    run.logger.log(run.state.step, values)
    bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{lr:.2e}", sps=f"{rate:.0f}")
    if run.state.data_errors:
        bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{lr:.2e}", sps=f"{rate:.0f}",
                        skipped=values["data_errors"])


# ---------------------------------------------------------------------------------------------
# Entry


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train a CLIP model as ``cfg`` says and return the held-out evaluation report."""
    info = distributed.init_distributed(cfg.trainer.device, cfg.trainer.dist_backend)
    try:
        return _train(cfg, info)
    finally:
        distributed.cleanup(info)


def _build_run(cfg: TrainConfig, info: distributed.DistInfo, run_dir: Path) -> tuple[_Run, ShardSet, str | None]:
    shard_set = prepare_data(cfg, info)
    bundle = create_model(cfg.model, info.device, **model_kwargs_for(cfg.loss))
    log.info("model %s: %s parameters", cfg.model.name, f"{count_parameters(bundle.model)['total']:,}")
    plan = plan_epochs(cfg, shard_set, info)
    optimizer = create_optimizer(bundle.model, cfg.optim)
    precision = resolve_precision(cfg.trainer.precision, info.device)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    state, resumed_from = TrainState(), None
    if cfg.resume:
        found = find_resume_checkpoint(cfg.resume, run_dir)
        if found is None:
            log.info("resume=%s: no checkpoint found, starting from step 0", cfg.resume)
        else:
            resumed_from = str(found[0])
            state = _restore(found[1], bundle, optimizer, scaler, plan, info)
            log.info("resumed from %s at step %d (epoch %d, step %d of it)", resumed_from, state.step,
                     state.epoch, state.epoch_step)
    model = bundle.model
    if info.distributed:
        model = DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    if cfg.model.torch_compile:
        model = torch.compile(model)
    train_transform = create_transform(bundle.image_size, bundle.mean, bundle.std, train=True,
                                       augment=cfg.data.augment)
    logger = MetricsLogger(run_dir, info.is_main, cfg.trainer.tensorboard)
    logger.drop_after(state.step)
    run = _Run(cfg, info, bundle, model, create_loss(cfg.loss, info.rank, info.world_size), optimizer,
               create_scheduler(optimizer, cfg.optim, plan.total_steps), scaler, precision, plan, state, run_dir,
               logger, train_transform)
    return run, shard_set, resumed_from


def _train(cfg: TrainConfig, info: distributed.DistInfo) -> dict[str, Any]:
    run_dir = resolve_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    run, shard_set, resumed_from = _build_run(cfg, info, run_dir)
    log.info("training %d steps over %d epochs (%d workers per process) into %s", run.plan.total_steps,
             len(run.plan.steps), run.plan.workers, run_dir)
    started = time.perf_counter()
    try:
        while run.state.epoch < len(run.plan.steps) and run.state.step < run.plan.total_steps:
            _run_epoch(run)
            every = cfg.eval.every_epochs
            if every and run.state.epoch % every == 0 and run.state.epoch < len(run.plan.steps):
                evaluate_run(run.bundle, shard_set, cfg, info, run_dir, run.logger, run.state.step,
                             write_files=False)
        train_seconds = time.perf_counter() - started
        return evaluate_run(run.bundle, shard_set, cfg, info, run_dir, run.logger, run.state.step,
                            extra={"resumed_from": resumed_from, "train_seconds": round(train_seconds, 1),
                                   "data_errors": run.state.data_errors,
                                   "nonfinite_skipped": run.state.nonfinite_skipped})
    finally:
        run.logger.close()
