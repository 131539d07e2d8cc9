"""Upstream's overlapping 3/4-size patches of the query page and of each reference."""
from __future__ import annotations

from PIL import Image

from ..errors import InvalidInputError
from ..imaging import to_rgb

Box = tuple[int, int, int, int]

#: Candidate order inside one reference: the whole image, then the four quadrant patches.
PATCHES_PER_REFERENCE = 5


def patch_boxes(width: int, height: int) -> list[Box]:
    """The 4 overlapping (W//4*3, H//4*3) boxes with stride (W//4, H//4), order TL, TR, BL, BR."""
    if width < 4 or height < 4:
        raise InvalidInputError(f"size {width}x{height} is too small to cut into patches (minimum 4x4)")
    crop_w, crop_h = width // 4 * 3, height // 4 * 3
    stride_w, stride_h = width // 4, height // 4
    return [(x, y, x + crop_w, y + crop_h) for y in (0, stride_h) for x in (0, stride_w)]


def query_patches(query: Image.Image, size: tuple[int, int]) -> list[Image.Image]:
    """Upstream `process_image_Q_varres`: resize to `size` (PIL default filter), RGB, the 4 patches."""
    page = to_rgb(query.resize(size))
    return [page.crop(box) for box in patch_boxes(*size)]


def reference_patches(reference: Image.Image, size: tuple[int, int]) -> list[Image.Image]:
    """Upstream `process_image_ref_varres` on a `process_image`d reference: [whole, TL, TR, BL, BR]."""
    whole = to_rgb(reference.resize(size))
    return [whole] + [whole.crop(box) for box in patch_boxes(*size)]
