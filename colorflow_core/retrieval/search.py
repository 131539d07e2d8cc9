"""Exact cosine top-k with faiss, ties resolved to the lowest candidate index."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import InvalidInputError

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


def search_index(index: "faiss.Index", queries: torch.Tensor | np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`k` candidates per query by cosine, ties by lowest index: (LongTensor [Q,k], FloatTensor [Q,k])."""
    if not 1 <= k <= index.ntotal:
        raise InvalidInputError(f"k={k} is out of range for {index.ntotal} candidates")
    # faiss's default non-BLAS path is several times slower for the few query rows used here.
    load_faiss().cvar.distance_compute_blas_threshold = 1
    array = normalized(queries)
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


def exact_search(queries: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream's `argsort(cosine_similarity(Q[:,None], K[None], -1), descending=True)[:, :k]`, deterministic."""
    return search_index(build_index(keys), queries, k)
