"""What a GPU run needs that a CPU can check: precision by capability, refused DDP combinations."""

import pytest
import torch

from clip_med.core import precision
from clip_med.training.config import TrainerConfig


@pytest.mark.parametrize("capability, expected", [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp16"),
                                                  ((7, 0), "fp16")])
def test_auto_precision_follows_the_gpus_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert precision.resolve_precision("auto", torch.device("cuda", 0)) == expected


def test_precision_on_the_cpu_and_bad_names(caplog):
    cpu = torch.device("cpu")
    assert precision.resolve_precision("auto", cpu) == "fp32"
    assert precision.resolve_precision("bf16", cpu) == "fp32"
    with pytest.raises(ValueError, match="unknown precision"):
        precision.resolve_precision("fp8", cpu)


def test_emulated_bf16_is_allowed_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert precision.resolve_precision("bf16", torch.device("cuda", 0)) == "bf16"
    assert any("emulated" in record.getMessage() for record in caplog.records)


def test_static_graph_with_accumulation_is_refused_before_any_work():
    with pytest.raises(ValueError, match="ddp_static_graph=true cannot be combined with trainer.accum_freq=2"):
        TrainerConfig(ddp_static_graph=True, accum_freq=2)
    TrainerConfig(ddp_static_graph=True)  # each alone is fine
    TrainerConfig(accum_freq=4)


def test_the_run_and_its_evaluation_resolve_precision_in_one_place():
    from clip_med.inference.model import resolve_precision as inference_resolve
    from clip_med.training import evaluation, step

    assert step.resolve_precision is precision.resolve_precision is inference_resolve
    assert evaluation.resolve_precision is precision.resolve_precision


@pytest.mark.parametrize("cores, local, expected", [(16, "1", 8), (16, "8", 1), (64, "8", 7), (16, "4", 3),
                                                    (2, "1", 1)])
def test_extraction_workers_share_the_cores_between_local_ranks(monkeypatch, cores, local, expected):
    from clip_med.inference import extract

    monkeypatch.setattr(extract.os, "cpu_count", lambda: cores)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    assert extract.loader_workers(-1, torch.device("cuda", 0)) == expected
    assert extract.loader_workers(-1, torch.device("cpu")) == 0
    assert extract.loader_workers(3, torch.device("cuda", 0)) == 3
