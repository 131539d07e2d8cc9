"""Stage g of the upstream fixtures: app.py `extract_lines` with the released res_skip key layout."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from colorflow_core.errors import IncompatibleWeightsError
from colorflow_core.preprocessors import LineExtractor, find_erika
from colorflow_core.preprocessors.line_extractor import lines_to_uint8, opencv_rgb2gray, padded_input
from colorflow_core.weights import read_state_dict

from .fixtures import assert_rel, tensors

SIZES = ["64x64", "40x50"]  # 40x50 is not a multiple of 16: padded to 48x64 with ones


@pytest.fixture(scope="module")
def stage_g(parity_dir):
    return tensors(parity_dir, "stage_g_lineart")


@pytest.fixture(scope="module")
def extractor(parity_dir):
    return LineExtractor.from_file(find_erika(parity_dir / "colorflow"))


@pytest.mark.parametrize("size", SIZES)
def test_gray_conversion_and_padding_give_the_stored_model_input(stage_g, size):
    gray = opencv_rgb2gray(stage_g[f"in_rgb_{size}"].numpy())
    got = padded_input(gray)
    ref = stage_g[f"model_input_{size}"].numpy()
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert np.array_equal(got, ref)


@pytest.mark.parametrize("size", SIZES)
def test_network_reproduces_the_stored_raw_output(stage_g, extractor, size):
    with torch.no_grad():
        got = extractor.net(stage_g[f"model_input_{size}"])[0, 0]
    ref = stage_g[f"model_output_raw_{size}"]
    # Relative to the magnitude (outputs reach ~400, where CPU kernels differ by a few float32 ulps).
    assert_rel(got, ref, f"line extractor {size}")


@pytest.mark.parametrize("size", SIZES)
def test_clip_crop_truncate_give_the_stored_lines(stage_g, size):
    height, width = stage_g[f"in_rgb_{size}"].shape[:2]
    got = lines_to_uint8(stage_g[f"model_output_raw_{size}"].numpy()[:height, :width])
    assert np.array_equal(got, stage_g[f"lines_u8_{size}"].numpy())


@pytest.mark.parametrize("size", SIZES)
def test_extract_lines_end_to_end(stage_g, extractor, size):
    out = extractor(Image.fromarray(stage_g[f"in_rgb_{size}"].numpy()))
    ref = stage_g[f"lines_u8_{size}"].numpy()
    assert out.mode == "L" and out.size == (ref.shape[1], ref.shape[0])
    diff = np.abs(np.asarray(out).astype(int) - ref.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01  # README: ±1 LSB allowed; observed exact


def test_release_layout_is_strict(parity_dir):
    state = read_state_dict(parity_dir / "colorflow" / "LE" / "erika.pth")
    assert len(state) == 707
    assert sum(v.numel() for v in state.values()) == 43_134_934
    del state["block4.model.11.residual.model.2.bias"]
    with pytest.raises(IncompatibleWeightsError, match="does not fit"):
        LineExtractor.from_state_dict(state)


def test_tiny_factory_writes_the_release_layout(parity_dir, tiny_release):
    release, _ = tiny_release
    ours = read_state_dict(release / "LE" / "erika.pth")
    theirs = read_state_dict(parity_dir / "colorflow" / "LE" / "erika.pth")
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape and ours[k].dtype == theirs[k].dtype for k in ours)
