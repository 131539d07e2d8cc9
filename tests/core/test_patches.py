"""Upstream's query/reference patch geometry (process_image_Q_varres / process_image_ref_varres)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from colorflow_core.errors import InvalidInputError
from colorflow_core.retrieval import patch_boxes, query_patches, reference_patches


@pytest.mark.parametrize(
    "size, boxes",
    [
        ((640, 640), [(0, 0, 480, 480), (160, 0, 640, 480), (0, 160, 480, 640), (160, 160, 640, 640)]),
        ((512, 800), [(0, 0, 384, 600), (128, 0, 512, 600), (0, 200, 384, 800), (128, 200, 512, 800)]),
        ((800, 512), [(0, 0, 600, 384), (200, 0, 800, 384), (0, 128, 600, 512), (200, 128, 800, 512)]),
        ((65, 97), [(0, 0, 48, 72), (16, 0, 64, 72), (0, 24, 48, 96), (16, 24, 64, 96)]),
    ],
)
def test_patch_boxes_match_upstream_table(size, boxes):
    assert patch_boxes(*size) == boxes


def test_patch_boxes_refuse_tiny_sizes():
    with pytest.raises(InvalidInputError):
        patch_boxes(3, 64)


def _random_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_query_patches_are_row_major_crops_of_the_page():
    page = _random_rgb(64, 96)
    patches = query_patches(page, (64, 96))
    pixels = np.asarray(page)
    expected = [pixels[y0:y1, x0:x1] for x0, y0, x1, y1 in patch_boxes(64, 96)]
    assert [p.mode for p in patches] == ["RGB"] * 4
    assert all(np.array_equal(np.asarray(p), e) for p, e in zip(patches, expected))


def test_query_patches_resize_other_sizes_and_convert_to_rgb():
    page = _random_rgb(80, 120).convert("L")
    patches = query_patches(page, (64, 96))
    resized = np.asarray(page.resize((64, 96)).convert("RGB"))
    assert patches[3].size == (48, 72) and patches[3].mode == "RGB"
    assert np.array_equal(np.asarray(patches[3]), resized[24:96, 16:64])


def test_reference_patches_are_whole_then_quadrants():
    ref = _random_rgb(64, 96, seed=1)
    patches = reference_patches(ref, (64, 96))
    assert len(patches) == 5
    assert np.array_equal(np.asarray(patches[0]), np.asarray(ref))
    assert [p.size for p in patches] == [(64, 96)] + [(48, 72)] * 4
    assert np.array_equal(np.asarray(patches[2]), np.asarray(ref)[0:72, 16:64])
