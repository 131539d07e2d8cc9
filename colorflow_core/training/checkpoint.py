"""Atomic, resumable checkpoints: a complete folder appears under its final name or not at all.

    RUN_DIR/checkpoints/step-00000040/{trainable.safetensors, ema.safetensors, optimizer.pt, state.json}
    RUN_DIR/checkpoints/latest            the newest complete checkpoint's name (replaced atomically)

A checkpoint is written into a hidden temporary folder, every file fsynced, then renamed; a failure (disk full, a
kill) removes the temporary folder and leaves the previous checkpoint and `latest` as they were.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import ColorFlowError
from ..retrieval.store import atomic_write

LATEST = "latest"


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with path.open("rb") as handle:
            os.fsync(handle.fileno())


def save_checkpoint(folder: Path, step: int, tensors: dict[str, torch.Tensor], ema: dict[str, torch.Tensor] | None,
                    optimizer: dict[str, Any], state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint `step` under `folder` atomically, point `latest` at it, keep the newest `keep` ones."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    final, tmp = folder / name, folder / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "trainable.safetensors"))
        if ema is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
        torch.save(optimizer, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write(folder / LATEST, lambda path: path.write_text(name))
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            previous = latest_checkpoint(folder)
            kept = f"; {previous.name} is intact" if previous is not None else ""
            raise ColorFlowError(f"writing the checkpoint of step {step} failed ({exc}){kept}") from exc
        raise
    for old in sorted(p for p in folder.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    pointer = folder / LATEST
    if not pointer.is_file():
        return None
    path = folder / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def load_checkpoint(path: Path) -> tuple[dict, dict | None, dict, dict]:
    """(trainable tensors, EMA tensors or None, optimizer state, state.json) of a checkpoint folder."""
    ema = path / "ema.safetensors"
    return (
        load_file(str(path / "trainable.safetensors")),
        load_file(str(ema)) if ema.is_file() else None,
        torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True),
        json.loads((path / "state.json").read_text()),
    )
