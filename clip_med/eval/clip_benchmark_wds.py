"""CLIP_benchmark both ways: write any clip_med evaluation set in CLIP_benchmark's custom webdataset
layout, and evaluate such a folder (written by clip_med or anyone) with its own class names and prompts.

Writing (:func:`write_clip_benchmark_wds`) one split of a shard set, for one task::

    <out>/classnames.txt                          the classes' display names, in class order
    <out>/zeroshot_classification_templates.txt   the task's plain templates, "{}" written "{c}"
    <out>/zeroshot_classification_templates.json  {"wds/<name>": {class name: [its prompts]}, "<name>": ...}
    <out>/dataset_type.txt                        classification
    <out>/<cb_split>/nshards.txt, 0.tar ...       per sample: the image (its own bytes), cls, txt
    <out>/retrieval/dataset_type.txt              retrieval: the same tars (hard links), read as
    <out>/retrieval/<cb_split>/...                image-caption pairs
    <out>/clip_med.json                           task, label ids, source split, counts

CLIP_benchmark fills one template list for every class (``template.format(c=classname)``), so
clip_med's prompt ensemble — the task's templates times each class's names (synonyms), whose
lists differ in length from class to class — goes in the JSON: CLIP_benchmark's
``zero_shot_classifier`` takes ``templates`` as a dict of class name -> prompts (CuPL-style
class-specific prompts), and its CLI loads that dict with ``--custom_template_file``. The
``.txt`` templates alone give the same prompts only when ``clip_med.json`` says
``"templates_exact": true`` (no synonyms and no templates naming another task).

Only samples whose label is one of the classes are written (as clip_med's zero-shot
evaluation scores only those); captions are written on one line (CLIP_benchmark splits ``txt``
into captions at line breaks).

Reading: :func:`clip_benchmark_prompts` gives a folder's classes and per-class prompts (the
JSON's dict or list, else the ``.txt`` templates; ``{c}`` becomes ``{}`` and is filled by
:func:`clip_med.core.templates.fill_template`, any other field is refused), and
:func:`evaluate_clip_benchmark_wds` evaluates a loaded model on the folder: its images are
sharded by the ``clip_benchmark`` source (:mod:`clip_med.data.sources.clip_benchmark`: only
image, ``cls`` and ``txt`` members, nothing unpickled) and read by clip_med's own pipeline.

``python -m clip_med.eval.clip_benchmark_wds write ...`` writes a set; ``python -m
clip_med.eval.clip_benchmark_wds clip_benchmark eval ...`` runs CLIP_benchmark's own command
with :func:`patch_clip_benchmark_accuracy` applied (CLIP_benchmark 1.6.2 fails under NumPy 2).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import webdataset as wds
from PIL import Image

from clip_med.core.io import AtomicFile, write_text_atomic
from clip_med.core.templates import TemplateError, fill_template, template_fields
from clip_med.data import pipeline
from clip_med.data.shardset import ShardSet, open_shard_set
from clip_med.data.sources import read_source
from clip_med.data.sources.clip_benchmark import (
    CLASSNAMES_FILE,
    CLIP_MED_INFO_FILE,
    DATASET_TYPE_FILE,
    NSHARDS_FILE,
    TEMPLATES_FILE,
    ClipBenchmarkSourceConfig,
    folder_labels,
    read_classnames,
    read_clip_med_info,
    read_lines,
    read_text_file,
)
from clip_med.data.writer import ShardConfig, write_shards
from clip_med.eval.clip_benchmark import top_k_accuracy
from clip_med.eval.datasets import eval_shard_config, eval_shard_dir
from clip_med.eval.embeddings import embed_split
from clip_med.eval.evaluator import Predictions, task_labels
from clip_med.eval.metrics import classification_metrics
from clip_med.eval.retrieval import retrieval_metrics
from clip_med.eval.zero_shot import (
    MAX_PROMPT_CHARS,
    check_prompts,
    label_prompts,
    zero_shot_probabilities,
    zero_shot_weights,
)
from clip_med.labels import taxonomy

log = logging.getLogger(__name__)

TEMPLATES_JSON = "zeroshot_classification_templates.json"
RETRIEVAL_DIR = "retrieval"
FALLBACK_TEMPLATE = "a medical image of {}."
_FIELD_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")
_LINE_BREAKS = re.compile(r"[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]+")  # what str.splitlines splits at


# ---------------------------------------------------------------------------------------------
# Templates: clip_med's "{}" and CLIP_benchmark's "{c}"


def to_clip_benchmark_template(template: str) -> str:
    """A clip_med template with only ``{}`` fields, written as CLIP_benchmark's ``{c}``."""
    if any(field for field in template_fields(template)):
        raise TemplateError(f"template {template[:80]!r} names another task: CLIP_benchmark templates have only {{c}}")
    return _FIELD_TOKEN.sub(lambda match: "{c}" if match.group(1) is not None else match.group(0), template)


def from_clip_benchmark_template(template: str) -> str:
    """A CLIP_benchmark template (``{c}`` = the class name) as a clip_med ``{}`` template; other fields are refused."""

    def replace(match: re.Match) -> str:
        if match.group(1) is None:
            return match.group(0)  # {{ or }}
        if match.group(1) != "c":
            raise TemplateError(f"CLIP_benchmark template {template[:80]!r} has the field {{{match.group(1)[:40]}}}: "
                                "only {c} (the class name) is allowed")
        return "{}"

    converted = _FIELD_TOKEN.sub(replace, template)
    template_fields(converted)  # refuses stray braces and over-long templates
    return converted


def fill_clip_benchmark_templates(templates: Sequence[str], classname: str) -> list[str]:
    return [fill_template(from_clip_benchmark_template(t), {"": classname}, max_chars=MAX_PROMPT_CHARS)
            for t in templates]


def class_names(task: str, labels: Sequence[str]) -> list[str]:
    """Each label's display name (taxonomy), its id when names would collide; one line each."""
    task_def = taxonomy.TASKS.get(task)
    names = [task_def.label(label).names[0] if task_def and label in task_def.ids else label.replace("_", " ")
             for label in labels]
    if len(set(names)) != len(names):
        names = list(labels)
    for name in names:
        if not name.strip() or _LINE_BREAKS.search(name) or name != name.strip():
            raise ValueError(f"class name {name!r} cannot be a line of classnames.txt")
    return names


# ---------------------------------------------------------------------------------------------
# Writing


def _clip_med_samples(urls: Sequence[str]):
    """A clip_med split through the shard pipeline: raw image bytes, decoded txt and json (nothing else read)."""
    errors = pipeline.ShardErrorCounter()
    sample_errors = pipeline.ErrorCounter(shard_errors=False)
    members = [*pipeline.IMAGE_EXTENSIONS, "txt", "json"]
    stream = wds.DataPipeline(*pipeline.open_shards(list(urls), errors), pipeline.read_tar(errors, members),
                              pipeline.decode(["txt", "json"], sample_errors))
    yield from stream
    if errors.counts or sample_errors.counts:
        log.warning("reading the shards: %s", dict(errors.counts + sample_errors.counts))


def _image_member(sample: dict[str, Any]) -> tuple[str, bytes]:
    for ext in pipeline.IMAGE_EXTENSIONS:
        if ext in sample:
            if ext in ("png", "jpg", "jpeg", "webp"):
                return ext, sample[ext]
            buffer = io.BytesIO()  # tif: CLIP_benchmark reads webp, png, jpg and jpeg only; png is lossless
            with Image.open(io.BytesIO(sample[ext])) as image:
                image.save(buffer, format="png")
            return "png", buffer.getvalue()
    raise ValueError(f"sample {sample.get('__key__')} has no image")


def _link_or_copy(source: Path, target: Path) -> None:
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def write_clip_benchmark_wds(shard_set: ShardSet | str | Path, split: str, task: str, out: str | Path, *,
                             name: Optional[str] = None, classes: Optional[Sequence[str]] = None,
                             train_split: Optional[str] = None, templates: Optional[Sequence[str]] = None,
                             prompts: Optional[dict[str, list[str]]] = None, synonyms: bool = True,
                             cb_split: str = "test", max_samples: int = 10_000) -> dict[str, Any]:
    """Write ``split`` of ``shard_set`` (a :class:`ShardSet` or its folder) for ``task`` in CLIP_benchmark's layout.

    ``classes``: the label ids, in class order (default: the labels of ``train_split`` when given,
    else of ``split``; sorted, ``unknown`` left out: what ``python -m clip_med.evaluate`` scores).
    Prompts: ``prompts`` (label -> texts) as given, else :func:`clip_med.eval.zero_shot.label_prompts`
    with ``templates`` (default: the task's) and ``synonyms``, the other tasks' labels of the
    split as context, as the evaluator builds them. Returns what ``clip_med.json`` holds.
    """
    shards = shard_set if isinstance(shard_set, ShardSet) else open_shard_set(shard_set)
    out = Path(out)
    name = name or out.name
    counts = shards.manifest(train_split or split).label_counts
    classes = list(classes) if classes else task_labels(list(counts.get(task, {})))
    if len(classes) < 2:
        raise ValueError(f"task {task!r} has fewer than two classes in {train_split or split}: {classes}")
    names = class_names(task, classes)
    task_def = taxonomy.TASKS.get(task)
    templates = list(templates or (task_def.prompt_templates if task_def else (FALLBACK_TEMPLATE,)))
    if prompts is None:
        context = {other: task_labels(list(values)) for other, values in counts.items() if other != task}
        prompts = label_prompts(task, classes, templates, context=context, synonyms=synonyms)
    else:
        prompts = label_prompts(task, classes, prompts=prompts)
    per_class = {classname: list(prompts[label]) for classname, label in zip(names, classes)}
    plain = [to_clip_benchmark_template(t) for t in templates if not any(template_fields(t))]
    txt_templates = plain or [to_clip_benchmark_template(FALLBACK_TEMPLATE)]
    exact = all(per_class[classname] == fill_clip_benchmark_templates(txt_templates, classname)
                for classname in names)
    for template in txt_templates:
        if _LINE_BREAKS.search(template) or template != template.strip():
            raise ValueError(f"template {template!r} cannot be a line of {TEMPLATES_FILE}")

    split_dir = out / cb_split
    split_dir.mkdir(parents=True, exist_ok=True)
    for stale in split_dir.glob("*.tar"):
        stale.unlink()
    index = {label: position for position, label in enumerate(classes)}
    skipped: Counter = Counter()
    written, joined, shard_count = 0, 0, 0
    writer: Optional[wds.TarWriter] = None
    handle: Optional[AtomicFile] = None
    for sample in _clip_med_samples(shards.urls(split)):
        label = ((sample.get("json") or {}).get("labels") or {}).get(task, taxonomy.UNKNOWN)
        if label not in index:
            skipped["label_not_a_class"] += 1
            continue
        ext, data = _image_member(sample)
        text = sample.get("txt") or ""
        one_line = " ".join(part for part in _LINE_BREAKS.split(text) if part)
        joined += one_line != text
        if writer is None or written % max_samples == 0 and written:
            if writer is not None and handle is not None:
                writer.close()
                handle.commit()
            handle = AtomicFile(split_dir / f"{shard_count}.tar", "wb")
            writer = wds.TarWriter(handle.file, encoder=False, mtime=0)
            shard_count += 1
        writer.write({"__key__": sample["__key__"], ext: data, "cls": str(index[label]).encode("ascii"),
                      "txt": one_line.encode("utf-8")})
        written += 1
    if writer is None or handle is None:
        raise ValueError(f"no sample of {split} has a {task} label among {classes}")
    writer.close()
    handle.commit()

    write_text_atomic(split_dir / NSHARDS_FILE, f"{shard_count}\n")
    write_text_atomic(out / CLASSNAMES_FILE, "".join(f"{classname}\n" for classname in names))
    write_text_atomic(out / TEMPLATES_FILE, "".join(f"{template}\n" for template in txt_templates))
    write_text_atomic(out / TEMPLATES_JSON, json.dumps({f"wds/{name}": per_class, name: per_class}, indent=1,
                                                      ensure_ascii=False) + "\n")
    write_text_atomic(out / DATASET_TYPE_FILE, "classification\n")
    retrieval_split = out / RETRIEVAL_DIR / cb_split
    retrieval_split.mkdir(parents=True, exist_ok=True)
    for stale in retrieval_split.glob("*.tar"):
        stale.unlink()
    for shard in range(shard_count):
        _link_or_copy(split_dir / f"{shard}.tar", retrieval_split / f"{shard}.tar")
    write_text_atomic(retrieval_split / NSHARDS_FILE, f"{shard_count}\n")
    write_text_atomic(out / RETRIEVAL_DIR / DATASET_TYPE_FILE, "retrieval\n")
    info = {"name": name, "dataset": f"wds/{name}", "task": task, "labels": classes, "classnames": names,
            "source": shards.source, "split": split, "clip_benchmark_split": cb_split, "n": written,
            "skipped": dict(skipped), "texts_joined_onto_one_line": joined, "templates_exact": exact,
            "prompts_per_class": {classname: len(texts) for classname, texts in per_class.items()}}
    write_text_atomic(out / CLIP_MED_INFO_FILE, json.dumps(info, indent=1, ensure_ascii=False) + "\n")
    log.info("wrote %d samples of %s/%s (%s) in CLIP_benchmark's layout to %s", written, shards.source, split,
             task, out)
    return info


# ---------------------------------------------------------------------------------------------
# Reading


def clip_benchmark_prompts(root: str | Path, name: Optional[str] = None,
                           template_file: Optional[str | Path] = None) -> tuple[list[str], dict[str, list[str]]]:
    """(class names, class name -> prompts) of a CLIP_benchmark folder, as CLIP_benchmark would use them.

    ``template_file`` (default: the folder's ``zeroshot_classification_templates.json`` when
    present) is a CLIP_benchmark custom template file: its entry for ``wds/<name>``, ``<name>``
    or ``imagenet1k`` (CLIP_benchmark's lookup order) is a dict of per-class prompts or a list of
    ``{c}`` templates. Without one, the folder's ``zeroshot_classification_templates.txt``.
    """
    root = Path(root)
    names = read_classnames(root)
    path = Path(template_file) if template_file else root / TEMPLATES_JSON
    entry: Any = None
    if template_file or path.is_file():
        data = json.loads(read_text_file(path, "template file"))
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a CLIP_benchmark template file is a JSON object (dataset -> templates)")
        name = name or read_clip_med_info(root).get("name") or (next(iter(data)) if len(data) == 1 else None)
        keys = [f"wds/{name}", str(name), "imagenet1k"] if name else ["imagenet1k"]
        entry = next((data[key] for key in keys if key in data), None)
        if entry is None:
            raise ValueError(f"{path} has no entry for any of {keys}")
    if entry is None:
        entry = read_lines(root / TEMPLATES_FILE, "templates")
    if isinstance(entry, dict):
        missing = [classname for classname in names if classname not in entry]
        if missing:
            raise ValueError(f"{path}: no prompts for the class(es) {missing[:5]}")
        prompts = {classname: entry[classname] for classname in names}
    elif isinstance(entry, list) and all(isinstance(t, str) for t in entry) and entry:
        prompts = {classname: fill_clip_benchmark_templates(entry, classname) for classname in names}
    else:
        raise ValueError(f"templates of {root} must be a non-empty list of strings or a dict of class -> prompts")
    check_prompts(prompts)
    return names, prompts


def evaluate_clip_benchmark_wds(model: Any, root: str | Path, *, split: str = "test", name: Optional[str] = None,
                                template_file: Optional[str | Path] = None, shards: Optional[ShardConfig] = None,
                                batch_size: int = 128, workers: int = 0, recall_ks: Sequence[int] = (1, 5, 10),
                                progress: bool = False) -> dict[str, Any]:
    """Zero-shot classification (the folder's classes and prompts) and retrieval (its captions) of a loaded
    model (:func:`clip_med.load`) on a CLIP_benchmark folder; metrics under CLIP_benchmark's names.

    The folder is sharded by the ``clip_benchmark`` source into ``<shards.root>/eval/...`` with the
    model's pixel options (as ``python -m clip_med.evaluate`` does), then embedded by clip_med.
    """
    root = Path(root)
    source = ClipBenchmarkSourceConfig(root=str(root), splits=[split])
    shard_cfg = eval_shard_config(shards or ShardConfig(), model.preprocessing.shard_options())
    out_dir = eval_shard_dir(source, shard_cfg)
    manifests = write_shards(read_source(source), out_dir, shard_cfg, source.name)
    shard_set = ShardSet(out_dir, manifests)
    task, labels = folder_labels(root)
    held_out = embed_split(model.model, shard_set.urls(split), model.transform, model.tokenizer, model.device,
                           batch_size=batch_size, workers=workers, precision=model.precision, tasks=[task],
                           progress=progress, description=f"embed {root.name}/{split}")
    result: dict[str, Any] = {"dataset": f"wds/{name or read_clip_med_info(root).get('name') or root.name}",
                              "split": split, "n": len(held_out), "shards": str(out_dir)}
    names, per_class = clip_benchmark_prompts(root, name, template_file)
    prompts = {label: per_class[classname] for label, classname in zip(labels, names)}
    weights = zero_shot_weights(model.model, model.tokenizer, prompts, model.device)
    keep = np.array([label in prompts for label in held_out.labels[task]], dtype=bool)
    if keep.any():
        y_true = [label for label, kept in zip(held_out.labels[task], keep) if kept]
        probs = zero_shot_probabilities(held_out.image[keep], weights)
        metrics = classification_metrics(y_true, probs, labels)
        found = Predictions([i for i, kept in zip(held_out.ids, keep) if kept], y_true, labels, probs)
        correct = int(round(metrics["accuracy"] * metrics["n"]))
        result["zeroshot_classification"] = {"acc1": metrics["accuracy"], "acc5": top_k_accuracy(found, 5),
                                             "mean_per_class_recall": metrics["balanced_accuracy"],
                                             "n": metrics["n"], "correct": correct, "task": task}
        result["predictions"] = found
    retrieval = retrieval_metrics(held_out.image, held_out.text, recall_ks)
    result["zeroshot_retrieval"] = {
        **{f"image_retrieval_recall@{k}": retrieval["text_to_image"][f"R@{k}"] for k in recall_ks},
        **{f"text_retrieval_recall@{k}": retrieval["image_to_text"][f"R@{k}"] for k in recall_ks}}
    return result


# ---------------------------------------------------------------------------------------------
# CLIP_benchmark itself


def patch_clip_benchmark_accuracy() -> None:
    """Make CLIP_benchmark's ``zeroshot_classification.accuracy`` run under NumPy 2, computing the same thing.

    CLIP_benchmark 1.6.2 converts a one-element array to ``float`` (``float(x.sum(0, keepdim=True)
    .cpu().numpy())``), which NumPy 2 refuses ("only 0-dimensional arrays can be converted");
    this is the same function with that element taken first (``[0]``). Idempotent.
    """
    from clip_benchmark.metrics import zeroshot_classification

    if getattr(zeroshot_classification.accuracy, "clip_med_numpy2", False):
        return

    def accuracy(output, target, topk=(1,)):
        pred = output.topk(max(topk), 1, True, True)[1].t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        n = len(target)
        return [float(correct[:k].reshape(-1).float().sum(0, keepdim=True).cpu().numpy()[0]) / n for k in topk]

    accuracy.clip_med_numpy2 = True  # type: ignore[attr-defined]
    zeroshot_classification.accuracy = accuracy


__all__ = ["clip_benchmark_prompts", "evaluate_clip_benchmark_wds", "patch_clip_benchmark_accuracy",
           "write_clip_benchmark_wds"]
