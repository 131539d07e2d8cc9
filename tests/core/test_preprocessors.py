"""Preprocessors: OpenCV gray, line-extractor tiling, the Sketch_Shading rule, ScreenStyle, wiring and CLI."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from colorflow_core import imaging
from colorflow_core.cli import main
from colorflow_core.errors import IncompatibleWeightsError, InvalidInputError, MissingWeightsError
from colorflow_core.preprocess import prepare_page
from colorflow_core.preprocessors import (
    LineExtractor, Preprocessors, ScreenStyle, find_erika, load_line_extractor, preprocess_image, shade_lines,
    sketch_input, sketch_shading_input,
)
from colorflow_core.preprocessors.line_extractor import (
    DEFAULT_MARGIN, RECEPTIVE_RADIUS, LineNet, opencv_rgb2gray,
)
from colorflow_core.preprocessors.screen_style import (
    DECODER_FILE, GENERATOR_FILE, Randomness, ScreenDecoder, ScreenGenerator, SNConv2d,
)
from colorflow_core.weights import read_state_dict


def page(size=(40, 44), seed=0) -> Image.Image:
    """A gray page with strokes, flat mid-tones and dark areas."""
    rng = np.random.default_rng(seed)
    width, height = size
    array = np.full((height, width), 235, np.uint8)
    array[height // 3: height // 2, :] = 120
    array[:, width // 4: width // 4 + 2] = 20
    array[rng.integers(0, height, 20), rng.integers(0, width, 20)] = 60
    return Image.fromarray(array)


@pytest.fixture(scope="module")
def release(tiny_release):
    return tiny_release[0]


@pytest.fixture(scope="module")
def preprocessors(release):
    return Preprocessors(release)


# ---- OpenCV's RGB→gray ---------------------------------------------------------------------------------------

def test_opencv_gray_integer_formula():
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [7, 7, 7], [255, 255, 255], [1, 2, 3],
                     [227, 146, 166], [12, 145, 7]]], np.uint8)
    # (R·9798 + G·19235 + B·3735 + 2**14) >> 15: red 76.75→76, green 150.2→150, blue 29.6→29, gray stays gray;
    # the last two are where OpenCV's 15-bit rounding differs from a 14-bit one (173 and 89).
    assert opencv_rgb2gray(rgb).tolist() == [[76, 150, 29, 7, 255, 2, 172, 90]]


def test_opencv_gray_equals_cv2():
    cv2 = pytest.importorskip("cv2")
    rgb = np.random.default_rng(0).integers(0, 256, (64, 97, 3), dtype=np.uint8)
    assert np.array_equal(opencv_rgb2gray(rgb), cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
    rgba = np.random.default_rng(1).integers(0, 256, (5, 9, 4), dtype=np.uint8)
    assert np.array_equal(opencv_rgb2gray(rgba), cv2.cvtColor(rgba, cv2.COLOR_RGBA2GRAY))


# ---- line extractor: tiling and sizes ------------------------------------------------------------------------

NARROW = (2, 3, 4, 5, 6, 5, 4, 3, 2, 2)  # the res_skip structure at narrow widths: same receptive field, fast


@pytest.fixture(scope="module")
def narrow_extractor():
    torch.manual_seed(0)
    return LineExtractor(LineNet(NARROW))


def test_receptive_field_is_within_the_default_margin():
    net = LineNet(NARROW).double().eval()
    with torch.no_grad():  # positive weights, zero biases: an output is non-zero iff it depends on the input pixel
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.fill_(1.0 / module.weight[0].numel())
                module.bias.zero_()
        deltas = torch.zeros(16, 1, 16, 1024, dtype=torch.float64)
        for phase in range(16):  # one input pixel at every phase of the 16-pixel grid
            deltas[phase, 0, :, 512 + phase] = 1.0
        reached = net(deltas)[:, 0].sum(1) > 0
    left = max(int(reached[p].nonzero().max()) - (512 + p) for p in range(16))  # outputs right of the pixel see it
    right = max((512 + p) - int(reached[p].nonzero().min()) for p in range(16))
    assert (left, right) == (RECEPTIVE_RADIUS, 480)  # an output reads 495 px to its left, 480 to its right
    assert DEFAULT_MARGIN >= RECEPTIVE_RADIUS and DEFAULT_MARGIN % 16 == 0


@pytest.mark.parametrize("shape", [(16, 1600), (1600, 16)])
def test_tiled_output_equals_whole_page_output_up_to_rounding(narrow_extractor, shape):
    gray = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    whole = narrow_extractor.run(gray, tile=2048)
    bound = 1e-5 + 1e-5 * np.abs(whole).max()  # the fixtures' "rel"; float64 gives ~5e-15 (summation order only)
    tiled = narrow_extractor.run(gray, tile=1504, margin=DEFAULT_MARGIN)  # 4 tiles
    assert np.abs(tiled - whole).max() <= bound
    if shape[0] == 16:
        short = narrow_extractor.run(gray, tile=192, margin=32)  # margin far below the receptive field: visible
        assert np.abs(short - whole).max() > 3 * bound


def test_bad_tiles_and_absurd_pages_are_refused(narrow_extractor, monkeypatch):
    with pytest.raises(InvalidInputError, match="multiples of 16"):
        narrow_extractor.run(np.zeros((8, 8), np.uint8), tile=1000, margin=448)
    monkeypatch.setattr(imaging, "MAX_INPUT_PIXELS", 1000)
    with pytest.raises(InvalidInputError, match="downscale"):
        narrow_extractor(Image.new("L", (40, 40)))


@pytest.mark.parametrize("mode, size", [("L", (1, 1)), ("RGBA", (13, 11)), ("P", (16, 9)), ("I;16", (15, 16)),
                                        ("CMYK", (8, 3)), ("1", (5, 16))])  # all pad to 16×16: one conv plan
def test_lines_of_any_mode_and_size(preprocessors, mode, size):
    image = page(size).convert(mode) if mode != "I;16" else Image.fromarray(np.asarray(page(size), np.uint16) * 257)
    out = preprocessors.line_extractor(image)
    assert out.mode == "L" and out.size == size


def test_gray_and_rgb_pages_give_the_same_lines(preprocessors):
    gray = page((13, 16))
    assert np.array_equal(np.asarray(preprocessors.line_extractor(gray)),
                          np.asarray(preprocessors.line_extractor(gray.convert("RGB"))))


# ---- Sketch and Sketch_Shading -------------------------------------------------------------------------------

# (page value, line value) → expected context value; each threshold edge on both sides.
SHADING_CASES = [
    ((75, 200), 0), ((76, 200), 0), ((77, 200), 125), ((75, 126), 0), ((76, 0), 0), ((77, 0), 0),
    ((77, 124), 124), ((77, 125), 125), ((77, 126), 125),
    ((124, 126), 125), ((125, 126), 125), ((126, 126), 125), ((124, 124), 124), ((126, 125), 125),
    ((144, 200), 125), ((145, 200), 200), ((146, 200), 200), ((144, 124), 124), ((145, 126), 126),
    ((146, 0), 0), ((255, 255), 255), ((0, 255), 0),
]


def test_sketch_shading_rule_at_every_threshold_edge():
    page_values = np.array([[p for (p, _), _ in SHADING_CASES]], np.uint8)
    line_values = np.array([[l for (_, l), _ in SHADING_CASES]], np.uint8)
    out = shade_lines(Image.fromarray(page_values).convert("RGB"), Image.fromarray(line_values).convert("RGB"))
    assert out.mode == "RGB"
    got = np.asarray(out)
    assert (got == got[..., :1]).all()
    assert got[0, :, 0].tolist() == [expected for _, expected in SHADING_CASES]


def test_sketch_and_shading_inputs_use_lines_of_the_gray_page():
    seen = []

    def fake_lines(image):
        seen.append(np.asarray(image).copy())
        return Image.fromarray(np.full(image.size[::-1], 200, np.uint8))

    colour = Image.fromarray(np.random.default_rng(2).integers(0, 256, (6, 9, 3), dtype=np.uint8))
    context, guide = sketch_input(colour, fake_lines)
    assert context is guide and context.mode == "RGB" and np.asarray(guide).max() == 200
    gray = np.asarray(colour.convert("L"))
    assert np.array_equal(seen[0], np.stack([gray] * 3, -1))  # Pillow L, replicated to RGB
    context, guide = sketch_shading_input(colour, fake_lines)
    assert np.array_equal(np.asarray(guide), np.full((6, 9, 3), 200))
    expected = np.where(gray < 76.5, 0, np.where((gray > 76.5) & (gray < 145), 125, 200))
    assert np.array_equal(np.asarray(context)[..., 0], expected)


# ---- ScreenStyle -----------------------------------------------------------------------------------------------

def test_release_widths_give_the_release_parameter_counts():
    with torch.device("meta"):
        generator, decoder = ScreenGenerator(ngf=48), ScreenDecoder(ngf=48)
    assert sum(v.numel() for v in generator.state_dict().values()) == 12_659_516  # incl. spectral-norm u, v
    assert sum(v.numel() for v in decoder.state_dict().values()) == 13_188_531


def test_tiny_screen_files_use_the_release_key_names_and_load_strictly(release):
    generator = read_state_dict(release / GENERATOR_FILE)
    decoder = read_state_dict(release / DECODER_FILE)
    assert {"model.model.1.weight_orig", "model.model.1.weight_u", "model.model.1.weight_v", "model.model.9.bias",
            "model.model.2.model.4.model.4.model.4.model.4.model.4.model.4.model.9.weight_orig"} <= set(generator)
    assert {"model.model.1.weight", "model.model.4.weight", "model.model.8.weight", "model.model.2.noiseblock.weight",
            "model.model.2.model.6.weight", "model.model.2.model.4.model.4.model.4.model.7.weight"} <= set(decoder)
    assert not any(k.endswith(".weight") for k in generator if k.replace(".weight", ".weight_orig") in generator)
    ScreenStyle.from_state_dicts(generator, decoder)
    broken = dict(decoder)
    broken["model.model.2.noiseblock.extra"] = broken.pop("model.model.2.noiseblock.bias")
    with pytest.raises(IncompatibleWeightsError, match="does not fit"):
        ScreenStyle.from_state_dicts(generator, broken)


def test_spectral_norm_matches_torch_in_eval_mode():
    torch.manual_seed(0)
    reference = torch.nn.utils.spectral_norm(torch.nn.Conv2d(3, 5, 3, stride=2))
    for _ in range(3):
        reference(torch.randn(1, 3, 8, 8))  # training-mode power iterations move u and v
    reference.eval()
    ours = SNConv2d(3, 5, 3, stride=2)
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(1, 3, 9, 9)
    with torch.no_grad():
        assert torch.equal(ours(x), reference(x))


def test_screen_is_seeded_repeatable_and_has_a_deterministic_mode(preprocessors):
    style = preprocessors.screen_style
    image = page((50, 70))
    one = np.asarray(style.screen(image, seed=1))
    assert one.shape == (70, 50, 3) and (one == one[..., :1]).all()
    assert np.array_equal(one, np.asarray(style.screen(image, seed=1)))
    other = np.asarray(style.screen(image, seed=2))
    assert (one != other).mean() > 0.05
    calm_1 = np.asarray(style.screen(image, seed=1, deterministic=True))
    assert np.array_equal(calm_1, np.asarray(style.screen(image, seed=7, deterministic=True)))
    assert (calm_1 != one).mean() > 0.05


def test_decoder_draws_what_upstreams_calls_draw_from_a_seeded_cpu_rng(preprocessors):
    decoder = preprocessors.screen_style.decoder
    x = torch.rand(1, 4, 128, 128) * 2 - 1
    with torch.no_grad():
        torch.manual_seed(5)
        global_rng = decoder(x, Randomness(None))  # F.dropout + randn_like, as upstream
        seeded = decoder(x, Randomness(torch.Generator().manual_seed(5)))
    assert torch.equal(global_rng, seeded)


def test_screen_pads_like_upstream_and_blends_by_floor_of_mean(preprocessors):
    style = preprocessors.screen_style
    seen = {}
    def keep(name):
        def hook(module, args):
            seen[name] = args[0].clone()  # returns None: the call is unchanged
        return hook

    hooks = [style.generator.register_forward_pre_hook(keep("g")), style.decoder.register_forward_pre_hook(keep("d"))]
    try:
        image = page((300, 70)).convert("RGB")
        blended = style(image, seed=3)
    finally:
        for hook in hooks:
            hook.remove()
    g = seen["g"]
    assert g.shape == (1, 4, 256, 512)
    assert g[0, :, 100, 400].tolist() == [1.0, 1.0, -1.0, -1.0]  # L white, RGB "fill=255" = red
    assert g[0, :, 200, 100].tolist() == [1.0, 1.0, -1.0, -1.0]
    assert seen["d"].shape == (1, 4, 384, 640)  # (⌊n/128⌋ + 1)·128, replicate-padded
    screen = np.asarray(style.screen(image, seed=3))[..., 0].astype(int)
    gray = np.asarray(image.convert("L")).astype(int)
    got = np.asarray(blended)
    assert blended.mode == "RGB" and (got == got[..., :1]).all()
    assert np.array_equal(got[..., 0], (screen + gray) // 2)


def test_screen_refuses_oversized_pages(preprocessors):
    with pytest.raises(InvalidInputError, match="downscale"):
        preprocessors.screen_style(Image.new("L", (4097, 8)))


# ---- wiring: lazy loading, caching, erika lookup, prepare_page -----------------------------------------------

def test_networks_load_lazily_and_are_cached(release, tmp_path):
    partial = tmp_path / "release"
    (partial / "LE").mkdir(parents=True)
    (partial / "LE" / "erika.pth").symlink_to(release / "LE" / "erika.pth")
    bundle = Preprocessors(partial)
    context, guide = preprocess_image(page(), "gray", bundle)
    assert bundle._nets == {} and context.mode == "RGB"
    preprocess_image(page(), "sketch", bundle)
    assert list(bundle._nets) == ["lines"]
    assert load_line_extractor(partial / "LE" / "erika.pth") is bundle.line_extractor
    with pytest.raises(MissingWeightsError, match="latest_net_G_RGB2INTSCR"):
        preprocess_image(page(), "screen", bundle)
    with pytest.raises(InvalidInputError, match="needs its networks"):
        preprocess_image(page(), "sketch", None)
    with pytest.raises(InvalidInputError, match="unknown preprocess"):
        preprocess_image(page(), "lineart", bundle)


def test_erika_is_found_in_a_given_file_or_folder_before_the_release(release, tmp_path):
    erika = release / "LE" / "erika.pth"
    assert find_erika(tmp_path, (erika,)) == erika
    assert find_erika(None, (tmp_path / "nothing", erika.parent)) == erika
    assert find_erika(release) == erika
    with pytest.raises(MissingWeightsError, match="Annotators"):
        find_erika(tmp_path, (tmp_path / "x.pth",))


@pytest.mark.parametrize("method", ["screen", "sketch", "sketch_shading", "gray", "none"])
def test_prepare_page_gives_context_and_guide_at_one_and_a_half_times(preprocessors, method):
    source = page((37, 61)).convert("RGBA")
    context, guide = prepare_page(source, (32, 32), method, preprocessors=preprocessors, seed=0)
    assert context.size == guide.size == (48, 48) and context.mode == guide.mode == "RGB"
    if method == "sketch_shading":
        assert not np.array_equal(np.asarray(context), np.asarray(guide))
        assert np.array_equal(np.asarray(guide), np.asarray(prepare_page(source, (32, 32), "sketch",
                                                                         preprocessors=preprocessors)[1]))
    else:
        assert np.array_equal(np.asarray(context), np.asarray(guide))


# ---- command line ----------------------------------------------------------------------------------------------

def test_cli_preprocess_writes_context_and_guide(release, tmp_path):
    source = tmp_path / "pages" / "p1.png"
    source.parent.mkdir()
    page((40, 44)).save(source)
    out = tmp_path / "out"
    args = ["preprocess", "--colorflow", str(release), "--device", "cpu", "--width", "32", "--height", "32"]
    assert main([*args, "--style", "sketch_shading", "--out", str(out / "shade"), str(source)]) == 0
    context, guide = (Image.open(out / "shade" / f"p1_{n}.png") for n in ("context", "guide"))
    assert context.size == guide.size == (48, 48)
    assert not np.array_equal(np.asarray(context), np.asarray(guide))
    for run in ("a", "b"):
        assert main([*args, "--style", "gray", "--seed", "4", "--out", str(out / run), str(source.parent)]) == 0
    assert np.array_equal(np.asarray(Image.open(out / "a" / "p1_context.png")),
                          np.asarray(Image.open(out / "b" / "p1_context.png")))
    assert main(["preprocess", "--colorflow", str(tmp_path / "missing"), "--erika", str(release / "LE"),
                 "--style", "sketch", "--size", "native", "--out", str(out / "native"), str(source)]) == 0
    assert Image.open(out / "native" / "p1_guide.png").size == (40, 44)


def test_cli_preprocess_missing_screen_weights_is_one_line(tmp_path, capsys):
    source = tmp_path / "p.png"
    page().save(source)
    code = main(["preprocess", "--colorflow", str(tmp_path), "--out", str(tmp_path / "o"), str(source)])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "latest_net_G_RGB2INTSCR.pth" in err[0]


def test_cli_colorize_uses_screen_for_gray_pages(tiny_release, tmp_path, monkeypatch):
    import colorflow_core.sequence as sequence

    calls = []
    real = sequence.prepare_page

    def spy(*args, **kwargs):
        calls.append((args[2], kwargs["deterministic"], kwargs["preprocessors"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(sequence, "prepare_page", spy)
    release, base = tiny_release
    ref, source = tmp_path / "ref.png", tmp_path / "p.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 64, 3), dtype=np.uint8)).save(ref)
    page((64, 96)).save(source)
    code = main(["colorize", "--colorflow", str(release), "--base", str(base), "--refs", str(ref), "--out",
                 str(tmp_path / "out"), "--steps", "1", "--device", "cpu", "--width", "64", "--height", "96",
                 "--screen-deterministic", str(source)])
    assert code == 0
    assert Image.open(tmp_path / "out" / "p.png").size == (96, 144)
    assert [(m, d) for m, d, _ in calls] == [("screen", True)]
    assert isinstance(calls[0][2], Preprocessors)


def test_data_parallel_prefix_is_accepted(release):
    state = read_state_dict(release / "LE" / "erika.pth")
    plain = LineExtractor.from_state_dict(state)
    prefixed = LineExtractor.from_state_dict({f"module.{k}": v for k, v in state.items()})
    assert np.array_equal(np.asarray(plain(page())), np.asarray(prefixed(page())))
    with pytest.raises(IncompatibleWeightsError):
        LineExtractor.from_state_dict({f"net.{k}": v for k, v in state.items()})
