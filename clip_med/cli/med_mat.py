"""``python -m clip_med.med_mat checkpoint=<ckpt> root=<Med-MAT folder> [files=<glob|list>] [template=...]``.

Answers Med-MAT's multiple-choice questions with a CLIP model (each option scored as a text against
the image) and writes ``med_mat.json``, ``med_mat.md`` and ``med_mat_predictions.csv`` into the run
folder: accuracy overall, per subset and per modality / area / task, against each question's
chance level. See :mod:`clip_med.eval.med_mat`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from clip_med.cli.common import command, register_command
from clip_med.cli.config import setup_logging, to_object
from clip_med.eval.med_mat import MedMatOptions, check_option_template, evaluate_med_mat, find_files, render_summary
from clip_med.inference.evaluation import ModelOptions, load_model


@dataclass
class MedMatConfig(MedMatOptions, ModelOptions):
    root: Optional[str] = None  # the folder holding med-mat/, Aggregated_Subsets/ and Original_Medical_Datasets/
    # Question files: paths, globs or folders, relative ones under root (None: Aggregated_Subsets/Subset--*.json).
    files: Any = None
    out: Optional[str] = None  # report folder (the Hydra entry point sets it to hydra.run.dir)


def run_med_mat(cfg: MedMatConfig) -> dict[str, Any]:
    check_option_template(cfg.template)
    find_files(cfg.root, cfg.files)  # no question file: fail before loading the model
    model = load_model(cfg)
    options = MedMatOptions(**{item.name: getattr(cfg, item.name) for item in dataclasses.fields(MedMatOptions)})
    extra = {"model": model.name, "checkpoint": str(model.info.path), "step": model.info.step}
    return evaluate_med_mat(model, cfg.root, cfg.files, options, cfg.out or "runs/med_mat", extra)


register_command("med_mat", MedMatConfig)


@command("med_mat")
def main(cfg: DictConfig) -> None:
    setup_logging()
    config: MedMatConfig = to_object(cfg)
    config.out = config.out or HydraConfig.get().runtime.output_dir
    report = run_med_mat(config)
    print(render_summary(report))
    print(f"report: {config.out}/med_mat.md")


if __name__ == "__main__":
    main()
