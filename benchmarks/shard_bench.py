"""Shard writer throughput with 0, 1 and 2 worker processes against a one-process baseline, same run.

    python benchmarks/shard_bench.py                          # 1000 images of 768 px, resized to 256 px
    python benchmarks/shard_bench.py --count 2000 --repeats 3 # the final numbers, on a quiet machine
    python benchmarks/shard_bench.py --count 60 --repeats 1   # a quick check that it works

Rows (all on the same images, written to a fresh folder each time):

* ``baseline``: plain Pillow in one process, no clip_med: open, decode (with the same JPEG
  draft-mode shrink the writer uses), convert to RGB (or L when the channels are equal, as the
  writer stores them), resize to ``--max-side`` with LANCZOS, encode PNG (compress_level 6).
  The same output pixels as the writer, and nothing else.
* ``writer, N workers``: ``python -m clip_med.shard source=folder`` as a function
  (:func:`clip_med.data.shardset.shard_source`) end to end: listing the folder, reading the
  captions, the caption label rules, validation, colour normalisation, content hash for
  deduplication, resize, PNG encode, tar writing, journal and manifest. ``workers=0`` decodes in
  the main process; 1 and 2 use that many worker processes (output is identical in all three).

The images are smooth grayscale fields with noise saved as RGB JPEG (quality 90), as figures
from journals usually are. The target of issue 3 is writer with 2 workers >= 1.7x baseline;
on a machine with fewer than 3 free cores the main process and the two workers compete, so run
the final numbers on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clip_med.data.shardset import ShardCommandConfig, shard_source  # noqa: E402
from clip_med.data.sources.generic import FolderSourceConfig  # noqa: E402
from clip_med.data.writer import ShardConfig  # noqa: E402

CAPTIONS = ("Axial CT of the chest showing a nodule.", "Sagittal T2-weighted MRI of the lumbar spine.",
            "Frontal chest radiograph.", "Ultrasound of the right kidney.")


def make_images(folder: Path, count: int, side: int, seed: int = 0) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        coarse = rng.random((side // 32, side // 32))
        field = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((side, side), Image.BICUBIC))
        pixels = np.clip(field.astype(np.float64) + rng.normal(0, 12, (side, side)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).convert("RGB").save(folder / f"{index:05d}.jpg", quality=90)
        (folder / f"{index:05d}.txt").write_text(CAPTIONS[index % len(CAPTIONS)])


def baseline(folder: Path, out: Path, max_side: int) -> int:
    out.mkdir(parents=True, exist_ok=True)
    count = 0
    for path in sorted(folder.glob("*.jpg")):
        with Image.open(path) as image:
            image.draft(image.mode, (max_side, max_side))
            pixels = np.asarray(image.convert("RGB"))
            if (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 0] == pixels[..., 2]).all():
                image = Image.fromarray(pixels[..., 0])  # the writer stores gray RGB as L: same output
            else:
                image = Image.fromarray(pixels)
            image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
            image.save(out / f"{path.stem}.png", format="PNG", compress_level=6)
        count += 1
    return count


def writer(folder: Path, out: Path, max_side: int, workers: int) -> int:
    cfg = ShardCommandConfig(source=FolderSourceConfig(root=str(folder)), out=str(out),
                             shards=ShardConfig(workers=workers, max_side=max_side, max_samples=500, progress=False))
    return shard_source(cfg).manifests["train"].written_count


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the writer's worker processes)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def timed(run, out: Path, repeats: int) -> tuple[float, float, int]:
    """Median pairs/s and CPU ms per pair over ``repeats`` runs, each into an empty folder."""
    rates, cpu, count = [], [], 0
    for _ in range(repeats):
        shutil.rmtree(out, ignore_errors=True)
        start, start_cpu = time.perf_counter(), _cpu_seconds()
        count = run(out)
        rates.append(count / (time.perf_counter() - start))
        cpu.append(1000 * (_cpu_seconds() - start_cpu) / count)
    return statistics.median(rates), statistics.median(cpu), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--side", type=int, default=768)
    parser.add_argument("--max-side", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"making {args.count} JPEG images of {args.side}x{args.side} ...", flush=True)
        make_images(tmp / "images", args.count, args.side)
        rows = [("baseline (plain Pillow, 1 process)",
                 *timed(lambda out: baseline(tmp / "images", out, args.max_side), tmp / "out", args.repeats))]
        for workers in args.workers:
            label = "writer, in-process (workers=0)" if workers == 0 else f"writer, {workers} worker process(es)"
            rows.append((label, *timed(lambda out, w=workers: writer(tmp / "images", out, args.max_side, w),
                                       tmp / "out", args.repeats)))

    base_rate = rows[0][1]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n{args.count} images {args.side}px -> max_side {args.max_side}, PNG; {os.cpu_count()} CPU cores, "
          f"load average {load:.1f} at the end; median of {args.repeats} run(s)\n")
    print(f"{'method':<40} {'pairs/s':>10} {'x baseline':>11} {'CPU ms/pair':>12} {'written':>8}")
    for label, rate, cpu, count in rows:
        print(f"{label:<40} {rate:>10.1f} {rate / base_rate:>10.2f}x {cpu:>12.1f} {count:>8}")
    print("\n(CPU ms/pair counts this process and its worker processes: the work done, whatever the "
          "contention; pairs/s is what a user waits for.)")
    two = next((rate for label, rate, _, _ in rows if label.startswith("writer, 2 ")), None)
    if two is not None:
        verdict = "met" if two >= 1.7 * base_rate else "NOT met"
        print(f"\ntarget: writer with 2 workers >= 1.7x baseline: {two / base_rate:.2f}x ({verdict})")


if __name__ == "__main__":
    main()
