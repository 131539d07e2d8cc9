"""Configured models from release folders, loaded strictly; where and in which dtype they are placed."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from diffusers import AutoencoderKL

from .errors import IncompatibleWeightsError, InvalidInputError
from .models.fusion import MultiHiddenResNetModel
from .weights import find_weight_file, read_state_dict, require_file

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' → CUDA if available, else MPS, else CPU."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from its name ('float32', 'float16', 'bfloat16')."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InvalidInputError(f"unknown dtype '{dtype}' (choose {', '.join(DTYPES)})")
    return DTYPES[dtype]


def _load_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], path: Path) -> torch.nn.Module:
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise IncompatibleWeightsError(f"{path} does not fit its model: {' '.join(first)[:400]}") from exc
    return model


def load_configured(cls, folder: Path, root: Path | None = None, adapt=lambda model, state: state):
    """`cls` from `folder/config.json` built on the meta device, then strictly loaded with the folder's weights
    (`adapt(model, state_dict)` may first drop known aliases)."""
    config_path = require_file(folder / "config.json", root)
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise IncompatibleWeightsError(f"{config_path} is not valid JSON: {exc}") from exc
    weights = find_weight_file(folder, "diffusion_pytorch_model", root)
    with torch.device("meta"):
        model = cls.from_config(config)
    return _load_strict(model, adapt(model, read_state_dict(weights)), weights).eval()


def load_fusion(folder: Path, vae: AutoencoderKL, root: Path | None = None) -> MultiHiddenResNetModel:
    """The GSRP fusion net; its widths must match the VAE encoder's feature widths."""
    weights = find_weight_file(folder, "MultiResNetModel", root)
    state_dict = read_state_dict(weights)
    channels = MultiHiddenResNetModel.channels_from_state_dict(state_dict)
    expected = [vae.config.block_out_channels[0], *vae.config.block_out_channels]
    if channels != expected:
        raise IncompatibleWeightsError(f"{weights} has feature widths {channels}; this VAE gives {expected}")
    with torch.device("meta"):
        fusion = MultiHiddenResNetModel(channels_list=tuple(channels), num_tensors=len(channels))
    return _load_strict(fusion, state_dict, weights)


def place_modules(modules: Sequence[object], device: torch.device, dtype: torch.dtype) -> None:
    """Move the `nn.Module`s among `modules` to `device`, cast to `dtype` (loaded weights are float32)."""
    for module in modules:
        if isinstance(module, torch.nn.Module):
            # No dtype argument for float32: diffusers warns on any dtype cast, even a no-op one.
            module.to(device) if dtype == torch.float32 else module.to(device=device, dtype=dtype)
