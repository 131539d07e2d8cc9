"""ComfyUI's model system for the native path (core MODEL / VAE, ModelPatcher, LoRA weight patches).

Imported only by the native nodes' functions, which run inside ComfyUI; like comfy_bridge, the only place these
`comfy.*` modules are touched.
"""
from __future__ import annotations

import torch

from ..colorflow_core.errors import IncompatibleWeightsError, InvalidInputError
from ..colorflow_core.models.lora import normalize_lora_keys


def _comfy():
    import comfy.lora
    import comfy.model_management
    import comfy.model_patcher
    import comfy.utils

    return comfy


class ColorFlowGuider(torch.nn.Module):
    """The guider in a plain container (its class name is what ComfyUI logs; ModelPatcher sets `.device`, which a
    diffusers ModelMixin refuses)."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module


def managed(module: torch.nn.Module):
    """`module` in ComfyUI's UNet dtype on its offload device, in a ModelPatcher ComfyUI loads and unloads."""
    comfy = _comfy()
    mm = comfy.model_management
    module = module.to(mm.unet_offload_device(), mm.unet_dtype()).eval()
    return comfy.model_patcher.ModelPatcher(ColorFlowGuider(module), load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def sd15_unet_config(model) -> dict:
    """The UNet config of a core SD1.5 MODEL; any other family (SDXL, SD2, Flux, an inpainting UNet…) is refused."""
    config = model.model.model_config
    unet = config.unet_config
    family = type(config).__name__
    if unet.get("context_dim") != 768 or unet.get("model_channels") != 320 or unet.get("in_channels", 4) != 4 \
            or "channel_mult" not in unet:
        raise InvalidInputError(f"ColorFlow Apply needs an SD1.5 MODEL (a plain 4-channel SD1.5 UNet); got {family}")
    return unet


def check_vae(vae) -> None:
    """Refuse a VAE that is not of the SD family (4 latent channels, 8× downscale, 2-D)."""
    channels, ratio = getattr(vae, "latent_channels", None), getattr(vae, "downscale_ratio", None)
    if channels != 4 or ratio != 8 or getattr(vae, "latent_dim", 2) != 2:
        raise InvalidInputError(
            f"ColorFlow Apply needs an SD1.5 VAE (4 latent channels, 8x downscale); got one with {channels} channels, "
            f"downscale {ratio}"
        )


def sigma_range(model, start_percent: float, end_percent: float) -> tuple[float, float]:
    """(high, low) sigma of a start/end percent range, as ControlNet computes it."""
    sampling = model.get_model_object("model_sampling")
    return (float(sampling.percent_to_sigma(start_percent)), float(sampling.percent_to_sigma(end_percent)))


def process_latents_in(model, latents: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents scaled into the model's latent space (SD1.5: × 0.18215)."""
    return model.get_model_object("latent_format").process_in(latents)


def lora_on(model, state_dict: dict[str, torch.Tensor], strength: float):
    """A clone of `model` with the release LoRA as ComfyUI weight patches; every file tensor must find its weight."""
    comfy = _comfy()
    tensors = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v
               for k, v in normalize_lora_keys(state_dict).items()}
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in tensors})
    # diffusers module names (the release's) → LDM weights of this UNet
    names = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    key_map = {k[: -len(".weight")]: f"diffusion_model.{v}" for k, v in names.items() if k.endswith(".weight")}
    unmapped = [m for m in modules if m not in key_map]
    patches = comfy.lora.load_lora(tensors, {m: key_map[m] for m in modules if m in key_map}, log_missing=False)
    clone = model.clone()
    applied = set(clone.add_patches(patches, strength))
    missing = unmapped + [m for m in modules if m in key_map and key_map[m] not in applied]
    if missing:
        raise IncompatibleWeightsError(
            f"ColorFlow LoRA: {len(missing)} of {len(modules)} LoRA modules found no weight in this MODEL "
            f"(e.g. {missing[:2]}): not the SD1.5 UNet the release was trained on"
        )
    return clone


def load_file(path) -> dict[str, torch.Tensor]:
    """A weight file read the way ComfyUI reads them (safetensors, or pickles with weights_only)."""
    return _comfy().utils.load_torch_file(str(path), safe_load=True)


def vae_state_dict(vae) -> dict[str, torch.Tensor]:
    """The core VAE's weights in the original `first_stage_model.*` layout."""
    state = vae.first_stage_model.state_dict()
    if not any(k.startswith("decoder.up.") for k in state):
        raise IncompatibleWeightsError("Guided Upscale needs an SD-family VAE (the original encoder/decoder layout)")
    return {f"first_stage_model.{k}": v for k, v in state.items()}
