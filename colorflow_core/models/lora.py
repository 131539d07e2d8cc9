"""Load the released LoRAs (SD1.5 UNet, PixArt transformer) with peft, whatever spelling their keys use,
and refuse partial loads."""
from __future__ import annotations

import re

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..errors import IncompatibleWeightsError

#: The modules upstream's LoraConfig targets on the SD1.5 UNet.
SD_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
#: The modules upstream's LoraConfig targets on PixArt-α (291 modules on PixArt-XL, incl. the Conv2d pos_embed.proj;
#: "proj_in" matches nothing there).
PIXART_LORA_TARGETS = (
    "to_k", "to_q", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "proj", "linear", "linear_1", "linear_2",
)
ADAPTER_NAME = "default"

_KEY = re.compile(r"^(?:unet\.|transformer\.|base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


def normalize_lora_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map `.lora_A.weight`, `.lora_A.default.weight`, `.lora_A.default_0.weight` (optionally `unet.`-prefixed)
    to peft's `<module>.lora_A.default.weight`; any other key is an error."""
    normalized: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise IncompatibleWeightsError(f"LoRA file holds a {type(tensor).__name__} under '{key}', not a tensor")
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
    `alpha` defaults to the rank (scale 1.0, as in the release). Models with diffusers' `add_adapter` (the UNet)
    use it; others (stock PixArt has none) get the adapter through `peft.inject_adapter_in_model`.
    """
    tensors = normalize_lora_keys(state_dict)
    if not tensors:
        raise IncompatibleWeightsError("LoRA file holds no tensors")
    modules = {name for name, _ in model.named_modules()}
    if not any(key.split(".lora_")[0] in modules for key in tensors):
        kind = "UNet" if "UNet" in type(model).__name__ else type(model).__name__
        raise IncompatibleWeightsError(
            f"none of the LoRA file's tensors match a {kind} module (e.g. '{next(iter(tensors))}'): a LoRA for another model?"
        )
    broken = [key for key, tensor in tensors.items() if not bool(torch.isfinite(tensor).all())]
    if broken:
        raise IncompatibleWeightsError(f"LoRA file holds NaN or infinite values in {len(broken)} tensor(s), e.g. '{broken[0]}'")
    rank = lora_rank(tensors)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=list(targets))
    add_lora_adapter(model, config)
    own = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
    unexpected = sorted(set(tensors) - set(own))
    missing = sorted(set(own) - set(tensors))
    if unexpected or missing:
        remove_lora_adapter(model)
        detail = f"{len(unexpected)} file tensors match no module (e.g. {unexpected[:2]}); " if unexpected else ""
        detail += f"{len(missing)} adapter weights are absent from the file (e.g. {missing[:2]})" if missing else ""
        raise IncompatibleWeightsError(f"LoRA does not fit this model: {detail}")
    for key, tensor in tensors.items():
        if own[key].shape != tensor.shape:
            remove_lora_adapter(model)
            raise IncompatibleWeightsError(f"LoRA tensor '{key}' has shape {tuple(tensor.shape)}, model wants {tuple(own[key].shape)}")
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:
        raise IncompatibleWeightsError(f"LoRA tensors were not applied: {result.unexpected_keys[:3]}")
    return len(tensors) // 2


def add_lora_adapter(model: nn.Module, config: LoraConfig) -> None:
    """Wrap `model`'s target modules with a peft LoRA named 'default' (diffusers' add_adapter where it exists)."""
    if hasattr(model, "add_adapter"):
        model.add_adapter(config, adapter_name=ADAPTER_NAME)
    else:
        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)


def remove_lora_adapter(model: nn.Module) -> None:
    """Undo `add_lora_adapter`: the model is left with its plain modules (and state-dict keys) again."""
    if hasattr(model, "delete_adapters"):
        model.delete_adapters(ADAPTER_NAME)
        return
    wrapped = [(name, module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    for name, module in wrapped:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())


def lora_module_count(model: nn.Module) -> int:
    """How many modules of `model` carry a LoRA adapter."""
    return sum(isinstance(module, BaseTunerLayer) for module in model.modules())
