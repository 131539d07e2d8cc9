"""Input definitions shared by several nodes, and how their values turn into core arguments."""
from __future__ import annotations

import torch

from ..colorflow_core.errors import InvalidInputError
from ..colorflow_core.imaging import PRESET_SIZES, check_query_size
from ..colorflow_core.options import ColorizeOptions
from ..colorflow_core.settings import memory_needed
from ..colorflow_core.validation import check_finite
from ..colorflow_core.styles import PREPROCESS_METHODS, STYLES
from . import comfy_bridge

_DEFAULTS = ColorizeOptions()
#: Seeds stay below 2**63 (the core's range); every page of a batch uses the same seed, so any page can be redone alone.
SEED_LIMIT = 2**63
SIZE_CHOICES = ["auto", *(f"{w}x{h}" for w, h in PRESET_SIZES), "custom"]
#: The preprocess choice that follows the model's style (gray → screen, sketch → sketch, sketch_shading → sketch_shading).
STYLE_DEFAULT = "style default"
#: Page preparations; the list only ever grows at the end (saved workflows keep their values).
PREPROCESS_CHOICES = [*PREPROCESS_METHODS, STYLE_DEFAULT]
DEVICE_CHOICES = ["auto", "cpu"]

MODEL = ("COLORFLOW_MODEL", {"tooltip": "A ColorFlow model from the ColorFlow Model Loader."})
POOL = ("COLORFLOW_POOL", {"tooltip": "Coloured references to retrieve patches from (ColorFlow Reference Pool)."})
SEED = ("INT", {
    "default": _DEFAULTS.seed, "min": 0, "max": SEED_LIMIT - 1, "control_after_generate": True,
    "tooltip": "Random seed, same meaning as upstream ColorFlow's; every page uses it, so a page redone alone comes out the same.",
})
STEPS = ("INT", {"default": _DEFAULTS.steps, "min": 1, "max": 200, "tooltip": "Denoising steps (upstream default 10)."})
GUIDANCE = ("FLOAT", {
    "default": 0.0, "min": 0.0, "max": 30.0, "step": 0.1,
    "tooltip": (
        "Classifier-free guidance scale. 0 = the default: the loader preset's own ('fast': 1.0, no guidance), else the "
        f"style's upstream scale ({STYLES['gray'].guidance_scale} gray, {STYLES['sketch'].guidance_scale} sketch styles). "
        "Any value from 1.0 is used as given; 1.0 turns guidance off and halves the work."
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


def guidance_option(value: float) -> float | None:
    """The core's guidance option for a GUIDANCE value: 0 = None (resolved by the core), else the value."""
    if check_finite(value, "guidance scale") == 0:
        return None
    if value < 1.0:
        raise InvalidInputError(f"guidance {value} is not allowed: 0 (the default) or a scale from 1.0")
    return value


def preprocess_option(choice: str) -> str | None:
    """The core's preprocess option for a PREPROCESS choice ('style default' = None: the model's style's method)."""
    return None if choice == STYLE_DEFAULT else choice


def size_option(choice: str, width: int, height: int) -> tuple[int, int] | None:
    """The core's size option for a SIZE choice: None for 'auto' (each page's closest upstream preset)."""
    if choice == "auto":
        return None
    found = (width, height) if choice == "custom" else tuple(int(v) for v in choice.split("x"))
    check_query_size(*found)
    return found


def colorize_options(
    *, guidance: float = 0.0, preprocess: str = STYLE_DEFAULT, size: tuple[int, int] | None = None,
    screen_deterministic: bool | None = None, **values,
) -> ColorizeOptions:
    """The core's options from widget values (guidance 0 and 'style default' mean the core's default)."""
    return ColorizeOptions(
        guidance_scale=guidance_option(guidance), preprocess=preprocess_option(preprocess), size=size,
        screen_deterministic=bool(screen_deterministic), **values,
    )


def first(*lists: list | None, defaults: tuple = ()) -> list:
    """The first value of each list input of an INPUT_IS_LIST node (an optional input left unconnected: its default)."""
    defaults = defaults or (None,) * len(lists)
    return [values[0] if values else default for values, default in zip(lists, defaults)]


def make_room(model, options: ColorizeOptions, size: tuple[int, int], pages: int = 1) -> None:
    """Have ComfyUI free what a call of `pages` W×H pages on `model` with `options` needs (the core's estimate)."""
    comfy_bridge.make_room(memory_needed(model, options, size, pages), model.device)
