"""Input definitions shared by several nodes, and how their values turn into core arguments."""
from __future__ import annotations

from PIL import Image

from ..colorflow_core.imaging import PRESET_SIZES, auto_size, check_query_size
from ..colorflow_core.options import ColorizeOptions

_DEFAULTS = ColorizeOptions()
#: Seeds stay below 2**63 (the core's range); every page of a batch uses the same seed, so any page can be redone alone.
SEED_LIMIT = 2**63
SIZE_CHOICES = ["auto", *(f"{w}x{h}" for w, h in PRESET_SIZES), "custom"]
#: Page preparations available now ("screen" arrives with the ScreenStyle preprocessor).
PREPROCESS_CHOICES = ["gray", "none"]

MODEL = ("COLORFLOW_MODEL", {"tooltip": "A ColorFlow model from the ColorFlow Model Loader."})
POOL = ("COLORFLOW_POOL", {"tooltip": "Coloured references to retrieve patches from (ColorFlow Reference Pool)."})
SEED = ("INT", {
    "default": _DEFAULTS.seed, "min": 0, "max": SEED_LIMIT - 1, "control_after_generate": True,
    "tooltip": "Random seed, same meaning as upstream ColorFlow's; every page uses it, so a page redone alone comes out the same.",
})
STEPS = ("INT", {"default": _DEFAULTS.steps, "min": 1, "max": 200, "tooltip": "Denoising steps (upstream default 10)."})
GUIDANCE = ("FLOAT", {
    "default": _DEFAULTS.guidance_scale, "min": 1.0, "max": 30.0, "step": 0.1,
    "tooltip": "Classifier-free guidance scale; 1.0 turns guidance off and halves the work.",
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
    "tooltip": "'gray': the page is made gray first (upstream without ScreenStyle); 'none': used as given.",
})


def query_size(choice: str, width: int, height: int, page: Image.Image) -> tuple[int, int]:
    """(W, H) of the page on the canvas for a size choice."""
    if choice == "auto":
        return auto_size(page)
    size = (width, height) if choice == "custom" else tuple(int(v) for v in choice.split("x"))
    check_query_size(*size)
    return size
