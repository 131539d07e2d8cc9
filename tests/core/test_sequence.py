"""Chapters: one pool, many pages, feed-back, any size, any image mode."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from colorflow_core.errors import InvalidInputError
from colorflow_core.imaging import auto_size, load_image
from colorflow_core.options import ColorizeOptions
from colorflow_core.retrieval import ReferencePool
from colorflow_core.sequence import colorize_pages

FAST = dict(steps=1, size=(64, 96))


def colourful(seed: int, size=(80, 120)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def test_feed_back_gives_later_pages_the_finished_ones_without_changing_the_pool(tiny_model):
    pool = ReferencePool(tiny_model.encoder)
    pool.add([colourful(1)])
    pages = [colourful(10).convert("L"), colourful(11).convert("L")]
    progress = []
    results = list(colorize_pages(tiny_model, pages, pool, ColorizeOptions(**FAST), feed_back=True,
                                  progress=lambda *a: progress.append(a)))
    assert len(pool) == 1  # the fed-back pages went into a private copy
    assert len(results[1].retrieval.references) == 2  # …which the second page searched
    list(colorize_pages(tiny_model, pages, pool, ColorizeOptions(**FAST), feed_back=True, feed_back_into_pool=True))
    assert len(pool) == 3
    assert [r.name for r in results] == ["page_0000", "page_0001"]
    assert results[0].final.size == (96, 144)
    assert ("page", 2, 2) in progress and ("step", 1, 1) in progress
    without = ReferencePool(tiny_model.encoder)
    without.add([colourful(1)])
    list(colorize_pages(tiny_model, pages, without, ColorizeOptions(**FAST)))
    assert len(without) == 1


def test_one_reference_is_enough_and_an_empty_pool_is_an_error(tiny_model):
    pool = ReferencePool(tiny_model.encoder)
    with pytest.raises(InvalidInputError):
        list(colorize_pages(tiny_model, [colourful(3)], pool, ColorizeOptions(**FAST)))
    pool.add([colourful(4)])
    (result,) = colorize_pages(tiny_model, [colourful(3)], pool, ColorizeOptions(**FAST))
    assert result.retrieval.indices.max() < 5


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "I;16", "CMYK", "1"])
def test_any_page_mode(tiny_model, mode):
    pool = ReferencePool(tiny_model.encoder)
    pool.add([colourful(5).convert(mode if mode != "I;16" else "L")])
    page = colourful(6).convert("L").convert(mode) if mode != "I;16" else Image.fromarray(
        (np.asarray(colourful(6).convert("L"), dtype=np.uint16) * 257))
    assert page.mode == mode
    (result,) = colorize_pages(tiny_model, [page], pool, ColorizeOptions(**FAST))
    assert result.final.mode == "RGB"


def test_tiny_page_and_non_preset_size(tiny_model):
    pool = ReferencePool(tiny_model.encoder)
    pool.add([colourful(7)])
    (result,) = colorize_pages(tiny_model, [colourful(8, (8, 8))], pool, ColorizeOptions(steps=1, size=(96, 64)))
    assert result.size == (96, 64) and result.final.size == (144, 96)
    assert result.icp.canvas.size == (192, 128)


def test_auto_size_picks_the_closest_preset():
    assert auto_size(Image.new("L", (500, 800))) == (512, 800)
    assert auto_size(Image.new("L", (1600, 1000))) == (800, 512)
    assert auto_size(Image.new("L", (900, 1000))) == (640, 640)


def test_huge_images_are_refused_before_they_are_decoded(tmp_path):
    path = tmp_path / "huge.png"
    Image.new("1", (12001, 12001)).save(path)
    with pytest.raises(InvalidInputError, match="12001x12001"):
        load_image(path)
    with pytest.raises(InvalidInputError, match="not found"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(InvalidInputError, match="cannot read"):
        load_image(tmp_path / "broken.png")
