"""Turn a page into the ICP input and the GSRP guide (both 1.5W×1.5H)."""
from __future__ import annotations

from PIL import Image

from .errors import InvalidInputError
from .imaging import gray_rgb, process_image


def prepare_page(page: Image.Image, size: tuple[int, int], method: str = "gray") -> tuple[Image.Image, Image.Image]:
    """(input_context, guide) at 1.5× the query size. 'gray': upstream without ScreenStyle; 'none': as given."""
    width, height = size
    large = process_image(page, int(1.5 * width), int(1.5 * height))
    if method == "gray":
        large = gray_rgb(large)
    elif method == "screen":
        raise InvalidInputError("the ScreenStyle preprocessor is not available yet; use --preprocess gray")
    elif method != "none":
        raise InvalidInputError(f"unknown preprocess method '{method}'")
    return large, large
