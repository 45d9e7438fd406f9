"""``clip_med.load(checkpoint)``: a trained model ready to classify, embed and search.

Preprocessing is the evaluation path of training, step for step: the shard writer's decoding,
normalisation and ``max_side`` shrink (:mod:`clip_med.inference.inputs`), then the model's eval
transform (the model's own ``preprocess_cfg``: :meth:`~clip_med.modeling.factory.ModelBundle.transform`). Zero-shot
classification uses the prompt construction, the class set and the temperature of
:mod:`clip_med.eval.zero_shot`, so ``classify`` reproduces the evaluation's zero-shot numbers.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from clip_med.core.distributed import pick_device
from clip_med.core.precision import autocast_context, resolve_precision
from clip_med.data.images import ImageRejected
from clip_med.data.manifest import load_manifest
from clip_med.data.writer import ShardConfig
from clip_med.eval.probe_head import ProbeHead
from clip_med.eval.zero_shot import (
    MAX_PROMPTS,
    check_labels,
    check_templates,
    label_prompts,
    prompt_style_for,
    zero_shot_probabilities,
    zero_shot_weights,
)
from clip_med.inference.inputs import ImageInput, as_batch, describe, load_image
from clip_med.inference.results import Classification, SearchHit, Skipped
from clip_med.labels import taxonomy
from clip_med.modeling.checkpoint import (
    CheckpointInfo,
    Preprocessing,
    open_model,
    shard_preprocessing,
    weights_fingerprint,
)
from clip_med.modeling.factory import ModelBundle, clip_model

log = logging.getLogger(__name__)

Prompts = Union[dict[str, Sequence[str]], Sequence[str], str, None]
Head = Union[ProbeHead, str, Path, None]
MAX_CACHED_CLASSIFIERS = 64  # zero-shot classifiers kept per model (least recently used ones are dropped)


def trained_labels(info: CheckpointInfo) -> tuple[dict[str, list[str]], str]:
    """Per task, the classes the checkpoint was trained and evaluated with, and where that was read.

    The run's ``report.json`` (the classes its zero-shot evaluation used), else the training
    split's manifest; tasks found in neither fall back to the whole taxonomy.
    """
    run_dir = info.run_dir
    if run_dir is not None and (run_dir / "report.json").is_file():
        with open(run_dir / "report.json", encoding="utf-8") as handle:
            report = json.load(handle)
        labels = {task: list(metrics["labels"]) for task, metrics in (report.get("zero_shot") or {}).items()}
        if labels:
            return labels, str(run_dir / "report.json")
    shards, source = info.config.get("shards") or {}, info.config.get("source") or {}
    if shards and source.get("name"):
        out_dir = ShardConfig(out=shards.get("out"), root=shards.get("root", "shards")).out_dir(source["name"])
        train_split = (info.config.get("data") or {}).get("train_split", "train")
        manifest = load_manifest(out_dir, train_split)
        if manifest is not None:
            labels = {task: sorted(manifest.labels(task)) for task in manifest.label_counts}
            labels = {task: values for task, values in labels.items() if len(values) >= 2}
            if labels:
                return labels, str(out_dir / f"{train_split}.manifest.json")
    return {}, "the taxonomy (no run report or training manifest found)"


def _check_labels(labels: Sequence[str]) -> list[str]:
    if isinstance(labels, str) or not all(isinstance(label, str) and label.strip() for label in labels):
        raise ValueError(f"labels must be a list of non-empty strings, got {labels!r:.200}")
    labels = list(labels)
    check_labels(labels)
    if len(labels) < 2:
        raise ValueError(f"zero-shot classification needs at least two labels, got {labels}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels must be distinct, got {labels}")
    return labels


def _check_templates(templates: Sequence[str]) -> list[str]:
    templates = [templates] if isinstance(templates, str) else list(templates)
    check_templates(templates)  # limits, and plain {} / {task} fields only: before anything else
    bad = [template for template in templates if template.count("{}") != 1]
    if not templates or bad:
        raise ValueError("prompt templates must be strings with one '{}' for the label name; "
                         f"bad: {bad or templates}")
    return templates


class ClipMedModel:
    """A loaded checkpoint. Thread-safe: model calls are serialised by a lock."""

    def __init__(self, bundle: ModelBundle, info: CheckpointInfo, device: torch.device, precision: str = "auto",
                 preprocessing: Preprocessing | None = None, labels: dict[str, list[str]] | None = None,
                 labels_origin: str = "", prompt_templates: dict[str, list[str]] | None = None,
                 prompt_synonyms: bool = True, prompt_style: str = "plain"):
        self.bundle, self.model, self.tokenizer, self.info = bundle, bundle.model, bundle.tokenizer, info
        self.device = device
        self.precision = resolve_precision(precision, device)
        self.preprocessing = preprocessing or shard_preprocessing(info)
        self.transform = bundle.transform(train=False)  # the model's own preprocess_cfg
        self.labels = {task: list(values) for task, values in (labels or {}).items()}
        self.labels_origin = labels_origin
        self.prompt_templates = dict(prompt_templates or {})
        self.prompt_synonyms = prompt_synonyms
        self.prompt_style = prompt_style  # the default prompts' phrasing (clip_med.eval.zero_shot.PROMPT_STYLES)
        self._lock = threading.Lock()  # held only while the model computes (bounded work)
        self._cache_lock = threading.Lock()  # held only to read or update the classifier cache
        self._classifiers: OrderedDict[Any, tuple[list[str], np.ndarray]] = OrderedDict()

    def __repr__(self) -> str:
        return (f"ClipMedModel({self.name}, checkpoint={str(self.info.path)!r}, step={self.info.step}, "
                f"dim={self.dim}, device={self.device})")

    @property
    def name(self) -> str:
        return self.bundle.name

    @property
    def dim(self) -> int:
        return int(self.bundle.model_cfg.get("embed_dim") or clip_model(self.model).text_projection.shape[-1])

    @functools.cached_property
    def fingerprint(self) -> str:
        return weights_fingerprint(self.model)

    def task_labels(self, task: str) -> list[str]:
        """The default classes of ``task``: those the checkpoint was trained with, else the taxonomy's."""
        if task in self.labels:
            return list(self.labels[task])
        if task in taxonomy.TASKS:
            return taxonomy.get_task(task).ids
        raise ValueError(f"task {task!r} has no built-in labels (built-in tasks: {', '.join(taxonomy.TASKS)}); "
                         "pass labels=[...] (and optionally prompts=...)")

    # -- embeddings ------------------------------------------------------------------------------

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """One input -> the (3, H, W) tensor the model sees."""
        return self.transform(load_image(image, self.preprocessing))

    @torch.no_grad()
    def encode_image_tensors(self, pixels: torch.Tensor) -> np.ndarray:
        with self._lock, autocast_context(self.device, self.precision):
            features = clip_model(self.model).encode_image(pixels.to(self.device, non_blocking=True), normalize=True)
        return features.float().cpu().numpy()

    @torch.no_grad()
    def encode_token_tensors(self, tokens: torch.Tensor) -> np.ndarray:
        with self._lock, autocast_context(self.device, self.precision):
            features = clip_model(self.model).encode_text(tokens.to(self.device, non_blocking=True), normalize=True)
        return features.float().cpu().numpy()

    def _pixels(self, items: list, workers: int, on_error: str) -> tuple[list[torch.Tensor], list[int],
                                                                           list[Skipped]]:
        def one(position: int):
            try:
                return self.preprocess(items[position]), None
            except ImageRejected as rejected:
                if on_error == "raise":
                    raise ImageRejected(rejected.reason, f"input {position}: {rejected.detail}") from None
                return None, Skipped(position, describe(items[position]), rejected.reason, rejected.detail)

        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                results = list(pool.map(one, range(len(items))))
        else:
            results = [one(position) for position in range(len(items))]
        tensors = [tensor for tensor, _ in results if tensor is not None]
        kept = [position for position, (tensor, _) in enumerate(results) if tensor is not None]
        return tensors, kept, [skip for _, skip in results if skip is not None]

    def _embed(self, items: list, batch_size: int, workers: int, on_error: str) -> tuple[np.ndarray, list[int],
                                                                                          list[Skipped]]:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        chunks, kept, skipped = [], [], []
        for start in range(0, len(items), batch_size):
            tensors, positions, bad = self._pixels(items[start:start + batch_size], workers, on_error)
            kept += [start + position for position in positions]
            skipped += [Skipped(start + skip.index, skip.input, skip.reason, skip.detail) for skip in bad]
            if tensors:
                chunks.append(self.encode_image_tensors(torch.stack(tensors)))
        embeddings = np.concatenate(chunks) if chunks else np.zeros((0, self.dim), dtype=np.float32)
        return embeddings, kept, skipped

    def embed_images(self, images: ImageInput | Sequence[ImageInput], batch_size: int = 32,
                     workers: int = 0) -> np.ndarray:
        """(N, D) L2-normalised image embeddings, one row per input (a single input gives one row).

        Raises :class:`~clip_med.data.images.ImageRejected` naming the first unusable input.
        """
        embeddings, _, _ = self._embed(as_batch(images), batch_size, workers, "raise")
        return embeddings

    def embed_texts(self, texts: str | Sequence[str], batch_size: int = 256) -> np.ndarray:
        """(N, D) L2-normalised text embeddings (texts longer than the context are truncated)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        for position, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"text {position} is empty or not a string: {text!r}")
        chunks = [self.encode_token_tensors(self.tokenizer(texts[start:start + batch_size]))
                  for start in range(0, len(texts), batch_size)]
        return np.concatenate(chunks) if chunks else np.zeros((0, self.dim), dtype=np.float32)

    # -- classification --------------------------------------------------------------------------

    def zero_shot_classifier(self, task: str = "modality", labels: Optional[Sequence[str]] = None,
                             prompts: Prompts = None, max_prompts: int = MAX_PROMPTS) -> tuple[list[str], np.ndarray]:
        """(labels, (D, C) class embeddings) for a task, built as the evaluation builds them.

        Labels, templates and the ensemble (at most ``max_prompts`` texts) are checked and the prompts
        tokenized before the model's lock is taken: under it the model only encodes a bounded batch.
        """
        explicit = prompts if isinstance(prompts, dict) else None
        templates = None if prompts is None or isinstance(prompts, dict) else _check_templates(prompts)
        if labels is None:
            labels = list(explicit) if explicit else self.task_labels(task)
        labels = _check_labels(labels)
        templates = templates or self.prompt_templates.get(task) or None
        key = (task, tuple(labels), tuple(templates or ()),
               tuple((label, tuple(values)) for label, values in (explicit or {}).items()))
        with self._cache_lock:
            cached = self._classifiers.get(key)
            if cached is not None:
                self._classifiers.move_to_end(key)
        if cached is None:
            context = {other: self.task_labels(other) for other in taxonomy.TASKS if other != task}
            ensemble = label_prompts(task, labels, templates, {k: list(v) for k, v in explicit.items()}
                                     if explicit else None, context=context, synonyms=self.prompt_synonyms,
                                     style=self.prompt_style,
                                     max_prompts=max_prompts)
            weights = zero_shot_weights(self.model, self.tokenizer, ensemble, self.device, lock=self._lock,
                                        max_prompts=max_prompts)
            cached = (labels, weights)
            with self._cache_lock:
                self._classifiers[key] = cached
                while len(self._classifiers) > MAX_CACHED_CLASSIFIERS:
                    self._classifiers.popitem(last=False)
        return cached

    def load_head(self, head: ProbeHead | str | Path) -> ProbeHead:
        """A probe head (object or safetensors path), checked against this model's embedding space."""
        if not isinstance(head, ProbeHead):
            head = ProbeHead.load(head)
        head.check_model(self.fingerprint, self.dim)
        return head

    def classify_embeddings(self, embeddings: np.ndarray, task: str | None = None,
                            labels: Optional[Sequence[str]] = None, prompts: Prompts = None,
                            head: Head = None) -> tuple[str, list[str], np.ndarray, str]:
        """(task, labels, (N, C) probabilities, method) for embeddings from :meth:`embed_images`."""
        if head is not None:
            head = self.load_head(head)
            if labels is not None or prompts is not None:
                raise ValueError("labels and prompts do not apply with a probe head: the head has its own labels")
            if task is not None and task != head.task:
                raise ValueError(f"task={task!r} but the head classifies {head.task!r}")
            return head.task, list(head.labels), head.predict_proba(embeddings), "linear_probe"
        task = task or "modality"
        class_labels, weights = self.zero_shot_classifier(task, labels, prompts)
        return task, class_labels, zero_shot_probabilities(embeddings, weights), "zero_shot"

    def _checked_embed(self, items: list, task: str | None, labels: Optional[Sequence[str]], prompts: Prompts,
                       head: Head, batch_size: int, workers: int, on_error: str):
        """The loaded head (if any) and the images' embeddings, after refusing bad labels or prompts
        before anything is decoded."""
        if head is not None:
            head = self.load_head(head)
        else:
            self.zero_shot_classifier(task or "modality", labels, prompts)
        return head, self._embed(items, batch_size, workers, on_error)

    def classify(self, images: ImageInput | Sequence[ImageInput], task: str | None = None,
                 labels: Optional[Sequence[str]] = None, prompts: Prompts = None, head: Head = None,
                 batch_size: int = 32, workers: int = 0, on_error: str = "raise") -> Classification:
        """Class probabilities per image.

        * zero-shot with the built-in prompt ensembles: ``classify(images, task="anatomy")``
          (default classes: those the checkpoint was trained with, see ``model.labels``);
        * your own classes: ``labels=["pneumothorax", "normal chest"]``, optionally with
          ``prompts=["a chest X-ray showing {}."]`` (templates) or ``prompts={label: [texts]}``;
        * a linear-probe head from ``python -m clip_med.probe``: ``head="heads/modality.safetensors"``.

        ``on_error="skip"`` keeps going past unusable inputs and lists them in ``result.skipped``.
        """
        items = as_batch(images)
        head, (embeddings, kept, skipped) = self._checked_embed(items, task, labels, prompts, head, batch_size,
                                                                workers, on_error)
        task, class_labels, probs, method = self.classify_embeddings(embeddings, task, labels, prompts, head)
        return Classification(task, class_labels, probs, method, inputs=[describe(items[i]) for i in kept],
                              indices=kept, skipped=skipped)

    # -- series and cases ------------------------------------------------------------------------

    def classify_series_embeddings(self, embeddings: np.ndarray, task: str | None = None,
                                   labels: Optional[Sequence[str]] = None, prompts: Prompts = None,
                                   head: Head = None) -> tuple[str, list[str], np.ndarray, np.ndarray, str]:
        """(task, labels, (C,) pooled probabilities, (N, C) per-image probabilities, method) for the
        embeddings of one series or case; the pooling is :func:`clip_med.inference.series.pool`."""
        from clip_med.inference.series import pool

        if not len(embeddings):
            raise ValueError("a series needs at least one readable image")
        task, class_labels, per_image, method = self.classify_embeddings(embeddings, task, labels, prompts, head)
        _, _, pooled, _ = self.classify_embeddings(pool(embeddings), task, labels, prompts, head)
        return task, class_labels, pooled[0], per_image, method

    def classify_series(self, images: Sequence[ImageInput], task: str | None = None,
                        labels: Optional[Sequence[str]] = None, prompts: Prompts = None, head: Head = None,
                        batch_size: int = 32, workers: int = 0, on_error: str = "raise", name: str = "series"):
        """One prediction for the images of one series or case (a DICOM series' slices, a case's images),
        from their pooled embedding (mean, re-normalised, as ``evaluate``'s case level), with the
        per-image predictions beside it: a :class:`~clip_med.inference.series.SeriesClassification`.
        Arguments as :meth:`classify`; ``on_error="skip"`` pools the readable images and lists the others."""
        from clip_med.inference.series import SeriesClassification

        items = as_batch(images)
        head, (embeddings, kept, skipped) = self._checked_embed(items, task, labels, prompts, head, batch_size,
                                                                workers, on_error)
        if not kept:
            first = f": {skipped[0].input}: {skipped[0].reason} ({skipped[0].detail})" if skipped else ""
            raise ValueError(f"no image of {name} could be read{first}")
        task, class_labels, pooled, per_image, method = self.classify_series_embeddings(embeddings, task, labels,
                                                                                        prompts, head)
        images_result = Classification(task, class_labels, per_image, method, inputs=[describe(items[i]) for i in kept],
                                       indices=kept, skipped=skipped)
        return SeriesClassification(name, task, class_labels, pooled, method, images_result)

    # -- search ----------------------------------------------------------------------------------

    def search(self, index, text: str | None = None, image: ImageInput | None = None, k: int = 10) -> list[SearchHit]:
        """The ``k`` nearest images of a :class:`~clip_med.inference.index.SearchIndex` to a text or an image."""
        if (text is None) == (image is None):
            raise ValueError("give exactly one of text= or image=")
        index.check_model(self.fingerprint, self.dim)
        if text is not None:
            query = self.embed_texts([text])
        else:
            assert image is not None  # exactly one of text= and image=, checked above
            query = self.embed_images([image])
        return index.search(query, k)[0]


def load(checkpoint: str | Path | None = None, model_name: str | None = None, device: str = "auto",
         precision: str = "auto", image_size: int | None = None, context_length: int | None = None,
         labels: dict[str, list[str]] | None = None, pretrained: str | None = None) -> ClipMedModel:
    """Load a checkpoint, or a pretrained model by name, for inference.

    ``checkpoint``: a clip_med training checkpoint (``runs/.../checkpoints/step-*.pt``), a plain
    open_clip state dict (then name the architecture with ``model_name``), or a pretrained model
    itself: ``load("hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224")``,
    ``load("local-dir:<folder>")``, ``load("ViT-B-16", pretrained="laion2b_s34b_b88k")`` (files
    come through huggingface_hub's cache; ``HF_HUB_OFFLINE=1`` reads only the cache). ``device``:
    ``auto`` (CUDA when present), ``cpu`` or ``cuda``. ``labels``: per task, the default classes
    (else those the checkpoint was trained with).
    """
    chosen = pick_device(device, 0)
    bundle, info = open_model(checkpoint, model_name, pretrained, image_size, context_length, chosen)
    found, origin = trained_labels(info)
    if labels:
        found, origin = {**found, **labels}, "given to load()"
    eval_cfg = info.config.get("eval") or {}
    model = ClipMedModel(bundle, info, chosen, precision, labels=found, labels_origin=origin,
                         prompt_templates=eval_cfg.get("prompt_templates") or {},
                         prompt_synonyms=eval_cfg.get("prompt_synonyms") is not False,
                         prompt_style=prompt_style_for(eval_cfg.get("prompt_style"),
                                                       bundle.pretrained or info.format != "clip_med"))
    log.info("default classes from %s: %s", origin, found or "taxonomy")
    return model
