"""Load the released UNet LoRA with peft, whatever spelling its keys use, and refuse partial loads."""
from __future__ import annotations

import re

import torch
from peft import LoraConfig
from torch import nn

from ..errors import IncompatibleWeightsError

#: The modules upstream's LoraConfig targets on the SD1.5 UNet.
SD_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
ADAPTER_NAME = "default"

_KEY = re.compile(r"^(?:unet\.|base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


def normalize_lora_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map `.lora_A.weight`, `.lora_A.default.weight`, `.lora_A.default_0.weight` (optionally `unet.`-prefixed)
    to peft's `<module>.lora_A.default.weight`; any other key is an error."""
    normalized: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        match = _KEY.match(key)
        if match is None:
            raise IncompatibleWeightsError(f"LoRA file holds a key that is not a LoRA weight: '{key}'")
        name = f"{match['module']}.lora_{match['ab']}.{ADAPTER_NAME}.weight"
        if name in normalized:
            raise IncompatibleWeightsError(f"LoRA file holds two tensors for '{name}'")
        normalized[name] = tensor
    return normalized


def lora_rank(state_dict: dict[str, torch.Tensor]) -> int:
    """The rank stored in the file (all A matrices must agree)."""
    ranks = {t.shape[0] for k, t in state_dict.items() if ".lora_A." in k}
    if len(ranks) != 1:
        raise IncompatibleWeightsError(f"LoRA file has inconsistent or no ranks: {sorted(ranks)}")
    return ranks.pop()


def apply_lora(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    targets: tuple[str, ...] = SD_LORA_TARGETS,
    alpha: float | None = None,
) -> int:
    """Add a peft adapter to `model` and load every tensor of `state_dict` into it; return the module count.

    Raises unless every file tensor found its place and every adapter weight came from the file.
    `alpha` defaults to the rank (scale 1.0, as in the release).
    """
    tensors = normalize_lora_keys(state_dict)
    rank = lora_rank(tensors)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=list(targets))
    model.add_adapter(config, adapter_name=ADAPTER_NAME)
    own = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
    unexpected = sorted(set(tensors) - set(own))
    missing = sorted(set(own) - set(tensors))
    if unexpected or missing:
        model.delete_adapters(ADAPTER_NAME)
        detail = f"{len(unexpected)} file tensors match no module (e.g. {unexpected[:2]}); " if unexpected else ""
        detail += f"{len(missing)} adapter weights are absent from the file (e.g. {missing[:2]})" if missing else ""
        raise IncompatibleWeightsError(f"LoRA does not fit this model: {detail}")
    for key, tensor in tensors.items():
        if own[key].shape != tensor.shape:
            model.delete_adapters(ADAPTER_NAME)
            raise IncompatibleWeightsError(f"LoRA tensor '{key}' has shape {tuple(tensor.shape)}, model wants {tuple(own[key].shape)}")
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:
        raise IncompatibleWeightsError(f"LoRA tensors were not applied: {result.unexpected_keys[:3]}")
    return len(tensors) // 2
