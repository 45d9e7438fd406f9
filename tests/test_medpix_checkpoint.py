"""A trained MedPix checkpoint, checked on the real data (slow; needs a run and the data set).

    CLIP_MED_CHECKPOINT=runs/medpix/<run>/checkpoints/step-00000750.pt \
        python -m pytest -q --runslow tests/test_medpix_checkpoint.py

``classify`` on the original dev PNG files must give exactly the zero-shot accuracy that the
training run's ``report.json`` holds (same preprocessing, same prompts).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import clip_med
from clip_med.data.sources import read_source
from clip_med.data.sources.medpix import MedPixSourceConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoint() -> Path:
    path = os.environ.get("CLIP_MED_CHECKPOINT")
    if not path:
        pytest.skip("set CLIP_MED_CHECKPOINT to a +exp=medpix checkpoint")
    return Path(path)


def test_classify_on_dev_pngs_reproduces_the_training_report(checkpoint, medpix_real_root):
    report = json.loads((checkpoint.parent.parent / "report.json").read_text())
    records = read_source(MedPixSourceConfig(root=str(medpix_real_root)))[report["split"]]
    model = clip_med.load(checkpoint, device="cpu")
    for task in ("modality", "anatomy"):
        result = model.classify([record.image for record in records], task=task)
        truth = [record.labels[task] for record in records]
        accuracy = float(np.mean([p == t for p, t in zip(result.predictions, truth)]))
        assert accuracy == pytest.approx(report["zero_shot"][task]["accuracy"], abs=1e-9), task
