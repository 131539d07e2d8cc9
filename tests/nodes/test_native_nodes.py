"""The native nodes' checks that need no ComfyUI: one-line errors before sampling, the page crop."""
from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
import torch

from colorflow_core.canvas import center_crop

from ..pack import load_pack

InvalidInputError = load_pack().colorflow_core.errors.InvalidInputError  # the pack's own copy of the core


@pytest.fixture(scope="module")
def native(pack):
    return importlib.import_module(f"{pack.__name__}.nodes.native")


@pytest.fixture(scope="module")
def bridge(pack):
    return importlib.import_module(f"{pack.__name__}.nodes.native_bridge")


def core_model(family: str, **unet):
    config = type(family, (), {"unet_config": {"context_dim": 768, "model_channels": 320, "in_channels": 4,
                                                "channel_mult": [1, 2, 4, 4], "num_res_blocks": [2] * 4, **unet}})()
    return SimpleNamespace(model=SimpleNamespace(model_config=config))


@pytest.mark.parametrize("family, unet, named", [
    ("SDXL", {"context_dim": 2048}, "SDXL"), ("SD20", {"context_dim": 1024}, "SD20"),
    ("Flux", {"model_channels": None}, "Flux"), ("SD15_instructpix2pix", {"in_channels": 8}, "SD15_instructpix2pix"),
])
def test_other_families_are_refused_by_name(bridge, family, unet, named):
    with pytest.raises(InvalidInputError, match=f"needs an SD1.5 MODEL .*; got {named}$"):
        bridge.sd15_unet_config(core_model(family, **unet))
    assert bridge.sd15_unet_config(core_model("SD15"))["model_channels"] == 320


def test_vae_of_another_family_is_refused(bridge):
    with pytest.raises(InvalidInputError, match="got one with 16 channels"):
        bridge.check_vae(SimpleNamespace(latent_channels=16, downscale_ratio=8, latent_dim=2))
    bridge.check_vae(SimpleNamespace(latent_channels=4, downscale_ratio=8, latent_dim=2))


def test_canvas_and_mask_sizes_are_checked_before_encoding(native):
    canvas = torch.rand(1, 192, 128, 3)
    with pytest.raises(InvalidInputError, match="the mask is 64x64 but the canvas is 128x192"):
        native.canvas_condition(None, None, canvas, torch.zeros(1, 64, 64))
    with pytest.raises(InvalidInputError, match="multiple of 16"):
        native.canvas_condition(None, None, torch.rand(1, 200, 128, 3), torch.zeros(1, 200, 128))


def test_guider_must_fit_the_unet(native, tiny_model):
    guider = tiny_model.pipeline.guider  # widths 16..64: not an SD1.5 UNet's
    patch = native.ColorFlowPatch(guider, None, None, None)
    with pytest.raises(InvalidInputError, match="does not fit this UNet"):
        native._check_guider_fits(patch, core_model("SD15").model.model_config.unet_config)


def test_crop_page_is_the_canvas_centre(native, pack):
    tensors = importlib.import_module(f"{pack.__name__}.nodes.tensors")
    canvas = torch.randint(0, 256, (1, 192, 128, 3), generator=torch.Generator().manual_seed(0)).float() / 255
    (page,) = native.ColorFlowCropPage().crop(canvas)
    expected = tensors.pil_to_images([center_crop(tensors.images_to_pil(canvas)[0])])
    assert page.shape == (1, 96, 64, 3) and torch.equal(page, expected)
