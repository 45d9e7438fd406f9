"""Nearest-neighbour search over extracted image embeddings (FAISS, inner product = cosine).

Index kinds (one registry, each a FAISS ``index_factory`` string):

* ``flat``: exact search (``IndexFlatIP``); the right choice up to a few hundred thousand images;
* ``ivf``: inverted lists over k-means cells (``IVF<nlist>,Flat``), searched ``nprobe`` cells at a
  time: approximate, far faster on millions;
* ``hnsw``: a navigable small-world graph (``HNSW<M>,Flat``): approximate, fast queries, slow to build;
* ``ivfpq``: IVF with product-quantised vectors (``IVF<nlist>,PQ<m>``): for collections that do
  not fit in memory as float32;
* ``auto``: ``flat`` below ``auto_exact_limit`` vectors, else ``ivf``.

An embedding folder written by ``python -m clip_med.embed`` holds ``image_embeddings.npy``,
``metadata.parquet`` (one row per embedding: id, caption, labels, source location) and
``embed.json``; the index adds ``index.faiss`` and ``index.json`` to it.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from clip_med.core.bounds import bounded
from clip_med.core.io import atomic_write, write_text_atomic
from clip_med.inference.results import SearchHit

log = logging.getLogger(__name__)

EMBED_INFO = "embed.json"
METADATA = "metadata.parquet"
IMAGE_EMBEDDINGS = "image_embeddings.npy"
TEXT_EMBEDDINGS = "text_embeddings.npy"
INDEX_FILE = "index.faiss"
INDEX_INFO = "index.json"


class IndexFolderError(ValueError):
    """An index folder that cannot be used, with what to do about it."""


@dataclass
class IndexConfig:
    kind: str = "auto"  # auto | flat | ivf | hnsw | ivfpq | none (no index file; search builds a flat one)
    auto_exact_limit: int = bounded(200_000, minimum=0)
    nlist: Optional[int] = None  # IVF cells; None: 4·sqrt(N), at most N/39
    nprobe: int = bounded(32, minimum=1)  # IVF cells visited per query
    hnsw_m: int = bounded(32, minimum=2)
    ef_construction: int = bounded(80, minimum=1)
    ef_search: int = bounded(128, minimum=1)
    pq_m: int = bounded(64, minimum=1)  # sub-quantisers of ivfpq (must divide the dimension)
    train_size: int = bounded(200_000, minimum=1)  # vectors sampled to train IVF/PQ
    add_batch: int = bounded(65_536, minimum=1)
    threads: int = bounded(0, minimum=0)  # FAISS OpenMP threads; 0 keeps FAISS's default
    seed: int = 0


def _nlist(n: int, cfg: IndexConfig) -> int:
    if cfg.nlist:
        return int(cfg.nlist)
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


INDEX_KINDS: dict[str, Callable[[int, int, IndexConfig], str]] = {
    "flat": lambda n, d, cfg: "Flat",
    "ivf": lambda n, d, cfg: f"IVF{_nlist(n, cfg)},Flat",
    "hnsw": lambda n, d, cfg: f"HNSW{cfg.hnsw_m},Flat",
    "ivfpq": lambda n, d, cfg: f"IVF{_nlist(n, cfg)},PQ{cfg.pq_m}",
}


def resolve_kind(kind: str, n: int, cfg: IndexConfig) -> str:
    if kind == "auto":
        return "flat" if n <= cfg.auto_exact_limit else "ivf"
    if kind not in INDEX_KINDS:
        raise ValueError(f"unknown index kind {kind!r}; choose auto, {', '.join(INDEX_KINDS)} (or none)")
    return kind


def factory_string(kind: str, n: int, dim: int, cfg: IndexConfig) -> str:
    kind = resolve_kind(kind, n, cfg)
    if kind == "ivfpq" and dim % cfg.pq_m:
        raise ValueError(f"index.pq_m={cfg.pq_m} must divide the embedding dimension {dim}")
    return INDEX_KINDS[kind](n, dim, cfg)


def set_search_params(index: faiss.Index, nprobe: int | None = None, ef_search: int | None = None) -> None:
    params = faiss.ParameterSpace()
    inner = faiss.downcast_index(index)
    if nprobe and hasattr(inner, "nprobe"):
        params.set_index_parameter(index, "nprobe", int(nprobe))
    if ef_search and hasattr(inner, "hnsw"):
        params.set_index_parameter(index, "efSearch", int(ef_search))


def _as_float32(vectors: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(vectors, dtype=np.float32)


def build_index(vectors: np.ndarray, kind: str | None = None, cfg: IndexConfig | None = None,
                progress: bool = False) -> tuple[faiss.Index, str]:
    """Build an inner-product index over (N, D) vectors (a memory map is fine); returns (index, factory).

    ``kind`` defaults to ``cfg.kind``.
    """
    cfg = cfg or IndexConfig()
    kind = kind or cfg.kind
    n, dim = vectors.shape
    if n == 0:
        raise IndexFolderError("there are no embeddings to index")
    if cfg.threads:
        faiss.omp_set_num_threads(cfg.threads)
    factory = factory_string(kind, n, dim, cfg)
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if hasattr(faiss.downcast_index(index), "hnsw"):
        # faiss's stub types downcast_index() as the base Index; hasattr just found an HNSW index
        faiss.downcast_index(index).hnsw.efConstruction = cfg.ef_construction  # type: ignore[attr-defined]
    if not index.is_trained:
        rng = np.random.default_rng(cfg.seed)
        sample = np.sort(rng.choice(n, size=min(n, cfg.train_size), replace=False))
        log.info("training %s on %d of %d vectors", factory, len(sample), n)
        index.train(_as_float32(vectors[sample]))
    for start in tqdm(range(0, n, cfg.add_batch), desc=f"index {factory}", unit="batch", disable=not progress,
                      leave=False):
        index.add(_as_float32(vectors[start:start + cfg.add_batch]))
    set_search_params(index, cfg.nprobe, cfg.ef_search)
    return index, factory


def write_index(folder: str | Path, cfg: IndexConfig | None = None, progress: bool = True) -> Path | None:
    """Build the index of an embedding folder over its image embeddings; ``cfg.kind="none"`` builds nothing."""
    folder, cfg = Path(folder), cfg or IndexConfig()
    kind = cfg.kind
    if kind == "none":
        return None
    path = folder / IMAGE_EMBEDDINGS
    if not path.is_file():
        raise IndexFolderError(f"{path} is missing: run python -m clip_med.embed with out={folder} first")
    vectors = np.load(path, mmap_mode="r")
    index, factory = build_index(vectors, kind, cfg, progress)
    with atomic_write(folder / INDEX_FILE, "path") as tmp:
        faiss.write_index(index, str(tmp))
    info = {"factory": factory, "kind": resolve_kind(kind, len(vectors), cfg), "count": int(index.ntotal),
            "dim": int(vectors.shape[1]), "config": asdict(cfg)}
    write_text_atomic(folder / INDEX_INFO, json.dumps(info, indent=1))
    log.info("index %s over %d vectors written to %s", factory, index.ntotal, folder / INDEX_FILE)
    return folder / INDEX_FILE


def _hit(rank: int, score: float, position: int, row: dict[str, Any]) -> SearchHit:
    labels = row.get("labels") or "{}"
    return SearchHit(rank=rank, score=float(score), position=int(position), id=str(row.get("id", position)),
                     caption=row.get("caption") or "", text=row.get("text") or "",
                     labels=json.loads(labels) if isinstance(labels, str) else dict(labels),
                     origin=row.get("origin") or "", shard=row.get("shard") or "", key=row.get("key") or "")


class SearchIndex:
    """A FAISS index plus the metadata table its positions point into."""

    def __init__(self, index: faiss.Index, metadata: pa.Table | None = None, info: dict[str, Any] | None = None,
                 folder: Path | None = None):
        self.index, self.metadata, self.info, self.folder = index, metadata, dict(info or {}), folder
        if metadata is not None and metadata.num_rows != index.ntotal:
            where = f" in {folder}" if folder else ""
            raise IndexFolderError(f"the index holds {index.ntotal} vectors but the metadata has {metadata.num_rows} "
                                   f"rows{where}: rebuild the index (python -m clip_med.search index=<dir> build=flat)")

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @classmethod
    def from_embeddings(cls, embeddings: np.ndarray, metadata: Sequence[dict[str, Any]] | pa.Table | None = None,
                        kind: str = "flat", cfg: IndexConfig | None = None, info: dict | None = None) -> SearchIndex:
        """An in-memory index (e.g. over ``model.embed_images(...)``); metadata rows give ids and captions."""
        index, _ = build_index(np.asarray(embeddings), kind, cfg)
        if metadata is not None and not isinstance(metadata, pa.Table):
            rows = [{**row, "labels": json.dumps(row.get("labels") or {})} for row in metadata]
            metadata = pa.Table.from_pylist(rows)
        return cls(index, metadata, info)

    @classmethod
    def open(cls, folder: str | Path, nprobe: int | None = None, ef_search: int | None = None) -> SearchIndex:
        folder = Path(folder)
        info_path = folder / EMBED_INFO
        if not info_path.is_file():
            raise IndexFolderError(f"{folder} is not an embedding folder ({EMBED_INFO} missing): create it with "
                              f"python -m clip_med.embed checkpoint=<ckpt> shards=<pattern> out={folder}")
        info = json.loads(info_path.read_text(encoding="utf-8"))
        if info.get("status") != "complete":
            raise IndexFolderError(f"the extraction into {folder} is not complete: re-run the same "
                              "python -m clip_med.embed command to finish it")
        if (folder / INDEX_FILE).is_file():
            index = faiss.read_index(str(folder / INDEX_FILE))
        else:
            log.info("%s has no %s: building an exact index in memory", folder, INDEX_FILE)
            index, _ = build_index(np.load(folder / IMAGE_EMBEDDINGS, mmap_mode="r"), "flat")
        set_search_params(index, nprobe, ef_search)
        metadata = pq.read_table(folder / METADATA, memory_map=True)
        return cls(index, metadata, info, folder)

    def check_model(self, fingerprint: str, dim: int) -> None:
        if dim != self.dim:
            raise IndexFolderError(f"the index holds {self.dim}-d embeddings; the model gives {dim}-d")
        stored = self.info.get("model_fingerprint")
        if stored and fingerprint and stored != fingerprint:
            raise IndexFolderError(
                f"the index was built from another model's embeddings ({self.info.get('checkpoint')}); "
                "query it with that checkpoint or re-extract with python -m clip_med.embed"
            )

    def search_vectors(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(scores, positions), each (Q, k); positions are -1 where fewer than k results exist."""
        queries = _as_float32(np.atleast_2d(queries))
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries are {queries.shape[1]}-d, the index holds {self.dim}-d vectors")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        return self.index.search(queries, min(k, len(self)))

    def rows(self, positions: Sequence[int]) -> list[dict[str, Any]]:
        if self.metadata is None:
            return [{"id": str(position)} for position in positions]
        return self.metadata.take(pa.array(positions, type=pa.int64())).to_pylist()

    def search(self, queries: np.ndarray, k: int = 10) -> list[list[SearchHit]]:
        scores, positions = self.search_vectors(queries, k)
        results = []
        for row_scores, row_positions in zip(scores, positions):
            found = [(score, int(position)) for score, position in zip(row_scores, row_positions) if position >= 0]
            rows = self.rows([position for _, position in found])
            results.append([_hit(rank, score, position, row)
                            for rank, ((score, position), row) in enumerate(zip(found, rows), 1)])
        return results


def open_index(folder: str | Path, nprobe: int | None = None, ef_search: int | None = None) -> SearchIndex:
    """Open the index of an embedding folder written by ``python -m clip_med.embed``."""
    return SearchIndex.open(folder, nprobe, ef_search)


def paired_recall(index: SearchIndex, queries: np.ndarray, ks: Sequence[int] = (1, 5, 10),
                  batch: int = 1024) -> dict[str, float]:
    """Recall@k when query i's answer is indexed item i (text→image over an extraction's own pairs)."""
    ranks = np.full(len(queries), np.iinfo(np.int64).max, dtype=np.int64)
    depth = max(ks)
    for start in range(0, len(queries), batch):
        _, positions = index.search_vectors(queries[start:start + batch], depth)
        targets = np.arange(start, start + len(positions))[:, None]
        hit_rows, hit_cols = np.nonzero(positions == targets)
        ranks[start + hit_rows] = hit_cols
    return {f"R@{k}": float((ranks < k).mean()) for k in ks}
