"""Fixtures for the node tests: the pack as ComfyUI imports it, a stand-in ComfyUI base folder with tiny weights."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ..pack import load_pack

#: Page size on the canvas for tiny runs (canvas 128×192, latent 16×24).
SIZE = (64, 96)
RELEASE = "ColorFlow"
BASE = "diffusers/tiny-sd15"
PIXART = "diffusers/tiny-pixart"
#: The line extractor of the tiny release, as the preprocessor nodes name it.
ERIKA = "colorflow/ColorFlow/LE/erika.pth"
#: Folders inside the input directory, as the shipped workflows name them.
REFS, CHAPTER = "colorflow/refs", "colorflow/chapter"


def colour_image(seed: int, size=(80, 120)) -> Image.Image:
    """A smooth random colour image (a stand-in coloured reference)."""
    coarse = np.random.default_rng(seed).integers(0, 256, (6, 4, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size, Image.BICUBIC)


def gray_page(seed: int, size=(128, 192)) -> Image.Image:
    """A gray page at twice the tiny canvas page size."""
    return colour_image(seed, size).convert("L").convert("RGB")


@pytest.fixture(scope="package", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for the two cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def pack():
    """The repository imported as ComfyUI imports a custom node folder."""
    return load_pack()


@pytest.fixture(scope="session")
def comfy_base(tiny_release, tmp_path_factory) -> Path:
    """A ComfyUI-like base folder: models/colorflow/ColorFlow, models/diffusers/tiny-sd15 and tiny-pixart, and the input/
    files the shipped workflows use."""
    release, base = tiny_release
    root = tmp_path_factory.mktemp("comfy")
    (root / "models" / "colorflow").mkdir(parents=True)
    (root / "models" / "diffusers").mkdir(parents=True)
    (root / "models" / "colorflow" / RELEASE).symlink_to(release, target_is_directory=True)
    (root / "models" / "diffusers" / "tiny-sd15").symlink_to(base, target_is_directory=True)
    (root / "models" / "diffusers" / "tiny-pixart").symlink_to(release.parent / "pixart", target_is_directory=True)
    for folder, images in {
        REFS: {f"ref{i}.png": colour_image(i) for i in range(3)},
        CHAPTER: {"p01.png": gray_page(10), "p02.png": gray_page(11)},
        ".": {"colorflow_page_01.png": gray_page(12), "colorflow_page_02.png": gray_page(13),
              "colorflow_ref_01.png": colour_image(7), "colorflow_ref_02.png": colour_image(8, (90, 120)),
              "colorflow_sketch_01.png": gray_page(14)},
    }.items():
        (root / "input" / folder).mkdir(parents=True, exist_ok=True)
        for name, image in images.items():
            image.save(root / "input" / folder / name)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COLORFLOW_COMFY_BASE", str(root))
        yield root


@pytest.fixture(scope="session")
def loaded(pack, comfy_base):
    """(model, encoder) from the model loader node on the tiny weights (tests must not mutate them)."""
    with torch.inference_mode():  # ComfyUI runs every node, the loader too, in inference mode
        return pack.NODE_CLASS_MAPPINGS["ColorFlowModelLoader"]().load(RELEASE, BASE, "gray", "float32", "cpu", False)


@pytest.fixture(scope="session")
def loaded_sketch(pack, comfy_base):
    """(model, encoder) of the PixArt 'sketch' style from the model loader node on the tiny weights."""
    with torch.inference_mode():
        return pack.NODE_CLASS_MAPPINGS["ColorFlowModelLoader"]().load(RELEASE, BASE, "sketch", "float32", "cpu", False, PIXART)


@pytest.fixture
def user_dir(comfy_base) -> Path:
    """ComfyUI's user directory, emptied before and after the test (no persisted pools leak between tests)."""
    folder = comfy_base / "user"
    shutil.rmtree(folder, ignore_errors=True)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)
