"""The held-out evaluation: zero-shot, linear probe and retrieval on one split."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from clip_med.core.bounds import bounded
from clip_med.eval.case_level import case_level_metrics, has_cases
from clip_med.eval.embeddings import Embedded
from clip_med.eval.linear_probe import DEFAULT_CS, FittedProbe, fit_probe
from clip_med.eval.metrics import classification_metrics
from clip_med.eval.probe_head import ProbeHead
from clip_med.eval.retrieval import retrieval_metrics
from clip_med.eval.zero_shot import label_prompts, zero_shot_probabilities, zero_shot_weights
from clip_med.labels import taxonomy

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    # The held-out split; None picks the first split that is not the training split
    # (MedPix: dev; a source with a test split: test is used only when named here).
    split: Optional[str] = None
    every_epochs: int = bounded(0, minimum=0)  # also evaluate every k epochs (0: only at the end)
    tasks: list[str] = field(default_factory=lambda: list(taxonomy.TASKS))
    batch_size: int = bounded(128, minimum=1)
    workers: int = bounded(2, minimum=0)
    probe_Cs: list[float] = field(default_factory=lambda: list(DEFAULT_CS))
    probe_folds: int = bounded(5, minimum=2)
    probe_max_iter: int = bounded(2000, minimum=1)
    recall_ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    # Per-task prompt templates ("a {} scan."), replacing the taxonomy's defaults.
    prompt_templates: dict[str, list[str]] = field(default_factory=dict)
    # False: prompts use only each label's display name (the word clip_med's training templates
    # write); True adds the taxonomy's synonyms, which helps models that have seen them. None:
    # the checkpoint's own setting when evaluating a checkpoint, else True.
    prompt_synonyms: Optional[bool] = None
    # The default prompts' phrasing (without prompt_templates): plain (the taxonomy's short templates)
    # or medical ("a CT scan of the brain."). None: medical for a model started from weights trained
    # elsewhere (a pretrained tag, an hf-hub: model), plain for one trained from scratch.
    prompt_style: Optional[str] = None


@dataclass
class Predictions:
    """Per-image probabilities of one method on one task (rows: ``ids``; columns: ``labels``)."""

    ids: list[str]
    y_true: list[str]
    labels: list[str]
    probs: np.ndarray


def task_labels(train_labels: Sequence[str]) -> list[str]:
    """Classes of a task: those with training examples (sorted), ``unknown`` excluded."""
    return sorted({label for label in train_labels if label != "unknown"})


def _known(labels: Sequence[str], classes: list[str]) -> np.ndarray:
    allowed = set(classes)
    return np.array([label in allowed for label in labels], dtype=bool)


def evaluate_embeddings(model: torch.nn.Module, tokenizer: Callable, device: torch.device,
                        held_out: Embedded, train: Embedded | None, cfg: EvalConfig,
                        predictions: dict[tuple[str, str], Predictions] | None = None,
                        retrieval: bool = True) -> dict[str, Any]:
    """The report; pass a dict as ``predictions`` to also get per-image probabilities by (method, task).
    ``retrieval=False``: no retrieval section (captions made from class names, where it measures nothing)."""
    report: dict[str, Any] = {"n_images": len(held_out), "zero_shot": {}, "linear_probe": {}}
    for task in cfg.tasks:
        classes = task_labels(train.labels[task] if train else held_out.labels[task])
        if len(classes) < 2:
            log.warning("task %s: fewer than two known labels, skipped", task)
            continue
        keep = _known(held_out.labels[task], classes)
        y_true = [label for label, kept in zip(held_out.labels[task], keep) if kept]
        context = {other: task_labels(train.labels[other] if train else held_out.labels[other])
                   for other in cfg.tasks if other != task}
        prompts = label_prompts(task, classes, cfg.prompt_templates.get(task), context=context,
                                synonyms=cfg.prompt_synonyms is not False, style=cfg.prompt_style)
        weights = zero_shot_weights(model, tokenizer, prompts, device)
        probs = zero_shot_probabilities(held_out.image[keep], weights)
        report["zero_shot"][task] = {**classification_metrics(y_true, probs, classes),
                                     "excluded_unlabelled": int((~keep).sum())}
        cases = has_cases(held_out)
        if cases:
            report.setdefault("case_level", {}).setdefault("zero_shot", {})[task] = case_level_metrics(
                held_out, task, classes, functools.partial(zero_shot_probabilities, weights=weights))
        ids = [item for item, kept in zip(held_out.ids, keep) if kept]
        if predictions is not None:
            predictions["zero_shot", task] = Predictions(ids, y_true, classes, probs)
        if train is not None:
            probe = run_linear_probe(task, classes, train, held_out, Cs=cfg.probe_Cs, folds=cfg.probe_folds,
                                     max_iter=cfg.probe_max_iter)
            report["linear_probe"][task] = probe.metrics
            if cases:
                report.setdefault("case_level", {}).setdefault("linear_probe", {})[task] = case_level_metrics(
                    held_out, task, classes, functools.partial(_in_class_order, probe, classes))
            if predictions is not None:
                predictions["linear_probe", task] = Predictions(ids, y_true, classes, probe.probs)
    if retrieval:
        report["retrieval"] = retrieval_metrics(held_out.image, held_out.text, cfg.recall_ks)
    return report


def _in_class_order(probe: ProbeRun, classes: list[str], embeddings: np.ndarray) -> np.ndarray:
    """The fitted probe's probabilities for ``embeddings``, columns in ``classes`` order."""
    scored = probe.fitted.predict_proba(embeddings)
    probs = np.zeros((len(embeddings), len(classes)))
    for column, label in enumerate(probe.fitted.labels):
        probs[:, classes.index(label)] = scored[:, column]
    return probs


@dataclass
class ProbeRun:
    """One task's linear probe, fitted on ``train`` and scored on the held-out images with a known label."""

    fitted: FittedProbe
    head: ProbeHead  # the fitted probe as a saveable head (clip_med.eval.probe_head)
    probs: np.ndarray  # (held-out images with a label in ``classes``, len(classes)), columns in ``classes`` order
    metrics: dict[str, Any]  # classification_metrics + C, cv_balanced_accuracy, n_train
    excluded_unlabelled: int  # held-out images whose label is not among ``classes``


def run_linear_probe(task: str, classes: list[str], train: Embedded, held_out: Embedded, *,
                     Cs: Sequence[float] = DEFAULT_CS, folds: int = 5, max_iter: int = 2000,
                     score_with_head: bool = False, model_fingerprint: str = "", model_name: str = "") -> ProbeRun:
    """The linear-probe flow of the evaluator and of ``python -m clip_med.probe``: fit a logistic
    regression on the training images labelled with one of ``classes`` (``C`` chosen by
    cross-validation grouped by case), build its head, score the held-out images.

    ``score_with_head``: score with the head (float32 weights: the numbers its file reports are
    exactly what applying it gives) instead of the scikit-learn model (float64), as the evaluator does.
    """
    train_keep = _known(train.labels[task], classes)
    fitted = fit_probe(
        train.image[train_keep],
        [label for label, kept in zip(train.labels[task], train_keep) if kept],
        groups=[group for group, kept in zip(train.groups, train_keep) if kept],
        Cs=Cs, folds=folds, max_iter=max_iter,
    )
    head = ProbeHead.from_fitted(fitted, task, model_fingerprint, model_name)
    keep = _known(held_out.labels[task], classes)
    y_true = [label for label, kept in zip(held_out.labels[task], keep) if kept]
    scorer = head if score_with_head else fitted
    probs = np.zeros((int(keep.sum()), len(classes)))
    scored = scorer.predict_proba(held_out.image[keep])  # columns in fitted.labels order (== head.labels)
    for column, label in enumerate(fitted.labels):
        probs[:, classes.index(label)] = scored[:, column]
    metrics = {**classification_metrics(y_true, probs, classes), "C": fitted.C,
               "cv_balanced_accuracy": fitted.cv_balanced_accuracy, "n_train": int(train_keep.sum())}
    return ProbeRun(fitted, head, probs, metrics, int((~keep).sum()))
