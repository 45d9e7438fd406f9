"""Fixture builders shared by the tests (tiny data in the published layouts, tiny configs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from clip_med.data.loader import LoaderConfig
from clip_med.data.sources.synthetic import SyntheticSourceConfig
from clip_med.data.writer import ShardConfig
from clip_med.eval.evaluator import EvalConfig
from clip_med.modeling.factory import ModelConfig
from clip_med.training.config import DataConfig, TrainConfig, TrainerConfig
from clip_med.training.optim import OptimConfig

MEDPIX_CATEGORIES = ["Head", "Thorax", "Abdomen", "Spine and Muscles", "Reproductive and Urinary System"]


def write_png(path: Path, size=(48, 40), mode="L", seed=0) -> Path:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode=mode).save(path)
    return path


def make_medpix(root: Path, cases: dict[str, int] | None = None, images_per_case: int = 2,
                extra_splits: dict[str, list[str]] | None = None) -> Path:
    """A MedPix 2.0 folder in its published layout with random images.

    ``cases`` maps split -> number of cases; each case has ``images_per_case`` images
    alternating CT/MR and cycling through the location categories.
    """
    cases = cases or {"train": 6, "dev": 2}
    (root / "images").mkdir(parents=True)
    (root / "splitted_dataset").mkdir()
    descriptions, topics, per_split = [], [], {}
    seed = 0
    for split, n_cases in cases.items():
        rows = []
        for c in range(n_cases):
            case_id = f"MPX{split[:1].upper()}{c:03d}"
            names = []
            for _ in range(images_per_case):
                seed += 1
                name = f"{case_id}_synpic{seed:05d}"
                kind = "CT" if seed % 2 else "MR"
                category = MEDPIX_CATEGORIES[seed % len(MEDPIX_CATEGORIES)]
                write_png(root / "images" / f"{name}.png", mode="L" if seed % 3 else "RGB", seed=seed)
                row = {
                    "Type": kind, "U_id": case_id, "image": name,
                    "Description": {"ACR Codes": "1.2", "Age": "40",
                                    "Caption": f"Finding number {seed}. Second sentence.",
                                    "Figure Part": None, "Modality": f"{kind} - noncontrast", "Plane": "Axial",
                                    "Sex": "female"},
                    "Location": "Somewhere", "Location Category": category,
                }
                rows.append(row)
                descriptions.append(row)
                names.append((kind, name))
            topics.append({"U_id": case_id, "TAC": [n for k, n in names if k == "CT"],
                           "MRI": [n for k, n in names if k == "MR"],
                           "Case": {"Title": f"Case {case_id}", "Case Diagnosis": "Diagnosis X"},
                           "Topic": {"Title": "T", "Category": "Neoplasm"}})
        per_split[split] = rows
    for split, sources in (extra_splits or {}).items():
        rows = [row for source in sources for row in per_split[source]]
        per_split[split] = rows[: max(1, len(per_split[sources[0]]) // 2)]
    for split, rows in per_split.items():
        with open(root / "splitted_dataset" / f"descriptions_{split}.jsonl", "w") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
    (root / "Descriptions.json").write_text(json.dumps(descriptions))
    (root / "Case_topic.json").write_text(json.dumps(topics))
    return root


def tiny_train_config(tmp_path: Path, **trainer_overrides) -> TrainConfig:
    """A synthetic run that takes seconds: 32 px images, tiny model, no worker processes.

    Pinned to the CPU (``device=auto`` would pick a GPU where there is one, and the CPU tests compare
    against CPU fp32 references; on one GPU a second torchrun rank would have no device).
    """
    trainer = TrainerConfig(**{"epochs": 2, "progress": False, "tensorboard": False, "checkpoint_every_steps": 4,
                               "log_every_steps": 1, "device": "cpu", **trainer_overrides})
    return TrainConfig(
        source=SyntheticSourceConfig(image_size=32, sizes={"train": 96, "dev": 32}),
        shards=ShardConfig(out=str(tmp_path / "shards"), max_samples=24, workers=0, progress=False),
        data=DataConfig(loader=LoaderConfig(batch_size=16, workers=0, shuffle_buffer=32)),
        model=ModelConfig(name="medclip-tiny", image_size=32),
        optim=OptimConfig(lr=2e-3, warmup=2),
        trainer=trainer,
        eval=EvalConfig(batch_size=32, workers=0, probe_folds=2, probe_Cs=[0.1, 1.0]),
        run_dir=str(tmp_path / "run"),
    )
