"""Exact retrieval over large synthetic pools, and the embedding-cache check."""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ...retrieval import ReferencePool
from ...retrieval.search import build_index, prefilter_keys, search_index
from .meter import MB

def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def _timed(function: Callable[[], Any], repeats: int) -> list[float]:
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return times


def run_retrieval_bench(
    pool_sizes: Sequence[int] = (1_000, 10_000, 100_000),
    dim: int = 1024,
    batches: Sequence[int] = (4, 64),
    k: int = 3,
    repeats: int = 30,
    seed: int = 0,
    torch_baseline: bool = True,
    faiss_threads: Sequence[int] | None = None,
) -> dict:
    """Exact top-k over pools of random unit vectors with the library's `build_index`/`search_index`
    (faiss IndexFlatIP; `search_index` sets distance_compute_blas_threshold = 1), two-pass with the bf16
    prefilter where `prefilter_keys` gives one (then the float32-only search is timed too and the results
    compared). A batch of 4 queries is one page's 4 patches; larger batches are several pages searched at once."""
    import faiss

    rng = np.random.default_rng(seed)
    default_threads = faiss.omp_get_max_threads()
    rows = []
    try:
        for n in pool_sizes:
            keys = _unit(rng, n, dim)
            start = time.perf_counter()
            index = build_index(keys)
            prefilter = prefilter_keys(index)
            build_s = time.perf_counter() - start
            for batch in batches:
                queries = _unit(rng, batch, dim)
                for threads in faiss_threads or [default_threads]:
                    faiss.omp_set_num_threads(threads)
                    times = _timed(lambda: search_index(index, queries, k, prefilter), repeats)
                    row = {
                        "pool": n, "dim": dim, "k": k, "queries_per_search": batch, "faiss_threads": threads,
                        "two_pass": prefilter is not None,
                        "build_s": round(build_s, 4), "median_ms_per_search": 1e3 * statistics.median(times),
                        "min_ms_per_search": 1e3 * min(times), "median_ms_per_query": 1e3 * statistics.median(times) / batch,
                        "min_ms_per_query": 1e3 * min(times) / batch, "pool_mb": round(keys.nbytes / MB, 1),
                    }
                    if prefilter is not None:
                        plain = _timed(lambda: search_index(index, queries, k), repeats)
                        row["float32_median_ms_per_query"] = 1e3 * statistics.median(plain) / batch
                        (ids, scores), (ids32, scores32) = search_index(index, queries, k, prefilter), search_index(index, queries, k)
                        row["same_as_float32"] = torch.equal(ids, ids32) and torch.allclose(scores, scores32, atol=1e-6)
                    rows.append(row)
                faiss.omp_set_num_threads(default_threads)
                if torch_baseline:
                    keys_t, queries_t = torch.from_numpy(keys), torch.from_numpy(queries)
                    base = _timed(lambda: torch.topk(queries_t @ keys_t.T, k, dim=1), repeats)
                    for row in rows[-len(faiss_threads or [default_threads]):]:
                        row["torch_topk_median_ms_per_query"] = 1e3 * statistics.median(base) / batch
            del index, keys
    finally:
        faiss.omp_set_num_threads(default_threads)
    return {
        "faiss": getattr(faiss, "__version__", "?"),
        "faiss_threads_default": default_threads,
        "blas_threshold": int(faiss.cvar.distance_compute_blas_threshold),
        "target_ms_per_query_at_100k": 5.0,
        "rows": rows,
    }


def embedding_cache_check(encoder: Any, references: Sequence, query, size: tuple[int, int], store: Path) -> dict:
    """Two runs over the same references and store: the first embeds 5 candidates per reference, the second none."""
    counts, times = [], []
    for _ in range(2):
        start = time.perf_counter()
        pool = ReferencePool(encoder, store=store)
        pool.add(list(references))
        pool.search(query, size=size)
        times.append(time.perf_counter() - start)
        counts.append(pool.embedded_count)
    return {"references": len(references), "first_run_embedded": counts[0], "second_run_embedded": counts[1],
            "first_run_s": round(times[0], 4), "second_run_s": round(times[1], 4), "ok": counts[1] == 0 and counts[0] > 0}
