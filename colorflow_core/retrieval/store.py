"""Atomic file writes: write a temporary file beside the target, fsync it, then `os.replace`.

Files get the permissions the user's umask gives a new file (the temporary file itself starts private)."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import suppress
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from .search import load_faiss


def _new_file_mode() -> int:
    """The mode `open()` gives a new file under this process's umask (read once: setting it is process-wide)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _new_file_mode()


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary file in `path`'s folder and move it over `path` only once complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        _fsync(tmp)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _fsync(path: Path) -> None:
    """Flush a written file to disk so that the rename never exposes unwritten data after a crash."""
    with path.open("rb+") as handle:
        os.fsync(handle.fileno())


def write_json(path: Path, data: Any) -> None:
    """Atomically write `data` as indented JSON."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8"))


def write_npy(path: Path, array: np.ndarray) -> None:
    """Atomically write one array as .npy."""

    def write(tmp: Path) -> None:
        with tmp.open("wb") as handle:
            np.save(handle, array, allow_pickle=False)

    atomic_write(path, write)


def write_png(path: Path, image: Image.Image) -> None:
    """Atomically write a lossless PNG."""
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def write_faiss_index(path: Path, index: Any) -> None:
    """Atomically write a faiss index."""
    atomic_write(path, lambda tmp: load_faiss().write_index(index, str(tmp)))
