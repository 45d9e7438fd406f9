"""The command-line functions behind ``python -m clip_med.{classify,embed,search}`` (no Hydra here).

Each takes its typed config and returns plain results; ``format_*`` turn them into text.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path
from typing import Any, Optional

import numpy as np

from clip_med.core import distributed
from clip_med.core.bounds import bounded
from clip_med.inference.evaluation import REQUIRED, ModelOptions, load_model
from clip_med.inference.extract import ExtractConfig, extract, resolve_shards
from clip_med.inference.index import TEXT_EMBEDDINGS, IndexConfig, SearchIndex, paired_recall, write_index
from clip_med.inference.results import Classification, SearchHit
from clip_med.modeling.hub import first_on_rank_zero

log = logging.getLogger(__name__)


def _trim(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _trim_path(text: str, width: int) -> str:
    """Keep the end of a long path: the file name is the informative part."""
    return text if len(text) <= width else "…" + text[-(width - 1):]


# ---------------------------------------------------------------------------------------------
# classify


@dataclass
class ClassifyConfig(ModelOptions):
    images: Any = REQUIRED  # a file, a folder (every file in it), a glob, or a list of those
    task: Optional[str] = None  # modality | anatomy | your own name with labels=[...] (default: modality)
    labels: Optional[list[str]] = None
    prompts: Optional[list[str]] = None  # templates with one {} for the label, e.g. "a chest X-ray showing {}."
    head: Optional[str] = None  # a probe head (.safetensors) from python -m clip_med.probe
    batch_size: int = bounded(32, minimum=1)
    top: int = bounded(3, minimum=1)
    format: str = "table"  # table | json
    # One pooled prediction per series (clip_med.inference.series): true, all the inputs are one series or
    # case; None, each DICOM series of a folder of DICOM files (by SeriesInstanceUID); false, never.
    series: Optional[bool] = None


def expand_images(images: str | list[str]) -> list[str]:
    """Files named directly, every file of a folder (DICOM files often have no extension), and globs."""
    found: list[str] = []
    for item in [images] if isinstance(images, str) else list(images):
        item = str(item)
        path = Path(item).expanduser()
        if path.is_dir():
            found += sorted(str(child) for child in path.iterdir()
                            if child.is_file() and not child.name.startswith("."))
        elif any(ch in item for ch in "*?["):
            matches = sorted(glob(item))
            if not matches:
                raise FileNotFoundError(f"no file matches {item!r}")
            found += matches
        else:
            found.append(item)  # missing files are reported per item by classify()
    if not found:
        raise FileNotFoundError(f"no images in {images!r}")
    return found


def run_classify(cfg: ClassifyConfig) -> Classification:
    from clip_med.eval.zero_shot import check_labels, check_templates

    # Bad labels or prompt templates (format specs, over the limits) are refused before the model loads.
    if cfg.labels:
        check_labels(list(cfg.labels))
    if cfg.prompts:
        check_templates([cfg.prompts] if isinstance(cfg.prompts, str) else list(cfg.prompts))
    model = load_model(cfg)
    return model.classify(expand_images(cfg.images), task=cfg.task, labels=cfg.labels, prompts=cfg.prompts,
                          head=cfg.head, batch_size=cfg.batch_size, on_error="skip")


def format_classification(result: Classification, top: int = 3, fmt: str = "table") -> str:
    if fmt == "json":
        lines = [json.dumps(record) for record in result.to_records()]
        lines += [json.dumps({"skipped": skip.to_dict()}) for skip in result.skipped]
        return "\n".join(lines)
    if fmt != "table":
        raise ValueError(f"format must be table or json, got {fmt!r}")
    lines = [f"{result.method.replace('_', '-')} {result.task} over {', '.join(result.labels)}"]
    for name, best in zip(result.inputs, result.top(top)):
        ranked = "  ".join(f"{label} {p:.3f}" for label, p in best)
        lines.append(f"{_trim_path(name, 48):48s}  {ranked}")
    for skip in result.skipped:
        lines.append(f"{_trim_path(skip.input, 48):48s}  SKIPPED {skip.reason}: {skip.detail}")
    if result.skipped:
        lines.append(f"{len(result)} classified, {len(result.skipped)} skipped")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# embed


@dataclass
class EmbedConfig(ExtractConfig, ModelOptions):
    shards: Any = REQUIRED  # brace pattern, glob, folder or list: "shards/medpix/dev-{000000..000001}.tar"
    out: str = REQUIRED
    dist_backend: Optional[str] = None  # under torchrun: None = nccl on CUDA, gloo on CPU


def run_embed(cfg: EmbedConfig) -> dict[str, Any]:
    resolve_shards(cfg.shards)  # a missing shard fails now, not after loading the model
    info = distributed.init_distributed(cfg.device, cfg.dist_backend)
    try:
        # Rank 0 downloads a pretrained model's files into the cache; the other ranks then read the cache.
        model = first_on_rank_zero(info, lambda: load_model(cfg, device=str(info.device)))
        return extract(model, cfg.shards, cfg.out, cfg, info)
    finally:
        distributed.cleanup(info)


# ---------------------------------------------------------------------------------------------
# search


@dataclass
class SearchConfig(ModelOptions):
    index: str = REQUIRED  # an embedding folder written by python -m clip_med.embed
    # Default (no checkpoint, no model): the checkpoint or model the embeddings were made with.
    text: Optional[str] = None
    image: Optional[str] = None
    k: int = bounded(10, minimum=1)
    nprobe: Optional[int] = None  # IVF cells visited (default: the index's own setting)
    ef_search: Optional[int] = None  # HNSW search depth
    build: Optional[str] = None  # (re)build the index first: auto | flat | ivf | hnsw | ivfpq
    build_options: IndexConfig = field(default_factory=IndexConfig)
    recall: bool = False  # text->image recall@1/5/10 of the index over the folder's own pairs
    format: str = "table"  # table | json


@dataclass
class SearchOutput:
    hits: list[SearchHit] = field(default_factory=list)
    recall: dict[str, float] = field(default_factory=dict)
    query: str = ""
    index_size: int = 0


def run_search(cfg: SearchConfig) -> SearchOutput:
    if cfg.build:
        options = IndexConfig(**{**cfg.build_options.__dict__, "kind": cfg.build})
        write_index(cfg.index, options)
    index = SearchIndex.open(cfg.index, cfg.nprobe, cfg.ef_search)
    output = SearchOutput(index_size=len(index))
    if cfg.recall:
        path = Path(cfg.index) / TEXT_EMBEDDINGS
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: extract with texts=true to measure text->image recall")
        output.recall = paired_recall(index, np.load(path, mmap_mode="r"))
    if cfg.text is None and cfg.image is None:
        if not (cfg.build or cfg.recall):
            raise ValueError('give a query: text="..." or image=<path> (or build=<kind> / recall=true)')
        return output
    # embed.json's "load": what loads the embeddings' model again (older folders: only "checkpoint").
    recorded = index.info.get("load") or {"checkpoint": index.info.get("checkpoint")}
    if cfg.checkpoint is None and cfg.model_name is None and not (recorded.get("checkpoint")
                                                                  or recorded.get("model_name")):
        raise ValueError(f"{cfg.index} does not name the checkpoint its embeddings came from: "
                         "give checkpoint=<path> (or model=<the pretrained model>)")
    model = load_model(cfg, recorded=recorded)
    output.hits = model.search(index, text=cfg.text, image=cfg.image, k=cfg.k)
    output.query = f"text {cfg.text!r}" if cfg.text is not None else f"image {cfg.image}"
    return output


def format_search(output: SearchOutput, fmt: str = "table") -> str:
    if fmt == "json":
        return json.dumps({"query": output.query, "recall": output.recall,
                           "results": [hit.to_dict() for hit in output.hits]}, indent=1)
    lines = []
    if output.recall:
        lines.append(f"text->image recall over {output.index_size} pairs: "
                     + "  ".join(f"{key} {value:.3f}" for key, value in output.recall.items()))
    if output.query:
        lines.append(f"top {len(output.hits)} of {output.index_size} for {output.query}:")
        for hit in output.hits:
            labels = ",".join(value for value in hit.labels.values() if value != "unknown")
            lines.append(f"{hit.rank:3d}  {hit.score:.4f}  {_trim(hit.id, 28):28s}  {labels:18s}  "
                         f"{_trim(hit.caption or hit.text, 80)}")
    return "\n".join(lines)
