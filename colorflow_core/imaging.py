"""Image helpers: mode normalisation, upstream's crop-or-resize rule and size checks."""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

from .errors import InvalidInputError

ImageLike = Union[Image.Image, np.ndarray, str, Path]

#: Pages and references larger than this (pixels) are refused before any allocation (a 600-dpi A4 scan is 35 M;
#: a small PNG that decodes to more is a decompression bomb).
MAX_INPUT_PIXELS = 40_000_000
#: Images of one folder loaded together (Load Pages) may hold at most this many pixels in all (~4.8 GB as IMAGE).
MAX_FOLDER_PIXELS = 400_000_000
#: Upstream accepts aspect distortion up to this relative error instead of cropping.
ASPECT_TOLERANCE = 0.15
#: File suffixes read as images when a folder is given.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
#: Upstream's query sizes (W, H); `auto` picks among them.
PRESET_SIZES = ((640, 640), (512, 800), (800, 512))


def load_image(image: ImageLike) -> Image.Image:
    """Open a PIL image, array or path without changing its mode; validate its size."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise InvalidInputError(f"image file not found: {path}")
        try:
            with Image.open(path) as opened:
                check_image_size(opened.size, str(path))
                opened.load()
                image = opened.copy()
        except (OSError, Image.DecompressionBombError) as exc:
            raise InvalidInputError(f"cannot read image {path}: {exc}") from exc
    elif isinstance(image, np.ndarray):
        image = array_to_pil(image)
    elif not isinstance(image, Image.Image):
        raise InvalidInputError(f"expected a PIL image, array or path, got {type(image).__name__}")
    check_image_size(image.size, "image")
    return image


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name; an error when there are none."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InvalidInputError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {folder}")
    return files


def check_images_budget(paths: list[Path], what: str, budget: int | None = None) -> None:
    """Refuse, from their headers alone, image files that one by one or together exceed the pixel caps."""
    budget = MAX_FOLDER_PIXELS if budget is None else budget
    total = 0
    for path in paths:
        try:
            with Image.open(path) as opened:
                check_image_size(opened.size, str(path))
                total += opened.size[0] * opened.size[1]
        except (OSError, Image.DecompressionBombError) as exc:
            raise InvalidInputError(f"cannot read image {path}: {exc}") from exc
    if total > budget:
        raise InvalidInputError(
            f"{what} holds {total} pixels of images, more than the {budget} loaded at once; split it into smaller folders"
        )


def array_to_pil(array: np.ndarray) -> Image.Image:
    """Convert an H×W, H×W×1/3/4 array (uint8, or float in [0, 1]) to a PIL image."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise InvalidInputError(f"unsupported image array shape {array.shape}")
    if array.dtype != np.uint8:
        array = (np.clip(np.asarray(array, dtype=np.float64), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array))


def check_image_size(size: tuple[int, int], what: str) -> None:
    """Refuse empty and absurdly large images with a clear message."""
    width, height = size
    if width < 1 or height < 1:
        raise InvalidInputError(f"{what} is empty ({width}x{height})")
    if width * height > MAX_INPUT_PIXELS:
        raise InvalidInputError(
            f"{what} is {width}x{height}, larger than the {MAX_INPUT_PIXELS} pixels this tool accepts; downscale it first"
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB the way upstream's `.convert('RGB')` does (16-bit and CMYK included)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image.convert("I"), dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        return Image.fromarray((np.clip(array / peak, 0, 1) * 255).round().astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        return Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def _resizable(image: Image.Image) -> Image.Image:
    """Modes PIL cannot resize bicubically (16-bit, CMYK) go to RGB first; the rest keep their mode."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F", "CMYK", "YCbCr", "LAB", "HSV"):
        return to_rgb(image)
    return image


def process_image(image: Image.Image, width: int, height: int) -> Image.Image:
    """Upstream's `process_image`: resize if the aspect is within 15%, else centre-crop to it, then RGB."""
    image = _resizable(image)
    img_w, img_h = image.size
    ratio, target = img_w / img_h, width / height
    if abs(ratio - target) / target >= ASPECT_TOLERANCE:
        if ratio > target:
            new_w = int(img_h * target)
            left = int((img_w - new_w) / 2)
            image = image.crop((left, 0, left + new_w, img_h))
        else:
            new_h = int(img_w / target)
            top = int((img_h - new_h) / 2)
            image = image.crop((0, top, img_w, top + new_h))
        if min(image.size) < 1:
            raise InvalidInputError(
                f"a {img_w}x{img_h} image cannot be cropped to the {width}:{height} aspect: no pixel would remain"
            )
    return image.resize((width, height), Image.BICUBIC).convert("RGB")


def gray_rgb(image: Image.Image) -> Image.Image:
    """Pillow's integer ITU-R 601 luma, replicated to three channels (upstream's L→RGB)."""
    return to_rgb(image).convert("L").convert("RGB")


def check_query_size(width: int, height: int) -> None:
    """Query sizes must be positive multiples of 32 (the canvas is then a multiple of 64)."""
    if width <= 0 or height <= 0 or width % 32 or height % 32:
        raise InvalidInputError(f"page size {width}x{height} is not a multiple of 32 in both directions")


def auto_size(image: Image.Image) -> tuple[int, int]:
    """The upstream preset size whose aspect ratio is closest to the image's."""
    aspect = image.size[0] / image.size[1]
    return min(PRESET_SIZES, key=lambda wh: abs(np.log(aspect / (wh[0] / wh[1]))))
