"""Zero-shot classification with prompt ensembles (open_clip's classifier builder).

Prompt templates are filled by :mod:`clip_med.core.templates` (plain ``{}`` / ``{task}`` fields,
never ``str.format``), and the builder refuses, before any tokenizing or encoding, labels,
templates and prompt ensembles over the limits below: what one classifier costs is bounded by
``MAX_PROMPTS`` texts of at most ``MAX_PROMPT_CHARS`` characters.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Optional

import numpy as np
import torch
from open_clip import build_zero_shot_classifier
from scipy.special import softmax

from clip_med.core.errors import UnknownName
from clip_med.core.templates import MAX_TEMPLATE_CHARS, fill_template, template_fields
from clip_med.labels import taxonomy
from clip_med.labels.benchmarks import find_task

# The temperature CLIP applies to cosine similarities before the softmax.
ZERO_SHOT_LOGIT_SCALE = 100.0
# The library's limits on one zero-shot classifier (the service has tighter ones, ServiceLimits).
MAX_LABELS = 10_000  # classes
MAX_LABEL_CHARS = 300  # characters of one class label (or class name)
MAX_TEMPLATES = 1_000  # prompt templates
MAX_TEMPLATE_LENGTH = MAX_TEMPLATE_CHARS  # characters of one template (clip_med.core.templates' limit)
MAX_PROMPT_CHARS = 2_000  # characters of one prompt text (a filled template, or one given explicitly)
MAX_PROMPTS = 100_000  # prompt texts encoded for one classifier, all classes together
CLASSES_PER_BATCH = 10  # classes encoded together (open_clip's default)


# How the default prompts are phrased: "plain", the taxonomy's short templates with its label names
# (what clip_med's own training captions say); "medical", the phrasing of medical captions ("a CT
# scan of the brain.", "an axial MRI of the abdomen."), for models pretrained elsewhere.
PROMPT_STYLES = ("plain", "medical")


def prompt_style_for(style: str | None, pretrained: bool) -> str:
    """The prompt style: the one configured, else "medical" for a model that started from weights trained
    elsewhere (a pretrained tag, a hub model) and "plain" for one clip_med trained from scratch."""
    if style is not None and style not in PROMPT_STYLES:
        raise UnknownName(f"unknown prompt style {style!r}; known: {', '.join(PROMPT_STYLES)}")
    return style or ("medical" if pretrained else "plain")


class PromptLimit(ValueError):
    """Labels or prompts over a size limit (the service answers 413)."""


def check_labels(labels: Sequence[str], max_labels: int = MAX_LABELS, max_chars: int = MAX_LABEL_CHARS) -> None:
    """Refuse more than ``max_labels`` labels, or one longer than ``max_chars`` characters."""
    if len(labels) > max_labels:
        raise PromptLimit(f"{len(labels)} labels exceed the limit of {max_labels} labels")
    for position, label in enumerate(labels):
        if isinstance(label, str) and len(label) > max_chars:
            raise PromptLimit(f"label {position} ({label[:40]!r}...) has {len(label)} characters, more than the "
                              f"limit of {max_chars} characters per label")


def check_templates(templates: Sequence[str], max_templates: int = MAX_TEMPLATES,
                    max_chars: int = MAX_TEMPLATE_LENGTH) -> None:
    """Refuse too many or too long templates, and any that is not a plain ``{}`` / ``{name}`` template."""
    if len(templates) > max_templates:
        raise PromptLimit(f"{len(templates)} prompt templates exceed the limit of {max_templates} templates")
    for position, template in enumerate(templates):
        if not isinstance(template, str):
            raise ValueError(f"prompt template {position} is not a string: {template!r}")
        if len(template) > max_chars:
            raise PromptLimit(f"prompt template {position} has {len(template)} characters, more than the limit "
                              f"of {max_chars} characters per template")
        template_fields(template)  # TemplateError for format specs, conversions, attributes, stray braces


def check_prompts(prompts: Mapping[str, Sequence[str]], max_prompts: int = MAX_PROMPTS,
                  max_chars: int = MAX_PROMPT_CHARS) -> None:
    """Refuse a prompt ensemble over the limits (labels, prompt length, prompts in all), or an empty list."""
    check_labels(list(prompts))
    total = 0
    for label, texts in prompts.items():
        if isinstance(texts, str) or not texts or not all(isinstance(text, str) for text in texts):
            raise ValueError(f"label {label[:40]!r} needs a non-empty list of prompt strings, got {texts!r:.80}")
        total += len(texts)
        if total > max_prompts:
            raise PromptLimit(f"the prompt ensemble holds more than the limit of {max_prompts} prompts in all")
        for text in texts:
            if len(text) > max_chars:
                raise PromptLimit(f"a prompt of label {label[:40]!r} has {len(text)} characters, more than the "
                                  f"limit of {max_chars} characters per prompt")


def label_prompts(task: str, labels: list[str], templates: list[str] | None = None,
                  prompts: dict[str, list[str]] | None = None, context: dict[str, list[str]] | None = None,
                  synonyms: bool = True, max_prompts: int = MAX_PROMPTS,
                  style: str | None = None) -> dict[str, list[str]]:
    """The prompt ensemble per label: explicit ``prompts`` win, else label names x templates.

    A template holds ``{}`` for the class name and may name another task, as in
    ``"{modality} image of the {}."``: that placeholder is filled with every label of the other
    task in ``context`` (task -> label ids, e.g. the labels seen in training; default: the whole
    taxonomy), and the ensemble averages over them. ``synonyms=False`` uses only each label's
    display name, the word clip_med's training templates write: a model trained from scratch has
    never seen the other names. Labels of a task outside the taxonomy and the benchmark sets are
    used as their own name. ``style="medical"`` (without ``templates``) uses the task's medical
    templates, filled with the labels' phrases ("a CT scan of the brain."); ``None`` is "plain".

    Templates are filled by :func:`clip_med.core.templates.fill_template` (no format specs, no
    conversions, no attribute or index lookups). Labels and templates over the module's limits, and
    an ensemble of more than ``max_prompts`` texts, are refused (:class:`PromptLimit`) before any
    text is filled.
    """
    check_labels(labels)
    if prompts:
        missing = [label for label in labels if not prompts.get(label)]
        if missing:
            raise ValueError(f"no prompts given for label(s) {missing}")
        result = {label: list(prompts[label]) for label in labels}
        check_prompts(result, max_prompts)
        return result
    task_def = find_task(task)  # the taxonomy's, or a benchmark set's (clip_med.labels.benchmarks)
    medical = prompt_style_for(style, False) == "medical" and not templates and task_def is not None \
        and bool(task_def.medical_templates)
    if medical:
        assert task_def is not None  # medical needs the task's own templates
        templates = list(task_def.medical_templates)
    templates = list(templates or (task_def.prompt_templates if task_def else ("a medical image of {}.",)))
    check_templates(templates)
    context = context or {}
    options = [_context_options(template, context, synonyms, medical) for template in templates]
    per_name = sum(math.prod(len(choices) for choices in fields) for fields in options)
    names = {label: _names(task, label, synonyms, medical) for label in labels}
    count = per_name * sum(len(values) for values in names.values())
    if count > max_prompts:
        raise PromptLimit(f"{len(labels)} labels x {len(templates)} templates make {count} prompts (with the class "
                          f"names and the other tasks' labels they name), more than the limit of {max_prompts}")
    result = {}
    for label in labels:
        filled = [text for template, fields in zip(templates, options) for name in names[label]
                  for text in _fill(template, name, fields)]
        result[label] = list(dict.fromkeys(filled))
    return result


def _names(task: str, label: str, synonyms: bool, phrases: bool = False) -> tuple[str, ...]:
    task_def = find_task(task)  # the taxonomy's, or a benchmark set's (clip_med.labels.benchmarks)
    if task_def is None or label not in task_def.ids:
        return (label.replace("_", " "),)
    found = task_def.label(label)
    names = found.phrases if phrases and found.phrases else found.names
    return names if synonyms else names[:1]


def _context_options(template: str, context: dict[str, list[str]], synonyms: bool,
                     phrases: bool = False) -> list[list[tuple[str, str]]]:
    """Per distinct named field of ``template`` (another task), its (field, label name) choices."""
    fields = list(dict.fromkeys(field for field in template_fields(template) if field))
    for field in fields:
        if field not in taxonomy.TASKS:
            raise UnknownName(f"prompt template {template[:80]!r} names {{{field}}}; only {{}} and task names "
                              f"({', '.join('{' + t + '}' for t in taxonomy.TASKS)}) can be used")
    return [[(field, other) for label in (context.get(field) or taxonomy.TASKS[field].ids) if label != "unknown"
             for other in _names(field, label, synonyms, phrases)] for field in fields]


def _fill(template: str, name: str, options: list[list[tuple[str, str]]]) -> list[str]:
    return [fill_template(template, {"": name, **dict(combination)}, max_chars=MAX_PROMPT_CHARS)
            for combination in itertools.product(*options)]


class _Pretokenized:
    """A tokenizer answering open_clip's builder from tokens computed beforehand, so that the
    model's lock (if any) is held only while the model encodes."""

    def __init__(self, tokenizer: Callable, batches: list[list[str]]):
        self._tokens = {tuple(texts): tokenizer(texts) for texts in batches}

    def __call__(self, texts: Sequence[str]) -> Any:
        return self._tokens[tuple(texts)]


@torch.no_grad()
def zero_shot_weights(model: torch.nn.Module, tokenizer: Callable, prompts: dict[str, list[str]],
                      device: torch.device | str = "cpu", lock: Optional[AbstractContextManager] = None,
                      max_prompts: int = MAX_PROMPTS) -> np.ndarray:
    """(D, C) class embeddings: each the normalised mean of the embeddings of its own prompts.

    Whatever the lengths of the prompt lists: the classes are grouped by the length of theirs and
    each group goes through open_clip's ``build_zero_shot_classifier`` (which needs one length per
    call), so no list is padded or cycled. The ensemble is checked against the limits
    (:func:`check_prompts`) and tokenized before ``lock`` (e.g. the model's) is taken; under it the
    model only encodes.
    """
    check_prompts(prompts, max_prompts)
    labels = list(prompts)
    if not labels:
        raise ValueError("zero-shot classification needs at least one label")
    groups: dict[int, list[str]] = {}
    for label in labels:
        groups.setdefault(len(prompts[label]), []).append(label)
    batches = [[text for label in group[start:start + CLASSES_PER_BATCH] for text in prompts[label]]
               for group in groups.values() for start in range(0, len(group), CLASSES_PER_BATCH)]
    tokenized = _Pretokenized(tokenizer, batches)
    columns: dict[str, torch.Tensor] = {}
    with lock if lock is not None else contextlib.nullcontext():
        was_training = model.training
        model.eval()
        try:
            for width, group in groups.items():
                templates = [lambda label, k=k: prompts[label][k] for k in range(width)]
                weights = build_zero_shot_classifier(model, tokenized, group, templates,
                                                     num_classes_per_batch=CLASSES_PER_BATCH, device=device)
                columns.update(zip(group, weights.T))
        finally:
            model.train(was_training)
    return torch.stack([columns[label] for label in labels], dim=1).float().cpu().numpy()


def zero_shot_probabilities(image_embeddings: np.ndarray, weights: np.ndarray,
                            logit_scale: float = ZERO_SHOT_LOGIT_SCALE) -> np.ndarray:
    return softmax(logit_scale * image_embeddings @ weights, axis=1)
