"""The GPU check's own measurements (issue 13), beside ``train_bench.py``'s trainer and loader comparison:

* **the per-step sync**: clip_med's trainer on the same shards twice, reading each step's agreed
  flags (finite loss, data left, stop, checkpoint due) one step late (the default) and at once
  (``trainer.sync_every_step=true``, the per-step GPU synchronisation of earlier versions);
  samples/s of each, their ratio, and the peak GPU memory;
* **MFU**: the model's FLOPs for one forward + backward (``torch.utils.flop_counter``, loss
  included), times the measured samples/s, over the GPU's dense bf16 peak (a table of known GPUs,
  or ``--peak-tflops``);
* **one checkpoint**: model + AdamW state after one step, the CPU snapshot (the pause the
  training sees) and the background write (the time the writer thread takes), and the file size.

It prints one Markdown table. The trainer runs are timed as ``train_bench.py`` times them (the
same step clock, in a fresh process each, the clock stopped at ``--steps``).

    python benchmarks/gpu_extras.py --work gpu_check/train_bench --device cuda --model ViT-B-16 \\
        --image-size 224 --source-image-size 256 --batch-size 256 --precision bf16 --workers 12 \\
        --samples 28000 --shard-size 1000 --steps 40 --warmup-steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_bench  # noqa: E402  (the shards, the step clock)

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by a piece of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0,
                    "A6000": 155.0, "V100": 125.0, "T4": 65.0}
MEASUREMENTS = ("sync", "mfu", "checkpoint")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="bench_work/train_bench", help="shards (train_bench.py's) and runs")
    parser.add_argument("--shards", default=None, help="an existing shard folder instead of generated shards")
    parser.add_argument("--samples", type=int, default=8000, help="synthetic training pairs (if generated)")
    parser.add_argument("--shard-size", type=int, default=200)
    parser.add_argument("--source-image-size", type=int, default=96)
    parser.add_argument("--model", default="medclip-tiny")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--workers", type=int, default=2, help="loader workers")
    parser.add_argument("--prefetch-factor", type=int, default=4, help="clip_med's default")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps; timing stops at the last")
    parser.add_argument("--warmup-steps", type=int, default=5, help="steps before the clock starts")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense peak (TFLOP/s) for MFU; "
                        "default: its bf16 peak, looked up by the device's name in PEAK_BF16_TFLOPS")
    parser.add_argument("--skip", choices=MEASUREMENTS, action="append", default=[])
    args = parser.parse_args(argv)
    if args.warmup_steps < 1 or args.warmup_steps >= args.steps:
        parser.error("--warmup-steps must be at least 1 and below --steps")
    return args


# ---------------------------------------------------------------------------------------------
# The per-step sync: two trainer runs


def child(spec: dict) -> None:
    """One clip_med training process (train_bench.py's clip_med child, with the sync switch)."""
    import clip_med.training.trainer as trainer
    from clip_med.cli.config import setup_logging
    from clip_med.data.loader import LoaderConfig
    from clip_med.data.shardset import open_shard_set
    from clip_med.modeling.factory import ModelConfig
    from clip_med.training.config import DataConfig, TrainConfig, TrainerConfig
    from clip_med.training.optim import OptimConfig

    setup_logging()
    train_bench.install_step_clock(spec["result"], spec["warmup_steps"], spec["steps"], spec["device"])
    trainer.prepare_data = lambda cfg, info: open_shard_set(spec["shard_dir"])  # shards are already written
    cfg = TrainConfig(
        data=DataConfig(loader=LoaderConfig(batch_size=spec["batch_size"], workers=spec["workers"],
                                            shuffle_buffer=train_bench.SHUFFLE_BUFFER,
                                            prefetch_factor=spec["prefetch_factor"])),
        model=ModelConfig(name=spec["model"], image_size=spec["image_size"]),
        optim=OptimConfig(lr=1e-3, warmup=5, grad_clip_norm=1.0),
        trainer=TrainerConfig(epochs=1, max_steps=spec["steps"] + 1, device=spec["device"],
                              precision=spec["precision"], checkpoint_every_steps=10**9,
                              checkpoint_every_minutes=10**6, log_every_steps=10, progress=False,
                              tensorboard=False, sync_every_step=spec["sync_every_step"]),
        run_dir=spec["run_dir"], seed=0)
    trainer.train(cfg)
    raise SystemExit("the trainer stopped before the last timed step")


def run_trainer(args: argparse.Namespace, shard_set, work: Path, sync_every_step: bool) -> dict:
    name = f"clip_med-sync{int(sync_every_step)}"
    result, log_path = work / f"{name}.json", work / f"{name}.log"
    result.unlink(missing_ok=True)
    spec = {"result": str(result), "run_dir": str(work / name), "shard_dir": str(shard_set.out_dir),
            "model": args.model, "image_size": args.image_size, "batch_size": args.batch_size,
            "workers": args.workers, "prefetch_factor": args.prefetch_factor, "precision": args.precision,
            "device": args.device, "steps": args.steps, "warmup_steps": args.warmup_steps,
            "sync_every_step": sync_every_step}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log_path, "w") as log_file:
        completed = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                                   env=env, stdout=log_file, stderr=subprocess.STDOUT, timeout=1800)
    if not result.is_file():
        raise SystemExit(f"{name} failed (exit {completed.returncode}); from {log_path}:\n"
                         f"{log_path.read_text()[-6000:]}")
    timing = json.loads(result.read_text())
    timing["samples_per_s"] = timing["steps"] * args.batch_size / timing["seconds"]
    return timing


def sync_rows(args: argparse.Namespace, work: Path) -> tuple[list[tuple[str, str]], float | None]:
    shard_set = train_bench.shard_set_for(args, work)
    needed = (args.steps + 2) * args.batch_size + max(args.workers, 1) * (train_bench.SHUFFLE_BUFFER + args.batch_size)
    if sum(shard_set.shard_counts("train").values()) < needed:
        raise SystemExit(f"too few training pairs for {args.steps} steps ({needed} needed): raise --samples")
    late, every = (run_trainer(args, shard_set, work, sync) for sync in (False, True))
    rows = [("samples/s, flags read a step late (default)", f"{late['samples_per_s']:.1f}"),
            ("samples/s, sync every step (trainer.sync_every_step=true)", f"{every['samples_per_s']:.1f}"),
            ("the per-step sync costs", f"{1 - every['samples_per_s'] / late['samples_per_s']:+.1%} of samples/s")]
    if late.get("peak_memory_gb") is not None:
        rows.append(("peak GPU memory (GiB)", f"{late['peak_memory_gb']:.2f}"))
    return rows, late["samples_per_s"]


# ---------------------------------------------------------------------------------------------
# FLOPs and MFU


def _model(args: argparse.Namespace):
    from clip_med.modeling.factory import ModelConfig, create_model

    return create_model(ModelConfig(name=args.model, image_size=args.image_size), torch.device(args.device))


def flops_per_sample(args: argparse.Namespace) -> float:
    """FLOPs of one forward + backward (loss included) per sample, counted by torch on a small batch."""
    from torch.utils.flop_counter import FlopCounterMode

    from clip_med.core.precision import autocast_context
    from clip_med.modeling.losses import LossConfig, create_loss, fp32_loss

    bundle, device = _model(args), torch.device(args.device)
    batch = min(args.batch_size, 16)
    texts = bundle.tokenizer(["a chest radiograph"] * batch).to(device)
    images = torch.randn(batch, 3, args.image_size, args.image_size, device=device)
    loss_fn = create_loss(LossConfig())
    with FlopCounterMode(display=False) as counter:
        with autocast_context(device, args.precision):
            features = bundle.model(images, texts)
        fp32_loss(loss_fn, features).backward()
    return counter.get_total_flops() / batch


def peak_tflops(args: argparse.Namespace) -> float | None:
    if args.peak_tflops is not None:
        return args.peak_tflops
    if args.device != "cuda":
        return None
    name = torch.cuda.get_device_name(0)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def mfu_rows(args: argparse.Namespace, samples_per_s: float | None) -> list[tuple[str, str]]:
    flops = flops_per_sample(args)
    rows = [("model FLOPs per sample, forward + backward (GFLOP)", f"{flops / 1e9:.1f}")]
    peak = peak_tflops(args)
    if samples_per_s is not None and peak is not None:
        achieved = flops * samples_per_s / 1e12
        rows.append(("MFU (achieved / dense peak)", f"{achieved / peak:.1%} ({achieved:.0f} / {peak:.0f} TFLOP/s)"))
    else:
        rows.append(("MFU", "n/a (" + ("no trainer timing" if samples_per_s is None else "peak unknown: "
                                       "--peak-tflops") + ")"))
    return rows


# ---------------------------------------------------------------------------------------------
# One checkpoint


def checkpoint_rows(args: argparse.Namespace, work: Path) -> list[tuple[str, str]]:
    from clip_med.training.async_checkpoint import BackgroundWriter, snapshot_to_cpu
    from clip_med.training.checkpoint import rng_state, save_checkpoint
    from clip_med.training.nonfinite import use_fused_optimizer
    from clip_med.training.optim import OptimConfig, create_optimizer
    from clip_med.training.state import TrainState, checkpoint_payload

    bundle, device = _model(args), torch.device(args.device)
    optimizer = create_optimizer(bundle.model, OptimConfig())
    use_fused_optimizer(optimizer, device.type == "cuda")
    for param in bundle.model.parameters():  # one step: AdamW's moments exist, as in any checkpoint
        param.grad = torch.zeros_like(param)
    optimizer.step()
    payload = checkpoint_payload(bundle.model, optimizer, None, TrainState(step=1), [rng_state()],
                                 {"model_name": args.model})
    _sync(device)
    started = time.perf_counter()
    snapshot = snapshot_to_cpu(payload)
    snapshot_s = time.perf_counter() - started
    writer = BackgroundWriter(save_checkpoint)
    started = time.perf_counter()
    writer.submit(snapshot, work / "checkpoint_write", 1, 1)
    error = writer.wait()
    write_s = time.perf_counter() - started
    if error:
        raise SystemExit(f"checkpoint write failed: {error}")
    size = sum(path.stat().st_size for path in (work / "checkpoint_write" / "checkpoints").glob("*.pt"))
    return [("checkpoint: snapshot to CPU, training paused (s)", f"{snapshot_s:.2f}"),
            ("checkpoint: background write incl. fsync (s)", f"{write_s:.2f}"),
            ("checkpoint size, model + AdamW (GB)", f"{size / 1e9:.2f}")]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(json.loads(sys.argv[2]))
        return
    args = parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows, samples_per_s = [], None
    if "sync" not in args.skip:
        sync, samples_per_s = sync_rows(args, work)
        rows += sync
    if "mfu" not in args.skip:
        rows += mfu_rows(args, samples_per_s)
    if "checkpoint" not in args.skip:
        rows += checkpoint_rows(args, work)
    print(f"setup: {train_bench.describe_machine(args)}; {args.model} at {args.image_size} px, {args.precision}, "
          f"batch {args.batch_size}, {args.workers} loader workers, steps {args.warmup_steps}..{args.steps} timed")
    print("| measurement | value |")
    print("|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
