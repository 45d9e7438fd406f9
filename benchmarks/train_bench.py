"""Training throughput: clip_med's trainer next to open_clip's own (``open_clip_train.main``), and
clip_med's streaming loader next to the raw rate of decoding and transforming the same images.

Both trainers run on the same webdataset shards with the same architecture config, image size,
batch size, precision, loader worker count and prefetch depth (``--prefetch-factor``, default
open_clip_train's 2; clip_med's own default is 4), augmentation and number of steps, one after the
other in fresh processes (under ``torchrun`` with ``--nproc`` > 1). Each process times its own
optimizer steps through one global optimizer-step hook (the same code for both trainers): the
clock starts after ``--warmup-steps`` steps (worker start-up, shuffle-buffer fill, cuDNN
autotuning) and stops at ``--steps``, with a CUDA synchronisation at both ends; the process
then exits, so neither trainer's final checkpoint or evaluation is timed. A third, reference run
of open_clip_train gets glibc's malloc settings that clip_med's trainer makes itself
(``trainer.reuse_freed_memory``), through glibc's environment variables: it shows how much of the
difference is that setting (``--skip reference_trainer`` leaves it out).

The loader comparison runs in this process: clip_med's training loader (shuffling, per-sample
seeded augmentation, sentence sampling, tokenisation, error accounting, resume bookkeeping; uint8
images, whose float conversion and normalisation the trainer does per batch on its device, timed
here in this process) against a bare DataLoader with the same number of worker processes that only
reads the same tar members, decodes the PNGs and applies the whole transform, normalisation included.
A reference row passes that bare loader's raw samples through webdataset's sample shuffle with the
loader's buffer size (``--shuffle-buffer``, by default ``data.loader.shuffle_buffer``'s) before
decoding, as clip_med's loader and open_clip_train's do: what the shuffle alone costs.

    python benchmarks/train_bench.py                                # small CPU check (minutes)
    python benchmarks/train_bench.py --repeat 3 --threads 1         # the CPU numbers in BENCHMARKS.md
    python benchmarks/train_bench.py --device cuda --model ViT-B-16 --image-size 224 --batch-size 256 \\
        --precision bf16 --workers 8 --samples 40000 --steps 150 --warmup-steps 30
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRECISIONS = {"fp32": "fp32", "bf16": "amp_bf16", "fp16": "amp"}  # clip_med name -> open_clip_train name
# The reference row "open_clip_reused_memory": open_clip_train with glibc's malloc set as clip_med's
# trainer sets it (trainer.reuse_freed_memory, clip_med/core/memory.py), through glibc's environment
# variables, read when the process starts: what the allocator setting alone is worth.
REUSED_MEMORY_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}
TRAINER_LABELS = {"clip_med": "clip_med trainer", "open_clip": "open_clip_train.main (baseline)",
                  "open_clip_reused_memory": "open_clip_train.main with clip_med's malloc settings (reference)"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="bench_work/train_bench", help="shards and run folders go here")
    parser.add_argument("--shards", default=None, help="an existing shard folder (with train.manifest.json) "
                        "instead of generated synthetic shards")
    parser.add_argument("--samples", type=int, default=16000, help="synthetic training pairs to generate")
    parser.add_argument("--shard-size", type=int, default=200, help="pairs per generated shard")
    parser.add_argument("--source-image-size", type=int, default=96, help="pixel size of generated images")
    parser.add_argument("--model", default="medclip-tiny")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--workers", type=int, default=2, help="loader worker processes per training process")
    parser.add_argument("--prefetch-factor", type=int, default=2,
                        help="batches each loader worker keeps ready (open_clip_train uses DataLoader's default, 2)")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--nproc", type=int, default=1, help="training processes (torchrun) for both trainers")
    parser.add_argument("--steps", type=int, default=60,
                        help="optimizer steps; timing stops at the last (50 timed CPU steps: windows of ~30 s)")
    parser.add_argument("--warmup-steps", type=int, default=10, help="steps before the clock starts")
    parser.add_argument("--loader-batches", type=int, default=150,
                        help="timed loader batches (a few seconds each: shorter windows are at the mercy of a "
                             "shared machine's noise)")
    parser.add_argument("--shuffle-buffer", type=int, default=None,
                        help="samples in each loader worker's shuffle buffer (default: data.loader.shuffle_buffer's)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for both trainers' processes "
                        "(default: torch's choice); 1 keeps a shared or small machine from oversubscribing its cores")
    parser.add_argument("--settle-seconds", type=float, default=5,
                        help="pause before each trainer run, so that the last run's processes are gone")
    parser.add_argument("--repeat", type=int, default=1, help="alternate the measurements this often; medians")
    parser.add_argument("--skip", choices=["trainers", "loader", "reference_trainer"], action="append", default=[],
                        help="leave out a part (reference_trainer: the open_clip_train run with clip_med's malloc "
                             "settings)")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Data


def shard_set_for(args: argparse.Namespace, work: Path):
    from clip_med.data.shardset import open_shard_set, prepare_shards
    from clip_med.data.sources.synthetic import SyntheticSourceConfig
    from clip_med.data.writer import ShardConfig

    if args.shards:
        return open_shard_set(args.shards)
    source = SyntheticSourceConfig(image_size=args.source_image_size, sizes={"train": args.samples, "dev": 64})
    return prepare_shards(source, ShardConfig(out=str(work / "shards"), max_samples=args.shard_size, workers=-1,
                                              progress=False))


def check_enough_data(args: argparse.Namespace, counts: dict[str, int]) -> None:
    """Every timed batch must come from a full stream (no epoch end, no draining shuffle buffer)."""
    total, streams = sum(counts.values()), max(args.workers, 1) * args.nproc
    slack = streams * (args.shuffle_buffer + args.batch_size)
    needs = {"trainers": (args.steps + 2) * args.batch_size * args.nproc + slack,
             "loader": (max(args.workers, 1) + 1 + args.loader_batches) * args.batch_size + slack}
    for what, needed in needs.items():
        if what not in args.skip and total < needed:
            raise SystemExit(f"{total} training pairs are too few for the {what} measurement ({needed} needed): "
                             "raise --samples, or lower --steps / --loader-batches")


# ---------------------------------------------------------------------------------------------
# Inside each training process: the step clock


def install_step_clock(result_path: str, warmup: int, steps: int, device: str) -> None:
    """Time optimizer steps warmup..steps of this process; rank 0 writes the result; then exit."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    state: dict = {"n": 0, "t0": None, "usage0": None}

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def hook(optimizer, args, kwargs):
        state["n"] += 1
        if state["n"] == warmup:
            state["t0"] = sync()
            state["usage0"] = resource.getrusage(resource.RUSAGE_SELF)
        elif state["n"] == steps:
            seconds = sync() - state["t0"]
            usage, usage0, timed = resource.getrusage(resource.RUSAGE_SELF), state["usage0"], steps - warmup
            if int(os.environ.get("RANK", "0")) == 0:
                peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
                # The training process's own page faults and kernel time per step (not its loader workers').
                Path(result_path).write_text(json.dumps({
                    "seconds": seconds, "steps": timed, "peak_memory_gb": peak,
                    "page_faults_per_step": (usage.ru_minflt - usage0.ru_minflt) / timed,
                    "system_ms_per_step": (usage.ru_stime - usage0.ru_stime) * 1000 / timed}))
            # Nothing after the timed steps matters: stop the loader workers, then this process.
            for child in multiprocessing.active_children():
                child.terminate()
            sys.stdout.flush()
            os._exit(0)

    register_optimizer_step_post_hook(hook)


def child_clip_med(spec: dict) -> None:
    import clip_med.training.trainer as trainer
    from clip_med.cli.config import setup_logging
    from clip_med.data.loader import LoaderConfig
    from clip_med.data.shardset import open_shard_set
    from clip_med.modeling.factory import ModelConfig
    from clip_med.training.config import DataConfig, TrainConfig, TrainerConfig
    from clip_med.training.optim import OptimConfig

    setup_logging()
    install_step_clock(spec["result"], spec["warmup_steps"], spec["steps"], spec["device"])
    trainer.prepare_data = lambda cfg, info: open_shard_set(spec["shard_dir"])  # shards are already written
    cfg = TrainConfig(
        data=DataConfig(loader=LoaderConfig(batch_size=spec["batch_size"], workers=spec["workers"],
                                            shuffle_buffer=spec["shuffle_buffer"],
                                            prefetch_factor=spec["prefetch_factor"])),
        model=ModelConfig(name=spec["model"], image_size=spec["image_size"]),
        optim=OptimConfig(lr=1e-3, warmup=5, grad_clip_norm=1.0),
        trainer=TrainerConfig(epochs=1, max_steps=spec["steps"] + 1, device=spec["device"],
                              precision=spec["precision"], checkpoint_every_steps=10**9, log_every_steps=10,
                              progress=False, tensorboard=False),
        run_dir=spec["run_dir"], seed=0)
    trainer.train(cfg)
    raise SystemExit("clip_med's trainer stopped before the last timed step")


def child_open_clip(spec: dict) -> None:
    import functools
    import inspect

    import open_clip
    import open_clip_train.data
    from open_clip_train.main import main
    from webdataset.tariterators import tar_file_expander

    from clip_med.modeling.factory import CONFIG_DIR

    open_clip.add_model_config(CONFIG_DIR)  # clip_med's architectures, by the same names
    # open_clip_train's webdataset reader predates webdataset's end-of-shard marker ({}) and fails on it
    # (KeyError: 'fname'; webdataset/webdataset#384, mlfoundations/open_clip#935): their suggested fix.
    if "eof_value" in inspect.signature(tar_file_expander).parameters:  # webdataset >= 1.0 has the marker
        open_clip_train.data.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)
    install_step_clock(spec["result"], spec["warmup_steps"], spec["steps"], spec["device"])
    global_batch = spec["batch_size"] * spec["nproc"]
    argv = [
        "--train-data", "::".join(spec["urls"]), "--dataset-type", "webdataset",
        "--train-num-samples", str((spec["steps"] + 2) * global_batch), "--epochs", "1",
        "--batch-size", str(spec["batch_size"]), "--workers", str(spec["workers"]),
        "--model", spec["model"], "--force-image-size", str(spec["image_size"]),
        "--precision", PRECISIONS[spec["precision"]], "--device", spec["device"],
        "--lr", "1e-3", "--warmup", "5", "--wd", "0.1", "--grad-clip-norm", "1.0", "--seed", "0",
        "--logs", spec["run_dir"], "--name", "open_clip", "--report-to", "", "--log-every-n-steps", "10",
        # clip_med's default augmentation, so that both loaders do the same work per image
        "--aug-cfg", "scale=(0.7, 1.0)", "color_jitter=(0.2, 0.2, 0.0, 0.0)", "color_jitter_prob=0.8",
    ]
    if spec["nproc"] > 1:
        argv += ["--local-loss", "--gather-with-grad"]
        if spec["device"] == "cpu":
            argv += ["--dist-backend", "gloo"]
    main(argv)
    raise SystemExit("open_clip_train stopped before the last timed step")


# ---------------------------------------------------------------------------------------------
# Launching the trainers


def run_trainer(kind: str, args: argparse.Namespace, shard_set, work: Path, attempt: int) -> dict:
    run_dir = work / f"{kind}-{attempt}"
    result = work / f"{kind}-{attempt}.json"
    result.unlink(missing_ok=True)
    shutil.rmtree(run_dir, ignore_errors=True)  # open_clip_train refuses an existing experiment folder
    spec = {"kind": kind, "result": str(result), "run_dir": str(run_dir), "shard_dir": str(shard_set.out_dir),
            "urls": shard_set.urls("train"), "model": args.model, "image_size": args.image_size,
            "batch_size": args.batch_size, "workers": args.workers, "prefetch_factor": args.prefetch_factor,
            "shuffle_buffer": args.shuffle_buffer,
            "precision": args.precision,
            "device": args.device, "nproc": args.nproc, "steps": args.steps, "warmup_steps": args.warmup_steps}
    script = [str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    if args.nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                   str(args.nproc), *script]
    else:
        command = [sys.executable, *script]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if kind == "open_clip_reused_memory":
        env.update(REUSED_MEMORY_ENV)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    log_path = work / f"{kind}-{attempt}.log"
    time.sleep(args.settle_seconds)  # the previous run's worker processes finish exiting
    with open(log_path, "w") as log_file:
        completed = subprocess.run(command, env=env, stdout=log_file, stderr=subprocess.STDOUT, timeout=3600)
    if not result.is_file():
        raise SystemExit(f"{kind} run failed (exit {completed.returncode}); its output, from {log_path}:\n"
                         f"{log_path.read_text()[-6000:]}")
    timing = json.loads(result.read_text())
    timing["samples_per_s"] = timing["steps"] * args.batch_size * args.nproc / timing["seconds"]
    return timing


# ---------------------------------------------------------------------------------------------
# Loader alone


class RawDecode(IterableDataset):
    """The floor for a loader: read tar members, decode the image, transform it, stack a batch.

    With a ``tokenizer`` it also tokenizes each sample's caption (work every CLIP loader must do,
    shown separately so that the loader's own overhead can be told from the text work). With a
    ``shuffle`` buffer size it also passes the raw (image, caption) bytes through webdataset's sample
    shuffle, as clip_med's loader (and open_clip_train's) does: what shuffling alone costs.
    """

    def __init__(self, urls: list[str], transform, batch_size: int, tokenizer=None, shuffle: int = 0):
        self.urls, self.transform, self.batch_size, self.tokenizer = urls, transform, batch_size, tokenizer
        self.shuffle = shuffle

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if self.shuffle:
            yield from self._shuffled(self.urls[worker::workers])
            return
        images, texts = [], []
        for url in self.urls[worker::workers]:
            with tarfile.open(url) as tar:
                for member in tar:
                    if member.name.endswith(".png"):
                        images.append(self.transform(Image.open(io.BytesIO(tar.extractfile(member).read()))))
                    elif member.name.endswith(".txt") and self.tokenizer is not None:
                        texts.append(tar.extractfile(member).read().decode("utf-8"))
                    if len(images) == self.batch_size and (self.tokenizer is None or len(texts) == len(images)):
                        yield torch.stack(images), self.tokenizer(texts) if self.tokenizer is not None else None
                        images, texts = [], []

    def _shuffled(self, urls: list[str]):
        import random

        from webdataset.filters import _shuffle

        def pairs():
            for url in urls:
                with tarfile.open(url) as tar:
                    sample: dict[str, bytes] = {}
                    for member in tar:
                        extension = member.name.rpartition(".")[2]
                        if extension in ("png", "txt"):
                            sample[extension] = tar.extractfile(member).read()
                        if len(sample) == 2:
                            yield sample
                            sample = {}

        batch = []
        for sample in _shuffle(pairs(), self.shuffle, initial=self.shuffle, rng=random.Random(0)):
            batch.append((self.transform(Image.open(io.BytesIO(sample["png"]))), sample["txt"].decode("utf-8")))
            if len(batch) == self.batch_size:
                yield torch.stack([image for image, _ in batch]), self.tokenizer([text for _, text in batch])
                batch = []


def _worker_cpu_seconds(iterator) -> float:
    """User + system CPU time of the loader's worker processes (of this process when it has none)."""
    import psutil

    workers = getattr(iterator, "_workers", None) or []  # torch's multiprocessing iterator keeps them here
    processes = [psutil.Process(worker.pid) for worker in workers] or [psutil.Process()]
    return sum(sum(process.cpu_times()[:2]) for process in processes)


def _own_cpu_seconds() -> float:
    """User + system CPU time of this process, all its threads (torch's intra-op threads included)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def time_batches(loader, warmup: int, batches: int, batch_size: int, finish=None) -> dict[str, float]:
    """Samples per second over ``batches`` batches after ``warmup``, and the CPU milliseconds per sample over
    the same stretch (the work itself, far less disturbed by a noisy machine than the clock): the workers'
    and this process's, which receives the batches as the training process would.

    ``finish`` is what the training process still does to each batch's images before the model sees them
    (clip_med's uint8 images: the float conversion and normalisation); it runs inside the clock."""
    iterator = iter(loader)
    for _ in range(warmup):
        next(iterator)
    start, cpu_start, own_start = time.perf_counter(), _worker_cpu_seconds(iterator), _own_cpu_seconds()
    for _ in range(batches):
        batch = next(iterator)
        if finish is not None:
            finish(batch)
    elapsed = time.perf_counter() - start
    workers_cpu, own_cpu = _worker_cpu_seconds(iterator) - cpu_start, _own_cpu_seconds() - own_start
    if not getattr(iterator, "_workers", None):  # no workers: _worker_cpu_seconds measured this process
        workers_cpu = 0.0
    del iterator
    samples = batches * batch_size
    return {"rate": samples / elapsed, "cpu_ms": 1000 * (workers_cpu + own_cpu) / samples,
            "main_cpu_ms": 1000 * own_cpu / samples}


def loader_rates(args: argparse.Namespace, shard_set, attempt: int) -> dict[str, dict[str, float]]:
    from clip_med.data.loader import LoaderConfig, _LowerPriority, create_train_loader
    from clip_med.data.transforms import create_transform, split_normalize
    from clip_med.modeling.factory import ModelConfig, create_model

    # This process stands in for the training process (it receives the batches and, for clip_med's uint8 images,
    # normalises them), so it gets the trainers' thread count: with more, torch's idle intra-op threads spin
    # after each normalisation and take the cores the loader workers need (in training those threads run the
    # model instead).
    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = create_model(ModelConfig(name=args.model, image_size=args.image_size))
    transform = create_transform(bundle.image_size, bundle.mean, bundle.std, train=True)
    urls = shard_set.urls("train")
    cfg = LoaderConfig(batch_size=args.batch_size, workers=args.workers, shuffle_buffer=args.shuffle_buffer,
                       prefetch_factor=args.prefetch_factor)
    # As the trainer does by default: uint8 images through the loader, normalised in the training process
    # (on the device); that last step is timed with the loader (see time_batches).
    loader_transform, normalize = split_normalize(transform) if cfg.uint8_images else (transform, None)

    def finish(batch: dict) -> None:
        normalize(batch["images"])
    # Each worker fills its shuffle buffer (reading, not decoding) before its first batch: the clock starts
    # once every worker has delivered one.
    warmup = max(args.workers, 1) + 1

    def make(kind: str):
        if kind == "loader":  # as the trainer calls it
            return create_train_loader(urls, loader_transform, bundle.tokenizer, cfg, 0, 0, args.workers,
                                       shard_counts=shard_set.shard_counts("train"))
        tokenizer = bundle.tokenizer if kind in ("raw_tokenize", "raw_shuffle") else None
        shuffle = cfg.shuffle_buffer if kind == "raw_shuffle" else 0
        # The same worker processes: same count, prefetch depth and niceness (the trainer's default).
        return DataLoader(RawDecode(urls, transform, args.batch_size, tokenizer, shuffle), batch_size=None,
                          num_workers=args.workers, prefetch_factor=cfg.prefetch_factor if args.workers else None,
                          worker_init_fn=_LowerPriority(cfg.worker_niceness) if args.workers else None)

    kinds = ["loader", "raw_tokenize", "raw", "raw_shuffle"]
    if attempt % 2:  # alternate who goes first
        kinds.reverse()
    return {kind: time_batches(make(kind), warmup, args.loader_batches, args.batch_size,
                               finish if kind == "loader" and normalize is not None else None) for kind in kinds}


# ---------------------------------------------------------------------------------------------
# Report


def describe_machine(args: argparse.Namespace) -> str:
    parts = [platform.machine(), f"{os.cpu_count()} CPUs", f"torch {torch.__version__}"]
    if args.device == "cuda" and torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name(0))
    return ", ".join(parts)


def print_table(args: argparse.Namespace, trainers: dict[str, list[dict]],
                loaders: dict[str, list[dict[str, float]]]) -> None:
    print(f"\nmachine: {describe_machine(args)}")
    print(f"setup: {args.model} @ {args.image_size} px, batch {args.batch_size} x {args.nproc} process(es), "
          f"{args.precision} on {args.device}, {args.workers} loader workers per process, steps "
          f"{args.warmup_steps}..{args.steps} timed, {args.threads or 'default'} torch thread(s) per trainer "
          f"process, median of {args.repeat}\n")
    print("| measured | samples/s | peak GPU memory | ratio | goal |")
    print("|---|---|---|---|---|")
    faults_table = []
    if trainers:
        rates = {kind: statistics.median(t["samples_per_s"] for t in runs) for kind, runs in trainers.items()}
        memory = {kind: runs[-1].get("peak_memory_gb") for kind, runs in trainers.items()}
        ratio = rates["clip_med"] / rates["open_clip"]
        for kind in rates:
            peak = f"{memory[kind]:.2f} GiB" if memory[kind] is not None else "-"
            own = rates[kind] / rates["open_clip"]
            ratio_cell = f"**{own:.2f}**" if kind == "clip_med" else f"{own:.2f}"
            paired = _paired(trainers["clip_med"], trainers["open_clip"], "samples_per_s")
            goal = _goal_cell(ratio, paired, 1.0) if kind == "clip_med" else ""
            print(f"| {TRAINER_LABELS[kind]} | {rates[kind]:.1f} | {peak} | {ratio_cell} | {goal} |")
            faults = statistics.median(t["page_faults_per_step"] for t in trainers[kind])
            system = statistics.median(t["system_ms_per_step"] for t in trainers[kind])
            faults_table.append(f"| {TRAINER_LABELS[kind]} | {faults:,.0f} | {system:.1f} |")
    if loaders:
        rate = {kind: statistics.median(run["rate"] for run in runs) for kind, runs in loaders.items()}
        ratio = rate["loader"] / rate["raw_tokenize"]
        goal = _goal_cell(ratio, _paired(loaders["loader"], loaders["raw_tokenize"], "rate"), 0.9)
        print(f"| clip_med streaming loader | {rate['loader']:.1f} | - | **{ratio:.2f}** | {goal} |")
        print(f"| raw decode + transform + tokenize, same workers (baseline) | {rate['raw_tokenize']:.1f} | - | "
              "1.00 | |")
        print(f"| raw decode + transform, same workers (no text work, for reference) | {rate['raw']:.1f} | - | "
              f"{rate['raw'] / rate['raw_tokenize']:.2f} | |")
        print(f"| raw decode + transform + tokenize after the loader's sample shuffle buffer ({args.shuffle_buffer}; "
              f"reference: what shuffling alone costs) | {rate['raw_shuffle']:.1f} | - | "
              f"{rate['raw_shuffle'] / rate['raw_tokenize']:.2f} | |")
        cpu = {kind: statistics.median(run["cpu_ms"] for run in runs) for kind, runs in loaders.items()}
        print("\n| loader CPU per sample (workers + the receiving process) | ms | throughput it allows, vs baseline "
              "|\n|---|---|---|")
        for kind, label in (("loader", "clip_med streaming loader"),
                            ("raw_tokenize", "raw decode + transform + tokenize (baseline)"),
                            ("raw", "raw decode + transform"),
                            ("raw_shuffle", "raw decode + transform + tokenize after the shuffle buffer")):
            print(f"| {label} | {cpu[kind]:.3f} | {cpu['raw_tokenize'] / cpu[kind]:.2f} |")
    if faults_table:
        print("\n| training process, per timed step (medians) | page faults | kernel CPU ms |\n|---|---|---|")
        print("\n".join(faults_table))
    print_paired_ratios(trainers, loaders)


def _paired(ours: list[dict], base: list[dict], key: str) -> list[float]:
    return [mine[key] / theirs[key] for mine, theirs in zip(ours, base)]


def _goal_cell(ratio: float, paired: list[float], goal: float) -> str:
    """Met only when the ratio of the medians and every back-to-back pair reach the goal."""
    if ratio >= goal and min(paired) >= goal:
        return f"≥ {goal} (met: median and every pair)"
    if ratio >= goal:
        return f"≥ {goal} (met as median; lowest pair {min(paired):.2f})"
    return f"≥ {goal} (NOT met)"


def _spread(ratios: list[float]) -> str:
    runs = ", ".join(f"{ratio:.2f}" for ratio in ratios)
    return f"{runs} (min {min(ratios):.2f}, median {statistics.median(ratios):.2f}, max {max(ratios):.2f})"


def print_paired_ratios(trainers: dict[str, list[dict]], loaders: dict[str, list[dict[str, float]]]) -> None:
    """The ratio of each repeat's pair, measured back to back: on a noisy machine the spread says more
    than the ratio of the medians."""
    print()
    if trainers:
        ratios = [ours["samples_per_s"] / base["samples_per_s"]
                  for ours, base in zip(trainers["clip_med"], trainers["open_clip"])]
        print(f"paired ratios, trainer / open_clip_train: {_spread(ratios)}")
        if "open_clip_reused_memory" in trainers:
            ratios = [ours["samples_per_s"] / base["samples_per_s"]
                      for ours, base in zip(trainers["clip_med"], trainers["open_clip_reused_memory"])]
            print(f"paired ratios, trainer / open_clip_train with clip_med's malloc settings: {_spread(ratios)}")
    if loaders:
        for base, label in (("raw_tokenize", "raw decode + transform + tokenize"), ("raw", "raw decode + transform")):
            ratios = [ours["rate"] / other["rate"] for ours, other in zip(loaders["loader"], loaders[base])]
            print(f"paired ratios, loader / {label}: {_spread(ratios)}")
        ratios = [other["cpu_ms"] / ours["cpu_ms"] for ours, other in zip(loaders["loader"], loaders["raw_tokenize"])]
        print(f"paired ratios, baseline CPU per sample / loader CPU per sample: {_spread(ratios)}")
        ratios = [ours["rate"] / other["rate"] for ours, other in zip(loaders["loader"], loaders["raw_shuffle"])]
        print(f"paired ratios, loader / raw decode + transform + tokenize after the shuffle buffer: {_spread(ratios)}")


def main(argv=None) -> None:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--child":
        spec = json.loads(sys.argv[2])
        (child_clip_med if spec["kind"] == "clip_med" else child_open_clip)(spec)
        return
    args = parse_args(argv)
    if args.shuffle_buffer is None:
        from clip_med.data.loader import LoaderConfig

        args.shuffle_buffer = LoaderConfig().shuffle_buffer
    if args.warmup_steps < 1 or args.warmup_steps >= args.steps:
        raise SystemExit("--warmup-steps must be at least 1 and below --steps")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    shard_set = shard_set_for(args, work)
    check_enough_data(args, shard_set.shard_counts("train"))
    trainers: dict[str, list[dict]] = {}
    loaders: dict[str, list[dict[str, float]]] = {}
    for attempt in range(args.repeat):
        if "trainers" not in args.skip:
            kinds = ["clip_med", "open_clip"]
            if "reference_trainer" not in args.skip:
                kinds.append("open_clip_reused_memory")
            turn = attempt % len(kinds)  # each kind takes each place in the order in turn
            for kind in kinds[turn:] + kinds[:turn]:
                timing = run_trainer(kind, args, shard_set, work, attempt)
                trainers.setdefault(kind, []).append(timing)
                print(f"[{attempt + 1}/{args.repeat}] {kind}: {timing['samples_per_s']:.1f} samples/s", flush=True)
        if "loader" not in args.skip:
            for kind, timing in loader_rates(args, shard_set, attempt).items():
                loaders.setdefault(kind, []).append(timing)
                print(f"[{attempt + 1}/{args.repeat}] {kind}: {timing['rate']:.1f} samples/s, "
                      f"{timing['cpu_ms']:.3f} CPU ms/sample ({timing['main_cpu_ms']:.3f} of them in this process)",
                      flush=True)
    print_table(args, trainers, loaders)


if __name__ == "__main__":
    main()
