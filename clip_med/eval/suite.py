"""A benchmark suite: the cells (model x data set x task) and how each one is scored.

A suite (``conf/suite/<name>.yaml``, :class:`SuiteConfig`) names data sets, each a source with its
options (:class:`SuiteSet`). For one model and one set, the cells are:

* ``zero_shot``: zero-shot classification with the set's class names and prompts
  (:mod:`clip_med.labels.benchmarks`, or the taxonomy's for ``modality`` / ``anatomy``);
* ``linear_probe``: the one linear-probe flow (:func:`clip_med.eval.evaluator.run_linear_probe`:
  logistic regression, ``C`` by cross-validation grouped by case) on the whole training split;
* ``few_shot`` (one cell per ``k``): the same flow on ``k`` training images per class, drawn
  with seeds ``0 .. few_shot_seeds - 1``; the metrics are averaged over the seeds (with their
  standard deviation). ``C`` is chosen by cross-validation on the k-shot sample itself, which
  needs two images of every class: at ``k = 1`` it is fixed at 1.0 (scikit-learn's default; each
  cell records ``C`` per seed and ``C_chosen_by``: ``cross-validation`` or ``fixed``);
* ``retrieval``: image <-> text recall@k, for sets of captioned pairs only: never for a source
  whose captions are made from class names
  (:attr:`clip_med.data.sources.SourceConfig.captions_from_class_names`).

A set of several single-label tasks (MedPix: modality, anatomy) gives one data set per task
(``medpix/modality``); a multi-label set (CheXpert, ChestMNIST: one binary task per finding) is
one data set scored per finding, with the mean AUROC as its main number.

Each cell has *headline* metrics (:func:`headline_metrics`), the numbers the summary tables
compare: top-1 accuracy and mean per-class recall for a single-label data set, the mean AUROC
over the findings for a multi-label one, the mean recall@k for retrieval (``lp_`` before the
names for probes). The first is the cell's main metric.

Every cell is written as one CLIP_benchmark result (``dataset``, ``model``, ``pretrained``,
``task``, ``metrics``, ``language``; ``fewshot_k`` for probes as CLIP_benchmark writes it, -1 for
the full training split) plus a ``clip_med`` block (suite, set, modality, family, main metric,
the fingerprint of what the cell depends on).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from clip_med.core.bounds import bounded
from clip_med.eval.clip_benchmark import top_k_accuracy
from clip_med.eval.embeddings import Embedded
from clip_med.eval.evaluator import EvalConfig, Predictions, ProbeRun, run_linear_probe, task_labels
from clip_med.eval.metrics import classification_metrics
from clip_med.eval.retrieval import retrieval_metrics
from clip_med.eval.zero_shot import zero_shot_probabilities
from clip_med.labels import benchmarks
from clip_med.labels.benchmarks import NEGATIVE, POSITIVE

log = logging.getLogger(__name__)

MULTICLASS, MULTILABEL, RETRIEVAL = "multiclass", "multilabel", "retrieval"
BENCHMARK_TASKS = {"zero_shot": "zeroshot_classification", "linear_probe": "linear_probe",
                   "few_shot": "linear_probe", "retrieval": "zeroshot_retrieval"}


@dataclass
class SuiteSet:
    """One data set of a suite."""

    # The source and its options, as under source= (name: medmnist, subset: pathmnist, root: ...).
    source: dict[str, Any] = field(default_factory=dict)
    modality: str = "other"  # the imaging family the summary groups it under (radiology, pathology, ...)
    # Label tasks to classify; None: the source's own classes (SourceConfig.class_tasks); []: none.
    tasks: Optional[list[str]] = None
    split: Optional[str] = "test"  # the evaluated split (None: dev, validation, val, then test)
    train_split: Optional[str] = "train"  # the probes' training split (also where zero-shot classes come from)
    zero_shot: bool = True
    linear_probe: bool = True
    few_shot: bool = True
    retrieval: bool = True  # image-text retrieval, where the source's captions are not made from class names
    prompt_templates: dict[str, list[str]] = field(default_factory=dict)  # task -> templates ("... {} ...")


@dataclass
class SuiteConfig:
    name: str = "?"
    description: str = ""
    sets: dict[str, SuiteSet] = field(default_factory=dict)


@dataclass
class SuiteOptions:
    """How the probes of every set are run (the suite command's own options)."""

    few_shot_ks: list[int] = field(default_factory=lambda: [1, 4, 16])
    few_shot_seeds: int = bounded(3, minimum=1)  # k-shot samples drawn per k (seeds 0..n-1), metrics averaged


@dataclass(frozen=True)
class Cell:
    set: str
    dataset: str  # CLIP_benchmark's dataset name: the set, or <set>/<task> for a set of several tasks
    tasks: tuple[str, ...]
    kind: str  # multiclass | multilabel | retrieval
    method: str  # zero_shot | linear_probe | few_shot | retrieval
    k: int = -1  # few_shot: images per class; -1: the whole training split

    @property
    def benchmark_task(self) -> str:
        return BENCHMARK_TASKS[self.method]

    @property
    def family(self) -> str:
        return {"zero_shot": "zero-shot", "linear_probe": "linear probe", "retrieval": "retrieval"}.get(
            self.method, f"{self.k}-shot")

    @property
    def file_name(self) -> str:
        return f"{self.dataset.replace('/', '--')}.{self.method}{self.k if self.method == 'few_shot' else ''}.json"

    @property
    def headline_metrics(self) -> list[str]:
        return headline_metrics(self.kind, self.method)

    @property
    def main_metric(self) -> str:
        return self.headline_metrics[0]


# The headline metrics (without the probes' "lp_") and what the report calls them.
METRIC_NAMES = {"acc1": "top-1 accuracy", "mean_per_class_recall": "mean per-class recall",
                "auroc": "mean AUROC over findings", "mean_recall": "mean recall@k (both directions)"}


def headline_metrics(kind: str, method: str) -> list[str]:
    """The metrics the summary compares for a cell of ``kind`` scored by ``method``; the first is its main one."""
    if kind == RETRIEVAL:
        return ["mean_recall"]
    prefix = "lp_" if method in ("linear_probe", "few_shot") else ""
    names = ["auroc"] if kind == MULTILABEL else ["acc1", "mean_per_class_recall"]
    return [prefix + name for name in names]


def metric_name(metric: str) -> str:
    """What the report calls a headline metric (``lp_acc1``: top-1 accuracy)."""
    return METRIC_NAMES.get(metric.removeprefix("lp_"), metric)


def set_tasks(set_cfg: SuiteSet, class_tasks: list[str]) -> list[str]:
    return list(set_cfg.tasks) if set_cfg.tasks is not None else list(class_tasks)


def plan_cells(name: str, set_cfg: SuiteSet, tasks: Sequence[str], captioned: bool,
               options: SuiteOptions) -> list[Cell]:
    """The cells of one set, in a fixed order (zero-shot, probe, k-shot per task group, then retrieval:
    only where ``captioned``, the source's captions being real ones)."""
    multilabel = bool(tasks) and all(benchmarks.is_finding(task) for task in tasks)
    groups = [(name, tuple(tasks), MULTILABEL)] if multilabel else [
        (name if len(tasks) == 1 else f"{name}/{task}", (task,), MULTICLASS) for task in tasks]
    if any(k < 1 for k in options.few_shot_ks):
        raise ValueError(f"few_shot_ks={options.few_shot_ks}: every k must be at least 1")
    cells = []
    for dataset, group, kind in groups:
        if set_cfg.zero_shot:
            cells.append(Cell(name, dataset, group, kind, "zero_shot"))
        if set_cfg.linear_probe:
            cells.append(Cell(name, dataset, group, kind, "linear_probe"))
        if set_cfg.few_shot:
            cells += [Cell(name, dataset, group, kind, "few_shot", k) for k in options.few_shot_ks]
    if set_cfg.retrieval and captioned:
        cells.append(Cell(name, name, (), RETRIEVAL, "retrieval"))
    return cells


def fingerprint(*parts: Any) -> str:
    """A short digest of what a cell's numbers depend on besides the model (the set's config, the options)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def set_fingerprint(set_cfg: SuiteSet, options: SuiteOptions, eval_cfg: EvalConfig) -> str:
    probe = {key: value for key, value in asdict(eval_cfg).items() if key not in ("tasks", "batch_size", "workers",
                                                                                  "every_epochs", "split")}
    return fingerprint(asdict(set_cfg), asdict(options), probe)


# ---------------------------------------------------------------------------------------------
# Scoring


ClassWeights = Callable[[str, list[str]], np.ndarray]  # (task, classes) -> (D, C) zero-shot class embeddings


@dataclass
class SetEmbeddings:
    held_out: Embedded
    train: Optional[Embedded]


def class_list(task: str, data: SetEmbeddings) -> list[str]:
    """A benchmark set's task: all its published classes; any other (the taxonomy's): those seen in training.
    Sorted, as the evaluator's (scikit-learn's one-vs-rest AUROC needs its labels in order)."""
    if task in benchmarks.TASKS:
        return sorted(benchmarks.TASKS[task].ids)
    return task_labels(data.train.labels[task] if data.train is not None else data.held_out.labels[task])


def take(embedded: Embedded, rows: np.ndarray) -> Embedded:
    """The rows ``rows`` of ``embedded``."""
    pick = [int(row) for row in rows]
    return Embedded(ids=[embedded.ids[row] for row in pick], image=embedded.image[pick], text=embedded.text[pick],
                    texts=[embedded.texts[row] for row in pick],
                    labels={task: [values[row] for row in pick] for task, values in embedded.labels.items()},
                    groups=[embedded.groups[row] for row in pick] if embedded.groups else [])


def few_shot_rows(labels: Sequence[str], classes: Sequence[str], k: int, seed: int) -> np.ndarray:
    """``k`` rows of each class (all of a class with fewer), drawn with ``seed``, in row order."""
    rng = np.random.default_rng(seed)
    values = np.asarray(labels, dtype=object)
    rows = [rng.choice(found, size=min(k, len(found)), replace=False)
            for label in classes if len(found := np.flatnonzero(values == label))]
    return np.sort(np.concatenate(rows)) if rows else np.zeros(0, dtype=np.int64)


def _labelled(held_out: Embedded, task: str, classes: list[str]) -> tuple[np.ndarray, list[str]]:
    keep = np.array([label in classes for label in held_out.labels[task]], dtype=bool)
    return keep, [label for label, kept in zip(held_out.labels[task], keep) if kept]


def multiclass_metrics(y_true: list[str], probs: np.ndarray, classes: list[str], prefix: str = "") -> dict[str, Any]:
    """CLIP_benchmark's names (acc1, acc5 — None below five classes —, mean_per_class_recall) and clip_med's others."""
    if not y_true:
        raise ValueError("no held-out image has one of the task's classes")
    found = classification_metrics(y_true, probs, classes)
    acc5 = top_k_accuracy(Predictions([], y_true, classes, probs), 5)
    return {f"{prefix}acc1": found["accuracy"], f"{prefix}acc5": acc5,
            f"{prefix}mean_per_class_recall": found["balanced_accuracy"], f"{prefix}macro_f1": found["macro_f1"],
            f"{prefix}auroc": found["auroc"], "n": found["n"]}


def binary_metrics(y_true: list[str], positive_scores: np.ndarray) -> tuple[float | None, float | None]:
    """(AUROC, average precision) of one finding; None when the held-out images hold one value only."""
    truth = np.asarray([label == POSITIVE for label in y_true])
    if truth.all() or not truth.any():
        return None, None
    return float(roc_auc_score(truth, positive_scores)), float(average_precision_score(truth, positive_scores))


def multilabel_metrics(per_finding: dict[str, tuple[list[str], np.ndarray]], prefix: str = "") -> dict[str, Any]:
    """Per finding AUROC and average precision, and their means over the findings where they are defined."""
    metrics: dict[str, Any] = {}
    aurocs, precisions = [], []
    for finding, (y_true, scores) in per_finding.items():
        auroc, precision = binary_metrics(y_true, scores)
        metrics[f"{prefix}auroc/{finding}"] = auroc
        metrics[f"n/{finding}"] = len(y_true)
        if auroc is not None and precision is not None:
            aurocs.append(auroc)
            precisions.append(precision)
    if not aurocs:
        raise ValueError("no finding has both positive and negative held-out images")
    return {f"{prefix}auroc": float(np.mean(aurocs)), f"{prefix}mean_average_precision": float(np.mean(precisions)),
            "findings_scored": len(aurocs), **metrics}


def _zero_shot(cell: Cell, data: SetEmbeddings, weights: ClassWeights) -> dict[str, Any]:
    if cell.kind == MULTILABEL:
        scored = {}
        for finding in cell.tasks:
            keep, y_true = _labelled(data.held_out, finding, [NEGATIVE, POSITIVE])
            probs = zero_shot_probabilities(data.held_out.image[keep], weights(finding, [NEGATIVE, POSITIVE]))
            scored[finding] = (y_true, probs[:, 1])
        return multilabel_metrics(scored)
    task = cell.tasks[0]
    classes = class_list(task, data)
    keep, y_true = _labelled(data.held_out, task, classes)
    probs = zero_shot_probabilities(data.held_out.image[keep], weights(task, classes))
    return multiclass_metrics(y_true, probs, classes)


def _chosen_by(runs: list[ProbeRun]) -> str:
    """How ``C`` was set: by cross-validation, or fixed (one value in the grid, or too few images per class)."""
    return "cross-validation" if all(run.fitted.cv_balanced_accuracy is not None for run in runs) else "fixed"


def _probe(cell: Cell, train: Embedded, held_out: Embedded, eval_cfg: EvalConfig) -> dict[str, Any]:
    """The linear probe of one cell fitted on ``train`` (the whole split or a k-shot sample)."""
    def fit(task: str, classes: list[str]) -> ProbeRun:
        return run_linear_probe(task, classes, train, held_out, Cs=eval_cfg.probe_Cs, folds=eval_cfg.probe_folds,
                                max_iter=eval_cfg.probe_max_iter)

    if cell.kind == MULTILABEL:
        scored, runs = {}, {}
        for finding in cell.tasks:
            _, y_true = _labelled(held_out, finding, [NEGATIVE, POSITIVE])
            try:
                runs[finding] = fit(finding, [NEGATIVE, POSITIVE])
            except ValueError as exc:  # one value only among the training images of this finding
                log.warning("%s: %s probe not fitted (%s)", cell.dataset, finding, exc)
                continue
            scored[finding] = (y_true, runs[finding].probs[:, 1])
        return {**multilabel_metrics(scored, "lp_"), "n_train": len(train),
                "C_chosen_by": _chosen_by(list(runs.values())),
                **{f"C/{finding}": run.fitted.C for finding, run in runs.items()}}
    task = cell.tasks[0]
    classes = class_list(task, SetEmbeddings(held_out, train))
    run = fit(task, classes)
    _, y_true = _labelled(held_out, task, classes)
    return {**multiclass_metrics(y_true, run.probs, classes, "lp_"), "C": run.fitted.C,
            "C_chosen_by": _chosen_by([run]), "n_train": run.metrics["n_train"]}


def _few_shot(cell: Cell, train: Embedded, held_out: Embedded, eval_cfg: EvalConfig,
              options: SuiteOptions) -> dict[str, Any]:
    runs = []
    for seed in range(options.few_shot_seeds):
        if cell.kind == MULTILABEL:  # k positives and k negatives of every finding
            rows = np.unique(np.concatenate([few_shot_rows(train.labels[finding], [NEGATIVE, POSITIVE], cell.k, seed)
                                             for finding in cell.tasks]))
        else:
            task = cell.tasks[0]
            rows = few_shot_rows(train.labels[task], class_list(task, SetEmbeddings(held_out, train)), cell.k, seed)
        runs.append(_probe(cell, take(train, rows), held_out, eval_cfg))
    return average_runs(runs, list(range(options.few_shot_seeds)))


PER_SEED = ("C", "C_chosen_by")  # kept as one value per seed: a mean regularisation strength means nothing


def average_runs(runs: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """The mean of each numeric metric over the runs, its standard deviation as ``<name>_std``; ``C`` (and how
    it was chosen) as the list of each run's."""
    metrics: dict[str, Any] = {"seeds": seeds}
    for key in runs[0]:
        values = [run.get(key) for run in runs]
        if key.split("/")[0] in PER_SEED:
            metrics[key] = values
            continue
        numbers = [float(value) for value in values if isinstance(value, int | float) and not isinstance(value, bool)]
        if all(value is None for value in values):
            metrics[key] = None  # e.g. acc5 below five classes
        elif len(numbers) == len(values):
            metrics[key] = float(np.mean(numbers))
            if key.startswith("lp_") and "/" not in key:
                metrics[f"{key}_std"] = float(np.std(numbers))
    return metrics


def _retrieval(data: SetEmbeddings, eval_cfg: EvalConfig) -> dict[str, Any]:
    found = retrieval_metrics(data.held_out.image, data.held_out.text, eval_cfg.recall_ks)
    metrics: dict[str, Any] = {}
    for direction, prefix in (("text_to_image", "image_retrieval_recall@"),
                              ("image_to_text", "text_retrieval_recall@")):
        metrics.update({prefix + key[2:]: value for key, value in found[direction].items() if key.startswith("R@")})
    metrics["mean_recall"] = float(np.mean([value for key, value in metrics.items() if "recall@" in key]))
    metrics["n"] = found["n"]
    return metrics


def compute_cell(cell: Cell, data: SetEmbeddings, weights: ClassWeights, eval_cfg: EvalConfig,
                 options: SuiteOptions) -> dict[str, Any]:
    """The metrics of one cell. Raises ValueError when the data cannot give them (no training split, one class)."""
    if cell.method == "zero_shot":
        return _zero_shot(cell, data, weights)
    if cell.method == "retrieval":
        return _retrieval(data, eval_cfg)
    if data.train is None:
        raise ValueError("the set has no training split: no probe")
    if cell.method == "linear_probe":
        return _probe(cell, data.train, data.held_out, eval_cfg)
    return _few_shot(cell, data.train, data.held_out, eval_cfg, options)


def cell_record(cell: Cell, metrics: dict[str, Any], model: str, pretrained: str, extra: dict[str, Any]
                ) -> dict[str, Any]:
    """One CLIP_benchmark result, with the cell's clip_med details (``extra``: suite, modality, fingerprint...)."""
    record: dict[str, Any] = {"dataset": cell.dataset, "model": model, "pretrained": pretrained,
                              "task": cell.benchmark_task, "metrics": metrics, "language": "en"}
    if cell.benchmark_task == "linear_probe":
        record["fewshot_k"] = cell.k
    record["clip_med"] = {"set": cell.set, "method": cell.method, "family": cell.family, "kind": cell.kind,
                          "tasks": list(cell.tasks), "main_metric": cell.main_metric,
                          "headline_metrics": cell.headline_metrics, **extra}
    return record
