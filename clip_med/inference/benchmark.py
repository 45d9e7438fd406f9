"""``python -m clip_med.benchmark suite=<name> models=[...]``: several models on every data set of a suite.

For each model (anything :func:`clip_med.load` takes: a clip_med checkpoint, an export folder
``local-dir:<folder>``, a hub model ``hf-hub:<org>/<repo>``, or an open_clip architecture with its
pretrained tag, ``<architecture>@<tag>``) and each set of the suite (:mod:`clip_med.eval.suite`), the set is read by its
source and sharded with the model's pixel options (as ``evaluate`` does, into
``<shards.root>/eval/<source>-<hash>``, shared by models with the same options), its held-out
and training splits are embedded once, and every cell not yet on disk is scored and written at
once (atomically) as ``<out>/results/<model>/<cell>.json``. A rerun skips the cells whose file
exists and whose fingerprint (the set's config, the probe options, the model file's size and
time, and the size and time of the files at the top of the set's root: a replaced ``.npz`` or
``.h5`` file is scored again) still matches, without loading the model when nothing is left for
it; an interrupted run therefore resumes. At the end ``results.csv``, ``results.md`` and ``results.png`` summarise every
cell of this run's models and sets (:mod:`clip_med.eval.suite_report`).

A set that cannot be read (its root not set, a file missing) is reported, with the reason, in
the summary and by the command; the other sets go on.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from clip_med.core.bounds import check_bounds
from clip_med.core.errors import UnknownName
from clip_med.core.io import write_json_atomic
from clip_med.data.sources import SourceConfig, get_source
from clip_med.data.writer import ShardConfig
from clip_med.eval import suite as suite_eval
from clip_med.eval.datasets import EvalData, eval_shard_config, prepare_source
from clip_med.eval.evaluator import EvalConfig
from clip_med.eval.suite import Cell, SetEmbeddings, SuiteConfig, SuiteOptions, SuiteSet
from clip_med.eval.suite_report import write_summary
from clip_med.eval.zero_shot import label_prompts, zero_shot_weights
from clip_med.inference.evaluation import REQUIRED, embed_data_split
from clip_med.labels import taxonomy

log = logging.getLogger(__name__)

SET_ERRORS = (FileNotFoundError, NotADirectoryError, PermissionError, ValueError)


@dataclass
class BenchmarkConfig(SuiteOptions):
    # One model or a list: checkpoints, local-dir:<export>, hf-hub:<org>/<repo>, <architecture>@<pretrained tag>.
    models: Any = REQUIRED
    model_name: Optional[str] = None  # the open_clip architecture of plain state dicts
    device: str = "auto"
    suite: Any = None  # the suite (suite=<name>: conf/suite/<name>.yaml)
    sets: Optional[list[str]] = None  # only these sets of the suite (None: all)
    eval: EvalConfig = field(default_factory=EvalConfig)  # batch size, workers, probe grid, recall ks, prompts
    # Benchmark sets are scored as published: identical images are kept (dedup=false).
    shards: ShardConfig = field(default_factory=lambda: ShardConfig(dedup=False))
    pixels_from_checkpoint: bool = True  # shard each set with the model's own pixel options
    out: Optional[str] = None  # results folder (the Hydra entry point sets it)
    progress: bool = True


@dataclass
class BenchmarkRun:
    out: Path
    paths: dict[str, Path]
    computed: int = 0  # cells scored by this run
    reused: int = 0  # cells found on disk
    failed: int = 0  # cells the data could not give (written with their reason)
    problems: dict[str, str] = field(default_factory=dict)  # "<model> / <set>" -> why it was not evaluated


def model_list(models: Any) -> list[str]:
    values = [models] if isinstance(models, str) else list(models or [])
    if not values or any(not isinstance(value, str) or not value.strip() or value == REQUIRED for value in values):
        raise ValueError("give the models to compare: models=[run/checkpoints/step-1000.pt,export_dir,...]")
    if len(set(values)) != len(values):
        raise ValueError(f"models lists a model twice: {values}")
    return values


def model_labels(models: list[str]) -> dict[str, str]:
    """A short column name per model: ``<run>/<checkpoint>`` for a run's checkpoint, a path's name, else itself."""
    def short(model: str) -> str:
        path = Path(model)
        if path.parent.name == "checkpoints":
            return f"{path.parent.parent.name}/{path.stem}"
        return path.name if path.exists() else model

    labels = {model: short(model) for model in models}
    if len(set(labels.values())) != len(labels):
        return {model: model for model in models}
    return labels


def model_folder(label: str, model: str) -> str:
    """The model's folder under ``results/``: its label made safe, and a digest of the full model string."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("._")[:60] or "model"
    return f"{safe}-{hashlib.sha256(model.encode()).hexdigest()[:8]}"


MODEL_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def model_source(spec: str) -> tuple[str, Optional[str]]:
    """``(model, pretrained tag)``: ``<architecture>@<tag>`` names an open_clip model with its pretrained
    weights (``ViT-B-16@laion2b_s34b_b88k``); anything else is passed to :func:`clip_med.load` as it is."""
    if "@" in spec and not spec.startswith(("hf-hub:", "local-dir:")) and not Path(spec).expanduser().exists():
        name, _, tag = spec.rpartition("@")
        return name, tag or None
    return spec, None


def check_models(models: list[str]) -> None:
    """Refuse, before any work, a model file or export folder that is not there."""
    for spec in models:
        path = Path(spec.removeprefix("local-dir:")).expanduser()
        if (spec.startswith("local-dir:") or path.suffix in MODEL_FILE_SUFFIXES) and not path.exists():
            raise FileNotFoundError(f"model {spec}: {path} does not exist (models=[<checkpoint .pt>, "
                                    "local-dir:<export folder>, hf-hub:<org>/<repo>, <architecture>@<tag>])")


def file_states(path: Path) -> list[Any]:
    """Name, size and modification time of ``path`` (a file) or of the files directly in it (a folder)."""
    files = sorted(path.iterdir()) if path.is_dir() else [path] if path.is_file() else []
    return [(item.name, item.stat().st_size, item.stat().st_mtime_ns) for item in files if item.is_file()]


def model_state(spec: str) -> list[Any]:
    """What a model file (or an export folder's files) looks like on disk, so that a checkpoint written again
    at the same path is scored again; nothing for a hub or open_clip name."""
    return file_states(Path(spec.removeprefix("local-dir:")).expanduser())


def data_state(source: SourceConfig) -> list[Any]:
    """The files at the top of the set's root(s), so that a replaced array file (MedMNIST's ``.npz``, PCam's
    ``.h5``, a label CSV) has its cells scored again. Images deeper in a folder tree are not looked at here
    (the shard writer's own fingerprint reshards them)."""
    states = []
    for root in source.input_roots():
        try:
            states.append(file_states(Path(root).expanduser()))
        except OSError as exc:  # unreadable: the set is reported when it is read
            states.append([type(exc).__name__])
    return states


def source_config(name: str, options: dict[str, Any]) -> SourceConfig:
    """A suite set's ``source`` mapping as its source's config (unknown options and bad values refused)."""
    if not options.get("name"):
        raise ValueError(f"suite set {name!r} names no source: give source: {{name: <source>, ...}}")
    config_class = get_source(str(options["name"])).config_class
    known = {item.name for item in dataclasses.fields(config_class)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UnknownName(f"suite set {name!r}: source {options['name']} has no option(s) {unknown}; it has "
                          f"{', '.join(sorted(known))}")
    config = config_class(**options)
    check_bounds(config, f"suite.sets.{name}.source.")
    return config


_DATA_CLASSES: dict[type, type] = {}


def _data_class(config_class: type) -> type:
    """``config_class`` with the evaluation's split / train_split fields, as the ``data`` node has them."""
    if config_class not in _DATA_CLASSES:
        _DATA_CLASSES[config_class] = dataclasses.make_dataclass(
            f"{config_class.__name__}SuiteData", [("split", Optional[str], None),
                                                   ("train_split", Optional[str], "train")], bases=(config_class,))
    return _DATA_CLASSES[config_class]


def prepare_set(source: SourceConfig, set_cfg: SuiteSet, shards: ShardConfig) -> EvalData:
    values = {item.name: getattr(source, item.name) for item in dataclasses.fields(source)}
    data = _data_class(type(source))(**values, split=set_cfg.split, train_split=set_cfg.train_split)
    return prepare_source(data, shards)


def cell_path(out: Path, folder: str, cell: Cell) -> Path:
    return out / "results" / folder / cell.file_name


def finished(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """The cell's record when its file exists and was written for the same set and options."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    info = record.get("clip_med") if isinstance(record, dict) else None
    return record if isinstance(info, dict) and info.get("fingerprint") == fingerprint else None


class SetUnavailable(Exception):
    """A set whose data cannot be read or embedded: reported, and the other sets go on."""


class ModelUnavailable(Exception):
    """A model that cannot be loaded: the whole run stops (not one set), see :func:`run_benchmark`."""


@dataclass
class _Model:
    """The model of the current column, loaded on first need (not at all when its cells are all on disk)."""

    spec: str
    cfg: BenchmarkConfig
    loaded: Any = None

    def get(self) -> Any:
        if self.loaded is None:
            from clip_med.inference.model import load

            name, tag = model_source(self.spec)
            try:
                self.loaded = load(name, self.cfg.model_name, self.cfg.device, pretrained=tag)
            except (OSError, ValueError, RuntimeError) as exc:  # missing, not a model, weights of another shape
                raise ModelUnavailable(" ".join(str(exc).split())) from exc
        return self.loaded


def class_weights(model: Any, set_cfg: SuiteSet, eval_cfg: EvalConfig, data: SetEmbeddings,
                  tasks: list[str]) -> suite_eval.ClassWeights:
    """Zero-shot class embeddings per (task, classes), from the set's, the run's or the model's prompts."""
    synonyms = model.prompt_synonyms if eval_cfg.prompt_synonyms is None else eval_cfg.prompt_synonyms
    style = eval_cfg.prompt_style or model.prompt_style
    context = {other: suite_eval.class_list(other, data) for other in tasks if other in taxonomy.TASKS}

    @functools.cache
    def weights(task: str, classes: tuple[str, ...]) -> Any:
        templates = (set_cfg.prompt_templates.get(task) or eval_cfg.prompt_templates.get(task)
                     or model.prompt_templates.get(task))
        prompts = label_prompts(task, list(classes), templates, synonyms=synonyms, style=style,
                                context={other: labels for other, labels in context.items() if other != task})
        return zero_shot_weights(model.model, model.tokenizer, prompts, model.device)

    return lambda task, classes: weights(task, tuple(classes))


def _embed(model: Any, data: EvalData, cells: list[Cell], tasks: list[str], cfg: BenchmarkConfig) -> SetEmbeddings:
    eval_cfg = dataclasses.replace(cfg.eval, tasks=list(tasks))
    held_out = embed_data_split(model, data, data.split, eval_cfg, cfg.progress)
    needs_train = any(cell.method in ("linear_probe", "few_shot") for cell in cells) or any(
        task in taxonomy.TASKS for task in tasks)  # taxonomy tasks take their classes from the training split
    train = embed_data_split(model, data, data.train_split, eval_cfg, cfg.progress) \
        if needs_train and data.train_split else None
    return SetEmbeddings(held_out, train)


def set_notes(source: SourceConfig) -> list[str]:
    """What a reader of the set's numbers must know about its split."""
    notes = [source.split_caveat] if source.split_caveat else []
    holdout = getattr(source, "holdout", 0) or 0
    if holdout > 0 and not source.split_caveat:
        notes.append(f"no published split: {getattr(source, 'holdout_split', '?')} is a seeded hash holdout of "
                     f"{holdout:g} of the groups (source.holdout_seed={getattr(source, 'holdout_seed', 0)})")
    return notes


@dataclass
class _SetPlan:
    """One set's cells for one model, and which of them are already on disk."""

    source: SourceConfig
    tasks: list[str]
    fingerprint: str
    records: dict[Cell, Optional[dict[str, Any]]]

    @property
    def missing(self) -> list[Cell]:
        return [cell for cell, record in self.records.items() if record is None]

    def done(self) -> list[dict[str, Any]]:
        return [record for record in self.records.values() if record is not None]


def _plan_set(model: _Model, name: str, set_cfg: SuiteSet, folder: str, cfg: BenchmarkConfig,
              out: Path) -> _SetPlan:
    source = source_config(name, set_cfg.source)  # a bad set config stops the run: it is the user's to fix
    tasks = suite_eval.set_tasks(set_cfg, source.class_tasks())
    cells = suite_eval.plan_cells(name, set_cfg, tasks, not source.captions_from_class_names, cfg)
    fingerprint = suite_eval.fingerprint(
        suite_eval.set_fingerprint(set_cfg, SuiteOptions(cfg.few_shot_ks, cfg.few_shot_seeds), cfg.eval),
        model_state(model.spec), data_state(source))
    return _SetPlan(source, tasks, fingerprint,
                    {cell: finished(cell_path(out, folder, cell), fingerprint) for cell in cells})


def _run_set(model: _Model, name: str, set_cfg: SuiteSet, folder: str, label: str, cfg: BenchmarkConfig,
             suite: SuiteConfig, run: BenchmarkRun) -> list[dict[str, Any]]:
    plan = _plan_set(model, name, set_cfg, folder, cfg, run.out)
    missing = plan.missing
    run.reused += len(plan.records) - len(missing)
    if not missing:
        return plan.done()
    log.info("%s / %s: %d of %d cells to score", label, name, len(missing), len(plan.records))
    loaded = model.get()
    pixels = loaded.preprocessing.shard_options() if cfg.pixels_from_checkpoint else None
    try:
        data = prepare_set(plan.source, set_cfg, eval_shard_config(cfg.shards, pixels))
        embedded = _embed(loaded, data, missing, plan.tasks, cfg)
    except SET_ERRORS as exc:
        raise SetUnavailable(" ".join(str(exc).split())) from exc
    weights = class_weights(loaded, set_cfg, cfg.eval, embedded, plan.tasks)
    extra = {"suite": suite.name, "modality": set_cfg.modality, "model_label": label,
             "fingerprint": plan.fingerprint, "source": plan.source.name, "split": data.split,
             "train_split": data.train_split, "n_images": len(embedded.held_out), "notes": set_notes(plan.source)}
    for cell in missing:
        plan.records[cell] = _score_cell(cell, embedded, weights, cfg, run, loaded.name, model.spec, extra,
                                         cell_path(run.out, folder, cell))
    return plan.done()


def _score_cell(cell: Cell, embedded: SetEmbeddings, weights: suite_eval.ClassWeights, cfg: BenchmarkConfig,
                run: BenchmarkRun, model_name: str, spec: str, extra: dict[str, Any], path: Path) -> dict[str, Any]:
    """Score one cell and write its record at once (with the reason when the data cannot give it)."""
    try:
        metrics, error = suite_eval.compute_cell(cell, embedded, weights, cfg.eval, cfg), None
        run.computed += 1
    except ValueError as exc:
        metrics, error = {}, str(exc)
        run.failed += 1
        log.warning("%s / %s: %s: %s", extra["model_label"], cell.dataset, cell.family, exc)
    record = suite_eval.cell_record(cell, metrics, model_name, spec, {**extra, **({"error": error} if error else {})})
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, record)
    return record


def chosen_sets(suite: Any, names: Optional[list[str]]) -> dict[str, SuiteSet]:
    if not isinstance(suite, SuiteConfig) or not suite.sets:
        raise ValueError("choose a suite with data sets: suite=<name> (conf/suite/<name>.yaml, or your own)")
    if names is None:
        return dict(suite.sets)
    if not names:
        raise ValueError(f"sets=[] chooses no set; leave sets out for all of suite {suite.name} "
                         f"({', '.join(suite.sets)})")
    unknown = [name for name in names if name not in suite.sets]
    if unknown:
        raise UnknownName(f"suite {suite.name} has no set(s) {unknown}; it has {', '.join(suite.sets)}")
    return {name: suite.sets[name] for name in names}


def run_benchmark(cfg: BenchmarkConfig) -> BenchmarkRun:
    models = model_list(cfg.models)
    check_models(models)
    sets = chosen_sets(cfg.suite, cfg.sets)
    labels = model_labels(models)
    out = Path(cfg.out or "runs/benchmark")
    run = BenchmarkRun(out, {})
    records: list[dict[str, Any]] = []
    for spec in models:
        model = _Model(spec, cfg)
        folder = model_folder(labels[spec], spec)
        for name, set_cfg in sets.items():
            try:
                records += _run_set(model, name, set_cfg, folder, labels[spec], cfg, cfg.suite, run)
            except ModelUnavailable as exc:
                raise ValueError(f"model {spec} cannot be loaded: {exc}") from exc
            except SetUnavailable as exc:
                run.problems[f"{labels[spec]} / {name}"] = str(exc)
                log.warning("%s / %s not evaluated: %s", labels[spec], name, exc)
        model.loaded = None  # one model in memory at a time
    if not records:
        raise ValueError("nothing was evaluated: " + "; ".join(f"{where}: {why}"
                                                               for where, why in run.problems.items()))
    pretrained = {labels[spec]: spec for spec in models}
    run.paths = write_summary(out, cfg.suite.name, records, [labels[spec] for spec in models], pretrained,
                              run.problems)
    log.info("benchmark: %d cells scored, %d reused, %d without a result; summary %s", run.computed, run.reused,
             run.failed, run.paths["md"])
    return run
