"""Bad input, CLI and API: each case raises one of the project's errors, whose one-line message names the cause, and
loses nothing (every file that was there before is unchanged, no temporary file is left, finished pages are kept)."""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from PIL import Image

from colorflow_core import errors
from colorflow_core.cli import build_parser, main
from colorflow_core.imaging import load_image, process_image
from colorflow_core.loading import load_colorflow, resolve_device
from colorflow_core.options import ColorizeOptions
from colorflow_core.retrieval import PoolStoreError, ReferencePool
from colorflow_core.validation import check_writable_folder

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@dataclass
class Workspace:
    root: Path
    release: Path
    base: Path

    @property
    def page(self) -> Path:
        return self.root / "pages" / "page.png"

    @property
    def ref(self) -> Path:
        return self.root / "refs" / "ref.png"

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def pool(self) -> Path:
        return self.root / "pool"

    def colorize(self, *extra: object, out: Path | None = None, pages: tuple = ()) -> list[str]:
        """`colorize` arguments on the tiny weights; `extra` comes last and overrides."""
        return [
            "colorize", "--colorflow", str(self.release), "--base", str(self.base), "--refs", str(self.ref),
            "--out", str(out or self.out), "--steps", "1", "--device", "cpu", "--width", "64", "--height", "96",
            *map(str, extra), "--", *(map(str, pages) if pages else [str(self.page)]),
        ]


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def ws(tiny_release, tiny_model, tmp_path) -> Workspace:
    """A page, a reference, an output folder holding an earlier page and a persisted pool of one reference."""
    release, base = tiny_release
    space = Workspace(tmp_path, release, base)
    for folder in ("pages", "refs", "out"):
        (tmp_path / folder).mkdir()
    Image.new("L", (64, 96), 90).save(space.page)
    Image.new("RGB", (80, 120), (200, 60, 40)).save(space.ref)
    Image.new("RGB", (96, 144), (1, 2, 3)).save(space.out / "earlier.png")
    ReferencePool(tiny_model.encoder, space.pool).add(space.ref)
    return space


def _copied_release(ws: Workspace, change: Callable[[Path], None]) -> Path:
    """The tiny release with its GraySD folder copied (the rest linked) and changed by `change`."""
    release = ws.root / "release"
    release.mkdir()
    for item in ws.release.iterdir():
        if item.name == "GraySD":
            shutil.copytree(item, release / item.name)
        else:
            (release / item.name).symlink_to(item, target_is_directory=item.is_dir())
    change(release / "GraySD")
    return release


def _lora(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        path = folder / "unet_lora.bin"
        torch.save(change(torch.load(path)), path)

    return edit


def _guider_config(**fields) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        path = folder / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))

    return edit


def case(name: str, *values, marks=()):
    """One row of a matrix: (what to run, the error class, a regex its message must match)."""
    return pytest.param(*values, id=name, marks=marks)


def _folder(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _write(path: Path, image: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


# (id, argv from the workspace, error class, what the message must say)
CLI_CASES = [
    case("out-is-a-file", lambda ws: ws.colorize(out=ws.out / "earlier.png"),
        errors.InvalidInputError, r"--out .*earlier.png' is a file"),
    case("out-under-a-file", lambda ws: ws.colorize(out=ws.out / "earlier.png" / "sub"),
        errors.InvalidInputError, r"--out .* cannot be written"),
    case("intermediates-is-a-file", lambda ws: ws.colorize("--save-intermediates", ws.page),
        errors.InvalidInputError, r"--save-intermediates .* is a file"),
    case("pool-is-a-file", lambda ws: ws.colorize("--pool", ws.page),
        errors.ColorFlowError, r"--pool .*page.png' is a file"),
    case("feed-back-pool-not-writable", lambda ws: ws.colorize("--pool", ws.page / "pool", "--feed-back"),
        errors.InvalidInputError, r"--pool .* cannot be written"),
    case("width-zero", lambda ws: ws.colorize("--width", 0),
        errors.ColorFlowError, r"--width must be a positive multiple of 32, got 0"),
    case("width-not-multiple-of-32", lambda ws: ws.colorize("--width", 65), errors.ColorFlowError, r"--width .* got 65"),
    case("height-negative", lambda ws: ws.colorize("--height", -32), errors.ColorFlowError, r"--height .* got -32"),
    case("width-without-height", lambda ws: [a for a in ws.colorize() if a not in ("--height", "96")],
        errors.ColorFlowError, r"--width and --height go together"),
    case("size-and-width", lambda ws: ws.colorize("--size", "auto"),
        errors.ColorFlowError, r"--width/--height or --size auto, not both"),
    case("guidance-nan", lambda ws: ws.colorize("--guidance", "nan"),
        errors.InvalidInputError, r"guidance scale must be a finite number, got nan"),
    case("guidance-inf", lambda ws: ws.colorize("--guidance", "inf"),
        errors.InvalidInputError, r"guidance scale must be a finite number, got inf"),
    case("guider-scale-nan", lambda ws: ws.colorize("--guider-scale", "nan"),
        errors.InvalidInputError, r"guider scale must be a finite number"),
    case("guider-scale-minus-inf", lambda ws: ws.colorize("--guider-scale=-inf"),
        errors.InvalidInputError, r"guider scale must be a finite number"),
    case("guidance-below-1", lambda ws: ws.colorize("--guidance", "0.5"),
        errors.InvalidInputError, r"guidance scale must be >= 1.0"),
    case("steps-zero", lambda ws: ws.colorize("--steps", 0), errors.InvalidInputError, r"steps must be at least 1"),
    case("page-batch-zero", lambda ws: ws.colorize("--page-batch", 0),
        errors.ColorFlowError, r"--page-batch must be at least 1"),
    case("page-missing", lambda ws: ws.colorize(pages=(ws.root / "nope.png",)),
        errors.ColorFlowError, r"page not found: .*nope.png"),
    case("reference-missing", lambda ws: ws.colorize("--refs", ws.root / "gone.png"),
        errors.ColorFlowError, r"reference not found: .*gone.png"),
    case("two-pages-one-stem", lambda ws: ws.colorize(pages=(ws.page, _write(ws.root / "b" / "page.jpg", Image.new("L", (64, 96))))),
        errors.ColorFlowError, r"share a file name stem"),
    case("empty-page-folder", lambda ws: ws.colorize(pages=(_folder(ws.root / "empty"),)),
        errors.InvalidInputError, r"no image files"),
    case("device-bogus", lambda ws: ws.colorize("--device", "bogus"), errors.InvalidInputError, r"unknown device 'bogus'"),
    case("device-cuda-without-cuda", lambda ws: ws.colorize("--device", "cuda"),
        errors.InvalidInputError, r"device 'cuda' asked for, but .* no CUDA", marks=NO_CUDA),
    case("device-meta", lambda ws: ws.colorize("--device", "meta"),
        errors.InvalidInputError, r"device 'meta' is not supported"),
    case("unknown-encoder", lambda ws: ws.colorize("--encoder", "clip"), errors.ColorFlowError, r"unknown encoder 'clip'"),
    case("pixart-base-for-gray-style", lambda ws: ws.colorize("--base", ws.release.parent / "pixart"),
        errors.IncompatibleWeightsError, r"is a PixArt .* gray style runs on an SD1.5 base"),
    case("release-folder-missing-guider", lambda ws: ws.colorize("--colorflow", _copied_release(ws, lambda g: (g / "config.json").unlink())),
        errors.MissingWeightsError, r"GraySD/config.json"),
    case("lora-holding-a-list", lambda ws: ws.colorize("--colorflow", _copied_release(ws, _lora(lambda sd: list(sd.values())))),
        errors.IncompatibleWeightsError, r"unet_lora.bin holds a list, not named tensors"),
    case("lora-full-of-nan", lambda ws: ws.colorize("--colorflow", _copied_release(ws, _lora(lambda sd: {k: v * math.nan for k, v in sd.items()}))),
        errors.IncompatibleWeightsError, r"LoRA file holds NaN or infinite values"),
    case("lora-for-another-model", lambda ws: ws.colorize("--colorflow", _copied_release(ws, _lora(lambda sd: {f"transformer_blocks.0.attn1.to_q.lora_{ab}.weight": v for ab, v in zip("AB", sd.values())}))),
        errors.IncompatibleWeightsError, r"none of the LoRA file's tensors match a UNet module"),
    case("lora-empty", lambda ws: ws.colorize("--colorflow", _copied_release(ws, _lora(lambda sd: {}))),
        errors.IncompatibleWeightsError, r"LoRA file holds no tensors"),
    case("block-out-channels-not-a-list", lambda ws: ws.colorize("--colorflow", _copied_release(ws, _guider_config(block_out_channels=320))),
        errors.IncompatibleWeightsError, r"config.json does not describe a valid ColorGuiderSDModel"),
    case("guider-of-another-style", lambda ws: ws.colorize("--colorflow", _copied_release(ws, _guider_config(_class_name="ColorGuiderPixArtModel"))),
        errors.IncompatibleWeightsError, r"describes a ColorGuiderPixArtModel, not the ColorGuiderSDModel"),
    case("page-decompression-bomb", lambda ws: ws.colorize(pages=(_write(ws.root / "bomb" / "bomb.png", Image.new("1", (8400, 8400))),)),
        errors.InvalidInputError, r"bomb.png is 8400x8400, larger than"),
    case("reference-cropped-to-nothing", lambda ws: ws.colorize("--refs", _write(ws.root / "thin" / "thin.png", Image.new("RGB", (2000, 1), "red"))),
        errors.InvalidInputError, r"reference thin.png: a 2000x1 image cannot be cropped .* no pixel would remain"),
    case("corrupt-pool-file", lambda ws: ws.colorize("--pool", _text(ws.pool / "pool.json", "{").parent),
        PoolStoreError, r"cannot read reference pool file .*pool.json"),
    case("preprocess-out-is-a-file", lambda ws: ["preprocess", "--preprocess", "gray", "--out", str(ws.page), str(ws.page)],
        errors.InvalidInputError, r"--out .* is a file"),
    case("make-tiny-over-a-downloaded-release", lambda ws: ["make-tiny", str(_write(ws.root / "models" / "sd15" / "unet" / "mine.png", Image.new("L", (4, 4))).parents[2])],
        errors.InvalidInputError, r"sd15' already exists and was not written by make-tiny"),
]


@pytest.mark.parametrize("build, error, message", CLI_CASES)
def test_cli_bad_input(ws, build, error, message, capsys):
    argv = build(ws)
    before = _snapshot(ws.root)
    args = build_parser().parse_args(argv)
    with pytest.raises(error, match=message) as raised:
        args.func(args)
    assert "\n" not in str(raised.value)
    after = _snapshot(ws.root)
    assert {name: after.get(name) for name in before} == before, "a file that was there changed or vanished"
    assert not [name for name in after if name.endswith(".tmp")]
    assert not (ws.out / "page.png").exists()
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and str(raised.value).split(":")[0] in err[-1]


def test_cli_keeps_the_finished_page_when_feeding_it_back_fails(ws, tiny_model, monkeypatch, capsys):
    original = ReferencePool.add

    def refuse_pages(self, items, progress=None):
        if isinstance(items, list) and items and isinstance(items[0], Image.Image):
            raise PoolStoreError(f"cannot write reference pool {self.store}: No space left on device")
        return original(self, items, progress)

    monkeypatch.setattr(ReferencePool, "add", refuse_pages)
    assert main(ws.colorize("--pool", ws.pool, "--feed-back-into-pool")) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: cannot write reference pool {ws.pool}: No space left on device"
    assert Image.open(ws.out / "page.png").size == (96, 144)
    assert len(ReferencePool.open(ws.pool, tiny_model.encoder)) == 1


# ------------------------------------------------------------------------------------------------ API
def _nan_parameter(module: torch.nn.Module, call: Callable[[], object]) -> None:
    """Run `call` with the module's first parameter NaN, then restore it (the tiny model is shared)."""
    parameter = next(module.parameters())
    saved = parameter.detach().clone()
    with torch.no_grad():
        parameter.fill_(math.nan)
    try:
        call()
    finally:
        with torch.no_grad():
            parameter.copy_(saved)


def _sample(model, **kwargs):
    canvas, mask = Image.new("RGB", (128, 192), (120, 90, 60)), Image.new("L", (128, 192), 255)
    return model.pipeline(canvas, mask, num_inference_steps=1, **kwargs)


def _upscale(model, size, guide_size=None):
    width, height = size
    guide = Image.new("RGB", guide_size or (int(1.5 * width), int(1.5 * height)), (90, 90, 90))
    return model.upscaler(Image.new("RGB", size, (120, 90, 60)), guide)


API_CASES = [
    case("options-guidance-nan", lambda m, t: ColorizeOptions(guidance_scale=math.nan),
        errors.InvalidInputError, r"guidance scale must be a finite number, got nan"),
    case("options-guider-inf", lambda m, t: ColorizeOptions(guider_scale=math.inf),
        errors.InvalidInputError, r"guider scale must be a finite number, got inf"),
    case("options-size-zero", lambda m, t: ColorizeOptions(size=(0, 96)),
        errors.InvalidInputError, r"page size 0x96 is not a multiple of 32"),
    case("options-steps-zero", lambda m, t: ColorizeOptions(steps=0), errors.InvalidInputError, r"steps must be at least 1"),
    case("options-seed-negative", lambda m, t: ColorizeOptions(seed=-1),
        errors.InvalidInputError, r"seed must be a non-negative"),
    case("options-unknown-preprocess", lambda m, t: ColorizeOptions(preprocess="blur"),
        errors.InvalidInputError, r"unknown preprocess 'blur'"),
    case("device-bogus", lambda m, t: resolve_device("bogus"), errors.InvalidInputError, r"unknown device 'bogus'"),
    case("device-cuda-index", lambda m, t: resolve_device("cuda:9"),
        errors.InvalidInputError, r"device 'cuda:9' asked for", marks=NO_CUDA),
    case("sampler-guidance-nan", lambda m, t: _sample(m, guidance_scale=math.nan),
        errors.InvalidInputError, r"guidance scale must be a finite number"),
    case("sampler-guider-scale-nan", lambda m, t: _sample(m, guider_scale=math.nan),
        errors.InvalidInputError, r"guider scale must be a finite number"),
    case("nan-unet-weights", lambda m, t: _nan_parameter(m.pipeline.unet, lambda: _sample(m)),
        errors.NonFiniteError, r"ICP denoising \(ColorGuider \+ UNet\) produced NaN"),
    case("nan-fusion-weights", lambda m, t: _nan_parameter(m.upscaler.fusion, lambda: _upscale(m, (64, 96))),
        errors.NonFiniteError, r"GSRP guided upscale .* produced NaN"),
    case("upscale-page-not-multiple-of-8", lambda m, t: _upscale(m, (60, 90)),
        errors.InvalidInputError, r"guided upscale works at 90x135 .* multiple of 8"),
    case("upscale-tiny-page", lambda m, t: _upscale(m, (8, 8)), errors.InvalidInputError, r"guided upscale works at 12x12"),
    case("image-decompression-bomb", lambda m, t: load_image(_write(t / "bomb.png", Image.new("1", (8400, 8400)))),
        errors.InvalidInputError, r"8400x8400, larger than the 40000000 pixels"),
    case("image-cropped-to-nothing", lambda m, t: process_image(Image.new("RGB", (3, 1)), 64, 96),
        errors.InvalidInputError, r"a 3x1 image cannot be cropped to the 64:96 aspect"),
    case("writable-folder-is-a-file", lambda m, t: check_writable_folder(_write(t / "f.png", Image.new("L", (2, 2))), "output folder"),
        errors.InvalidInputError, r"output folder .*f.png' is a file"),
    case("pool-store-is-a-file", lambda m, t: ReferencePool(m.encoder, _write(t / "p.png", Image.new("L", (2, 2)))).add(Image.new("RGB", (8, 8))),
        PoolStoreError, r"cannot write reference pool .*p.png"),
    case("pixart-base-for-gray", lambda m, t: load_colorflow(m.snapshot, m.snapshot.parent / "pixart", style="gray"),
        errors.IncompatibleWeightsError, r"is a PixArt"),
    case("unknown-style", lambda m, t: load_colorflow(m.snapshot, style="watercolour"),
        errors.InvalidInputError, r"style 'watercolour' is not available"),
    case("unknown-dtype", lambda m, t: load_colorflow(m.snapshot, dtype="float8"),
        errors.InvalidInputError, r"unknown dtype 'float8'"),
]


@pytest.mark.parametrize("call, error, message", API_CASES)
def test_api_bad_input(tiny_model, tmp_path, call, error, message):
    with torch.inference_mode():
        with pytest.raises(error, match=message) as raised:
            call(tiny_model, tmp_path)
    assert "\n" not in str(raised.value)
    assert all(torch.isfinite(p).all() for p in tiny_model.pipeline.unet.parameters())


# ------------------------------------------------------------------------------------------------ nothing lost
def test_make_tiny_rewrites_only_folders_it_wrote(tmp_path):
    from colorflow_core.tiny_common import TINY_MARKER, claim_tiny_folder

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    claim_tiny_folder(ours)
    (ours / "unet").mkdir()
    claim_tiny_folder(ours)
    assert sorted(p.name for p in ours.iterdir()) == [TINY_MARKER]
    _write(theirs / "unet" / "weights.png", Image.new("L", (4, 4)))
    with pytest.raises(errors.InvalidInputError, match="not written by make-tiny; nothing was changed"):
        claim_tiny_folder(theirs)
    assert (theirs / "unet" / "weights.png").is_file()


def test_written_files_follow_the_umask(tmp_path):
    import os

    from colorflow_core.retrieval import store

    umask = os.umask(0)
    os.umask(umask)
    store.write_json(tmp_path / "a.json", {})
    store.write_png(tmp_path / "a.png", Image.new("L", (2, 2)))
    assert {(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()} == {0o666 & ~umask}
