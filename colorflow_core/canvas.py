"""RAP's stitched canvas: the query in the centre of a 2W×2H white canvas, retrieved patches around it."""
from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from .imaging import check_query_size

#: (row, col) of the 4×4 cell grid for quadrant q (TL, TR, BL, BR) and rank k: best match beside the
#: query, second above/below it, third in the outer corner.
CELL_LAYOUT = (
    ((1, 0), (0, 1), (0, 0)),
    ((1, 3), (0, 2), (0, 3)),
    ((2, 0), (3, 1), (3, 0)),
    ((2, 3), (3, 2), (3, 3)),
)
#: Upstream's mask.png: 512² with white exactly on [128, 384)², i.e. the centre quarter.
_MASK_SIZE, _MASK_LO, _MASK_HI = 512, 128, 384


@dataclass(frozen=True)
class PatchPlacement:
    """Where one retrieved patch went: its quadrant, rank, candidate index and canvas box."""

    quadrant: int
    rank: int
    candidate: int
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class Canvas:
    """The stitched 2W×2H canvas, its mask (white = page area to colour) and the patch placements."""

    image: Image.Image
    mask: Image.Image
    placements: tuple[PatchPlacement, ...]

    @property
    def query_size(self) -> tuple[int, int]:
        """(W, H) of the page in the centre."""
        return self.image.size[0] // 2, self.image.size[1] // 2


def canvas_mask(width: int, height: int) -> Image.Image:
    """Upstream's mask for a W×H query: mask.png resized bicubically to 2W×2H (RGB)."""
    mask = Image.new("RGB", (_MASK_SIZE, _MASK_SIZE), (0, 0, 0))
    mask.paste((255, 255, 255), (_MASK_LO, _MASK_LO, _MASK_HI, _MASK_HI))
    return mask.resize((2 * width, 2 * height), Image.BICUBIC)


def build_canvas(query: Image.Image, patches: list[list[Image.Image]], candidates: list[list[int]] | None = None) -> Canvas:
    """Stitch the W×H `query` and, per quadrant, its ranked `patches` into a canvas with its mask."""
    width, height = query.size
    check_query_size(width, height)
    cell_w, cell_h = width // 2, height // 2
    canvas = Image.new("RGB", (2 * width, 2 * height), (255, 255, 255))
    canvas.paste(query.convert("RGB"), (cell_w, cell_h))
    placements = []
    for quadrant, ranked in enumerate(patches):
        for rank, patch in enumerate(ranked[: len(CELL_LAYOUT[quadrant])]):
            row, col = CELL_LAYOUT[quadrant][rank]
            left, top = col * cell_w + 1, row * cell_h + 1
            canvas.paste(patch.convert("RGB").resize((cell_w - 2, cell_h - 2)), (left, top))
            index = candidates[quadrant][rank] if candidates is not None else -1
            placements.append(PatchPlacement(quadrant, rank, index, (left, top, left + cell_w - 2, top + cell_h - 2)))
    return Canvas(canvas, canvas_mask(width, height), tuple(placements))


def split_canvas(canvas: Image.Image, box: tuple[int, int, int, int] | None = None) -> tuple[Image.Image, Image.Image]:
    """The references-only image (page box blacked out) and the query-only image (black elsewhere).

    `box` is the page's box in `canvas`: the centre half by default (a training crop passes its own)."""
    width, height = canvas.size
    if box is None:
        box_w, box_h = width // 2, height // 2
        left, top = (width - box_w) // 2, (height - box_h) // 2
        box = (left, top, left + box_w, top + box_h)
    left, top, box_w, box_h = box[0], box[1], box[2] - box[0], box[3] - box[1]
    references = Image.new("RGB", canvas.size, (0, 0, 0))
    references.paste(canvas, (0, 0))
    references.paste(Image.new("RGB", (box_w, box_h), (0, 0, 0)), (left, top))
    query = Image.new("RGB", canvas.size, (0, 0, 0))
    query.paste(canvas.crop(box), (left, top))
    return references, query


def center_crop(image: Image.Image) -> Image.Image:
    """The query region (centre half) of a canvas-sized image."""
    width, height = image.size
    left, top = (width - width // 2) // 2, (height - height // 2) // 2
    return image.crop((left, top, left + width // 2, top + height // 2))
