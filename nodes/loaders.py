"""Loader nodes: the ColorFlow model, the retrieval encoder, and ComfyUI's CLIP_VISION as an encoder."""
from __future__ import annotations

from pathlib import Path

import torch

from ..colorflow_core.errors import MissingWeightsError
from ..colorflow_core.loading import DTYPES, STYLE_FOLDERS, load_colorflow
from ..colorflow_core.retrieval.encoders import ReleaseClipEncoder
from ..colorflow_core.weights import COLORFLOW_REPO, SD15_REPO
from . import comfy_bridge, model_choices
from .clip_vision import ClipVisionEncoder

DEVICE_CHOICES = ["auto", "cpu"]
DTYPE_CHOICES = ["auto", *DTYPES]
DEVICE = (DEVICE_CHOICES, {"default": "auto", "tooltip": "'auto': ComfyUI's compute device (the CPU under --cpu)."})


def _device(choice: str) -> torch.device:
    return comfy_bridge.torch_device() if choice == "auto" else torch.device(choice)


def _location(choice: str, path: Path | None, repo: str, allow_download: bool) -> Path | str:
    """The folder/file of a dropdown choice; the Hugging Face repo id when missing and downloads are allowed."""
    if path is not None:
        return path
    if allow_download:
        return repo
    missing, folder = model_choices.missing_location(choice)
    raise MissingWeightsError(missing, folder, f"from huggingface.co/{repo}, or turn on auto_download")


class ColorFlowModelLoader:
    """Load ColorFlow for one input style on an SD1.5 base."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "snapshot": (model_choices.release_choices(), {
                "default": model_choices.RELEASE_NAME,
                "tooltip": "ColorFlow release folder under models/colorflow/ (TencentARC/ColorFlow: GraySD/, image_encoder/).",
            }),
            "base": (model_choices.base_choices(), {
                "default": model_choices.BASE_NAME,
                "tooltip": "SD1.5 base: a checkpoint from models/checkpoints/, or a diffusers folder under models/diffusers/ or models/colorflow/.",
            }),
            "style": (list(STYLE_FOLDERS), {"default": "gray", "tooltip": "Input style: 'gray' = gray or screentoned pages (GraySD)."}),
            "dtype": (DTYPE_CHOICES, {"default": "auto", "tooltip": "Weight precision; 'auto' lets ComfyUI choose for the device."}),
            "device": DEVICE,
            "auto_download": ("BOOLEAN", {
                "default": False,
                "tooltip": "Download missing weights from Hugging Face into models/colorflow/; off: a missing file is an error naming it.",
            }),
        }}

    RETURN_TYPES = ("COLORFLOW_MODEL", "COLORFLOW_ENCODER")
    RETURN_NAMES = ("model", "encoder")
    FUNCTION = "load"
    CATEGORY = "ColorFlow/loaders"
    DESCRIPTION = "Loads a ColorFlow release (LoRA, ColorGuider, guided-VAE fusion net, CLIP image encoder) on an SD1.5 base."

    def load(self, snapshot: str, base: str, style: str, dtype: str, device: str, auto_download: bool):
        """Load and return (model, its retrieval encoder)."""
        target = _device(device)
        model = load_colorflow(
            _location(snapshot, model_choices.release_path(snapshot), COLORFLOW_REPO, auto_download),
            _location(base, model_choices.base_path(base), SD15_REPO, auto_download),
            style=style,
            device=target,
            dtype=comfy_bridge.auto_dtype(target) if dtype == "auto" else dtype,
            allow_download=auto_download,
            download_dir=comfy_bridge.model_folders("colorflow")[0],
        )
        return (model, model.encoder)


class ColorFlowEncoderLoader:
    """Load only the release's CLIP image encoder (retrieval without the diffusion models)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "encoder": (model_choices.encoder_choices(), {
                "default": f"{model_choices.RELEASE_NAME}/{model_choices.ENCODER_FOLDER}",
                "tooltip": "The image_encoder folder of a ColorFlow release (CLIP ViT-H/14 with projection).",
            }),
            "device": DEVICE,
        }}

    RETURN_TYPES = ("COLORFLOW_ENCODER",)
    RETURN_NAMES = ("encoder",)
    FUNCTION = "load"
    CATEGORY = "ColorFlow/loaders"
    DESCRIPTION = "Loads the ColorFlow release's CLIP image encoder for reference retrieval."

    def load(self, encoder: str, device: str):
        """Load and return the encoder."""
        return (ReleaseClipEncoder.from_pretrained(model_choices.encoder_path(encoder), device=_device(device)),)


class ColorFlowEncoderFromCLIPVision:
    """Use a CLIP_VISION from ComfyUI's Load CLIP Vision as the retrieval encoder."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip_vision": ("CLIP_VISION", {
                "tooltip": "From Load CLIP Vision; ColorFlow's own encoder is CLIP ViT-H/14 (e.g. CLIP-ViT-H-14-laion2B-s32B-b79K).",
            }),
        }}

    RETURN_TYPES = ("COLORFLOW_ENCODER",)
    RETURN_NAMES = ("encoder",)
    FUNCTION = "adapt"
    CATEGORY = "ColorFlow/loaders"
    DESCRIPTION = "Wraps a core CLIP_VISION model as a ColorFlow retrieval encoder (its image_embeds)."

    def adapt(self, clip_vision):
        """Return the adapter."""
        return (ClipVisionEncoder(clip_vision),)
