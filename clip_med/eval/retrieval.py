"""Recall@k for paired embeddings (item i's positive is item i), in chunks so N can be large."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def positive_ranks(queries: np.ndarray, gallery: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """0-based rank of each query's own pair among all gallery items (ties count in its favour)."""
    n = len(queries)
    ranks = np.empty(n, dtype=np.int64)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        scores = queries[start:stop] @ gallery.T
        positive = scores[np.arange(stop - start), np.arange(start, stop)]
        ranks[start:stop] = (scores > positive[:, None]).sum(axis=1)
    return ranks


def recall_at_k(queries: np.ndarray, gallery: np.ndarray, ks: Sequence[int] = (1, 5, 10),
                chunk: int = 1024) -> dict[str, float]:
    ranks = positive_ranks(queries, gallery, chunk)
    result = {f"R@{k}": float((ranks < k).mean()) for k in ks}
    result["median_rank"] = float(np.median(ranks) + 1)
    result["mean_rank"] = float(ranks.mean() + 1)
    return result


def retrieval_metrics(image: np.ndarray, text: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, Any]:
    return {
        "n": int(len(image)),
        "image_to_text": recall_at_k(image, text, ks),
        "text_to_image": recall_at_k(text, image, ks),
    }
