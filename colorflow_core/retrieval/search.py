"""Exact cosine top-k with faiss, ties resolved to the lowest candidate index.

Large pools are searched in two passes where the CPU computes bf16 natively: a scan of a bf16 copy of the keys
(half the bytes of the float32 scan, which is bound by memory bandwidth), then an exact float32 re-rank of every
candidate the scan cannot rule out. The result is the same as the float32 search: for unit vectors the bf16 score
is within `BF16_SCORE_ERROR` of the float32 one, so no key outside the re-ranked set can reach the k-th score.
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
#: Bound on |bf16 score - float32 score| for unit vectors: keys and queries rounded to bf16 (unit roundoff 2^-8,
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

    `prefilter` (`prefilter_keys(index)`) makes the search two-pass, with the same result."""
    if not 1 <= k <= index.ntotal:
        raise InvalidInputError(f"k={k} is out of range for {index.ntotal} candidates")
    array = normalized(queries)
    if prefilter is not None:
        found = _prefiltered_search(index, prefilter, array, k)
        if found is not None:
            return found
    # faiss's default non-BLAS path is several times slower for the few query rows used here.
    load_faiss().cvar.distance_compute_blas_threshold = 1
    fetch = min(index.ntotal, k + 1)
    while True:
        scores, ids = index.search(array, fetch)
        # Complete once nothing beyond the fetched rows can tie with the k-th score.
        if fetch == index.ntotal or bool(np.all(scores[:, k - 1] > scores[:, fetch - 1])):
            break
        fetch = min(index.ntotal, fetch * 2)
    order = np.lexsort((ids, -scores), axis=1)[:, :k]
    return (
        torch.from_numpy(np.take_along_axis(ids, order, axis=1).astype(np.int64)),
        torch.from_numpy(np.take_along_axis(scores, order, axis=1).astype(np.float32)),
    )


def _prefiltered_search(
    index: "faiss.IndexFlat", prefilter: torch.Tensor, queries: np.ndarray, k: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """bf16 scan, then the float32 re-rank of every key within 2 x the error bound of the k-th bf16 score (a key
    whose float32 score reaches the k-th one scores at least that in bf16); None when that set is too large."""
    approx = (torch.from_numpy(queries).to(torch.bfloat16) @ prefilter.T).float()
    floor = approx.topk(k, dim=1).values[:, -1:] - 2 * BF16_SCORE_ERROR
    keep = approx >= floor
    if int(keep.sum()) > PREFILTER_MAX_SHARE * index.ntotal * len(queries):
        return None
    keys = index_vectors(index)
    ids, scores = [], []
    for query, row in zip(queries, keep.numpy()):
        candidates = np.flatnonzero(row)
        exact = keys[candidates] @ query
        order = np.lexsort((candidates, -exact))[:k]
        ids.append(candidates[order])
        scores.append(exact[order])
    return torch.from_numpy(np.stack(ids).astype(np.int64)), torch.from_numpy(np.stack(scores).astype(np.float32))


def exact_search(queries: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream's `argsort(cosine_similarity(Q[:,None], K[None], -1), descending=True)[:, :k]`, deterministic."""
    return search_index(build_index(keys), queries, k)
