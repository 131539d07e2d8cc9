"""One decision, one place: options resolved once by the core, identically from the API, the CLI and the nodes
(here beside the node tests, whose fixtures load the pack)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from colorflow_core import sequence, settings
from colorflow_core.cli import main
from colorflow_core.errors import InvalidInputError
from colorflow_core.options import ColorizeOptions
from colorflow_core.presets import PRESET_NAMES
from colorflow_core.retrieval import ReferencePool
from colorflow_core.sequence import colorize_page, colorize_pages
from colorflow_core.settings import guidance_scale, resolve
from colorflow_core.styles import STYLES

from .conftest import BASE, RELEASE

SIZE = (32, 32)


def image(seed: int, size=(48, 48), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


@pytest.fixture
def resolved(monkeypatch, pack) -> list:
    """Every `PageSettings` the page loop resolves, in order (the library's, and the pack's copy of it)."""
    seen = []
    for module in (sequence, pack.colorflow_core.sequence):
        def spy(*args, real=module.resolve, **kwargs):
            seen.append(real(*args, **kwargs))
            return seen[-1]

        monkeypatch.setattr(module, "resolve", spy)
    return seen


def _decisions(found) -> tuple:
    return (found.preset.name, found.guidance_scale, found.preprocess, found.encode_once, found.tile_decode)


# ---- the style's defaults reach every front end ---------------------------------------------------------------

def test_each_style_default_is_resolved_by_the_core(tiny_model, tiny_sketch):
    assert resolve(tiny_model, ColorizeOptions(), SIZE).guidance_scale == STYLES["gray"].guidance_scale == 7.5
    assert resolve(tiny_sketch, ColorizeOptions(), SIZE).guidance_scale == STYLES["sketch"].guidance_scale == 4.5
    assert resolve(tiny_model, ColorizeOptions(), SIZE).preprocess == "screen"
    assert resolve(tiny_sketch, ColorizeOptions(), SIZE).preprocess == "sketch"
    assert resolve(tiny_sketch, ColorizeOptions(guidance_scale=2.0, preprocess="none"), SIZE).guidance_scale == 2.0


def test_the_python_api_colours_sketch_pages_at_the_sketch_guidance(tiny_sketch, resolved):
    pool = ReferencePool(tiny_sketch.encoder)
    pool.add([image(1)])
    colorize_page(tiny_sketch, image(2, mode="L"), pool, ColorizeOptions(size=SIZE, steps=1, preprocess="gray"))
    assert resolved[-1].guidance_scale == 4.5 and resolved[-1].do_classifier_free_guidance


def test_guidance_precedence_explicit_then_preset_then_style(tiny_model):
    fast = tiny_model.with_preset("fast")
    assert guidance_scale(fast, ColorizeOptions()) == 1.0
    assert guidance_scale(fast, ColorizeOptions(guidance_scale=3.0)) == 3.0
    assert guidance_scale(tiny_model, ColorizeOptions(preset="fast")) == 1.0
    assert guidance_scale(tiny_model, ColorizeOptions(preset="low-vram")) == 7.5
    with pytest.raises(InvalidInputError, match="guidance"):
        ColorizeOptions(guidance_scale=float("nan"))


# ---- every preset × every front end ---------------------------------------------------------------------------

def _api(tiny_model, pool, preset, guidance):
    colorize_page(tiny_model, image(3, mode="L"), pool,
                  ColorizeOptions(size=SIZE, steps=1, preprocess="gray", preset=preset, guidance_scale=guidance))


def _cli(tiny_release, tmp_path, preset, guidance):
    release, base = tiny_release
    page, ref = tmp_path / "page.png", tmp_path / "ref.png"
    image(3, mode="L").save(page)
    image(1).save(ref)
    extra = ["--guidance", str(guidance)] if guidance is not None else []
    assert main(["colorize", "--colorflow", str(release), "--base", str(base), "--refs", str(ref), "--out",
                 str(tmp_path / "out"), "--steps", "1", "--width", str(SIZE[0]), "--height", str(SIZE[1]),
                 "--device", "cpu", "--dtype", "float32", "--preprocess", "gray", "--preset", preset, *extra,
                 str(page)]) == 0


def _node(pack, pool, preset, guidance):
    with torch.inference_mode():
        model, _ = pack.NODE_CLASS_MAPPINGS["ColorFlowModelLoader"]().load(
            RELEASE, BASE, "gray", "float32", "cpu", False, None, preset)
        pages = torch.from_numpy(np.asarray(image(3, mode="L").convert("RGB"), dtype=np.float32) / 255)[None]
        pack.NODE_CLASS_MAPPINGS["ColorFlowColorizeSequence"]().colorize(
            [model], [pool], [pages], [0], [1], [guidance or 0.0], [1.0], ["custom"], [SIZE[0]], [SIZE[1]], ["gray"],
            [False])


@pytest.mark.parametrize("guidance", [None, 3.0])
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_presets_resolve_identically_in_the_api_the_cli_and_the_node(
    preset, guidance, tiny_model, tiny_release, tmp_path, pack, comfy_base, resolved
):
    pool = ReferencePool(tiny_model.encoder)
    pool.add([image(1)])
    _api(tiny_model, pool, preset, guidance)
    _cli(tiny_release, tmp_path, preset, guidance)
    _node(pack, pool, preset, guidance)
    api, cli, node = (_decisions(found) for found in resolved)
    assert api == cli == node
    expected = guidance if guidance is not None else (1.0 if preset == "fast" else 7.5)
    assert api[0] == ("faithful" if preset == "auto" else preset) and api[1] == expected


# ---- feed-back never changes a persisted pool unless asked ----------------------------------------------------

def test_cli_feed_back_leaves_the_stored_pool_unchanged_and_a_rerun_gives_the_same_pages(tiny_release, tmp_path):
    release, base = tiny_release
    for i in range(2):
        image(20 + i, (64, 96), "L").save(tmp_path / f"p{i}.png")
    image(1, (64, 96)).save(tmp_path / "ref.png")
    store = tmp_path / "pool"

    def run(out, *extra):
        assert main(["colorize", "--colorflow", str(release), "--base", str(base), "--refs", str(tmp_path / "ref.png"),
                     "--out", str(tmp_path / out), "--steps", "1", "--width", "32", "--height", "32", "--device", "cpu",
                     "--preprocess", "gray", "--pool", str(store), *extra,
                     str(tmp_path / "p0.png"), str(tmp_path / "p1.png")]) == 0
        return [np.asarray(Image.open(tmp_path / out / f"p{i}.png")) for i in range(2)]

    first = run("a", "--feed-back")
    stored = sorted(p.name for p in (store / "refs").iterdir()) if (store / "refs").is_dir() else None
    second = run("b", "--feed-back")
    assert all(np.array_equal(x, y) for x, y in zip(first, second))
    assert ReferencePool.open(store, _encoder(release)).references == ReferencePool.open(store, _encoder(release)).references
    assert len(ReferencePool.open(store, _encoder(release))) == 1
    if stored is not None:
        assert sorted(p.name for p in (store / "refs").iterdir()) == stored
    run("c", "--feed-back-into-pool")
    assert len(ReferencePool.open(store, _encoder(release))) == 3


def _encoder(release):
    from colorflow_core.retrieval import ReleaseClipEncoder

    return ReleaseClipEncoder.from_pretrained(release / "image_encoder")


def test_colorize_pages_refuses_an_empty_chapter(tiny_model):
    with pytest.raises(InvalidInputError, match="no pages"):
        list(colorize_pages(tiny_model, [], ReferencePool(tiny_model.encoder)))


def test_memory_needed_follows_the_resolved_guidance(tiny_model):
    with_cfg = settings.memory_needed(tiny_model, ColorizeOptions(), (512, 800))
    without = settings.memory_needed(tiny_model, ColorizeOptions(guidance_scale=1.0), (512, 800))
    assert with_cfg > without > 0
