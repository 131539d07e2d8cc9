"""Input definitions shared by several nodes, and how their values turn into core arguments."""
from __future__ import annotations

import torch
from PIL import Image

from ..colorflow_core.errors import InvalidInputError
from ..colorflow_core.imaging import PRESET_SIZES, auto_size, check_query_size
from ..colorflow_core.loading import STYLE_GUIDANCE
from ..colorflow_core.options import ColorizeOptions
from ..colorflow_core.preprocessors import NEEDS, STYLE_METHODS
from . import comfy_bridge

_DEFAULTS = ColorizeOptions()
#: Seeds stay below 2**63 (the core's range); every page of a batch uses the same seed, so any page can be redone alone.
SEED_LIMIT = 2**63
SIZE_CHOICES = ["auto", *(f"{w}x{h}" for w, h in PRESET_SIZES), "custom"]
#: The preprocess choice that follows the model's style (gray → screen, sketch → sketch, sketch_shading → sketch_shading).
STYLE_DEFAULT = "style default"
#: Page preparations; the list only ever grows at the end (saved workflows keep their values).
PREPROCESS_CHOICES = ["gray", "none", "screen", "sketch", "sketch_shading", STYLE_DEFAULT]
DEVICE_CHOICES = ["auto", "cpu"]

MODEL = ("COLORFLOW_MODEL", {"tooltip": "A ColorFlow model from the ColorFlow Model Loader."})
POOL = ("COLORFLOW_POOL", {"tooltip": "Coloured references to retrieve patches from (ColorFlow Reference Pool)."})
SEED = ("INT", {
    "default": _DEFAULTS.seed, "min": 0, "max": SEED_LIMIT - 1, "control_after_generate": True,
    "tooltip": "Random seed, same meaning as upstream ColorFlow's; every page uses it, so a page redone alone comes out the same.",
})
STEPS = ("INT", {"default": _DEFAULTS.steps, "min": 1, "max": 200, "tooltip": "Denoising steps (upstream default 10)."})
GUIDANCE = ("FLOAT", {
    "default": _DEFAULTS.guidance_scale, "min": 1.0, "max": 30.0, "step": 0.1,
    "tooltip": (
        f"Classifier-free guidance scale. Upstream uses {STYLE_GUIDANCE['gray']} for the gray style (SD1.5) and "
        f"{STYLE_GUIDANCE['sketch']} for the sketch styles (PixArt-α): set {STYLE_GUIDANCE['sketch']} with a sketch model. "
        "1.0 turns guidance off and halves the work."
    ),
})
GUIDER_SCALE = ("FLOAT", {
    "default": _DEFAULTS.guider_scale, "min": 0.0, "max": 5.0, "step": 0.05,
    "tooltip": "Strength of the ColorGuider (colour-ID branch) residuals.",
})
SIZE = (SIZE_CHOICES, {
    "default": "auto",
    "tooltip": "Page size on the canvas: 'auto' picks the upstream preset closest to the page's aspect; 'custom' uses width and height.",
})
WIDTH = ("INT", {"default": 512, "min": 64, "max": 2048, "step": 32, "tooltip": "Page width when size is 'custom' (multiple of 32)."})
HEIGHT = ("INT", {"default": 800, "min": 64, "max": 2048, "step": 32, "tooltip": "Page height when size is 'custom' (multiple of 32)."})
PREPROCESS = (PREPROCESS_CHOICES, {
    "default": "gray",
    "tooltip": (
        "How the page is prepared (at 1.5× the canvas page size): 'gray': made gray (upstream without ScreenStyle); "
        "'none': used as given; 'screen': ScreenStyle screentones blended with the page (upstream's gray style); "
        "'sketch': extracted lines; 'sketch_shading': lines with thresholded shading (the guide keeps the pure lines); "
        "'style default': the model's style's own method (gray → screen, sketch → sketch, sketch_shading → sketch_shading). "
        "screen/sketch/sketch_shading use the preprocessing networks of the model's release."
    ),
})
SCREEN_DETERMINISTIC = ("BOOLEAN", {
    "default": False,
    "tooltip": (
        "ScreenStyle without its dropout and noise ('screen' only): smoother screentones that no longer depend on the seed. "
        "Off: upstream's random screentones, made repeatable by the seed."
    ),
})
DEVICE = (DEVICE_CHOICES, {"default": "auto", "tooltip": "'auto': ComfyUI's compute device (the CPU under --cpu)."})


def device(choice: str) -> torch.device:
    """The torch device of a DEVICE choice."""
    return comfy_bridge.torch_device() if choice == "auto" else torch.device(choice)


def preprocess_method(choice: str, model=None) -> str:
    """The core's preprocessing method for a PREPROCESS choice ('style default' → the model's style's method)."""
    if choice != STYLE_DEFAULT:
        return choice
    if model is None:
        raise InvalidInputError("preprocess 'style default' follows the model's style: connect the ColorFlow model")
    return STYLE_METHODS[model.style]


def page_preprocessors(method: str, model=None):
    """The preprocessing networks a method needs (the model's release's), or None when it needs none."""
    if method not in NEEDS:
        return None
    if model is None:
        raise InvalidInputError(
            f"preprocess '{method}' runs the preprocessing networks of the model's release: connect the ColorFlow model"
        )
    return model.preprocessors


def query_size(choice: str, width: int, height: int, page: Image.Image) -> tuple[int, int]:
    """(W, H) of the page on the canvas for a size choice."""
    if choice == "auto":
        return auto_size(page)
    size = (width, height) if choice == "custom" else tuple(int(v) for v in choice.split("x"))
    check_query_size(*size)
    return size
