"""``train(cfg)``: shards -> streamed CLIP training -> checkpoints -> held-out report.

One process, or one per GPU under ``torchrun`` (DDP; the contrastive loss sees the global
batch). Every rank takes the same step-level decisions (skip a non-finite step, end an epoch
whose data ran short, stop on SIGTERM, write a checkpoint) through one small all-reduce per step
on the device, which the host reads one step late (:mod:`clip_med.training.agreement`): the GPU
never waits for Python between steps. Only rank 0 writes checkpoints (in the background, from a
CPU snapshot), metrics and the report. While rank 0 alone works (shards, evaluation) the others
wait with their own long timeout, and a rank that fails ends the others with its message
(:func:`clip_med.core.distributed.failures_shared`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from clip_med.core import distributed
from clip_med.core.bounds import check_bounds
from clip_med.core.memory import reuse_freed_memory
from clip_med.data.loader import (
    TrainStream,
    batch_bytes,
    check_shared_memory,
    effective_workers,
    steps_per_epoch,
    train_workers,
)
from clip_med.data.shardset import ShardSet, open_shard_set, prepare_shards
from clip_med.data.transforms import split_normalize
from clip_med.modeling.factory import ModelBundle, clip_model, count_parameters, create_model
from clip_med.modeling.hub import first_on_rank_zero, resolve_source
from clip_med.modeling.lora import load_trained_state
from clip_med.modeling.losses import create_loss, model_kwargs_for
from clip_med.training.agreement import Agreed, GroupFeed, StepAgreement
from clip_med.training.async_checkpoint import BackgroundWriter, snapshot_to_cpu
from clip_med.training.checkpoint import find_resume_checkpoint, load_checkpoint, save_checkpoint
from clip_med.training.config import TrainConfig, TrainerConfig
from clip_med.training.evaluation import evaluate_run
from clip_med.training.metrics_log import MetricsLogger
from clip_med.training.nonfinite import apply_update_if, local_ok, use_fused_optimizer
from clip_med.training.optim import create_optimizer, create_scheduler
from clip_med.training.state import (
    EpochProgress,
    TrainState,
    checkpoint_payload,
    epoch_errors_total,
    gather_into_state,
    restore_train_state,
)
from clip_med.training.step import StepParts, create_grad_scaler, forward_backward, resolve_precision

log = logging.getLogger(__name__)


class TrainingInterrupted(RuntimeError):
    """SIGTERM/SIGINT/SIGUSR1 arrived: a checkpoint was written and the run stopped."""


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
    return Path("runs") / cfg.resolved_run_name() / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def prepare_data(cfg: TrainConfig, info: distributed.DistInfo) -> ShardSet:
    """Rank 0 writes (or reuses) the shards; the other ranks wait and read the manifests.

    With ``data.train_shards`` (a path, brace pattern, http(s) URL or pipe: command), shards
    written elsewhere are read as they are, with their manifests, and no source is read."""
    if cfg.data.train_shards:
        from clip_med.data.shardset import open_shard_lists

        return open_shard_lists(cfg.data.train_shards, cfg.data.eval_shards, cfg.data.train_split)
    if cfg.source is None:
        raise ValueError("no data source configured: choose one with source=<name> (see conf/source/)")
    if info.is_main:
        shard_set = prepare_shards(cfg.source, cfg.shards)
    distributed.barrier(info, "rank 0 writing the shards")
    if not info.is_main:
        shard_set = open_shard_set(cfg.shards.out_dir(cfg.source.name))
    return shard_set


def plan_epochs(cfg: TrainConfig, shard_set: ShardSet, info: distributed.DistInfo) -> EpochPlan:
    split = cfg.data.train_split
    urls, counts = shard_set.urls(split), shard_set.shard_counts(split)
    loader, accum = cfg.data.loader, cfg.trainer.accum_freq
    if not sum(counts.values()):
        manifest = shard_set.manifest(split)
        skipped = ", ".join(f"{count} {reason}" for reason, count in manifest.skipped_by_reason().items())
        where = ", ".join(urls[:3]) + (" ..." if len(urls) > 3 else "") if urls else "no shard files"
        raise ValueError(f"the {split!r} split holds no samples ({where}; {manifest.input_count} input record(s)"
                         + (f", skipped: {skipped}" if skipped else "") + f"): nothing to train on. See "
                         f"{split}.manifest.json for why each record was skipped")
    workers = effective_workers(len(urls), info.world_size, train_workers(loader.workers, info.device))
    steps = [steps_per_epoch(counts, urls, epoch, cfg.seed, True, info.world_size, workers, loader.batch_size)
             // accum for epoch in range(cfg.trainer.epochs)]
    if cfg.trainer.max_steps is not None:
        remaining, capped = cfg.trainer.max_steps, []
        for count in steps:
            capped.append(min(count, remaining))
            remaining -= capped[-1]
        steps = capped
    if not sum(steps):
        raise ValueError(
            f"split {split!r} has {sum(counts.values())} samples: not one full step of {accum} batch(es) of "
            f"{loader.batch_size} per process and worker. Lower data.loader.batch_size, data.loader.workers or "
            "trainer.accum_freq."
        )
    return EpochPlan(urls, counts, workers, steps)


def data_layout(cfg: TrainConfig, plan: EpochPlan, info: distributed.DistInfo) -> dict[str, int]:
    """What a saved data position depends on; a resume under a different layout restarts the epoch."""
    return {"world_size": info.world_size, "workers": plan.workers, "batch_size": cfg.data.loader.batch_size,
            "accum_freq": cfg.trainer.accum_freq}


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class _Run:
    cfg: TrainConfig
    info: distributed.DistInfo
    bundle: ModelBundle
    parts: StepParts
    scheduler: Any
    plan: EpochPlan
    state: TrainState
    run_dir: Path
    logger: MetricsLogger
    train_transform: Any
    stop: threading.Event
    last_checkpoint_time: float = 0.0
    nonfinite_in_row: int = 0
    stream: Any = None  # TrainStream: the loader, its workers kept from epoch to epoch
    # (every so many steps, every so many minutes): TrainerConfig.checkpoint_intervals
    checkpoint_every: tuple[int | None, float | None] = (None, None)
    # Rank 0's checkpoint writer (save_checkpoint looked up at each write, where tests replace it).
    writer: BackgroundWriter = field(default_factory=lambda: BackgroundWriter(lambda *args: save_checkpoint(*args)))
    agreement: Any = None  # StepAgreement: the per-step flags, read `lag` steps late
    feed: Any = None  # GroupFeed of the current epoch
    agreed_until: int = 0  # the epoch steps every rank holds data for (exclusive)
    stop_requested: bool = False  # a rank was asked to stop (agreed)
    checkpoint_due: bool = False  # a time-based checkpoint is due (agreed)
    last_ok: bool = True  # the newest agreed step was finite


def _checkpoint(run: _Run, progress: EpochProgress | None) -> None:
    """Every rank settles the step flags and sends its data position; rank 0 snapshots the state to CPU
    memory and writes it in the background (after the previous write: a failed one stops every rank)."""
    _settle(run)
    rngs = gather_into_state(run.state, progress, run.info)
    _raise_if_write_failed(run)
    if run.info.is_main:
        meta = {"model_name": run.bundle.name, "model_cfg": run.bundle.model_cfg,
                "config": dataclasses.asdict(run.cfg), **data_layout(run.cfg, run.plan, run.info)}
        payload = checkpoint_payload(run.parts.raw, run.parts.optimizer, run.parts.scaler, run.state, rngs, meta)
        run.writer.submit(snapshot_to_cpu(payload), run.run_dir, run.state.step, run.cfg.trainer.keep_checkpoints)
    run.last_checkpoint_time = time.monotonic()
    run.checkpoint_due = False


def _raise_if_write_failed(run: _Run) -> None:
    """Rank 0 waits for the write in flight; if it (or an earlier one) failed, every rank stops with its error."""
    error = distributed.broadcast_object(run.writer.wait() if run.info.is_main else None, run.info)
    if error:
        raise RuntimeError(error if run.info.is_main else f"rank 0 could not write a checkpoint: {error}")


def _on_agreed(run: _Run, agreed: Agreed) -> None:
    """Act on one step's flags, read after the step (every rank reads the same ones at the same step)."""
    if not agreed.writer_ok:
        _raise_if_write_failed(run)
    run.last_ok = agreed.ok
    if agreed.ok:
        run.nonfinite_in_row = 0
    else:
        _handle_nonfinite(run, agreed.step)
    run.agreed_until = max(run.agreed_until, agreed.data_until)
    run.stop_requested |= not agreed.go_on
    run.checkpoint_due |= not agreed.not_due


def _settle(run: _Run) -> None:
    """Read every step's flags now (waits for the device: log steps, checkpoints, epoch ends)."""
    for agreed in run.agreement.flush():
        _on_agreed(run, agreed)


def _micro_batch_groups(loader, accum: int) -> Iterator[list[dict]]:
    group: list[dict] = []
    for batch in loader:
        group.append(batch)
        if len(group) == accum:
            yield group
            group = []


def _checkpoint_due(run: _Run) -> bool:
    """Rank 0's clock says a time-based checkpoint is due (the ranks agree on it through the step flags)."""
    minutes = run.checkpoint_every[1]
    return (minutes is not None and run.info.is_main
            and time.monotonic() - run.last_checkpoint_time >= minutes * 60)


def _steps_due(run: _Run) -> bool:
    every = run.checkpoint_every[0]
    return every is not None and run.state.step % every == 0


def _handle_nonfinite(run: _Run, step: int) -> None:
    run.nonfinite_in_row += 1
    run.state.nonfinite_skipped += 1
    in_row = run.nonfinite_in_row
    log.warning("non-finite loss or gradient at step %d: step skipped (%d in a row)", step, in_row)
    if in_row >= run.cfg.trainer.max_nonfinite_steps:
        raise FloatingPointError(
            f"{in_row} consecutive non-finite losses (last at step {step}): training diverged. "
            "Lower optim.lr, raise optim.warmup, or use precision=bf16 instead of fp16."
        )


def _train_step(run: _Run, group: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step, applied where every rank's loss was finite; returns the loss and the step's
    agreed flags (both on the device: nothing here waits for the GPU)."""
    loss = forward_backward(run.parts, group)
    flags = run.agreement.agree(run.state.step + 1, local_ok(run.parts, loss), run.feed.data_until,
                                go_on=not run.stop.is_set(), not_due=not _checkpoint_due(run),
                                writer_ok=run.writer.error is None)
    apply_update_if(run.parts, flags[0])
    return loss, flags


def _advance(run: _Run, progress: EpochProgress, group: list[dict]) -> int:
    """Count a finished step; returns its global batch size."""
    for batch in group:
        progress.consumed(batch)
    batch_size = sum(len(batch["keys"]) for batch in group) * run.info.world_size
    run.state.step += 1
    run.state.epoch_step += 1
    run.state.samples_seen += batch_size
    return batch_size


def _start_epoch(run: _Run, steps: int) -> None:
    """This epoch's batches, fetched ahead as far as the step flags are read late, and how far every rank
    holds data at the start (one CPU exchange per epoch)."""
    if run.stream.starts_workers:
        run.writer.wait()  # no worker processes forked while a checkpoint thread runs
    groups = _micro_batch_groups(run.stream.epoch(run.state.epoch), run.cfg.trainer.accum_freq)
    run.feed = GroupFeed(groups, run.state.epoch_step, steps, ahead=run.agreement.lag + 1)
    run.agreed_until = run.feed.agree_start(run.info)


def _run_epoch(run: _Run) -> None:
    state, cfg, info = run.state, run.cfg, run.info
    steps = run.plan.steps[state.epoch]
    progress = EpochProgress(run.plan.workers, state, info.rank)
    _start_epoch(run, steps)
    bar = tqdm(total=steps, initial=state.epoch_step, desc=f"epoch {state.epoch + 1}/{len(run.plan.steps)}",
               unit="step", disable=not (cfg.trainer.progress and info.is_main), dynamic_ncols=True)
    run.parts.model.train()
    window = (time.perf_counter(), 0)
    while state.epoch_step < run.agreed_until:  # every rank holds this step's batches
        group, lr = run.feed.pop(), run.scheduler(state.step)
        loss, _ = _train_step(run, group)
        window = (window[0], window[1] + _advance(run, progress, group))
        bar.update(1)
        for agreed in run.agreement.ready():  # the flags of `lag` steps ago
            _on_agreed(run, agreed)
        if state.step % cfg.trainer.log_every_steps == 0 or state.epoch_step == steps:
            _settle(run)
            _log_step(run, progress, float(loss) if run.last_ok else None, lr, window, bar)
            window = (time.perf_counter(), 0)
        if run.stop_requested:
            _checkpoint(run, progress)
            raise TrainingInterrupted(f"stopped by a signal at step {state.step}; checkpoint written in "
                                      f"{run.run_dir}/checkpoints. Continue with resume=latest.")
        if state.epoch_step < steps and (_steps_due(run) or run.checkpoint_due):
            _checkpoint(run, progress)
    bar.close()
    _end_epoch(run, progress, steps)


def _end_epoch(run: _Run, progress: EpochProgress, steps: int) -> None:
    state = run.state
    state.data_errors = epoch_errors_total(state, progress, run.info)
    if state.epoch_step < steps:
        log.warning("epoch %d ended after %d of its %d planned steps: a process ran out of data (data errors so "
                    "far: %s). Training goes on with the next epoch.", state.epoch + 1, state.epoch_step, steps,
                    state.data_errors or "none")
    if state.data_errors:
        log.warning("data errors so far (all processes; each item was skipped): %s", state.data_errors)
    state.errors_before_epoch = dict(state.data_errors)
    state.epoch += 1
    state.epoch_step = 0
    _checkpoint(run, None)


def _log_step(run: _Run, progress: EpochProgress, loss: float | None, lr: float, window: tuple[float, int],
              bar) -> None:
    info, state = run.info, run.state
    rate = window[1] / max(time.perf_counter() - window[0], 1e-9)
    state.data_errors = epoch_errors_total(state, progress, info)
    loss_sum = distributed.all_reduce_sum(loss if loss is not None else float("nan"), info)
    values = {
        "loss": loss_sum / info.world_size,
        "lr": lr,
        "logit_scale": float(clip_model(run.parts.raw).logit_scale.detach().exp()),
        "samples_per_s": rate,
        "epoch": state.epoch + state.epoch_step / run.plan.steps[state.epoch],
        "data_errors": sum(state.data_errors.values()),
        "nonfinite_skipped": state.nonfinite_skipped,
    }
    if info.device.type == "cuda":
        values["peak_memory_gb"] = torch.cuda.max_memory_allocated(info.device) / 2**30
    run.logger.log(state.step, values)
    postfix: dict[str, str | float] = {"loss": f"{values['loss']:.3f}", "lr": f"{lr:.2e}", "sps": f"{rate:.0f}"}
    if state.data_errors:
        postfix["skipped"] = values["data_errors"]
    bar.set_postfix(**postfix)


# ---------------------------------------------------------------------------------------------
# Entry


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train a CLIP model as ``cfg`` says and return the held-out evaluation report."""
    check_bounds(cfg)  # before any work (the command line has checked already; Python callers too)
    info = distributed.init_distributed(cfg.trainer.device, cfg.trainer.dist_backend,
                                        cfg.trainer.dist_timeout_minutes, cfg.trainer.dist_phase_timeout_minutes)
    try:
        # a rank's error ends every rank with its message (a signal's stop is taken by all ranks together)
        with distributed.failures_shared(info, passthrough=(TrainingInterrupted,)):
            return _train(cfg, info)
    finally:
        distributed.cleanup(info)


def _find_checkpoint(resume: str, run_dir: Path, info: distributed.DistInfo) -> tuple[str, dict] | None:
    """Rank 0 picks the checkpoint and every rank loads that same one (sent by rank 0 where a rank cannot see it)."""
    found = find_resume_checkpoint(resume, run_dir) if info.is_main else None
    path = distributed.broadcast_object(str(found[0]) if found else None, info)
    if path is None:
        return None
    checkpoint: dict[str, Any] | None
    if info.is_main:
        assert found is not None  # rank 0 sent a path, so it found a checkpoint
        checkpoint = found[1]
    else:
        checkpoint = load_checkpoint(path) if Path(path).is_file() else None
    # (all_true is collective: every rank calls it; when it holds, this rank's checkpoint is there too)
    if distributed.all_true([checkpoint is not None], info)[0] and checkpoint is not None:
        return path, checkpoint
    if checkpoint is None:
        log.warning("checkpoint %s is not visible from rank %d: receiving it from rank 0", path, info.rank)
    sent = distributed.broadcast_object(checkpoint if info.is_main else None, info)
    return path, checkpoint if checkpoint is not None else sent


def _wrap_model(cfg: TrainConfig, bundle: ModelBundle, info: distributed.DistInfo):
    model: torch.nn.Module | Callable[..., Any]  # torch.compile gives a plain callable
    model, ddp = bundle.model, None
    if info.distributed:
        if cfg.trainer.sync_batchnorm:
            if info.device.type == "cuda":
                bundle.model = model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            else:
                log.warning("trainer.sync_batchnorm needs CUDA (torch's SyncBatchNorm): ignored on %s", info.device)
        ddp = model = DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda"
                                              else None, static_graph=cfg.trainer.ddp_static_graph)
    if cfg.model.torch_compile:
        model = torch.compile(model)
    return model, ddp


def _build_run(cfg: TrainConfig, info: distributed.DistInfo, run_dir: Path) -> tuple[_Run, ShardSet, str | None]:
    # A pretrained model's own files are fetched before sharding, which can take a while: one that is
    # unavailable stops the run at once (rank 0 downloads, the others then read the cache).
    first_on_rank_zero(info, lambda: resolve_source(cfg.model.name, cfg.model.pretrained))
    shard_set = prepare_data(cfg, info)
    # Rank 0 downloads pretrained files into the cache first; the other ranks then read the cache.
    bundle = first_on_rank_zero(info, lambda: create_model(cfg.model, info.device, **model_kwargs_for(cfg.loss)))
    if info.is_main:
        log.info("model %s: %s parameters", cfg.model.name, f"{count_parameters(bundle.model)['total']:,}")
    plan = plan_epochs(cfg, shard_set, info)
    optimizer = create_optimizer(bundle.model, cfg.optim)
    fused = use_fused_optimizer(optimizer, cfg.trainer.use_fused_optimizer(info.device))
    precision = resolve_precision(cfg.trainer.precision, info.device)
    scaler = create_grad_scaler(precision, info.device)
    state, resumed_from = TrainState(), None
    if cfg.resume:
        found = _find_checkpoint(cfg.resume, run_dir, info)
        if found is None:
            log.info("resume=%s: no checkpoint found, starting from step 0", cfg.resume)
        else:
            resumed_from, checkpoint = found
            load_trained_state(bundle.model, checkpoint)  # a LoRA checkpoint holds only what was trained
            optimizer.load_state_dict(checkpoint["optimizer"])
            use_fused_optimizer(optimizer, fused)  # the saved groups bring their own setting back
            if scaler is not None and checkpoint.get("scaler"):
                scaler.load_state_dict(checkpoint["scaler"])
            state = restore_train_state(checkpoint, data_layout(cfg, plan, info), info)
            if info.is_main:
                log.info("resumed from %s at step %d (epoch %d, step %d of it)", resumed_from, state.step,
                         state.epoch + 1, state.epoch_step)
    model, ddp = _wrap_model(cfg, bundle, info)
    train_transform, normalize = _train_transform(cfg, bundle)
    parts = StepParts(model, bundle.model, ddp, create_loss(cfg.loss, info.rank, info.world_size), optimizer, scaler,
                      precision, info.device, cfg.optim.grad_clip_norm, normalize)
    logger = MetricsLogger(run_dir, info.is_main, cfg.trainer.tensorboard)
    logger.drop_after(state.step)
    run = _Run(cfg, info, bundle, parts, create_scheduler(optimizer, cfg.optim, plan.total_steps), plan, state,
               run_dir, logger, train_transform, threading.Event(), time.monotonic(),
               stream=_train_stream(cfg, info, bundle, plan, state, train_transform, uint8=normalize is not None),
               checkpoint_every=cfg.trainer.checkpoint_intervals(info.device),
               agreement=StepAgreement(info, lag=0 if cfg.trainer.sync_every_step else 1))
    return run, shard_set, resumed_from


def _train_transform(cfg: TrainConfig, bundle: ModelBundle) -> tuple[Callable, Callable | None]:
    """The loader's transform and, for uint8 images, the normalisation left for the device."""
    transform = bundle.transform(train=True, augment=cfg.data.augment)  # the model's own preprocess_cfg
    if not cfg.data.loader.uint8_images:
        return transform, None
    try:
        return split_normalize(transform)
    except ValueError as exc:
        log.warning("images cross the loader as float32: %s", exc)
        return transform, None


def _train_stream(cfg: TrainConfig, info: distributed.DistInfo, bundle: ModelBundle, plan: EpochPlan,
                  state: TrainState, transform: Callable, uint8: bool) -> TrainStream:
    """This rank's loader for the whole run, continuing the saved position; refused up front when its
    batches in flight would not fit in /dev/shm."""
    loader = cfg.data.loader
    check_shared_memory(plan.workers, loader.prefetch_factor, batch_bytes(loader.batch_size, bundle.image_size, uint8))
    progress = EpochProgress(plan.workers, state, info.rank)
    return TrainStream(plan.urls, transform, bundle.tokenizer, loader, cfg.seed, plan.workers,
                       first_epoch=state.epoch, resume=progress.positions, first_worker=progress.next_worker,
                       rank=info.rank, world_size=info.world_size, pin_memory=info.device.type == "cuda",
                       shard_counts=plan.counts)


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event):
    """SIGTERM (pre-emption, torchrun shutting down), SIGUSR1 (SLURM's warning) and SIGINT ask for a clean stop."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    names = ("SIGTERM", "SIGUSR1", "SIGINT")
    signals = [getattr(signal, name) for name in names if hasattr(signal, name)]

    def request_stop(signum, frame):
        name = signal.Signals(signum).name
        if stop.is_set():  # asked twice: stop now, the way the signal normally would
            log.warning("signal %s again: stopping without a checkpoint", name)
            signal.signal(signum, previous[signum])
            signal.raise_signal(signum)
            return
        log.warning("signal %s: stopping after this step with a checkpoint (send it again to stop at once)", name)
        stop.set()

    previous = {sig: signal.getsignal(sig) for sig in signals}
    for sig in signals:
        signal.signal(sig, request_stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _setup_backends(info: distributed.DistInfo, cfg: TrainerConfig) -> None:
    if cfg.reuse_freed_memory:
        reuse_freed_memory()
    if info.device.type == "cuda":
        # As open_clip_train does: TF32 matmuls/convolutions for fp32 work, cuDNN autotuning.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def _train(cfg: TrainConfig, info: distributed.DistInfo) -> dict[str, Any]:
    # Rank 0's folder for every rank (each torchrun process composes its own time-stamped default).
    run_dir = Path(distributed.broadcast_object(str(resolve_run_dir(cfg)), info))
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    _setup_backends(info, cfg.trainer)
    run, shard_set, resumed_from = _build_run(cfg, info, run_dir)
    if info.is_main:
        log.info("training %d steps over %d epochs (%d processes x %d loader workers, %d x %d samples per step and "
                 "process) into %s", run.plan.total_steps, len(run.plan.steps), info.world_size, run.plan.workers,
                 cfg.trainer.accum_freq, cfg.data.loader.batch_size, run_dir)
    started = time.perf_counter()
    try:
        with _stop_on_signals(run.stop):
            while run.state.epoch < len(run.plan.steps) and run.state.step < run.plan.total_steps:
                _run_epoch(run)
                if run.stop_requested:  # asked during the epoch's last step: its checkpoint is written
                    raise TrainingInterrupted(f"stopped by a signal at step {run.state.step}; checkpoint written "
                                              f"in {run_dir}/checkpoints. Continue with resume=latest.")
                every = cfg.eval.every_epochs
                if every and run.state.epoch % every == 0 and run.state.epoch < len(run.plan.steps):
                    run.writer.wait()  # its loader forks workers: not while a checkpoint thread runs
                    evaluate_run(run.bundle, shard_set, cfg, info, run_dir, run.logger, run.state.step,
                                 write_files=False)
        _stop_loader(run)
        _raise_if_write_failed(run)  # the last checkpoint is on disk before the evaluation
        train_seconds = time.perf_counter() - started
        return evaluate_run(run.bundle, shard_set, cfg, info, run_dir, run.logger, run.state.step,
                            extra={"resumed_from": resumed_from, "train_seconds": round(train_seconds, 1),
                                   "data_errors": run.state.data_errors,
                                   "nonfinite_skipped": run.state.nonfinite_skipped,
                                   "samples_seen": run.state.samples_seen})
    finally:
        _close(run)


def _close(run: _Run) -> None:
    """However the run ends: the checkpoint being written is finished (a stop's, or the newest before an
    error), the loader workers stop, the metrics are flushed."""
    error = run.writer.wait()
    if error:
        log.error("the last checkpoint write failed: %s", error)
    _stop_loader(run)
    run.logger.close()


def _stop_loader(run: _Run) -> None:
    run.feed = None  # its batch generator holds the loader's iterator, which holds the worker processes
    run.stream.close()
