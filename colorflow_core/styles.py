"""The release's three input styles: where each one's weights live, which model family runs it, upstream's defaults."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import InvalidInputError

#: Page preparations (`preprocessors.preprocess_image`); the order is the nodes' dropdown order, which only grows at
#: the end (saved workflows store the value).
PREPROCESS_METHODS = ("gray", "none", "screen", "sketch", "sketch_shading")


@dataclass(frozen=True)
class Style:
    """One input style of the release."""

    name: str
    #: Sub-folder of the release holding this style's guider, LoRA and fusion net.
    folder: str
    #: "sd" (SD1.5 UNet) or "pixart" (PixArt-α transformer).
    family: str
    #: Upstream's CFG scale (the pipelines' defaults; the app never overrode them).
    guidance_scale: float
    #: Upstream's page preparation (its "Preprocess" button).
    preprocess: str


STYLES: dict[str, Style] = {
    style.name: style
    for style in (
        Style("gray", "GraySD", "sd", 7.5, "screen"),
        Style("sketch", "sketch", "pixart", 4.5, "sketch"),
        Style("sketch_shading", "shading", "pixart", 4.5, "sketch_shading"),
    )
}
STYLE_NAMES: tuple[str, ...] = tuple(STYLES)


def get_style(name: str) -> Style:
    """The style of that name, or a one-line error naming the choices."""
    if name not in STYLES:
        raise InvalidInputError(f"style '{name}' is not available (choose {', '.join(STYLE_NAMES)})")
    return STYLES[name]


def check_preprocess(method: str) -> str:
    """`method` when it is a known page preparation, else a one-line error naming the choices."""
    if method not in PREPROCESS_METHODS:
        raise InvalidInputError(f"unknown preprocess '{method}' (choose {', '.join(PREPROCESS_METHODS)})")
    return method
