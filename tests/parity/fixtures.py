"""Readers for the upstream golden fixtures (every tensor cloned, as their README asks)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file


def tensors(parity_dir: Path, name: str) -> dict[str, torch.Tensor]:
    """All tensors of `stages/<name>.safetensors`, cloned."""
    return {k: v.clone() for k, v in load_file(str(parity_dir / "stages" / f"{name}.safetensors")).items()}


def arrays(parity_dir: Path, name: str) -> dict[str, np.ndarray]:
    """All arrays of `stages/<name>.npz`, copied."""
    with np.load(parity_dir / "stages" / f"{name}.npz") as data:
        return {k: data[k].copy() for k in data.files}


def image(array: np.ndarray) -> Image.Image:
    """A PIL image of a stored H×W×C uint8 array."""
    return Image.fromarray(array)


def assert_rel(got: torch.Tensor, ref: torch.Tensor, what: str = "") -> None:
    """The fixtures' 'rel' tolerance: |got - ref| <= 1e-5 + 1e-5 * max|ref|."""
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    bound = 1e-5 + 1e-5 * ref.abs().max().item()
    worst = (got.float() - ref.float()).abs().max().item()
    assert worst <= bound, f"{what}: max abs diff {worst:.3g} > {bound:.3g}"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images."""
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
