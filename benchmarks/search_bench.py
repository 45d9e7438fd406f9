"""Search latency over N random unit vectors: numpy brute force vs clip_med's exact and approximate indexes.

    python benchmarks/search_bench.py                      # 1,000,000 x 512, 1000 queries, k=10
    python benchmarks/search_bench.py --n 100000 --hnsw    # quicker; also the HNSW graph index

Rows (all in the same run, on the same vectors and queries):

* ``numpy brute force`` (the baseline): ``queries @ vectors.T`` in chunks plus ``argpartition``;
* ``flat``: clip_med's exact index (FAISS ``IndexFlatIP``);
* ``ivf nprobe=P``: clip_med's approximate index (``IVF<nlist>,Flat``), one row per ``nprobe``;
* ``hnsw efSearch=E`` (with ``--hnsw``; slow to build at 1M on few cores).

Latency is reported for one query at a time (median and p95 over ``--single`` queries) and per
query within one batch of ``--queries``. Recall@k is the share of the exact top-k found. Random
vectors are the hard case for approximate search (no cluster structure); real embeddings, which
cluster, give higher recall at the same ``nprobe``. Memory: the vectors (N x D x 4 bytes) are held
up to three times (array, flat index, IVF index).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clip_med.inference.index import IndexConfig, build_index, set_search_params  # noqa: E402


def random_unit(n: int, dim: int, seed: int, centres: np.ndarray | None = None, chunk: int = 100_000) -> np.ndarray:
    """Uniform on the sphere, or spread around ``centres`` (clustered, as real embeddings are)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        block = rng.standard_normal((min(chunk, n - start), dim), dtype=np.float32)
        if centres is not None:
            block = 0.5 * block + centres[rng.integers(0, len(centres), len(block))]
        out[start:start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def numpy_search(vectors: np.ndarray, queries: np.ndarray, k: int, chunk: int = 262_144) -> np.ndarray:
    best_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_ids = np.zeros((len(queries), k), dtype=np.int64)
    for start in range(0, len(vectors), chunk):
        scores = queries @ vectors[start:start + chunk].T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        merged_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, 1)], axis=1)
        merged_ids = np.concatenate([best_ids, top + start], axis=1)
        keep = np.argsort(-merged_scores, axis=1, kind="stable")[:, :k]
        best_scores, best_ids = np.take_along_axis(merged_scores, keep, 1), np.take_along_axis(merged_ids, keep, 1)
    return best_ids


def timed(search, queries: np.ndarray, single: int) -> tuple[float, float, float, np.ndarray]:
    """(median ms, p95 ms for one query at a time; ms per query in one batch; batch results)."""
    latencies = []
    for query in queries[:single]:
        start = time.perf_counter()
        search(query[None])
        latencies.append((time.perf_counter() - start) * 1000)
    start = time.perf_counter()
    found = search(queries)
    batch_ms = (time.perf_counter() - start) * 1000 / len(queries)
    return float(np.median(latencies)), float(np.percentile(latencies, 95)), batch_ms, found


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, exact)]))


def index_rows(vectors: np.ndarray, queries: np.ndarray, exact: np.ndarray, cfg: IndexConfig,
               settings: dict[str, dict | None], args) -> list[tuple]:
    """Build one clip_med index and time it under each search setting."""
    start = time.perf_counter()
    index, factory = build_index(vectors, cfg=cfg)
    built = time.perf_counter() - start
    rows = []
    for label, params in settings.items():
        if params:
            set_search_params(index, **params)
        median, p95, batch_ms, found = timed(lambda q: index.search(q, args.k)[1], queries, args.single)
        name = "flat (exact, IndexFlatIP)" if cfg.kind == "flat" else f"{factory} {label}"
        rows.append((name, built, median, p95, batch_ms, recall(found, exact)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--single", type=int, default=100, help="queries timed one at a time")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--nlist", type=int, default=None, help="IVF cells (default: 4*sqrt(N))")
    parser.add_argument("--nprobe", default="8,32,128")
    parser.add_argument("--hnsw", action="store_true", help="also build and time an HNSW index (slow at 1M)")
    parser.add_argument("--ef-search", default="64,256")
    parser.add_argument("--threads", type=int, default=0, help="FAISS OpenMP threads (0: FAISS default)")
    parser.add_argument("--clusters", type=int, default=0,
                        help="draw vectors and queries around this many centres instead of uniformly (0)")
    args = parser.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)

    centres = (np.random.default_rng(42).standard_normal((args.clusters, args.dim), dtype=np.float32)
               if args.clusters else None)
    vectors = random_unit(args.n, args.dim, seed=0, centres=centres)
    queries = random_unit(args.queries, args.dim, seed=1, centres=centres)
    rows = []
    median, p95, batch_ms, exact = timed(lambda q: numpy_search(vectors, q, args.k), queries, args.single)
    rows.append(("numpy brute force (baseline)", 0.0, median, p95, batch_ms, 1.0))
    rows += index_rows(vectors, queries, exact, IndexConfig(kind="flat"), {"": None}, args)
    rows += index_rows(vectors, queries, exact, IndexConfig(kind="ivf", nlist=args.nlist),
                       {f"nprobe={p}": {"nprobe": int(p)} for p in args.nprobe.split(",")}, args)
    if args.hnsw:
        rows += index_rows(vectors, queries, exact, IndexConfig(kind="hnsw"),
                           {f"efSearch={e}": {"ef_search": int(e)} for e in args.ef_search.split(",")}, args)

    kind = f"clustered ({args.clusters} centres)" if args.clusters else "uniformly random"
    print(f"{args.n:,} {kind} unit vectors x {args.dim}-d, {args.queries} queries, k={args.k}, "
          f"FAISS threads {faiss.omp_get_max_threads()}")
    print(f"| index | build s | 1 query p50 ms | 1 query p95 ms | ms/query in a batch of {args.queries} "
          f"| recall@{args.k} vs exact |")
    print("|---|---|---|---|---|---|")
    for name, built, median, p95, batch_ms, found in rows:
        print(f"| {name} | {built:.1f} | {median:.2f} | {p95:.2f} | {batch_ms:.3f} | {found:.3f} |")


if __name__ == "__main__":
    main()
