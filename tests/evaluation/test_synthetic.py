"""Synthetic chapters: deterministic by seed, labels that reproduce the colours, inputs that follow them."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from colorflow_core.evaluation import synthetic as S


@pytest.fixture(scope="module")
def chapter():
    return S.make_chapter(7, n_references=2, n_pages=3, n_characters=3, size=(128, 192))


def _arrays(chapter):
    out = []
    for page in chapter.references + chapter.pages:
        out += [np.asarray(page.color), page.labels, *(np.asarray(page.inputs[s]) for s in S.STYLES)]
    return out


def test_same_seed_same_pixels_other_seed_other_pixels(chapter):
    again = S.make_chapter(7, n_references=2, n_pages=3, n_characters=3, size=(128, 192))
    assert all(np.array_equal(a, b) for a, b in zip(_arrays(chapter), _arrays(again)))
    assert [c.colors for c in again.characters] == [c.colors for c in chapter.characters]
    other = S.make_chapter(8, n_references=2, n_pages=3, n_characters=3, size=(128, 192))
    assert not np.array_equal(np.asarray(other.pages[0].color), np.asarray(chapter.pages[0].color))


def test_labels_reproduce_every_character_pixel(chapter):
    for page in chapter.references + chapter.pages:
        color = np.asarray(page.color)
        assert np.array_equal(S.expected_colors(page.labels, chapter, background=color), color)
        for character in chapter.characters:
            for part in S.PARTS:
                lit = page.labels == S.part_label(character.index, part)
                shaded = page.labels == S.part_label(character.index, part) + S.SHADED
                assert (color[lit] == character.colors[part]).all()
                assert (color[shaded] == S.shade(character.colors[part])).all()
        assert (color[page.labels == S.INK] == S.INK_RGB).all()
        assert (color[np.isin(page.labels, (S.GUTTER, S.BUBBLE))] == 255).all()


def test_every_part_of_every_character_is_on_the_references(chapter):
    seen = set(np.unique(np.concatenate([p.labels.ravel() for p in chapter.references])).tolist())
    for character in chapter.characters:
        for part in S.PARTS:
            assert S.part_label(character.index, part) in seen, (character.name, part)


def test_inputs_follow_the_labels(chapter):
    page = chapter.pages[0]
    ink = page.labels == S.INK
    line = np.asarray(page.inputs["lineart"])
    assert np.array_equal(line == 0, ink) and set(np.unique(line)) == {0, 255}
    shading = np.asarray(page.inputs["lineart_shading"])
    shaded = (page.labels > S.SHADED) & (page.labels < S.GUTTER)
    assert shaded.any() and (shading[shaded] == S.SHADING_GRAY).all() and (shading[ink] == 0).all()
    assert (shading[~shaded & ~ink] == 255).all()
    tone = np.asarray(page.inputs["screentone"])
    assert set(np.unique(tone)) == {0, 255} and (tone[ink] == 0).all()
    # Darker ground truth → more ink dots: the dot density follows the gray value.
    gray = np.asarray(page.color.convert("L"))
    dark, light = (gray < 100) & ~ink, (gray > 200) & ~ink
    assert (tone[dark] == 0).mean() > (tone[light] == 0).mean() + 0.3


def test_decode_label_round_trip():
    for character in range(3):
        for part in S.PARTS:
            label = S.part_label(character, part)
            assert S.decode_label(label) == (character, part, False)
            assert S.decode_label(label + S.SHADED) == (character, part, True)
    assert all(S.decode_label(v) is None for v in (S.BACKGROUND, S.GUTTER, S.BUBBLE, S.INK))


def test_write_chapter_layout(chapter, tmp_path):
    folder = S.write_chapter(chapter, tmp_path / "ch")
    meta = json.loads((folder / "chapter.json").read_text())
    assert [p["name"] for p in meta["pages"]] == ["page_000", "page_001", "page_002"]
    assert meta["labels"][str(S.part_label(1, "hair"))]["color"] == list(chapter.characters[1].colors["hair"])
    labels = np.asarray(Image.open(folder / "labels" / "page_001.png"))
    assert np.array_equal(labels, chapter.pages[1].labels)
    assert np.array_equal(np.asarray(Image.open(folder / "gt" / "page_001.png")), np.asarray(chapter.pages[1].color))
    for style in S.STYLES:
        assert Image.open(folder / "input" / style / "page_002.png").size == (128, 192)
    assert len(list((folder / "references").iterdir())) == 2
    assert json.loads((folder / "labels" / "labels.json").read_text())["labels"] == meta["labels"]
