"""Checks made before any work starts, and the one check a stage's output gets: nothing is lost to a late failure."""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch

from .errors import InvalidInputError, NonFiniteError


def check_writable_folder(path: str | Path, what: str) -> Path:
    """`path` as a folder a file can be written in (created when missing); InvalidInputError naming `what` otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InvalidInputError(f"{what} '{path}' is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise InvalidInputError(f"{what} '{path}' cannot be written: {exc.strerror or exc}") from exc
    return path


def check_finite(value: float, what: str) -> float:
    """`value` when it is a finite number; InvalidInputError naming `what` for NaN and infinities."""
    if not math.isfinite(value):
        raise InvalidInputError(f"{what} must be a finite number, got {value}")
    return value


def check_finite_tensor(tensor: torch.Tensor, stage: str) -> torch.Tensor:
    """`tensor` when every value is finite; NonFiniteError naming the stage that produced it otherwise."""
    if not bool(torch.isfinite(tensor).all()):
        raise NonFiniteError(
            f"{stage} produced NaN or infinite values: check the guidance and guider scales and the weights "
            "(a LoRA or guider file holding NaN)"
        )
    return tensor
