"""``python -m clip_med.evaluate``: any checkpoint on any split of any source.

Writes the training run's report files (``report.json``, ``report.md``, one confusion-matrix PNG
per method and task: zero-shot, linear probe fitted on the training split, retrieval recall@k
and median rank, per-class metrics) plus ``clip_benchmark.json`` (CLIP_benchmark's result
shape) and ``predictions.csv`` (every image's prediction and probabilities, for error analysis).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from clip_med.core.io import atomic_write, write_json_atomic
from clip_med.data.writer import ShardConfig
from clip_med.eval.clip_benchmark import clip_benchmark_records
from clip_med.eval.datasets import EvalData, eval_shard_config, open_data
from clip_med.eval.embeddings import embed_split
from clip_med.eval.evaluator import EvalConfig, Predictions, evaluate_embeddings
from clip_med.eval.report import write_report

log = logging.getLogger(__name__)

# OmegaConf's marker for a mandatory value: composing a command without it fails, naming the key.
REQUIRED = "???"


@dataclass
class ModelOptions:
    """How a command finds its model (shared by evaluate, probe, embed, search, serve, classify, med_mat).

    ``checkpoint=<file>``: a clip_med checkpoint, or a plain open_clip state dict with ``model=<its
    architecture>``. Without a checkpoint, the pretrained model itself: ``model=hf-hub:<org>/<repo>``
    (``model=biomedclip``: ``hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``),
    ``model=local-dir:<folder>``, or ``model=<architecture> pretrained=<tag>`` (``ViT-B-16`` with
    ``laion2b_s34b_b88k``); its files come through huggingface_hub's cache (HF_HOME / HF_HUB_CACHE;
    HF_HUB_OFFLINE=1 reads only the cache). On the command line ``model=`` sets ``model_name``
    (:func:`clip_med.cli.common.normalise_overrides`: ``model`` is a config group's name).
    """

    checkpoint: Optional[str] = None  # a clip_med checkpoint, or a plain open_clip state dict (with model=)
    model_name: Optional[str] = None  # model=: hf-hub:<org>/<repo>, local-dir:<folder> or an open_clip architecture
    pretrained: Optional[str] = None  # with an architecture: open_clip's pretrained tag, or a weights file
    device: str = "auto"  # auto | cpu | cuda


def load_model(options: ModelOptions | Any, device: str | None = None, recorded: dict[str, Any] | None = None):
    """The model ``options`` name (:func:`clip_med.load`): the one loader every command uses.

    ``device`` replaces ``options.device`` (embed under torchrun); ``recorded`` (``clip_med.load``'s
    checkpoint, model_name and pretrained) is the fallback when ``options`` names neither a checkpoint
    nor a model (search: the index's own)."""
    from clip_med.inference.model import load

    if options.checkpoint is None and options.model_name is None and recorded:
        return load(**recorded, device=device or options.device)
    return load(options.checkpoint, options.model_name, device or options.device, pretrained=options.pretrained)


@dataclass
class EvaluateConfig(ModelOptions):
    data: Any = None  # a source (data=medpix, data=synthetic, ...) or data=shards
    shards: ShardConfig = field(default_factory=ShardConfig)
    # Shard the data with a clip_med checkpoint's pixel options (max_side, format, limits), as in training
    # (a pretrained model, or a plain state dict, takes shards.* as given).
    pixels_from_checkpoint: bool = True
    eval: EvalConfig = field(default_factory=EvalConfig)
    out: Optional[str] = None  # report folder (the Hydra entry point sets it to hydra.run.dir)
    progress: bool = True


def embed_data_split(model, data: EvalData, split: str, cfg: EvalConfig, progress: bool):
    return embed_split(model.model, data.shard_set.urls(split), model.transform, model.tokenizer, model.device,
                       batch_size=cfg.batch_size, workers=cfg.workers, precision=model.precision, tasks=cfg.tasks,
                       progress=progress, description=f"embed {split}")


def write_predictions(path: Path, predictions: dict[tuple[str, str], Predictions]) -> None:
    with atomic_write(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "method", "task", "true", "predicted", "confidence", "probabilities"])
        for (method, task), found in predictions.items():
            for item, truth, row in zip(found.ids, found.y_true, found.probs):
                best = int(row.argmax())
                probabilities = json.dumps({label: round(float(p), 6) for label, p in zip(found.labels, row)})
                writer.writerow([item, method, task, truth, found.labels[best], f"{row[best]:.6f}", probabilities])


def evaluate_model(model, data: EvalData, cfg: EvalConfig, out_dir: str | Path, progress: bool = True,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate a loaded model (:func:`clip_med.load`) on prepared data; writes and returns the report."""
    out_dir = Path(out_dir)
    cfg = dataclasses.replace(
        cfg, prompt_templates=cfg.prompt_templates or dict(model.prompt_templates),
        prompt_synonyms=model.prompt_synonyms if cfg.prompt_synonyms is None else cfg.prompt_synonyms,
        prompt_style=cfg.prompt_style or model.prompt_style,
        tasks=[*cfg.tasks, *(task for task in data.tasks if task not in cfg.tasks)],  # + a benchmark set's classes
    )
    held_out = embed_data_split(model, data, data.split, cfg, progress)
    train = embed_data_split(model, data, data.train_split, cfg, progress) if data.train_split else None
    if train is None:
        log.warning("no training split: linear probes are skipped and zero-shot classes come from %s", data.split)
    predictions: dict[tuple[str, str], Predictions] = {}
    if not data.retrieval:
        log.info("%s: captions made from class names, no retrieval", data.source)
    report = evaluate_embeddings(model.model, model.tokenizer, model.device, held_out, train, cfg, predictions,
                                 retrieval=data.retrieval)
    manifest = data.shard_set.manifest(data.split)
    report.update({"split": data.split, "train_split": data.train_split, "source": data.source,
                   "checkpoint": str(model.info.path), "step": model.info.step, "model": model.name,
                   "shards": str(data.shard_set.out_dir), "read_errors": held_out.errors,
                   "skipped_when_sharding": manifest.skipped_by_reason(), **(extra or {})})
    paths = write_report(report, out_dir)
    records = clip_benchmark_records(report, predictions, f"{data.source}/{data.split}", model.name,
                                     str(model.info.path))
    write_json_atomic(out_dir / "clip_benchmark.json", records)
    write_predictions(out_dir / "predictions.csv", predictions)
    log.info("report written to %s", paths["md"])
    return report


def load_model_and_data(cfg: EvaluateConfig | Any) -> tuple[Any, EvalData]:
    """The checkpoint's model and the data it is scored on, sharded with the checkpoint's pixel options.

    ``cfg`` is an :class:`EvaluateConfig` or anything with the same fields (the probe command's config)."""
    if cfg.data is None:
        raise ValueError("choose the data: data=<source> (e.g. data=medpix data.root=...) or data=shards data.dir=...")
    model = load_model(cfg)
    # A clip_med checkpoint knows the pixel options it was trained on; other models take shards.* as given.
    trained_pixels = cfg.pixels_from_checkpoint and model.info.format == "clip_med"
    pixels = model.preprocessing.shard_options() if trained_pixels else None
    return model, open_data(cfg.data, eval_shard_config(cfg.shards, pixels))


def evaluate_checkpoint(cfg: EvaluateConfig) -> dict[str, Any]:
    model, data = load_model_and_data(cfg)
    out = cfg.out or str(Path("runs") / "eval" / f"{data.source}-{data.split}")
    # A pretrained model's report names the tag beside the architecture ("checkpoint" holds its name).
    extra = {"pretrained": cfg.pretrained} if model.info.format == "pretrained" and cfg.pretrained else None
    return evaluate_model(model, data, cfg.eval, out, cfg.progress, extra)
