"""Zero-shot classification with prompt ensembles (open_clip's classifier builder)."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import torch
from open_clip import build_zero_shot_classifier
from scipy.special import softmax

from clip_med.core.errors import UnknownName
from clip_med.data.text import template_fields
from clip_med.labels import taxonomy

# The temperature CLIP applies to cosine similarities before the softmax.
ZERO_SHOT_LOGIT_SCALE = 100.0


def label_prompts(task: str, labels: list[str], templates: list[str] | None = None,
                  prompts: dict[str, list[str]] | None = None, context: dict[str, list[str]] | None = None,
                  synonyms: bool = True) -> dict[str, list[str]]:
    """The prompt ensemble per label: explicit ``prompts`` win, else label names x templates.

    A template holds ``{}`` for the class name and may name another task, as in
    ``"{modality} image of the {}."``: that placeholder is filled with every label of the other
    task in ``context`` (task -> label ids, e.g. the labels seen in training; default: the whole
    taxonomy), and the ensemble averages over them. ``synonyms=False`` uses only each label's
    display name, the word clip_med's training templates write: a model trained from scratch has
    never seen the other names. Labels outside the taxonomy are used as their own name.
    """
    if prompts:
        missing = [label for label in labels if not prompts.get(label)]
        if missing:
            raise ValueError(f"no prompts given for label(s) {missing}")
        return {label: list(prompts[label]) for label in labels}
    task_def = taxonomy.TASKS.get(task)
    templates = list(templates or (task_def.prompt_templates if task_def else ("a medical image of {}.",)))
    result = {}
    for label in labels:
        filled = [text for template in templates for name in _names(task, label, synonyms)
                  for text in _fill(template, name, context or {}, synonyms)]
        result[label] = list(dict.fromkeys(filled))
    return result


def _names(task: str, label: str, synonyms: bool) -> tuple[str, ...]:
    task_def = taxonomy.TASKS.get(task)
    if task_def is None or label not in task_def.ids:
        return (label.replace("_", " "),)
    names = task_def.label(label).names
    return names if synonyms else names[:1]


def _fill(template: str, name: str, context: dict[str, list[str]], synonyms: bool) -> list[str]:
    fields = [field for field in template_fields(template) if field]
    for field in fields:
        if field not in taxonomy.TASKS:
            raise UnknownName(f"prompt template {template!r} names {{{field}}}; only {{}} and task names "
                           f"({', '.join('{' + t + '}' for t in taxonomy.TASKS)}) can be used")
    options = [[(field, other) for label in (context.get(field) or taxonomy.TASKS[field].ids) if label != "unknown"
                for other in _names(field, label, synonyms)] for field in fields]
    return [template.format(name, **dict(combination)) for combination in itertools.product(*options)]


@torch.no_grad()
def zero_shot_weights(model: torch.nn.Module, tokenizer: Callable, prompts: dict[str, list[str]],
                      device: torch.device | str = "cpu") -> np.ndarray:
    """(D, C) class embeddings: the normalised mean of each label's prompt embeddings.

    open_clip's builder needs the same number of prompts per class; shorter lists are cycled
    (a label with 2 prompts among labels with 4 counts each of its prompts twice).
    """
    labels = list(prompts)
    width = max(len(prompts[label]) for label in labels)
    templates = [lambda label, k=k: prompts[label][k % len(prompts[label])] for k in range(width)]
    was_training = model.training
    model.eval()
    weights = build_zero_shot_classifier(model, tokenizer, labels, templates, device=device)
    model.train(was_training)
    return weights.float().cpu().numpy()


def zero_shot_probabilities(image_embeddings: np.ndarray, weights: np.ndarray,
                            logit_scale: float = ZERO_SHOT_LOGIT_SCALE) -> np.ndarray:
    return softmax(logit_scale * image_embeddings @ weights, axis=1)
