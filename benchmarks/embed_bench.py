"""Embedding extraction speed against the model's forward-only rate on the same batches, same run.

    python benchmarks/embed_bench.py                                   # medclip-small, 1024 synthetic images
    python benchmarks/embed_bench.py --checkpoint runs/medpix/<time>/checkpoints/step-NNNNNNNN.pt \
        --shards "shards/medpix/train-*.tar" --workers 4 --batch-size 128

*forward-only*: the batches are decoded and transformed first and held in memory; then only the
model runs on them (image tower, plus the text tower when texts are embedded) and the results
are copied back to the host, as extraction does. *extraction*: ``clip_med.inference.extract``
end to end on the same shards (reading, decoding, transforms in loader workers, the model,
Parquet parts, the final arrays). The goal is extraction >= 0.9x forward-only: the loader
should keep the model busy. By default (``--workers -1``) a GPU run decodes in up to 8 loader
processes while the model runs, and a CPU run decodes in the main process, because there the
model's threads already occupy every core and loader processes beside them slow it down more
than they help (2 cores, MedPix, medclip-small: 0.82x with one worker, 0.92x with none).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import clip_med  # noqa: E402
from clip_med.data.shardset import prepare_shards  # noqa: E402
from clip_med.data.sources.synthetic import SyntheticSourceConfig  # noqa: E402
from clip_med.data.writer import ShardConfig  # noqa: E402
from clip_med.inference.extract import (  # noqa: E402
    ExtractConfig,
    create_loader,
    extract,
    loader_workers,
    resolve_shards,
)
from clip_med.inference.index import IndexConfig  # noqa: E402
from clip_med.modeling.factory import ModelConfig, create_model  # noqa: E402
from clip_med.training.config import TrainConfig  # noqa: E402


def untrained_checkpoint(folder: Path, name: str, image_size: int | None) -> Path:
    """A randomly initialised model in the trainer's checkpoint format (speed does not depend on weights)."""
    cfg = ModelConfig(name=name, image_size=image_size)
    bundle = create_model(cfg)
    payload = {"state_dict": bundle.model.state_dict(), "model_name": name, "model_cfg": bundle.model_cfg,
               "config": dataclasses.asdict(TrainConfig(model=cfg)), "train_state": {"step": 0}}
    path = folder / "checkpoints" / "step-00000000.pt"
    path.parent.mkdir(parents=True)
    torch.save(payload, path)
    return path


def synthetic_shards(folder: Path, count: int, side: int) -> list[str]:
    source = SyntheticSourceConfig(image_size=side, sizes={"bench": count})
    shard_set = prepare_shards(source, ShardConfig(out=str(folder), max_samples=256, progress=False))
    return shard_set.urls("bench")


def forward_only(model, urls: list[str], cfg: ExtractConfig, repeats: int) -> tuple[int, float]:
    tokenizer = model.tokenizer if cfg.texts else None
    batches = list(create_loader(urls, model.transform, tokenizer, cfg.batch_size,
                                 loader_workers(cfg.workers, model.device)))
    model.encode_image_tensors(batches[0]["images"])  # warm-up
    images = sum(len(batch["keys"]) for batch in batches)
    times = []
    for _ in range(repeats):
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for batch in batches:
            model.encode_image_tensors(batch["images"])
            if batch["tokens"] is not None:
                model.encode_token_tensors(batch["tokens"])
        times.append(time.perf_counter() - start)
    return images, statistics.median(times)


def extraction(model, urls: list[str], cfg: ExtractConfig, repeats: int, folder: Path) -> tuple[int, float]:
    times, count = [], 0
    for repeat in range(repeats):
        start = time.perf_counter()
        result = extract(model, urls, folder / f"extract-{repeat}", cfg)
        times.append(time.perf_counter() - start)
        count = result["count"]
    return count, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="a clip_med checkpoint (default: an untrained --model)")
    parser.add_argument("--model", default="medclip-small")
    parser.add_argument("--image-size", type=int, default=None, help="model input size (default: the model's)")
    parser.add_argument("--shards", help="shards to embed (default: --images synthetic images)")
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--image-side", type=int, default=256, help="side of the synthetic images")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=-1, help="loader workers (-1: 0 on CPU, up to 8 on GPU)")
    parser.add_argument("--no-texts", action="store_true", help="embed images only")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = args.checkpoint or untrained_checkpoint(tmp / "run", args.model, args.image_size)
        model = clip_med.load(checkpoint, device=args.device)
        urls = resolve_shards(args.shards) if args.shards else synthetic_shards(tmp / "shards", args.images,
                                                                                  args.image_side)
        cfg = ExtractConfig(batch_size=args.batch_size, workers=args.workers, texts=not args.no_texts,
                            progress=False, index=IndexConfig(kind="none"))
        images, forward_seconds = forward_only(model, urls, cfg, args.repeats)
        extracted, extract_seconds = extraction(model, urls, cfg, args.repeats, tmp)

    forward_rate, extract_rate = images / forward_seconds, extracted / extract_seconds
    print(f"model {model.name} ({model.bundle.image_size} px) on {model.device}, {len(urls)} shard(s), "
          f"batch {args.batch_size}, {loader_workers(args.workers, model.device)} loader worker(s), "
          f"texts {'no' if args.no_texts else 'yes'}, "
          f"torch threads {torch.get_num_threads()}")
    print("| measurement | images | seconds | images/s | x forward-only |")
    print("|---|---|---|---|---|")
    print(f"| forward-only (baseline: batches pre-decoded in memory) | {images} | {forward_seconds:.2f} "
          f"| {forward_rate:.1f} | 1.00 |")
    print(f"| extraction (clip_med.embed: read, decode, model, write) | {extracted} | {extract_seconds:.2f} "
          f"| {extract_rate:.1f} | {extract_rate / forward_rate:.2f} |")
    print(f"goal: extraction >= 0.90x forward-only: {'met' if extract_rate >= 0.9 * forward_rate else 'NOT met'}")


if __name__ == "__main__":
    main()
