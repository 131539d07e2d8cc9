"""Exact cosine top-k with faiss, ties resolved to the lowest candidate index.

Every search is a fast scan that keeps each key whose score could reach the k-th best, then a float64 re-score of
those keys. The scan is faiss's float32 product, or, for large pools where the CPU computes bf16 natively, a bf16
copy of the keys (half the bytes of the float32 scan, which is bound by memory bandwidth). Both keep every key
that can matter (a proven error bound per scan), and the final order comes from the same float64 scores, so the
result does not depend on which scan ran.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import InvalidInputError
from ..runtime import cpu_has_native_bf16

if TYPE_CHECKING:
    import faiss


def load_faiss():
    """faiss, imported on first use: its import logs CPU-feature probing that has no place at start-up."""
    import faiss

    return faiss


def normalized(vectors: torch.Tensor | np.ndarray) -> np.ndarray:
    """Row-wise L2-normalised float32 copy (zero rows stay zero)."""
    if isinstance(vectors, torch.Tensor):
        vectors = vectors.detach().cpu().numpy()
    array = np.array(vectors, dtype=np.float32, copy=True, order="C")
    load_faiss().normalize_L2(array)
    return array


def build_index(keys: torch.Tensor | np.ndarray) -> "faiss.IndexFlatIP":
    """An exact inner-product index over the L2-normalised `keys` (so scores are cosine similarities)."""
    array = normalized(keys)
    index = load_faiss().IndexFlatIP(array.shape[1])
    index.add(array)
    return index


#: Pools from this many vectors on get a bf16 prefilter (below it a float32 scan takes well under a millisecond).
PREFILTER_MIN_VECTORS = 20_000
#: Bound on |bf16 score - exact score| for unit vectors: keys and queries rounded to bf16 (unit roundoff 2^-8,
#: one u each), float32 accumulation over <= 4096 dims (< 2.5e-4), the product rounded to bf16 (one u), with margin.
BF16_SCORE_ERROR = 4 * 2.0**-8
#: Above this share of the pool in the re-rank set, the prefilter saves nothing: search in float32 instead.
PREFILTER_MAX_SHARE = 0.1


def index_vectors(index: "faiss.IndexFlat") -> np.ndarray:
    """A flat index's stored (normalised) vectors as a zero-copy [ntotal, d] float32 view (valid while it lives)."""
    pointer = load_faiss().rev_swig_ptr(index.get_xb(), index.ntotal * index.d)
    return pointer.reshape(index.ntotal, index.d)


def prefilter_keys(index: "faiss.IndexFlat") -> torch.Tensor | None:
    """The bf16 copy of a large index's keys for `search_index`'s first pass; None where it would not pay (a small
    pool, or a CPU that only emulates bf16)."""
    if index.ntotal < PREFILTER_MIN_VECTORS or index.d > 4096 or not cpu_has_native_bf16():
        return None
    return torch.from_numpy(index_vectors(index)).to(torch.bfloat16)


def search_index(
    index: "faiss.IndexFlat", queries: torch.Tensor | np.ndarray, k: int, prefilter: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`k` candidates per query by cosine, ties by lowest index: (LongTensor [Q,k], FloatTensor [Q,k]).

    A fast scan (faiss float32, or bf16 with `prefilter = prefilter_keys(index)`) picks every key whose score could
    reach the k-th best; those are scored again in float64, so the ranking of near-ties never depends on which scan
    ran (the two scans round differently)."""
    if not 1 <= k <= index.ntotal:
        raise InvalidInputError(f"k={k} is out of range for {index.ntotal} candidates")
    array = normalized(queries)
    candidates = _prefiltered_candidates(index, prefilter, array, k) if prefilter is not None else None
    if candidates is None:
        candidates = _float32_candidates(index, array, k)
    keys = index_vectors(index)
    ids, scores = [], []
    for query, found in zip(array, candidates):
        # Row-wise products summed by numpy's per-row reduction: unlike a BLAS product, a key's score does not depend
        # on where it sits among the candidates, so identical keys tie exactly (and go to the lowest index).
        exact = (keys[found].astype(np.float64) * query.astype(np.float64)).sum(axis=1)
        order = np.lexsort((found, -exact))[:k]
        ids.append(found[order])
        scores.append(exact[order])
    return torch.from_numpy(np.stack(ids).astype(np.int64)), torch.from_numpy(np.stack(scores).astype(np.float32))


def float32_score_error(dim: int) -> float:
    """Bound on |float32 dot product - exact| for unit vectors of `dim` float32 components (accumulation only)."""
    gamma = dim * 2.0**-24
    return gamma / (1 - gamma)


def _float32_candidates(index: "faiss.IndexFlat", queries: np.ndarray, k: int) -> list[np.ndarray]:
    """Per query, the ids of every key whose exact score could reach the k-th best, from faiss's float32 scan."""
    # faiss's default non-BLAS path is several times slower for the few query rows used here.
    load_faiss().cvar.distance_compute_blas_threshold = 1
    margin = 2 * float32_score_error(index.d)
    fetch = min(index.ntotal, k + 16)  # a few spare rows: a second, larger search is rarely needed
    while True:
        scores, ids = index.search(queries, fetch)
        floor = scores[:, k - 1 : k] - margin
        # Complete once every unfetched key is below the floor (it cannot reach the k-th exact score).
        if fetch == index.ntotal or bool(np.all(scores[:, fetch - 1 :] < floor)):
            break
        fetch = min(index.ntotal, fetch * 2)
    return [row_ids[row_scores >= row_floor] for row_ids, row_scores, row_floor in zip(ids, scores, floor[:, 0])]


def _prefiltered_candidates(
    index: "faiss.IndexFlat", prefilter: torch.Tensor, queries: np.ndarray, k: int
) -> list[np.ndarray] | None:
    """Per query, the ids of every key within 2 x the error bound of the k-th bf16 score (a key whose exact score
    reaches the k-th one scores at least that in bf16); None when that set is too large to pay."""
    approx = (torch.from_numpy(queries).to(torch.bfloat16) @ prefilter.T).float()
    floor = approx.topk(k, dim=1).values[:, -1:] - 2 * BF16_SCORE_ERROR
    keep = approx >= floor
    if int(keep.sum()) > PREFILTER_MAX_SHARE * index.ntotal * len(queries):
        return None
    return [np.flatnonzero(row) for row in keep.numpy()]


def exact_search(queries: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream's `argsort(cosine_similarity(Q[:,None], K[None], -1), descending=True)[:, :k]`, deterministic."""
    return search_index(build_index(keys), queries, k)
