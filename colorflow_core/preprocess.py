"""Turn a page into the ICP input and the GSRP guide (both 1.5W×1.5H)."""
from __future__ import annotations

from PIL import Image

from .imaging import process_image
from .preprocessors import Preprocessors, preprocess_image


def prepare_page(
    page: Image.Image,
    size: tuple[int, int],
    method: str = "gray",
    *,
    preprocessors: Preprocessors | None = None,
    seed: int = 0,
    deterministic: bool = False,
) -> tuple[Image.Image, Image.Image]:
    """(input_context, guide) at 1.5× the query size, as upstream's "Preprocess" button makes them.

    'screen': ScreenStyle blend (GrayImage style; seeded by `seed`, see `preprocessors.ScreenStyle`);
    'gray': upstream without ScreenStyle; 'none': as given; 'sketch': extracted lines for both;
    'sketch_shading': shaded lines as context, pure lines as guide. The networks come from
    `preprocessors` (e.g. `ColorFlowModel.preprocessors`) and load only when the method needs them.
    """
    width, height = size
    large = process_image(page, int(1.5 * width), int(1.5 * height))
    return preprocess_image(large, method, preprocessors, seed=seed, deterministic=deterministic)
