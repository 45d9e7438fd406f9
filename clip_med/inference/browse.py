"""Browsing an embedding folder: filtered, paged search, item rows, "more like this".

A :class:`Catalog` wraps a :class:`~clip_med.inference.index.SearchIndex`. Rows are named by their
integer position (the ``position`` of a search hit, the ``{id}`` of ``/items/{id}``).

* Without filters a search asks the index for ``offset + k`` neighbours and returns the last ``k``
  (so page 2 of an approximate index is that index's answer too).
* With filters (exact values of the ``modality``, ``anatomy``, ``split`` and ``source`` columns,
  combined with AND) the rows that match are found in the metadata table (pyarrow, cached per
  filter combination) and scored **exactly** against the query (``image_embeddings.npy``,
  memory-mapped, in chunks), whatever the index kind; the total number of matching rows is known.
* "More like this" queries with an archive row's own stored embedding: no image is decoded.

Filter values and ids are only ever compared with table values; nothing is a path.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clip_med.inference.index import IMAGE_EMBEDDINGS, _hit

FILTERS = ("modality", "anatomy", "split", "source")
EXTRA_COLUMNS = ("split", "source", "modality", "anatomy")
CHUNK = 65_536
MAX_FACET_VALUES = 200


class BrowseError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _decoded(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in "{[":
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


class Catalog:
    """Filtered, paged search and row lookup over one index (its metadata and stored embeddings)."""

    def __init__(self, index: Any, filter_cache: int = 32):
        self.index = index
        self.metadata: pa.Table | None = getattr(index, "metadata", None)
        self.columns = set(self.metadata.column_names) if self.metadata is not None else set()
        self._vectors: np.ndarray | None = None
        self._vectors_loaded = False
        self._allowed: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._filter_cache = max(1, filter_cache)
        self._facets: dict[str, dict[str, int]] | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.index)

    # -- rows ---------------------------------------------------------------------------------

    def check_position(self, position: int) -> int:
        if not 0 <= position < len(self):
            raise BrowseError(404, f"no archive item {position}: ids run from 0 to {len(self) - 1}")
        return position

    def row(self, position: int) -> dict[str, Any]:
        """Every metadata column of one row (``labels`` and ``meta`` decoded from JSON)."""
        self.check_position(position)
        if self.metadata is None:
            return {"position": position, "id": str(position)}
        raw = self.metadata.slice(position, 1).to_pylist()[0]
        return {"position": position, **{name: _decoded(value) if name in ("labels", "meta") else value
                                         for name, value in raw.items()}}

    def raw_row(self, position: int) -> dict[str, Any]:
        self.check_position(position)
        if self.metadata is None:
            return {}
        return self.metadata.slice(position, 1).to_pylist()[0]

    def _hits(self, scores: Sequence[float], positions: Sequence[int], first_rank: int = 1) -> list[dict[str, Any]]:
        positions = [int(position) for position in positions]
        rows = self.index.rows(positions) if positions else []
        hits = []
        for rank, (score, position, row) in enumerate(zip(scores, positions, rows), first_rank):
            hit = _hit(rank, float(score), position, row).to_dict()
            for name in EXTRA_COLUMNS:
                value = row.get(name)
                hit[name] = str(value if value is not None else hit["labels"].get(name, ""))
            hits.append(hit)
        return hits

    # -- filters ------------------------------------------------------------------------------

    def facets(self) -> dict[str, dict[str, int]]:
        """For each filter column the index has: value -> row count (most frequent first)."""
        if self._facets is None:
            facets: dict[str, dict[str, int]] = {}
            for name in FILTERS:
                if self.metadata is None or name not in self.columns:
                    continue
                counts = pc.value_counts(self.metadata.column(name)).to_pylist()
                counts.sort(key=lambda item: (-item["counts"], str(item["values"])))
                facets[name] = {str(item["values"]): int(item["counts"]) for item in counts[:MAX_FACET_VALUES]}
            self._facets = facets
        return self._facets

    def allowed(self, filters: dict[str, str]) -> np.ndarray | None:
        """Sorted positions of the rows matching every filter; None when there is no filter."""
        filters = {name: value for name, value in filters.items() if value}
        if not filters:
            return None
        if self.metadata is None:
            raise BrowseError(422, "this index has no metadata table to filter on")
        missing = [name for name in filters if name not in self.columns]
        if missing:
            raise BrowseError(422, f"this index has no {', '.join(missing)} column to filter on "
                                   f"(it has: {', '.join(name for name in FILTERS if name in self.columns)})")
        key = tuple(sorted(filters.items()))
        with self._lock:
            if key in self._allowed:
                self._allowed.move_to_end(key)
                return self._allowed[key]
        mask = None
        for name, value in filters.items():
            match = pc.equal(self.metadata.column(name), pa.scalar(value, pa.string()))
            mask = match if mask is None else pc.and_(mask, match)
        assert mask is not None
        positions = np.flatnonzero(np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool))
        with self._lock:
            self._allowed[key] = positions
            while len(self._allowed) > self._filter_cache:
                self._allowed.popitem(last=False)
        return positions

    # -- stored embeddings --------------------------------------------------------------------

    def vectors(self) -> np.ndarray:
        """The index's (N, D) embeddings: ``image_embeddings.npy`` memory-mapped, or read back from a flat index."""
        with self._lock:
            if not self._vectors_loaded:
                self._vectors_loaded = True
                self._vectors = self._load_vectors()
        if self._vectors is None:
            raise BrowseError(501, "this index keeps no embeddings to filter or find similar items with "
                                   f"(its folder has no {IMAGE_EMBEDDINGS})")
        return self._vectors

    def _load_vectors(self) -> np.ndarray | None:
        folder = getattr(self.index, "folder", None)
        if folder is not None and (folder / IMAGE_EMBEDDINGS).is_file():
            vectors = np.load(folder / IMAGE_EMBEDDINGS, mmap_mode="r")
            if len(vectors) == len(self):
                return vectors
        inner = getattr(self.index, "index", None)
        if inner is None:
            return None
        try:
            return np.asarray(faiss.downcast_index(inner).reconstruct_n(0, len(self)), dtype=np.float32)
        except RuntimeError:  # an index kind that cannot give its vectors back (IVF without a direct map)
            return None

    def vector(self, position: int) -> np.ndarray:
        self.check_position(position)
        return np.asarray(self.vectors()[position], dtype=np.float32)[None, :]

    # -- search -------------------------------------------------------------------------------

    def search(self, query: np.ndarray, k: int, offset: int = 0, filters: dict[str, str] | None = None,
               ) -> tuple[int, list[dict[str, Any]]]:
        """(rows that could be returned, the hits of ranks offset+1 .. offset+k) for one query vector."""
        allowed = self.allowed(filters or {})
        depth = offset + k
        if allowed is None:
            if self.metadata is None or not hasattr(self.index, "search_vectors"):
                hits = [hit.to_dict() for hit in self.index.search(query, depth)[0]]
                return len(self), hits[offset:]
            scores, positions = self.index.search_vectors(query, depth)
            found = [(float(score), int(position)) for score, position in zip(scores[0], positions[0]) if position >= 0]
            page = found[offset:]
            return len(self), self._hits([s for s, _ in page], [p for _, p in page], offset + 1)
        scores, positions = self._exact_top(np.asarray(query, dtype=np.float32).reshape(-1), allowed, depth)
        return len(allowed), self._hits(scores[offset:].tolist(), positions[offset:].tolist(), offset + 1)

    def _exact_top(self, query: np.ndarray, allowed: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        vectors = self.vectors()
        best_scores, best_positions = np.zeros(0, np.float32), np.zeros(0, np.int64)
        for start in range(0, len(allowed), CHUNK):
            chunk = allowed[start:start + CHUNK]
            scores = np.asarray(vectors[chunk], dtype=np.float32) @ query
            best_scores = np.concatenate([best_scores, scores])
            best_positions = np.concatenate([best_positions, chunk])
            if len(best_scores) > depth:
                keep = np.argpartition(-best_scores, depth - 1)[:depth]
                best_scores, best_positions = best_scores[keep], best_positions[keep]
        order = np.lexsort((best_positions, -best_scores))[:depth]
        return best_scores[order], best_positions[order]

    def similar(self, position: int, k: int, offset: int = 0, filters: dict[str, str] | None = None,
                ) -> tuple[int, list[dict[str, Any]]]:
        """Image -> image search from an archive row's stored embedding; the row itself ranks first among
        equal scores (an exact index always finds it: its score with itself is the largest)."""
        query = self.vector(position)
        total, hits = self.search(query, k, offset, filters)
        if offset == 0 and hits:
            mine = next((i for i, hit in enumerate(hits) if hit["position"] == position), None)
            if mine and hits[mine]["score"] >= hits[0]["score"] - 1e-5:
                hits.insert(0, hits.pop(mine))
                for rank, hit in enumerate(hits, 1):
                    hit["rank"] = rank
        return total, hits
