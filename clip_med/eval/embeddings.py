"""Embedding a split of shards with a model: images, texts, labels and ids, in key order."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from clip_med.core.counting import merge_counts
from clip_med.core.precision import autocast_context
from clip_med.data.loader import create_eval_loader
from clip_med.labels import taxonomy
from clip_med.modeling.factory import clip_model


@dataclass
class Embedded:
    ids: list[str]
    image: np.ndarray  # (N, D) float32, L2-normalised
    text: np.ndarray  # (N, D) float32, L2-normalised
    texts: list[str]
    labels: dict[str, list[str]] = field(default_factory=dict)
    groups: list[str] = field(default_factory=list)  # case id when the source has one, else id
    errors: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)


@torch.no_grad()
def embed_split(model: torch.nn.Module, urls: Sequence[str], transform: Callable, tokenizer: Callable,
                device: torch.device, batch_size: int = 128, workers: int = 2, precision: str = "fp32",
                tasks: Sequence[str] = tuple(taxonomy.TASKS), progress: bool = True,
                description: str = "embed") -> Embedded:
    was_training = model.training
    model.eval()
    parts: dict[str, list] = {"ids": [], "image": [], "text": [], "texts": [], "groups": []}
    labels: dict[str, list[str]] = {task: [] for task in tasks}
    errors: dict[int, dict[str, int]] = {}
    loader = create_eval_loader(urls, transform, tokenizer, batch_size, workers)
    for batch in tqdm(loader, desc=description, unit="batch", disable=not progress, leave=False):
        with autocast_context(device, precision):
            image = clip_model(model).encode_image(batch["images"].to(device, non_blocking=True), normalize=True)
            text = clip_model(model).encode_text(batch["texts"].to(device, non_blocking=True), normalize=True)
        parts["image"].append(image.float().cpu().numpy())
        parts["text"].append(text.float().cpu().numpy())
        parts["texts"].extend(batch["raw_texts"])
        for meta, key in zip(batch["meta"], batch["keys"]):
            parts["ids"].append(meta.get("id", key))
            parts["groups"].append(str((meta.get("meta") or {}).get("case_id") or meta.get("id", key)))
            for task in tasks:
                labels[task].append((meta.get("labels") or {}).get(task, "unknown"))
        errors[batch["worker"]] = batch["errors"]
    model.train(was_training)
    if not parts["ids"]:
        raise ValueError(f"no samples could be read from {list(urls)[:3]}...")
    order = np.argsort(np.array(parts["ids"], dtype=object), kind="stable")
    pick = lambda values: [values[i] for i in order]  # noqa: E731
    return Embedded(
        ids=pick(parts["ids"]),
        image=np.concatenate(parts["image"])[order],
        text=np.concatenate(parts["text"])[order],
        texts=pick(parts["texts"]),
        labels={task: pick(values) for task, values in labels.items()},
        groups=pick(parts["groups"]),
        errors=merge_counts(*errors.values()),
    )
