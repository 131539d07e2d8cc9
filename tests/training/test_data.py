"""prepare-training: the cached retrieval is inference's retrieval, reruns extend, bad pages are skipped by name."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from colorflow_core.errors import InvalidInputError
from colorflow_core.imaging import list_images, load_image
from colorflow_core.retrieval import ReferencePool, ReleaseClipEncoder, content_hash
from colorflow_core.training.data import (
    PrepSettings, TrainingData, is_grayscale, pool_for, prepare_training, retrieval_query, screen_ratio,
)

from .conftest import PAGE, write_chapters


def test_cached_retrieval_equals_a_fresh_inference_retrieval(prepared):
    data_dir, release, _, chapters = prepared
    data = TrainingData(data_dir)
    encoder = ReleaseClipEncoder.from_pretrained(release / "image_encoder")
    for frame in data.frames:
        files = {content_hash(load_image(p)): p for p in list_images(chapters / frame["chapter"])}
        pool = ReferencePool(encoder)
        pool.add([files[digest] for digest in frame["pool"]])
        fresh = pool.search(retrieval_query(data.image(frame, "color"), data.size), data.size, k=3)
        cached = data.retrieval(frame)
        assert fresh.indices.tolist() == frame["retrieval"]["indices"] == cached.indices.tolist()
        assert np.allclose(fresh.scores.numpy(), cached.scores.numpy())
        assert [np.asarray(p).tolist() for p in fresh.candidates] == [np.asarray(p).tolist() for p in cached.candidates]


def test_frames_have_every_style_at_1_5x(prepared):
    data = TrainingData(prepared[0])
    assert len(data.frames) == 4 and data.meta["styles"] == ["gray", "screen", "sketch", "sketch_shading"]
    frame = data.frames[0]
    for kind in ("color", "gray", "screen", "sketch", "sketch_shading"):
        assert data.image(frame, kind).size == (96, 144)
    gray = np.asarray(data.image(frame, "gray"))
    assert (gray[..., 0] == gray[..., 1]).all() and not (np.asarray(data.image(frame, "color")) == gray).all()


def test_rerun_extends_and_never_recomputes(prepared, tmp_path, monkeypatch):
    data_dir, release, _, chapters = prepared
    work = tmp_path / "data"
    shutil.copytree(data_dir, work)
    before = json.loads((work / "data.json").read_text())
    stamps = {p: p.stat().st_mtime_ns for p in (work / "frames").rglob("*.png")}
    more = tmp_path / "chapters"
    shutil.copytree(chapters, more)
    write_chapters(more, (2,))
    searched = []
    original = ReferencePool.search
    monkeypatch.setattr(ReferencePool, "search", lambda self, q, *a, **k: searched.append(1) or original(self, q, *a, **k))
    data = prepare_training(more, work, release, PrepSettings(*PAGE), warn=lambda m: None)
    assert len(searched) == 2  # only the new chapter's two frames
    assert data.meta["frames"][:4] == before["frames"]
    assert {f["chapter"] for f in data.frames} == {"ch0", "ch1", "ch2"}
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    with pytest.raises(InvalidInputError, match="other settings"):
        prepare_training(more, work, release, PrepSettings(64, 128), warn=lambda m: None)


def test_bad_pages_are_skipped_with_their_names(prepared, tmp_path):
    _, release, _, chapters = prepared
    root = tmp_path / "chapters"
    shutil.copytree(chapters / "ch0", root / "good")
    (root / "good" / "broken.png").write_bytes(b"not a png")
    Image.open(list_images(chapters / "ch0")[0]).convert("L").convert("RGB").save(root / "good" / "zz_gray.png")
    (root / "short").mkdir()
    shutil.copy(list_images(chapters / "ch1")[0], root / "short" / "only.png")
    warnings: list[str] = []
    data = prepare_training(root, tmp_path / "data", release, PrepSettings(*PAGE, styles=("gray",)), warn=warnings.append)
    assert [f["id"] for f in data.frames] == ["good/page_000", "good/page_001"]
    text = "\n".join(warnings)
    assert "broken.png" in text and "zz_gray.png" in text and "no colour" in text and "chapter short" in text
    (tmp_path / "single" / "c").mkdir(parents=True)
    shutil.copy(list_images(chapters / "ch1")[0], tmp_path / "single" / "c" / "p.png")
    with pytest.raises(InvalidInputError, match="2 or more"):
        prepare_training(tmp_path / "single", tmp_path / "data2", release, PrepSettings(*PAGE), warn=warnings.append)


def test_pools_and_screen_ratios_are_seeded():
    settings = PrepSettings(*PAGE, pool_size=20)
    assert pool_for(3, 10, settings, "c/p") == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    chosen = pool_for(3, 60, settings, "c/p")
    assert len(chosen) == 20 and 3 not in chosen and chosen == pool_for(3, 60, settings, "c/p")
    assert chosen != pool_for(3, 60, PrepSettings(*PAGE, seed=1), "c/p")
    ratios = [screen_ratio(0, f"c/{i}") for i in range(400)]
    assert 0 <= min(ratios) and max(ratios) <= 1 and abs(np.mean(ratios) - 0.5) < 0.05


def test_grayscale_detection():
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 255, (64, 64), dtype=np.uint8)
    assert is_grayscale(Image.fromarray(np.stack([gray] * 3, -1)))
    color = np.stack([gray] * 3, -1)
    color[:16, :16] = (200, 40, 40)
    assert not is_grayscale(Image.fromarray(color))
