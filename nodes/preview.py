"""What retrieval chose, for people: a labelled grid of the 12 patches, and a text summary."""
from __future__ import annotations

from PIL import Image, ImageDraw

from ..colorflow_core.retrieval import PATCHES_PER_REFERENCE, Retrieval

QUADRANTS = ("TL", "TR", "BL", "BR")
#: Candidate order inside a reference (colorflow_core.retrieval.patches).
PATCH_NAMES = ("whole", "TL", "TR", "BL", "BR")
CELL_WIDTH = 192
LABEL_HEIGHT = 14


def _candidate_label(retrieval: Retrieval, candidate: int) -> str:
    reference = retrieval.references[candidate // PATCHES_PER_REFERENCE]
    return f"{reference}:{PATCH_NAMES[candidate % PATCHES_PER_REFERENCE]}"


def retrieval_preview(retrieval: Retrieval) -> Image.Image:
    """One row per query quadrant (TL, TR, BL, BR), best match first, each cell labelled 'quadrant#rank score reference'."""
    width, height = retrieval.size
    cell_height = round(CELL_WIDTH * height / width)
    rows, ranks = retrieval.indices.shape
    grid = Image.new("RGB", (ranks * CELL_WIDTH, rows * (cell_height + LABEL_HEIGHT)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for quadrant, (candidates, scores) in enumerate(zip(retrieval.indices.tolist(), retrieval.scores.tolist())):
        for rank, (candidate, score) in enumerate(zip(candidates, scores)):
            left, top = rank * CELL_WIDTH, quadrant * (cell_height + LABEL_HEIGHT)
            patch = retrieval.candidates[candidate].convert("RGB")
            patch.thumbnail((CELL_WIDTH - 2, cell_height - 2))
            grid.paste(patch, (left + (CELL_WIDTH - patch.width) // 2, top + (cell_height - patch.height) // 2))
            label = f"{QUADRANTS[quadrant]}#{rank + 1} {score:.2f} {_candidate_label(retrieval, candidate)}"
            draw.text((left + 2, top + cell_height + 1), label[:32], fill=(0, 0, 0))
    return grid


def retrieval_summary(retrieval: Retrieval) -> str:
    """One line per quadrant: the chosen candidates with their cosine scores."""
    lines = []
    for quadrant, (candidates, scores) in enumerate(zip(retrieval.indices.tolist(), retrieval.scores.tolist())):
        picks = ", ".join(f"{_candidate_label(retrieval, c)} {s:.3f}" for c, s in zip(candidates, scores))
        lines.append(f"{QUADRANTS[quadrant]}: {picks}")
    return "\n".join(lines)
