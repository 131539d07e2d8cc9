"""A reference pool store shared by several real processes: nothing added by one is lost by another.

Each test starts Python processes (each imports torch: a few seconds apiece), because only separate processes show
what a lock, a re-read before saving and a kill -9 really do.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from colorflow_core.retrieval import PoolStoreError, ReferencePool
from tests.core.pool_worker import ThumbnailEncoder, image

ROOT = Path(__file__).resolve().parents[2]


def _worker(*args: object, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.core.pool_worker", *map(str, args)], cwd=ROOT, text=True, **kwargs,
    )


def _finish(process: subprocess.Popen) -> str:
    out, _ = process.communicate(timeout=240)
    assert process.returncode == 0, out
    return out or ""


def _listed(store: Path) -> list[str]:
    return [entry["hash"] for entry in json.loads((store / "pool.json").read_text())["references"]]


def _seeded_pool(store: Path, seed: int = 5) -> ReferencePool:
    pool = ReferencePool.open(store, ThumbnailEncoder())
    pool.add(image(seed))
    return pool


def test_two_processes_adding_at_once_keep_every_reference(tmp_path):
    store, go = tmp_path / "pool", tmp_path / "go"
    _seeded_pool(store)
    adders = [_worker("add", store, seed, 6, tmp_path / f"ready{seed}", go) for seed in (1, 2)]
    while not all((tmp_path / f"ready{seed}").exists() for seed in (1, 2)):
        assert all(adder.poll() is None for adder in adders), "an adder stopped early"
    go.touch()
    for adder in adders:
        _finish(adder)
    pool = ReferencePool.open(store, ThumbnailEncoder())
    assert len(pool) == 13 and len(set(_listed(store))) == 13
    assert all((store / "refs" / f"{digest}.png").is_file() for digest in _listed(store))


def test_a_searching_process_never_drops_what_another_adds(tmp_path):
    store, ready, done = tmp_path / "pool", tmp_path / "ready", tmp_path / "done"
    _seeded_pool(store)
    searcher = _worker("search", store, ready, done, stdout=subprocess.PIPE)
    while not ready.exists():
        assert searcher.poll() is None, "the searcher stopped early"
    adder = _worker("add", store, 3, 5, tmp_path / "adder_ready", ready)
    _finish(adder)
    done.touch()
    seen = int(_finish(searcher).strip())
    assert len(_listed(store)) == 6 and len(ReferencePool.open(store, ThumbnailEncoder())) == 6
    assert seen == 6  # the searcher reloaded the store the adder changed


def test_kill_9_during_a_save_leaves_a_working_pool_and_no_stray_files(tmp_path):
    store = tmp_path / "pool"
    _seeded_pool(store)
    before = (store / "pool.json").read_bytes()
    hung = _worker("hang", store, 8, stdout=subprocess.PIPE)
    assert hung.stdout.readline().strip() == "saving"
    assert [p for p in store.rglob("*.tmp")], "the worker should be inside a save"
    os.kill(hung.pid, signal.SIGKILL)
    hung.wait(timeout=30)
    hung.stdout.close()
    assert (store / "pool.json").read_bytes() == before
    pool = ReferencePool.open(store, ThumbnailEncoder())
    assert not [p for p in store.rglob("*.tmp")] and len(pool) == 1
    assert pool.add(image(8, (400, 400))) == 1  # the dead writer's lock is gone with it
    assert len(ReferencePool.open(store, ThumbnailEncoder())) == 2


def test_two_pool_objects_in_one_process_merge_instead_of_overwriting(tmp_path):
    store = tmp_path / "pool"
    first, second = _seeded_pool(store), ReferencePool.open(store, ThumbnailEncoder())
    second.add(image(11))
    query = image(7, (64, 64))
    assert first.search(query, size=(64, 96)).references == second.references
    first.add(image(12))
    assert len(ReferencePool.open(store, ThumbnailEncoder())) == 3 and len(second.search(query, size=(96, 64)).references) == 3


def test_searching_never_writes_the_pool_file(tmp_path):
    store = tmp_path / "pool"
    _seeded_pool(store).add(image(6))
    before = (store / "pool.json").stat().st_mtime_ns, (store / "pool.json").read_bytes()
    pool = ReferencePool.open(store, ThumbnailEncoder())
    for size in ((64, 96), (96, 64), (64, 64)):
        pool.search(image(7, (64, 64)), size=size)
    assert ((store / "pool.json").stat().st_mtime_ns, (store / "pool.json").read_bytes()) == before


def test_an_empty_or_corrupt_embedding_file_is_a_cache_miss(tmp_path):
    store = tmp_path / "pool"
    pool = _seeded_pool(store)
    query = image(7, (64, 64))
    expected = pool.search(query, size=(64, 96)).indices
    (npy,) = store.rglob("*.npy")
    for garbage in (b"", b"\x93NUMPY", np.arange(3).tobytes()):
        next(store.glob("index_*.faiss")).unlink()
        npy.write_bytes(garbage)
        fresh = ReferencePool.open(store, ThumbnailEncoder())
        assert fresh.search(query, size=(64, 96)).indices.tolist() == expected.tolist() and fresh.embedded_count == 5


def test_a_store_that_cannot_be_written_is_searched_but_refuses_additions(tmp_path, monkeypatch):
    store = tmp_path / "pool"
    _seeded_pool(store)
    pool = ReferencePool.open(store, ThumbnailEncoder())

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("colorflow_core.retrieval.store.atomic_write", read_only)
    assert len(pool.search(image(7, (64, 64)), size=(128, 64)).references) == 1  # a new size: nothing cached
    with pytest.raises(PoolStoreError, match="cannot write reference pool .*Permission denied"):
        pool.add(image(9))
    assert len(ReferencePool.open(store, ThumbnailEncoder())) == 1
