"""AdamW's three kernels on one model's parameters: torch's CPU default (a Python loop over the
parameters, the baseline; what open_clip_train runs on the CPU), the multi-tensor ``foreach``
kernel (clip_med's CPU default) and the ``fused`` kernel (``trainer.fused_optimizer=true``; the
default on CUDA).

Every kernel starts from the same weights and takes the same gradients (one real backward pass
of a CLIP loss, reused), alternating rounds so that drift of the machine hits all three alike. The
table gives the median time of one optimizer step and whether the weights after all steps equal the
baseline's bit for bit, which decides whether a run's numbers can depend on the kernel.

    python benchmarks/optimizer_bench.py                          # medclip-tiny, 1 thread
    python benchmarks/optimizer_bench.py --model ViT-B-16 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KERNELS = {"for-loop (torch's CPU default, baseline)": {"foreach": False},
           "foreach (clip_med's CPU default)": {"foreach": True},
           "fused (trainer.fused_optimizer=true)": {"fused": True}}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="medclip-tiny")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds; medians over them")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per round")
    return parser.parse_args(argv)


def model_with_gradients(name: str, image_size: int) -> torch.nn.Module:
    import open_clip

    from clip_med.modeling.factory import CONFIG_DIR

    open_clip.add_model_config(CONFIG_DIR)
    torch.manual_seed(0)
    model = open_clip.create_model(name, force_image_size=image_size)
    context = model.context_length
    image_features, text_features, logit_scale = model(torch.randn(8, 3, image_size, image_size),
                                                       torch.randint(1, 1000, (8, context)))
    open_clip.ClipLoss()(image_features, text_features, logit_scale).backward()
    return model


def main(argv=None) -> None:
    from clip_med.training.optim import OptimConfig, create_optimizer

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    base = model_with_gradients(args.model, args.image_size)
    runs = {}
    for label, kernel in KERNELS.items():
        model = copy.deepcopy(base)
        for param, source in zip(model.parameters(), base.parameters()):
            param.grad = source.grad.clone()  # deepcopy leaves .grad behind
        optimizer = create_optimizer(model, OptimConfig())  # clip_med's groups and hyper-parameters
        for group in optimizer.param_groups:
            group.update({"foreach": None, "fused": None, **kernel})
        runs[label] = (model, optimizer, [])
    for _ in range(args.rounds):
        for _model, optimizer, times in runs.values():
            start = time.perf_counter()
            for _ in range(args.steps):
                optimizer.step()
            times.append((time.perf_counter() - start) / args.steps)
    baseline_label = next(iter(runs))
    baseline_model, _, baseline_times = runs[baseline_label]
    baseline = statistics.median(baseline_times)
    parameters = sum(p.numel() for p in base.parameters())
    print(f"AdamW step on {args.model} ({parameters:,} parameters in {len(list(base.parameters()))} tensors), "
          f"{args.threads} thread(s), median of {args.rounds} rounds of {args.steps} steps, torch {torch.__version__}")
    print("| kernel | ms per step | speed vs baseline | weights equal the baseline's, bit for bit |")
    print("|---|---|---|---|")
    for label, (model, _, times) in runs.items():
        median = statistics.median(times)
        same = all(torch.equal(a, b) for a, b in zip(model.parameters(), baseline_model.parameters()))
        print(f"| {label} | {median * 1000:.1f} | {baseline / median:.2f}x | {'yes' if same else 'no'} |")


if __name__ == "__main__":
    main()
