"""Each metric on hand-computable cases; the consistency metric finds a planted colour drift."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from colorflow_core.errors import IncompatibleWeightsError, InvalidInputError, MissingWeightsError
from colorflow_core.evaluation import metrics as M
from colorflow_core.evaluation import synthetic as S


def flat(rgb, size=(32, 24)) -> Image.Image:
    return Image.new("RGB", size, tuple(rgb))


def noise(seed: int, size=(32, 24)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(20, 236, (size[1], size[0], 3), dtype=np.uint8))


class MeanColour(torch.nn.Module):
    """A 3-feature 'extractor': the mean of each channel (uint8 in, float out)."""

    num_features = 3

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.double().mean(dim=(2, 3))


class MeanColourEncoder:
    """An ImageEncoder stub: the mean RGB of each image."""

    name, dim = "mean-colour", 3

    def encode(self, images):
        return torch.tensor(np.stack([np.asarray(im.convert("RGB"), np.float64).mean(axis=(0, 1)) for im in images]))


def test_psnr_identical_known_shift_and_resize():
    image = noise(0)
    assert M.psnr(image, image) == math.inf
    shifted = Image.fromarray(np.asarray(image) + 10)
    assert M.psnr(shifted, image) == pytest.approx(10 * math.log10(255**2 / 100), abs=1e-5)
    # The prediction is compared at the ground truth's size.
    assert M.psnr(flat((110, 110, 110), (64, 48)), flat((100, 100, 100))) == pytest.approx(10 * math.log10(255**2 / 100), abs=1e-5)


def test_ssim_identical_and_constant_images():
    image = noise(1)
    assert M.ssim(image, image) == pytest.approx(1.0, abs=1e-12)
    a, b, c1 = 100, 130, (0.01 * 255) ** 2
    # Constant images have no variance: SSIM is the luminance term alone.
    assert M.ssim(flat((a,) * 3), flat((b,) * 3)) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), abs=1e-9)
    assert M.ssim(noise(2), image) < 0.5
    with pytest.raises(InvalidInputError):
        M.ssim(flat((1, 1, 1), (8, 8)), flat((1, 1, 1), (8, 8)))


def test_lab_and_delta_e_reference_values():
    lab = M.srgb_to_lab(np.array([[255, 0, 0], [255, 255, 255], [0, 0, 0]], np.uint8))
    assert lab[0] == pytest.approx([53.2408, 80.0925, 67.2032], abs=1e-3)
    assert lab[1] == pytest.approx([100, 0, 0], abs=1e-4) and lab[2] == pytest.approx([0, 0, 0], abs=1e-9)
    # Sharma, Wu & Dalal (2005) test data, pairs 1-4, 7, 13, 17-20, 25.
    pairs = [((50, 2.6772, -79.7751), (50, 0, -82.7485), 2.0425), ((50, 3.1571, -77.2803), (50, 0, -82.7485), 2.8615),
             ((50, 2.8361, -74.02), (50, 0, -82.7485), 3.4412), ((50, -1.3802, -84.2814), (50, 0, -82.7485), 1.0),
             ((50, 0, 0), (50, -1, 2), 2.3669), ((50, 2.49, -0.001), (50, -2.49, 0.0009), 7.1792),
             ((50, 2.5, 0), (73, 25, -18), 27.1492), ((50, 2.5, 0), (61, -5, 29), 22.8977),
             ((50, 2.5, 0), (56, -27, -3), 31.903), ((50, 2.5, 0), (58, 24, 15), 19.4535),
             ((60.2574, -34.0099, 36.2677), (60.4626, -34.1751, 39.4387), 1.2644)]
    first, second, expected = (np.array([p[i] for p in pairs], float) for i in range(3))
    assert M.delta_e_2000(first, second) == pytest.approx(expected, abs=1e-4)
    assert M.delta_e_2000(second, first) == pytest.approx(expected, abs=1e-4)
    assert M.delta_e_2000(first, first) == pytest.approx(np.zeros(len(pairs)), abs=1e-12)
    assert M.delta_e_76(np.array([50.0, 0, 0]), np.array([53.0, 4.0, 0])) == pytest.approx(5.0)


def test_fid_zero_for_the_same_set_and_squared_mean_shift_for_a_shifted_set():
    rng = np.random.default_rng(3)
    real = [flat(rng.integers(40, 200, 3)) for _ in range(6)]
    assert M.fid(real, real, MeanColour()) == pytest.approx(0.0, abs=1e-6)
    shifted = [Image.fromarray(np.asarray(im) + 12) for im in real]
    # Same covariance, means 12 apart in each of 3 features: FID = |Δμ|² = 3·12².
    assert M.fid(shifted, real, MeanColour()) == pytest.approx(3 * 12**2, rel=1e-6)
    with pytest.raises(InvalidInputError):
        M.fid(real[:1], real, MeanColour())


def test_inception_wrapper_and_loader_errors(tmp_path):
    class Stand(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 5)

        def forward(self, x):
            assert x.shape[-2:] == (299, 299)
            return self.fc(x.mean(dim=(2, 3)))

    features = M.InceptionPoolFeatures(Stand(), "stand-in")
    out = features(torch.full((2, 3, 40, 30), 255, dtype=torch.uint8))
    expected = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert out.shape == (2, 3) and torch.allclose(out[0], expected, atol=1e-5)
    with pytest.raises(MissingWeightsError):
        M.load_inception(tmp_path / "absent.pth")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "bogus.pth")
    with pytest.raises(IncompatibleWeightsError):
        M.load_inception(tmp_path / "bogus.pth")


def test_clip_image_similarity_cosines():
    encoder = MeanColourEncoder()
    red, yellow, green = flat((255, 0, 0)), flat((255, 255, 0)), flat((0, 255, 0))
    sims = M.clip_image_similarity([red, red, red], [red, yellow, green], encoder)
    assert sims == pytest.approx([1.0, 1 / math.sqrt(2), 0.0], abs=1e-6)


def test_aesthetic_score_and_head_files(tmp_path):
    class Fixed:
        name, dim = "fixed", 2

        def encode(self, images):
            return torch.tensor([[3.0, 4.0]] * len(images))

    head = torch.nn.Linear(2, 1).double()
    with torch.no_grad():
        head.weight[:] = torch.tensor([[10.0, 20.0]])
        head.bias[:] = 1.0
    # The embedding is L2-normalised first: (0.6, 0.8) → 1 + 6 + 16.
    assert M.aesthetic_scores([flat((0, 0, 0))], Fixed(), head) == pytest.approx([23.0])
    torch.save(head.float().state_dict(), tmp_path / "linear.pth")
    assert isinstance(M.load_aesthetic_head(tmp_path / "linear.pth"), torch.nn.Linear)
    mlp = M.AestheticHead(8)
    torch.save(mlp.state_dict(), tmp_path / "mlp.pth")
    loaded = M.load_aesthetic_head(tmp_path / "mlp.pth")
    x = torch.randn(3, 8)
    assert torch.equal(loaded(x), mlp.eval()(x))
    torch.save({"other.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(IncompatibleWeightsError):
        M.load_aesthetic_head(tmp_path / "bad.pth")


# --------------------------------------------------------------------------------------------- consistency
@pytest.fixture(scope="module")
def chapter():
    return S.make_chapter(11, n_references=1, n_pages=4, n_characters=2, size=(128, 192))


def _recolor(page, labels_to_color: dict[int, tuple[int, int, int]]) -> Image.Image:
    array = np.asarray(page.color).copy()
    for label, rgb in labels_to_color.items():
        array[page.labels == label] = rgb
        array[page.labels == label + S.SHADED] = S.shade(rgb)
    return Image.fromarray(array)


def _consistency(chapter, preds):
    pages = chapter.pages
    return {p.label: p for p in M.color_consistency(
        preds, [p.labels for p in pages], [p.color for p in pages], page_names=[p.name for p in pages],
        table=chapter.label_table())}


def test_ground_truth_is_perfectly_consistent(chapter):
    parts = _consistency(chapter, [p.color for p in chapter.pages])
    assert len(parts) >= 6
    for part in parts.values():
        assert part.spread_max == pytest.approx(0, abs=1e-9) and part.error_max == pytest.approx(0, abs=1e-9)
    assert parts[S.part_label(0, "hair")].name == f"{chapter.characters[0].name} hair"


def test_planted_drift_on_one_page_is_found(chapter):
    parts = _consistency(chapter, [p.color for p in chapter.pages])
    label = next(l for l, p in parts.items() if S.decode_label(l)[1] == "hair" and len(p.pages) >= 3)
    victim = parts[label].pages[1]
    drift = (30, 200, 90)
    preds = [_recolor(p, {label: drift}) if p.name == victim else p.color for p in chapter.pages]
    found = _consistency(chapter, preds)
    hit = found[label]
    assert hit.drift_page == victim
    expected_error = float(M.delta_e_2000(M.srgb_to_lab(np.array(drift, np.uint8)),
                                          M.srgb_to_lab(np.array(chapter.label_table()[label]["color"], np.uint8))))
    assert hit.page_error[hit.pages.index(victim)] == pytest.approx(expected_error, abs=1e-6)
    assert hit.spread_max > 10 and hit.spread_pairwise_max == pytest.approx(expected_error, abs=1e-6)
    others = [p for l, p in found.items() if l != label]
    assert max(p.spread_max for p in others) == pytest.approx(0, abs=1e-9)
    summary = M.consistency_summary(list(found.values()))
    assert summary["spread_max"] == pytest.approx(hit.spread_max)


def test_consistent_but_wrong_colour_has_no_spread_but_an_error(chapter):
    label = S.part_label(1, "clothes")
    wrong = (250, 250, 20)
    preds = [_recolor(p, {label: wrong}) for p in chapter.pages]
    part = _consistency(chapter, preds)[label]
    truth = M.srgb_to_lab(np.array(chapter.characters[1].colors["clothes"], np.uint8))
    assert part.spread_max == pytest.approx(0, abs=1e-9)
    assert part.error_mean == pytest.approx(float(M.delta_e_2000(M.srgb_to_lab(np.array(wrong, np.uint8)), truth)), abs=1e-6)


def test_consistency_needs_matching_inputs(chapter):
    with pytest.raises(InvalidInputError):
        M.color_consistency([chapter.pages[0].color], [], None)
