"""``python -m clip_med.probe``: fit linear-probe heads on frozen embeddings and save them.

For each task, a logistic regression is fitted on the image embeddings of the training split;
its regularisation ``C`` is chosen on the validation folds of a cross-validation over that split
(grouped by case, so images of one case never sit on both sides), then the head is refitted on
the whole split, scored on the evaluation split (accuracy, balanced accuracy, macro-F1, AUROC,
confusion matrix, per class) and saved as ``<out>/<task>.safetensors``. ``clip_med.load(ckpt)
.classify(images, head="<out>/modality.safetensors")`` uses it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from clip_med.core.bounds import bounded
from clip_med.core.io import write_json_atomic, write_text_atomic
from clip_med.data.writer import ShardConfig
from clip_med.eval.datasets import EvalData
from clip_med.eval.embeddings import Embedded
from clip_med.eval.evaluator import EvalConfig, run_linear_probe, task_labels
from clip_med.eval.linear_probe import DEFAULT_CS
from clip_med.eval.probe_head import ProbeHead
from clip_med.eval.report import classification_table, plot_confusion
from clip_med.inference.evaluation import ModelOptions, embed_data_split, load_model_and_data
from clip_med.labels import taxonomy

log = logging.getLogger(__name__)


@dataclass
class ProbeConfig(ModelOptions):
    data: Any = None  # data=<source> (+ data.root, data.split, data.train_split) or data=shards data.dir=...
    shards: ShardConfig = field(default_factory=ShardConfig)
    pixels_from_checkpoint: bool = True
    tasks: list[str] = field(default_factory=lambda: list(taxonomy.TASKS))
    Cs: list[float] = field(default_factory=lambda: list(DEFAULT_CS))
    folds: int = bounded(5, minimum=2)
    max_iter: int = bounded(2000, minimum=1)
    batch_size: int = bounded(128, minimum=1)
    workers: int = bounded(2, minimum=0)
    out: Optional[str] = None  # where heads and probe_report.{json,md} go
    progress: bool = True


def fit_head(model, task: str, train: Embedded, held_out: Embedded, cfg: ProbeConfig,
             info: dict[str, Any]) -> tuple[ProbeHead, dict[str, Any]]:
    classes = task_labels(train.labels[task])
    if len(classes) < 2:
        raise ValueError(f"task {task}: the training split has fewer than two labelled classes ({classes})")
    probe = run_linear_probe(task, classes, train, held_out, Cs=cfg.Cs, folds=cfg.folds, max_iter=cfg.max_iter,
                             score_with_head=True, model_fingerprint=model.fingerprint, model_name=model.name)
    head = probe.head
    metrics = {**probe.metrics, "excluded_unlabelled": probe.excluded_unlabelled}
    head.info = {**info, "metrics": {key: metrics[key] for key in ("n", "accuracy", "balanced_accuracy", "macro_f1",
                                                                    "auroc", "cv_balanced_accuracy", "n_train")}}
    return head, metrics


def probe_model(model, data: EvalData, cfg: ProbeConfig, out_dir: str | Path) -> dict[str, Any]:
    """Fit, score and save one head per task; returns the probe report."""
    if data.train_split is None:
        raise ValueError(f"{data.source} has no training split to fit a probe on (set data.train_split)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    embed_cfg = EvalConfig(tasks=list(cfg.tasks), batch_size=cfg.batch_size, workers=cfg.workers)
    train = embed_data_split(model, data, data.train_split, embed_cfg, cfg.progress)
    held_out = embed_data_split(model, data, data.split, embed_cfg, cfg.progress)
    info = {"checkpoint": str(model.info.path), "step": model.info.step, "source": data.source,
            "train_split": data.train_split, "eval_split": data.split}
    report: dict[str, Any] = {**info, "model": model.name, "split": data.split, "linear_probe": {}, "heads": {}}
    for task in cfg.tasks:
        head, metrics = fit_head(model, task, train, held_out, cfg, info)
        report["linear_probe"][task] = metrics
        report["heads"][task] = str(head.save(out_dir / f"{task}.safetensors"))
        plot_confusion(metrics, f"linear probe: {task} ({data.split})", out_dir / f"confusion_linear_probe_{task}.png")
    write_json_atomic(out_dir / "probe_report.json", report)
    write_text_atomic(out_dir / "probe_report.md", render_probe_markdown(report))
    return report


def render_probe_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Linear probes: fitted on `{report['train_split']}`, scored on `{report['split']}`", "",
             f"- checkpoint: `{report['checkpoint']}`", f"- source: `{report['source']}`", "",
             *classification_table(report), "", "| task | C | CV balanced acc. | n train | head |",
             "|---|---|---|---|---|"]
    for task, metrics in report["linear_probe"].items():
        cv = metrics["cv_balanced_accuracy"]
        lines.append(f"| {task} | {metrics['C']} | {'–' if cv is None else f'{cv:.3f}'} | {metrics['n_train']} "
                     f"| `{report['heads'][task]}` |")
    for task in report["linear_probe"]:
        lines += ["", f"![confusion matrix](confusion_linear_probe_{task}.png)"]
    return "\n".join(lines) + "\n"


def probe_checkpoint(cfg: ProbeConfig) -> dict[str, Any]:
    model, data = load_model_and_data(cfg)
    return probe_model(model, data, cfg, cfg.out or Path("heads") / data.source)
