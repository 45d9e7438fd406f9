"""Zero-shot classification with prompt ensembles (open_clip's classifier builder)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from open_clip import build_zero_shot_classifier

from clip_med import taxonomy

# The temperature CLIP applies to cosine similarities before the softmax.
ZERO_SHOT_LOGIT_SCALE = 100.0


def label_prompts(task: str, labels: list[str], templates: list[str] | None = None,
                  prompts: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """The prompt ensemble per label: explicit ``prompts`` win, else taxonomy names x templates.

    Labels outside the taxonomy (a user's own class names) are used as their own name.
    """
    if prompts:
        missing = [label for label in labels if not prompts.get(label)]
        if missing:
            raise ValueError(f"no prompts given for label(s) {missing}")
        return {label: list(prompts[label]) for label in labels}
    task_def = taxonomy.TASKS.get(task)
    templates = list(templates or (task_def.prompt_templates if task_def else ("a medical image of {}.",)))
    known = set(task_def.ids) if task_def else set()
    result = {}
    for label in labels:
        names = task_def.label(label).names if label in known else (label.replace("_", " "),)
        result[label] = [template.format(name) for template in templates for name in names]
    return result


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
    logits = logit_scale * image_embeddings @ weights
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    return probs / probs.sum(axis=1, keepdims=True)
