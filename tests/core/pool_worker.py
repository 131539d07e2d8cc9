"""A separate process sharing a reference pool store with others (run by test_pool_sharing.py).

    python -m tests.core.pool_worker add STORE SEED COUNT READY GO   open, touch READY, add COUNT images (one add()
                                                                  each) once GO exists
    python -m tests.core.pool_worker search STORE READY DONE      open, touch READY, search at 9 sizes until DONE
                                                                  exists, then at a new one; print the reference count
    python -m tests.core.pool_worker hang STORE SEED              add one image and stop for good inside its save
"""
from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from colorflow_core.retrieval import ReferencePool
from colorflow_core.retrieval import store as store_module


class ThumbnailEncoder:
    """Deterministic 12-d embedding (2x2 RGB thumbnail), as the tests' FakeEncoder."""

    name, dim = "fake:v1", 12

    def encode(self, images):
        rows = [np.asarray(im.convert("RGB").resize((2, 2), Image.BILINEAR), np.float32).ravel() / 255 for im in images]
        return torch.from_numpy(np.stack(rows) - 0.5)


def image(seed: int, size: tuple[int, int] = (40, 60)) -> Image.Image:
    """A random RGB image, different for every seed."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _wait_for(path: Path) -> None:
    while not path.exists():
        time.sleep(0.01)


def add(store: str, seed: str, count: str, ready: str, go: str) -> None:
    pool = ReferencePool.open(store, ThumbnailEncoder())
    Path(ready).touch()
    _wait_for(Path(go))
    for index in range(int(count)):
        pool.add(image(int(seed) * 1000 + index))


def search(store: str, ready: str, done: str) -> None:
    pool = ReferencePool.open(store, ThumbnailEncoder())
    query = image(7, (64, 64)).convert("L").convert("RGB")
    Path(ready).touch()
    sizes = itertools.cycle([(32 * a, 32 * b) for a in range(2, 5) for b in range(2, 5)])
    while not Path(done).exists():
        pool.search(query, size=next(sizes))
    print(len(pool.search(query, size=(320, 320)).references))  # a size never searched: a new index


def hang(store: str, seed: str) -> None:
    """Stop forever after the new reference's temporary file is written, before it replaces anything."""

    def stuck(src, dst):
        print("saving", flush=True)
        time.sleep(3600)

    pool = ReferencePool.open(store, ThumbnailEncoder())
    store_module.os.replace = stuck
    pool.add(image(int(seed), (400, 400)))


if __name__ == "__main__":
    {"add": add, "search": search, "hang": hang}[sys.argv[1]](*sys.argv[2:])
