"""The Sketch and Sketch_Shading inputs: extracted lines, and lines with thresholded shading."""
from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image

from ..errors import InvalidInputError
from ..imaging import gray_rgb

#: Page values below this (0.3·255) become black in the shaded input.
DARK_THRESHOLD = 0.3 * 255.0
#: Bright line-map pixels over mid-tone page areas become this gray.
GRAY_RATE = 125
#: Upper (exclusive) page value of the mid-tones.
UP_BOUND = 145

LineFn = Callable[[Image.Image], Image.Image]


def shade_lines(page_gray: Image.Image, lines: Image.Image) -> Image.Image:
    """Upstream's Sketch_Shading rule on uint8 values, per channel (both images as RGB, same size):

    1. where the page is < 76.5 (i.e. <= 76) the output is 0;
    2. where the line map is > 125 and the page is strictly between 76.5 and 145, the output is 125;
    3. elsewhere the output is the line map.
    """
    page = np.asarray(page_gray.convert("RGB"))
    out = np.array(lines.convert("RGB"), copy=True)
    if page.shape != out.shape:
        raise InvalidInputError(f"page {page_gray.size} and lines {lines.size} differ in size")
    out[page < DARK_THRESHOLD] = 0
    out[(out > GRAY_RATE) & (page < UP_BOUND) & (page > DARK_THRESHOLD)] = GRAY_RATE
    return Image.fromarray(np.uint8(out))


def sketch_input(page: Image.Image, extract: LineFn) -> tuple[Image.Image, Image.Image]:
    """Sketch style: (context, guide) = (lines, lines), lines of the gray page as RGB."""
    lines = extract(gray_rgb(page)).convert("L").convert("RGB")
    return lines, lines


def sketch_shading_input(page: Image.Image, extract: LineFn) -> tuple[Image.Image, Image.Image]:
    """Sketch_Shading style: (context, guide) = (shaded lines, pure lines)."""
    gray = gray_rgb(page)
    lines = extract(gray).convert("L").convert("RGB")
    return shade_lines(gray, lines), lines
