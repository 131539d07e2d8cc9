"""The native path: ColorFlow as a patch on a core SD1.5 MODEL, sampled by core KSampler, decoded by a core VAE."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..colorflow_core.canvas import split_canvas
from ..colorflow_core.errors import InvalidInputError
from ..colorflow_core.loading import load_fusion, load_guider
from ..colorflow_core.styles import STYLES
from ..colorflow_core.models.residual_sites import ResidualLayout, guider_layout
from ..colorflow_core.options import gsrp_generator
from ..colorflow_core.pipelines.guided_sr import GuidedSuperResolver
from ..colorflow_core.single_file import sd15_vae_from_ldm
from ..colorflow_core.weights import find_weight_file
from . import comfy_bridge, inputs, model_choices, native_bridge
from .native_patch import ColorFlowGuidance, patch_model
from .tensors import images_to_pil, pair_batches, pil_to_images

GUIDER_FOLDER = STYLES["gray"].folder
RELEASE_TOOLTIP = "ColorFlow release folder in models/colorflow/ (its GraySD/ holds the guider, LoRA and fusion net)."


@dataclass(frozen=True)
class ColorFlowPatch:
    """COLORFLOW_PATCH: the GraySD guider as a ComfyUI-managed model, and where its residuals go."""

    guider: torch.nn.Module  # ColorGuiderSDModel
    patcher: object  # the comfy.model_patcher.ModelPatcher that loads and offloads it
    layout: ResidualLayout
    folder: Path


def _release(choice: str) -> Path:
    return model_choices.release_folder(choice) / GUIDER_FOLDER


def _release_input():
    return (model_choices.release_choices(), {"tooltip": RELEASE_TOOLTIP})


class ColorFlowPatchLoader:
    """Load the release's colour-ID guider for ColorFlow Apply (ComfyUI loads and offloads it with the MODEL)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"release": _release_input()}}

    RETURN_TYPES = ("COLORFLOW_PATCH",)
    RETURN_NAMES = ("colorflow_patch",)
    FUNCTION = "load"
    CATEGORY = "ColorFlow/native"
    DESCRIPTION = "The GraySD ColorGuider of a ColorFlow release, managed by ComfyUI's model manager (dtype and devices from it)."

    def load(self, release: str):
        """Return the guider patch."""
        folder = _release(release)
        patcher = native_bridge.managed(load_guider(folder, folder.parent))
        guider = patcher.model.module
        return (ColorFlowPatch(guider, patcher, guider_layout(guider), folder),)


class ColorFlowLoRALoader:
    """The release's UNet LoRA as ComfyUI weight patches (core LoraLoaderModelOnly drops its attention tensors)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SD1.5 MODEL (Load Checkpoint)."}),
            "release": _release_input(),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01, "tooltip": "LoRA strength (the release: 1.0)."}),
        }}

    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"
    CATEGORY = "ColorFlow/native"
    DESCRIPTION = (
        "Applies GraySD/unet_lora.bin through ComfyUI's LoRA machinery; fails if any of its tensors finds no weight. "
        "Core LoraLoaderModelOnly reads the file but loads only its feed-forward tensors (its key map has no "
        "'attn1.to_q'-style names), so use this node."
    )

    def load(self, model, release: str, strength: float):
        """Return a patched clone of `model`."""
        native_bridge.sd15_unet_config(model)
        folder = _release(release)
        lora = native_bridge.load_file(find_weight_file(folder, "unet_lora", folder.parent))
        return (native_bridge.lora_on(model, lora, strength),)


def _check_guider_fits(patch: ColorFlowPatch, unet_config: dict) -> None:
    config = patch.guider.config
    widths = [unet_config["model_channels"] * m for m in unet_config["channel_mult"]]
    layers = set(unet_config["num_res_blocks"])
    if list(config.block_out_channels) != widths or layers != {config.layers_per_block}:
        raise InvalidInputError(
            f"the guider (widths {list(config.block_out_channels)}, {config.layers_per_block} layers per level) does not "
            f"fit this UNet (widths {widths}, layers {sorted(layers)})"
        )


def canvas_condition(model, vae, canvas: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The guider's 9 channels per canvas, [2 (uncond, cond), B, 9, h, w]: latents of the references-only half,
    the keep-mask, latents of the query-only half (ComfyUI encodes the posterior mean)."""
    if canvas.ndim != 4 or mask.shape[-2:] != canvas.shape[1:3]:
        raise InvalidInputError(
            f"the mask is {mask.shape[-1]}x{mask.shape[-2]} but the canvas is {canvas.shape[2]}x{canvas.shape[1]}: "
            "give the canvas and mask from the same Stitch Canvas"
        )
    height, width = canvas.shape[1:3]
    if height % 16 or width % 16:
        raise InvalidInputError(f"canvas {width}x{height} must be a multiple of 16 (twice the VAE's 8)")
    halves = [split_canvas(picture) for picture in images_to_pil(canvas)]
    references = native_bridge.process_latents_in(model, vae.encode(pil_to_images([r for r, _ in halves])[..., :3]))
    query = native_bridge.process_latents_in(model, vae.encode(pil_to_images([q for _, q in halves])[..., :3]))
    masks = mask.reshape(-1, 1, height, width).to(references)
    if masks.shape[0] != references.shape[0]:
        masks = masks.expand(references.shape[0], -1, -1, -1)
    keep = F.interpolate(1 - masks.float(), size=references.shape[-2:], mode="bilinear", align_corners=False)
    condition = torch.cat([references, keep.to(references), query], dim=1)
    return torch.stack([condition, condition])


class ColorFlowApply:
    """Patch a core SD1.5 MODEL with ColorFlow's colour-ID guider for one canvas; sample it with core KSampler."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "SD1.5 MODEL with the ColorFlow LoRA (ColorFlow LoRA Loader)."}),
            "colorflow_patch": ("COLORFLOW_PATCH", {"tooltip": "From ColorFlow Patch Loader."}),
            "vae": ("VAE", {"tooltip": "The SD1.5 VAE (Load Checkpoint's): encodes the canvas for the guider."}),
            "canvas": ("IMAGE", {"tooltip": "The 2W×2H canvas from ColorFlow Stitch Canvas."}),
            "mask": ("MASK", {"tooltip": "The canvas mask from ColorFlow Stitch Canvas (1 = page area)."}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01, "tooltip": "Guider residual scale (the release: 1.0)."}),
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip": "Where in the sampling the guider starts (like ControlNet's)."}),
            "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip": "Where in the sampling the guider stops."}),
        }}

    RETURN_TYPES = ("MODEL", "LATENT")
    RETURN_NAMES = ("model", "latent")
    FUNCTION = "apply"
    CATEGORY = "ColorFlow/native"
    DESCRIPTION = (
        "Returns a clone of the MODEL whose every UNet call also runs the ColorFlow guider on the canvas and adds its "
        "12 + 1 + 15 residuals where the release adds them, and the empty LATENT of the canvas size to sample into. "
        "Decode the sample with VAE Decode, then ColorFlow Crop Page (or Guided Upscale from the canvas)."
    )

    def apply(self, model, colorflow_patch: ColorFlowPatch, vae, canvas, mask, strength: float, start_percent: float,
              end_percent: float):
        """Return (patched MODEL clone, empty LATENT of the canvas size)."""
        unet_config = native_bridge.sd15_unet_config(model)
        native_bridge.check_vae(vae)
        _check_guider_fits(colorflow_patch, unet_config)
        if start_percent > end_percent:
            raise InvalidInputError(f"start_percent {start_percent} is after end_percent {end_percent}")
        condition = canvas_condition(model, vae, canvas, mask).to(comfy_bridge.intermediate_device())
        full_range = start_percent == 0.0 and end_percent == 1.0
        guidance = ColorFlowGuidance(
            colorflow_patch.guider, colorflow_patch.patcher, condition, colorflow_patch.layout, strength,
            None if full_range else native_bridge.sigma_range(model, start_percent, end_percent),
        )
        latent = torch.zeros(condition.shape[1], 4, *condition.shape[-2:], device=comfy_bridge.intermediate_device())
        return (patch_model(model.clone(), guidance), {"samples": latent})


class ColorFlowCropPage:
    """The page (W×H centre) of a decoded 2W×2H canvas."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"canvas": ("IMAGE", {"tooltip": "The decoded canvas (VAE Decode of the sampled LATENT)."})}}

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("page",)
    FUNCTION = "crop"
    CATEGORY = "ColorFlow/native"
    DESCRIPTION = "Crops the colourised page out of the centre of the canvas (the region ColorFlow Apply's mask marks)."

    def crop(self, canvas):
        """Return the centre pages."""
        height, width = canvas.shape[1:3]
        top, left = (height - height // 2) // 2, (width - width // 2) // 2
        return (canvas[:, top : top + height // 2, left : left + width // 2, :].clone(),)


class ColorFlowGuidedUpscaleVAE:
    """Guided super-resolution with the core VAE's weights: no second VAE file is loaded."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "colorflow_patch": ("COLORFLOW_PATCH", {"tooltip": "From ColorFlow Patch Loader (its release holds the fusion net)."}),
            "vae": ("VAE", {"tooltip": "The SD1.5 VAE (Load Checkpoint's)."}),
            "page": ("IMAGE", {"tooltip": "The colour page(s) (ColorFlow Crop Page)."}),
            "guide": ("IMAGE", {"tooltip": "The prepared gray page at 1.5× (ColorFlow Stitch Canvas 'guide')."}),
            "seed": inputs.SEED,
            "sample_posterior": ("BOOLEAN", {"default": True, "tooltip": "Sample the VAE posterior (upstream); off: use its mean."}),
        }}

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "upscale"
    CATEGORY = "ColorFlow/native"
    DESCRIPTION = (
        "GSRP on a core VAE: the colour page decoded at the guide's size with the gray page's line detail, through the "
        "release's fusion net and a decoder sharing the given VAE's weights. With the KSampler's seed the posterior "
        "draw equals the faithful path's."
    )

    def upscale(self, colorflow_patch: ColorFlowPatch, vae, page, guide, seed: int, sample_posterior: bool):
        """Return the upscaled colour pages."""
        native_bridge.check_vae(vae)
        device = comfy_bridge.torch_device()
        decoder = sd15_vae_from_ldm(native_bridge.vae_state_dict(vae), "the VAE input").to(device, torch.float32)
        fusion = load_fusion(colorflow_patch.folder, decoder, colorflow_patch.folder.parent).to(device)
        resolver = GuidedSuperResolver(decoder, fusion)
        pairs = pair_batches(images_to_pil(page), images_to_pil(guide), "colour pages and guides")
        finals = comfy_bridge.each(pairs, lambda pair, _progress: resolver(
            *pair, generator=gsrp_generator(seed, device, (2 * pair[0].width, 2 * pair[0].height), cfg=True),
            sample_posterior=sample_posterior,
        ))
        return (pil_to_images(finals),)
