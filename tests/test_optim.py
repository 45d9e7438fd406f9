"""The optimizer the trainer builds on the CPU: torch's multi-tensor (foreach) AdamW, which must give the
for-loop AdamW's result bit for bit, so that +exp=medpix's numbers do not depend on the kernel."""

import copy

import open_clip
import torch

from clip_med.modeling.factory import CONFIG_DIR
from clip_med.training.nonfinite import is_fused, use_fused_optimizer
from clip_med.training.optim import OptimConfig, create_optimizer, create_scheduler


def _tiny_clip() -> torch.nn.Module:
    open_clip.add_model_config(CONFIG_DIR)
    torch.manual_seed(0)
    return open_clip.create_model("medclip-tiny", force_image_size=32)


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps: int) -> None:
    adjust = create_scheduler(optimizer, cfg, total_steps=steps)
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        adjust(step)
        images = torch.randn(8, 3, 32, 32, generator=generator)
        texts = torch.randint(1, 500, (8, 32), generator=generator)
        image_features, text_features, logit_scale = model(images, texts)
        loss = open_clip.ClipLoss()(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()


def test_the_cpu_optimizer_is_foreach_and_matches_the_for_loop_adamw_bit_for_bit():
    cfg = OptimConfig(lr=3e-3, lr_text=1e-3, warmup=2)  # three rates' schedules, groups with and without decay
    ours_model, loop_model = _tiny_clip(), _tiny_clip()
    ours = create_optimizer(ours_model, cfg)
    assert not use_fused_optimizer(ours, False)
    assert all(group["foreach"] for group in ours.param_groups) and not is_fused(ours)
    loop = create_optimizer(loop_model, cfg)
    for group in loop.param_groups:
        group["foreach"] = False  # torch's CPU default: the Python loop over parameters

    _train(ours_model, ours, cfg, steps=6)
    _train(loop_model, loop, cfg, steps=6)
    for (name, mine), theirs in zip(ours_model.named_parameters(), loop_model.parameters()):
        assert torch.equal(mine, theirs), name

    # A checkpoint of an older version saved foreach=None: after the reload the trainer's call sets it again.
    saved = copy.deepcopy(ours.state_dict())
    for group in saved["param_groups"]:
        group["foreach"] = None
    ours.load_state_dict(saved)
    use_fused_optimizer(ours, False)
    assert all(group["foreach"] for group in ours.param_groups)


def test_the_fused_switch_turns_foreach_off_and_back():
    optimizer = create_optimizer(_tiny_clip(), OptimConfig())
    assert use_fused_optimizer(optimizer, True) and is_fused(optimizer)
    assert all(group["fused"] and not group["foreach"] for group in optimizer.param_groups)
    assert not use_fused_optimizer(optimizer, False) and not is_fused(optimizer)
    assert all(group["foreach"] and not group["fused"] for group in optimizer.param_groups)
