"""Loader nodes: the ColorFlow model, the retrieval encoder, and ComfyUI's CLIP_VISION as an encoder."""
from __future__ import annotations

from pathlib import Path

from ..colorflow_core.configured import DTYPES
from ..colorflow_core.errors import MissingWeightsError
from ..colorflow_core.loading import load_colorflow
from ..colorflow_core.loading_pixart import PIXART_REPO
from ..colorflow_core.model import ColorFlowModel
from ..colorflow_core.preprocessors import ERIKA_FILE, Preprocessors
from ..colorflow_core.presets import PRESET_NAMES, describe_presets, get_preset
from ..colorflow_core.retrieval.encoders import ReleaseClipEncoder
from ..colorflow_core.runtime import Placement
from ..colorflow_core.styles import STYLE_NAMES, STYLES, get_style
from ..colorflow_core.weights import COLORFLOW_REPO, SD15_REPO
from . import comfy_bridge, inputs, model_choices
from .clip_vision import ClipVisionEncoder

DTYPE_CHOICES = ["auto", *DTYPES]


def _location(choice: str, path: Path | None, repo: str, allow_download: bool) -> Path | str:
    """The folder/file of a dropdown choice; the Hugging Face repo id when missing and downloads are allowed."""
    if path is not None:
        return path
    if allow_download:
        return repo
    missing, folder = model_choices.missing_location(choice)
    kind = "folder" if missing.endswith("/") else "weight file"
    raise MissingWeightsError(missing, folder, f"from huggingface.co/{repo}, or turn on auto_download", kind=kind)


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
            "style": (list(STYLE_NAMES), {
                "default": "gray",
                "tooltip": (
                    "Input style: 'gray' = gray or screentoned pages (GraySD/, on the SD1.5 'base'); 'sketch' = line art "
                    "(sketch/), 'sketch_shading' = line art with shading (shading/), both on the PixArt-α 'pixart_base'. "
                    f"Sampler guidance upstream: {STYLES['gray'].guidance_scale} gray, {STYLES['sketch'].guidance_scale} sketch styles."
                ),
            }),
            "dtype": (DTYPE_CHOICES, {"default": "auto", "tooltip": "Weight precision; 'auto' lets ComfyUI choose for the device."}),
            "device": inputs.DEVICE,
            "auto_download": ("BOOLEAN", {
                "default": False,
                "tooltip": "Download missing weights from Hugging Face into models/colorflow/; off: a missing file is an error naming it.",
            }),
        }, "optional": {
            "pixart_base": (model_choices.pixart_choices(), {
                "default": model_choices.PIXART_NAME,
                "tooltip": (
                    "PixArt-α base of the sketch styles (unused for 'gray'): a PixArt-XL-2-1024-MS diffusers folder "
                    "(transformer/, vae/, scheduler/; text_encoder/ + tokenizer/ are read once, then the prompt embeddings "
                    "are cached beside it) under models/diffusers/ or models/colorflow/."
                ),
            }),
            "preset": (list(PRESET_NAMES), {
                "default": PRESET_NAMES[0],
                "tooltip": " ".join(f"'{name}': {text}." for name, text in describe_presets().items())
                + " ComfyUI's --lowvram / --novram also keeps idle weights off the GPU under any preset.",
            }),
        }}

    RETURN_TYPES = ("COLORFLOW_MODEL", "COLORFLOW_ENCODER")
    RETURN_NAMES = ("model", "encoder")
    FUNCTION = "load"
    CATEGORY = "ColorFlow/loaders"
    DESCRIPTION = (
        "Loads a ColorFlow release (LoRA, ColorGuider, guided-VAE fusion net, CLIP image encoder) for one input style: "
        "'gray' on an SD1.5 base, 'sketch' / 'sketch_shading' on a PixArt-α base."
    )

    def load(self, snapshot: str, base: str, style: str, dtype: str, device: str, auto_download: bool,
             pixart_base: str | None = None, preset: str | None = None):
        """Load and return (model, its retrieval encoder)."""
        target = inputs.device(device)
        model = load_colorflow(
            _location(snapshot, model_choices.release_path(snapshot), COLORFLOW_REPO, auto_download),
            _base_location(style, base, pixart_base or model_choices.PIXART_NAME, auto_download),
            style=style,
            device=target,
            dtype=comfy_bridge.auto_dtype(target) if dtype == "auto" else dtype,
            allow_download=auto_download,
            download_dir=comfy_bridge.model_folders("colorflow")[0],
            preset=_host_preset(preset),
            placement=Placement(target, comfy_bridge.offload_device()),
        )
        _line_extractor_fallback(model)
        return (model, model.encoder)


def _base_location(style: str, base: str, pixart_base: str, allow_download: bool) -> Path | str:
    """The base model of the style's family: the SD1.5 choice for 'gray', the PixArt-α choice for the sketch styles."""
    if get_style(style).family == "sd":
        return _location(base, model_choices.base_path(base), SD15_REPO, allow_download)
    return _location(pixart_base, model_choices.pixart_path(pixart_base), PIXART_REPO, allow_download)


def _host_preset(name: str | None):
    """The chosen preset; with idle weights kept off the GPU when ComfyUI runs with --lowvram / --novram."""
    preset = get_preset(name)
    return preset.offloaded() if comfy_bridge.low_vram_mode() else preset


def _line_extractor_fallback(model: ColorFlowModel) -> None:
    """A release without LE/erika.pth borrows the line extractor found elsewhere (e.g. the ControlNet aux copy)."""
    if not (model.snapshot / ERIKA_FILE).is_file():
        other = model_choices.any_line_extractor()
        if other is not None:
            model.preprocessors = Preprocessors(model.snapshot, erika=other, device=model.device)


class ColorFlowEncoderLoader:
    """Load only the release's CLIP image encoder (retrieval without the diffusion models)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "encoder": (model_choices.encoder_choices(), {
                "default": f"{model_choices.RELEASE_NAME}/{model_choices.ENCODER_FOLDER}",
                "tooltip": "The image_encoder folder of a ColorFlow release (CLIP ViT-H/14 with projection).",
            }),
            "device": inputs.DEVICE,
        }}

    RETURN_TYPES = ("COLORFLOW_ENCODER",)
    RETURN_NAMES = ("encoder",)
    FUNCTION = "load"
    CATEGORY = "ColorFlow/loaders"
    DESCRIPTION = "Loads the ColorFlow release's CLIP image encoder for reference retrieval."

    def load(self, encoder: str, device: str):
        """Load and return the encoder."""
        return (ReleaseClipEncoder.from_pretrained(model_choices.encoder_path(encoder), device=inputs.device(device)),)


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
