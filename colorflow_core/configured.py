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


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' → CUDA if available, else MPS, else CPU; a device that does not exist here is an InvalidInputError."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise InvalidInputError(f"unknown device '{device}' (use cpu, cuda, cuda:N, mps or auto)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(f"device '{device}' asked for, but this PyTorch sees no CUDA GPU; use cpu or auto")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise InvalidInputError(f"device '{device}' asked for, but there are {torch.cuda.device_count()} CUDA GPU(s)")
    if resolved.type == "mps" and not _mps_available():
        raise InvalidInputError(f"device '{device}' asked for, but MPS is not available here; use cpu or auto")
    if resolved.type not in ("cpu", "cuda", "mps"):
        raise InvalidInputError(f"device '{device}' is not supported (use cpu, cuda, cuda:N, mps or auto)")
    return resolved


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
    named = config.get("_class_name", cls.__name__) if isinstance(config, dict) else cls.__name__
    if named != cls.__name__:
        raise IncompatibleWeightsError(
            f"{config_path} describes a {named}, not the {cls.__name__} this style needs (weights of another style?)"
        )
    weights = find_weight_file(folder, "diffusion_pytorch_model", root)
    try:
        with torch.device("meta"):
            model = cls.from_config(config)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
        raise IncompatibleWeightsError(f"{config_path} does not describe a valid {cls.__name__}: {exc}") from exc
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


#: The conv nets that run at page size: on CUDA their weights are kept channels_last, cuDNN's native layout (NCHW
#: convs transpose their input and output every call), and their large GroupNorms keep it (`gpu_kernels`).
PAGE_SIZE_NETS = (AutoencoderKL, MultiHiddenResNetModel)


def place_modules(modules: Sequence[object], device: torch.device, dtype: torch.dtype) -> None:
    """Move the `nn.Module`s among `modules` to `device`, cast to `dtype` (loaded weights are float32); on CUDA the
    `PAGE_SIZE_NETS` get channels_last weights."""
    cuda = torch.device(device).type == "cuda"
    for module in modules:
        if isinstance(module, torch.nn.Module):
            # No dtype argument for float32: diffusers warns on any dtype cast, even a no-op one.
            cast = {} if dtype == torch.float32 else {"dtype": dtype}
            layout = {"memory_format": torch.channels_last} if cuda and isinstance(module, PAGE_SIZE_NETS) else {}
            module.to(device=device, **cast, **layout)
