"""Bad input and hostile workflows, nodes: each case raises one of the project's errors with a one-line message naming
the cause, and changes nothing under input/ or user/ (pools included)."""
from __future__ import annotations

import hashlib
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from .conftest import REFS, SIZE, colour_image, gray_page
from .test_nodes import errors, images, run

W, H = SIZE


def _snapshot(*roots: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest() for root in roots for p in root.rglob("*") if p.is_file()
    }


class Context:
    """What a case needs: the pack, the tiny model and encoder, a pool, the ComfyUI folders and a folder outside them."""

    def __init__(self, pack, loaded, pool, comfy_base: Path, outside: Path):
        self.pack, self.model, self.encoder, self.pool = pack, loaded[0], loaded[1], pool
        self.input, self.outside = comfy_base / "input", outside

    def run(self, node: str, *args, **kwargs):
        return run(self.pack, node, *args, **kwargs)

    def images(self, *pictures):
        return images(self.pack, *pictures)

    def inside(self, name: str) -> str:
        """A fresh folder name under input/ (removed after the test)."""
        (self.input / name).mkdir()
        return name

    def link(self, name: str, target: Path) -> str:
        """input/<name>: a symlink to `target`."""
        (self.input / name).symlink_to(target, target_is_directory=target.is_dir())
        return name


def _empty(ctx: Context) -> torch.Tensor:
    return torch.zeros(0, H, W, 3)


def _sample(ctx: Context, guidance=7.5, guider=1.0, mask=None):
    canvas = ctx.images(Image.new("RGB", (2 * W, 2 * H), (90, 60, 30)))
    mask = torch.ones(1, 2 * H, 2 * W) if mask is None else mask
    return ctx.run("ColorFlowSampler", ctx.model, canvas, mask, 0, 1, guidance, guider)


def _sequence(ctx: Context, pages=None, guidance=7.5, guider=1.0):
    pages = [ctx.images(gray_page(10))] if pages is None else pages
    return ctx.run("ColorFlowColorizeSequence", [ctx.model], [ctx.pool], pages, [0], [1], [guidance], [guider], ["custom"],
                   [W], [H], ["gray"], [False])


def _thin_pool(ctx: Context):
    pool = ctx.run("ColorFlowReferencePool", ctx.encoder, "thin", "", False,
                   images=ctx.images(Image.new("RGB", (2000, 1), "red")))[0]
    return ctx.run("ColorFlowStitchCanvas", ctx.images(gray_page(10)), pool, "custom", W, H, "gray")


def _mixed(ctx: Context) -> str:
    """input/mixed: one page of its own and a link to a file outside the allowed folders."""
    folder = ctx.inside("mixed")
    gray_page(3).save(ctx.input / folder / "b.png")
    ctx.link(f"{folder}/a.png", ctx.outside / "a.png")
    return folder


def _loop(folder: Path) -> Path:
    """folder/a → folder/b → folder/a."""
    (folder / "a").symlink_to(folder / "b")
    (folder / "b").symlink_to(folder / "a")
    return folder / "a"


def _bomb(ctx: Context) -> str:
    folder = ctx.inside("bomb")
    Image.new("1", (8400, 8400)).save(ctx.input / folder / "bomb.png")
    return folder


def _over_budget(ctx: Context) -> str:
    ctx.pack.colorflow_core.imaging.MAX_FOLDER_PIXELS = 3 * 128 * 192 - 1  # restored by the fixture
    folder = ctx.inside("big")
    for index in range(3):
        gray_page(index).save(ctx.input / folder / f"p{index}.png")
    return folder


REFUSED = r"^folder '[^']*' is outside ComfyUI's input directory and the folders allowed in user/colorflow/allowed_folders.txt"


def case(name: str, *values):
    """One row: (what to run, the error class's name, a regex its message must match)."""
    return pytest.param(*values, id=name)


NODE_CASES = [
    case("load-pages-absolute-outside", lambda c: c.run("ColorFlowLoadPages", str(c.outside), False), "InvalidInputError", REFUSED),
    case("load-pages-widget-switched-on", lambda c: c.run("ColorFlowLoadPages", str(c.outside), True), "InvalidInputError", REFUSED),
    case("load-pages-dot-dot", lambda c: c.run("ColorFlowLoadPages", "../models/colorflow/ColorFlow", True), "InvalidInputError", REFUSED),
    case("load-pages-missing-outside", lambda c: c.run("ColorFlowLoadPages", str(c.outside / "no such"), True), "InvalidInputError", REFUSED),
    case("load-pages-home", lambda c: c.run("ColorFlowLoadPages", "~", True), "InvalidInputError", r"folder '~' not found"),
    case("load-pages-symlinked-folder", lambda c: c.run("ColorFlowLoadPages", c.link("elsewhere", c.outside), True), "InvalidInputError", REFUSED),
    case("load-pages-symlinked-file", lambda c: c.run("ColorFlowLoadPages", _mixed(c), False),
        "InvalidInputError", r"'a.png' in folder 'mixed' links outside the allowed folders"),
    case("load-pages-nul-byte", lambda c: c.run("ColorFlowLoadPages", "chapter\x00/x", False),
        "InvalidInputError", r"folder 'chapter\\x00/x' cannot be used: ValueError: embedded null byte"),
    case("load-pages-name-too-long", lambda c: c.run("ColorFlowLoadPages", "x" * 5000, False),
        "InvalidInputError", r"folder 'x{200}' cannot be used: OSError: File name too long$"),
    case("load-pages-symlink-loop-outside", lambda c: c.run("ColorFlowLoadPages", str(_loop(c.outside) / "x"), True),
        "InvalidInputError", REFUSED),
    case("load-pages-missing-inside", lambda c: c.run("ColorFlowLoadPages", "chapter99", False),
        "InvalidInputError", r"folder 'chapter99' not found"),
    case("load-pages-empty-folder", lambda c: c.run("ColorFlowLoadPages", c.inside("empty"), False),
        "InvalidInputError", r"no image files"),
    case("load-pages-decompression-bomb", lambda c: c.run("ColorFlowLoadPages", _bomb(c), False),
        "InvalidInputError", r"bomb.png is 8400x8400, larger than"),
    case("load-pages-folder-over-budget", lambda c: c.run("ColorFlowLoadPages", _over_budget(c), False),
        "InvalidInputError", r"folder 'big' holds 73728 pixels of images, more than"),
    case("pool-folder-outside", lambda c: c.run("ColorFlowReferencePool", c.encoder, "x", str(c.outside), True), "InvalidInputError", REFUSED),
    case("pool-symlinked-folder", lambda c: c.run("ColorFlowReferencePool", c.encoder, "x", c.link("refs_link", c.outside), False), "InvalidInputError", REFUSED),
    case("pool-name-is-a-path", lambda c: c.run("ColorFlowReferencePool", c.encoder, "../../etc", REFS, False),
        "InvalidInputError", r"pool name '../../etc' must be"),
    case("pool-empty", lambda c: c.run("ColorFlowReferencePool", c.encoder, "nothing", "", False),
        "InvalidInputError", r"reference pool 'nothing' is empty"),
    case("pool-reference-cropped-to-nothing", _thin_pool,
        "InvalidInputError", r"reference .*: a 2000x1 image cannot be cropped .* no pixel would remain"),
    case("stitch-empty-batch", lambda c: c.run("ColorFlowStitchCanvas", _empty(c), c.pool, "custom", W, H, "gray"),
        "InvalidInputError", r"the IMAGE input is empty \(shape \(0, 96, 64, 3\)\)"),
    case("stitch-custom-size-not-multiple-of-32", lambda c: c.run("ColorFlowStitchCanvas", c.images(gray_page(1)), c.pool, "custom", 65, H, "gray"),
        "InvalidInputError", r"page size 65x96 is not a multiple of 32"),
    case("stitch-style-default-without-model", lambda c: c.run("ColorFlowStitchCanvas", c.images(gray_page(1)), c.pool, "custom", W, H, "style default"),
        "InvalidInputError", r"the ColorFlow model"),
    case("sampler-guidance-nan", lambda c: _sample(c, guidance=math.nan),
        "InvalidInputError", r"guidance scale must be a finite number, got nan"),
    case("sampler-guider-scale-inf", lambda c: _sample(c, guider=math.inf),
        "InvalidInputError", r"guider scale must be a finite number, got inf"),
    case("sampler-empty-mask", lambda c: _sample(c, mask=torch.zeros(0, 2 * H, 2 * W)),
        "InvalidInputError", r"the MASK input is empty"),
    case("sampler-mask-of-another-size", lambda c: _sample(c, mask=torch.ones(1, 64, 64)),
        "InvalidInputError", r"mask \(64, 64\) and canvas \(128, 192\) differ in size"),
    case("upscale-page-not-multiple-of-8", lambda c: c.run("ColorFlowGuidedUpscale", c.model, c.images(Image.new("RGB", (60, 90))), c.images(gray_page(2)), 0, 7.5, "gray", True),
        "InvalidInputError", r"guided upscale works at 90x135 .* multiple of 8"),
    case("upscale-tiny-page", lambda c: c.run("ColorFlowGuidedUpscale", c.model, c.images(Image.new("RGB", (4, 4))), c.images(gray_page(2)), 0, 7.5, "gray", True),
        "InvalidInputError", r"guided upscale works at 6x6"),
    case("upscale-empty-page", lambda c: c.run("ColorFlowGuidedUpscale", c.model, _empty(c), c.images(gray_page(2)), 0, 7.5, "gray", True),
        "InvalidInputError", r"the IMAGE input is empty"),
    case("sequence-guidance-nan", lambda c: _sequence(c, guidance=math.nan),
        "InvalidInputError", r"guidance scale must be a finite number"),
    case("sequence-guider-scale-nan", lambda c: _sequence(c, guider=math.nan),
        "InvalidInputError", r"guider scale must be a finite number"),
    case("sequence-empty-batch", lambda c: _sequence(c, pages=[_empty(c)]),
        "InvalidInputError", r"the IMAGE input is empty"),
]


@pytest.fixture
def ctx(pack, loaded, comfy_base, user_dir, tmp_path):
    pool = run(pack, "ColorFlowReferencePool", loaded[1], "refs", REFS, False)[0]
    outside = tmp_path / "private"
    outside.mkdir()
    colour_image(5).save(outside / "a.png")
    before = set((comfy_base / "input").iterdir())
    budget = pack.colorflow_core.imaging.MAX_FOLDER_PIXELS
    yield Context(pack, loaded, pool, comfy_base, outside)
    pack.colorflow_core.imaging.MAX_FOLDER_PIXELS = budget
    for path in set((comfy_base / "input").iterdir()) - before:
        path.unlink() if path.is_symlink() or path.is_file() else shutil.rmtree(path)


@pytest.mark.parametrize("call, error, message", NODE_CASES)
def test_node_bad_input(ctx, comfy_base, user_dir, call, error, message):
    before = _snapshot(comfy_base / "input", user_dir)
    with pytest.raises(getattr(errors(ctx.pack), error), match=message) as raised:
        call(ctx)
    assert "\n" not in str(raised.value)
    after = _snapshot(comfy_base / "input", user_dir)
    assert {name: after.get(name) for name in before} == before, "a file under input/ or user/ changed or vanished"
    assert not [name for name in after if name.endswith(".tmp")]


def test_a_refused_path_says_the_same_whether_or_not_it_exists(ctx):
    messages = []
    for folder in (ctx.outside, ctx.outside / "no such"):
        with pytest.raises(errors(ctx.pack).InvalidInputError) as raised:
            ctx.run("ColorFlowLoadPages", str(folder), True)
        messages.append(str(raised.value).replace(str(folder), "FOLDER"))
    assert messages[0] == messages[1]


def test_the_user_allows_folders_outside_the_workflow(ctx, user_dir, monkeypatch):
    with pytest.raises(errors(ctx.pack).InvalidInputError):
        ctx.run("ColorFlowLoadPages", str(ctx.outside), True)
    monkeypatch.setenv("COLORFLOW_ALLOWED_FOLDERS", f"relative/ignored{os.pathsep}{ctx.outside}")
    (pages,) = ctx.run("ColorFlowLoadPages", str(ctx.outside), False)
    assert len(pages) == 1
    tooltip = ctx.pack.NODE_CLASS_MAPPINGS["ColorFlowLoadPages"].INPUT_TYPES()["required"]["allow_outside_input"][1]["tooltip"]
    assert "Ignored" in tooltip and "user/colorflow/allowed_folders.txt" in tooltip and "COLORFLOW_ALLOWED_FOLDERS" in tooltip
