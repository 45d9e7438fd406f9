import math

import pytest
import torch

from clip_med.modeling.losses import LossConfig, create_loss, model_kwargs_for, total_loss


def test_clip_loss_matches_hand_computation():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[0.6, 0.8], [0.8, -0.6]])
    scale = torch.tensor(2.0)
    loss = total_loss(create_loss(LossConfig("clip"))(image, text, scale, output_dict=True))
    # logits = 2 * image @ text.T = [[1.2, 1.6], [1.6, -1.2]]
    row0 = -1.2 + math.log(math.exp(1.2) + math.exp(1.6))
    row1 = 1.2 + math.log(math.exp(1.6) + math.exp(-1.2))
    expected = (row0 + row1) / 2  # symmetric logits: both directions equal
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_siglip_loss_matches_hand_computation():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss = total_loss(create_loss(LossConfig("siglip"))(image, text, torch.tensor(10.0), torch.tensor(-5.0),
                                                        output_dict=True))
    logsig = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
    expected = -(2 * logsig(10 - 5) + 2 * logsig(-(0 - 5))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_siglip_needs_a_bias_and_unknown_losses_are_refused():
    assert model_kwargs_for(LossConfig("siglip"))["init_logit_bias"] == -10.0
    assert model_kwargs_for(LossConfig("clip")) == {}
    with pytest.raises(ValueError, match="clip, siglip"):
        create_loss(LossConfig("triplet"))


def test_distributed_clip_defaults_give_global_batch_gradients_and_the_other_settings_warn(caplog):
    cfg = LossConfig("clip")
    assert cfg.local_loss and cfg.gather_with_grad  # exact global-batch gradients (tests/test_distributed.py)
    loss = create_loss(cfg, rank=0, world_size=2)
    assert loss.local_loss and loss.gather_with_grad and loss.world_size == 2
    create_loss(LossConfig("clip", local_loss=False, gather_with_grad=False), rank=0, world_size=2)
    assert any("1/2 of it" in record.getMessage() for record in caplog.records)
