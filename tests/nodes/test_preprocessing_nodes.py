"""The preprocessor nodes, the PixArt (sketch) styles in the loader, and the new preprocess choices, on tiny weights."""
from __future__ import annotations

import shutil

import pytest
import torch

from .conftest import BASE, ERIKA, PIXART, REFS, RELEASE, SIZE, colour_image, gray_page
from .test_nodes import Interrupted, errors, images, interrupt_on_call, run

W, H = SIZE
AUX_LABEL = "controlnet_aux/lllyasviel/Annotators/erika.pth"


@pytest.fixture
def pool(pack, loaded, user_dir):
    return run(pack, "ColorFlowReferencePool", loaded[1], "refs", REFS, False)[0]


@pytest.fixture
def small_pages(pack, comfy_base):
    return images(pack, gray_page(10, (48, 72)), gray_page(11, (48, 72)))


def core(pack):
    return pack.colorflow_core.preprocessors


def to_pil(pack, batch):
    return pack.nodes.tensors.images_to_pil(batch)


# ------------------------------------------------------------------------------------------------ preprocessor nodes
def test_screen_style_node_is_the_seeded_core_blend(pack, small_pages, tiny_release):
    blend, screen = run(pack, "ColorFlowScreenStyle", small_pages, RELEASE, 3, False, "cpu")
    assert blend.shape == screen.shape == small_pages.shape
    network = core(pack).load_screen_style(tiny_release[0], "cpu")
    expected = [network(page, seed=3) for page in to_pil(pack, small_pages)]
    assert torch.equal(blend, pack.nodes.tensors.pil_to_images(expected)), "each image: the core's blend with the one seed"
    again, _ = run(pack, "ColorFlowScreenStyle", small_pages, RELEASE, 3, False, "cpu")
    other, _ = run(pack, "ColorFlowScreenStyle", small_pages, RELEASE, 4, False, "cpu")
    assert torch.equal(again, blend) and not torch.equal(other, blend)
    calm, _ = run(pack, "ColorFlowScreenStyle", small_pages, RELEASE, 3, True, "cpu")
    calm_other, _ = run(pack, "ColorFlowScreenStyle", small_pages, RELEASE, 4, True, "cpu")
    assert torch.equal(calm, calm_other), "deterministic: the seed no longer matters"


def test_line_nodes_give_the_core_sketch_inputs(pack, small_pages, tiny_release):
    (lines,) = run(pack, "ColorFlowLineExtract", small_pages, ERIKA, "cpu")
    shaded, pure = run(pack, "ColorFlowSketchShading", small_pages, ERIKA, "cpu")
    assert lines.shape == shaded.shape == pure.shape == small_pages.shape
    extractor = core(pack).load_line_extractor(tiny_release[0] / "LE" / "erika.pth", "cpu")
    pages = to_pil(pack, small_pages)
    sketch = [core(pack).sketch_input(page, extractor)[0] for page in pages]
    shading = [core(pack).sketch_shading_input(page, extractor) for page in pages]
    to_images = pack.nodes.tensors.pil_to_images
    assert torch.equal(lines, to_images(sketch)) and torch.equal(pure, lines)
    assert torch.equal(shaded, to_images([context for context, _ in shading]))


def test_preprocessor_nodes_report_progress_and_honour_interrupts(pack, small_pages, monkeypatch):
    reports = []
    monkeypatch.setattr(pack.nodes.comfy_bridge, "progress_bar", lambda total: lambda done, of: reports.append((done, of)))
    run(pack, "ColorFlowLineExtract", small_pages, ERIKA, "cpu")
    assert reports == [(1, 2), (2, 2)]
    interrupt_on_call(monkeypatch, pack, "check_interrupt", 2)
    with pytest.raises(Interrupted):
        run(pack, "ColorFlowScreenStyle", small_pages, RELEASE, 0, False, "cpu")


def test_missing_preprocessor_weights_name_the_file_and_folder(pack, small_pages, comfy_base):
    with pytest.raises(errors(pack).MissingWeightsError) as missing:
        run(pack, "ColorFlowLineExtract", small_pages, "colorflow/Other/LE/erika.pth", "cpu")
    assert f"'erika.pth': put it in '{comfy_base / 'models' / 'colorflow' / 'Other' / 'LE'}'" in str(missing.value)
    assert "lllyasviel/Annotators" in str(missing.value)
    with pytest.raises(errors(pack).MissingWeightsError) as missing:
        run(pack, "ColorFlowScreenStyle", small_pages, "ColorFlow-v2", 0, False, "cpu")
    assert f"'ColorFlow-v2/': put it in '{comfy_base / 'models' / 'colorflow'}'" in str(missing.value)


@pytest.fixture
def aux_pack(comfy_base, tiny_release):
    """comfyui_controlnet_aux in custom_nodes/ with erika.pth where it downloads it (removed afterwards)."""
    folder = comfy_base / "custom_nodes" / "comfyui_controlnet_aux"
    target = folder / "ckpts" / "lllyasviel" / "Annotators"
    target.mkdir(parents=True)
    shutil.copy(tiny_release[0] / "LE" / "erika.pth", target / "erika.pth")
    yield folder
    shutil.rmtree(comfy_base / "custom_nodes")


def test_line_extractor_of_the_controlnet_aux_preprocessors(pack, small_pages, aux_pack, monkeypatch, tmp_path):
    choices = pack.nodes.model_choices
    assert choices.line_extractor_choices() == [ERIKA, AUX_LABEL]
    assert choices.line_extractor_path(AUX_LABEL) == aux_pack / "ckpts" / "lllyasviel" / "Annotators" / "erika.pth"
    (from_aux,) = run(pack, "ColorFlowLineExtract", small_pages, AUX_LABEL, "cpu")
    (from_release,) = run(pack, "ColorFlowLineExtract", small_pages, ERIKA, "cpu")
    assert torch.equal(from_aux, from_release)
    # its config.yaml may move the checkpoints, and $AUX_ANNOTATOR_CKPTS_PATH overrides both
    moved = aux_pack / "elsewhere" / "lllyasviel" / "Annotators"
    moved.mkdir(parents=True)
    shutil.move(aux_pack / "ckpts" / "lllyasviel" / "Annotators" / "erika.pth", moved / "erika.pth")
    assert choices.line_extractor_path(AUX_LABEL) is None
    (aux_pack / "config.yaml").write_text('annotator_ckpts_path: "./elsewhere"  # moved\nUSE_SYMLINKS: False\n')
    assert choices.line_extractor_path(AUX_LABEL) == aux_pack / "elsewhere" / "lllyasviel" / "Annotators" / "erika.pth"
    env_root = tmp_path / "annotators"
    (env_root / "lllyasviel" / "Annotators").mkdir(parents=True)
    shutil.copy(moved / "erika.pth", env_root / "lllyasviel" / "Annotators" / "erika.pth")
    monkeypatch.setenv("AUX_ANNOTATOR_CKPTS_PATH", str(env_root))
    assert choices.line_extractor_path(AUX_LABEL) == env_root / "lllyasviel" / "Annotators" / "erika.pth"
    # a model folder registered for annotators (e.g. models/annotators via extra_model_paths.yaml)
    monkeypatch.delenv("AUX_ANNOTATOR_CKPTS_PATH")
    shutil.rmtree(aux_pack)
    assert choices.line_extractor_path(AUX_LABEL) is None
    registered = pack.nodes.comfy_bridge.model_folders("annotators")[0] / "lllyasviel" / "Annotators"
    registered.mkdir(parents=True)
    try:
        shutil.copy(env_root / "lllyasviel" / "Annotators" / "erika.pth", registered / "erika.pth")
        assert choices.line_extractor_path(AUX_LABEL) == registered / "erika.pth"
    finally:
        shutil.rmtree(registered.parents[1])


def test_any_erika_under_models_colorflow_is_offered(pack, comfy_base, tiny_release, small_pages):
    loose = comfy_base / "models" / "colorflow" / "LE"
    loose.mkdir()
    try:
        shutil.copy(tiny_release[0] / "LE" / "erika.pth", loose / "erika.pth")
        assert pack.nodes.model_choices.line_extractor_choices() == [ERIKA, "colorflow/LE/erika.pth"]
        (lines,) = run(pack, "ColorFlowLineExtract", small_pages, "colorflow/LE/erika.pth", "cpu")
        assert torch.equal(lines, run(pack, "ColorFlowLineExtract", small_pages, ERIKA, "cpu")[0])
    finally:
        shutil.rmtree(loose)


def test_default_line_extractor_falls_back_to_any_other_copy(pack, aux_pack, monkeypatch):
    choices = pack.nodes.model_choices
    monkeypatch.setattr(choices, "LINE_EXTRACTOR_NAME", "colorflow/Missing/LE/erika.pth")
    assert choices.line_extractor_file("colorflow/Missing/LE/erika.pth") == choices.line_extractor_path(ERIKA)
    with pytest.raises(errors(pack).MissingWeightsError):
        choices.line_extractor_file("colorflow/Other/LE/erika.pth")


def test_release_without_its_line_extractor_borrows_the_aux_copy(pack, comfy_base, tiny_release, aux_pack, small_pages):
    partial = comfy_base / "models" / "colorflow" / "NoLE"
    partial.mkdir()
    try:
        for name in ("GraySD", "image_encoder", "ScreenStyle"):
            (partial / name).symlink_to(tiny_release[0] / name, target_is_directory=True)
        model, _ = run(pack, "ColorFlowModelLoader", "NoLE", BASE, "gray", "float32", "cpu", False)
        assert model.preprocessors.erika == pack.nodes.model_choices.any_line_extractor() is not None
        assert model.preprocessors.line_extractor is not None
        assert "NoLE/LE/erika.pth" not in pack.nodes.model_choices.line_extractor_choices()
    finally:
        shutil.rmtree(partial)


# ------------------------------------------------------------------------------------------------ PixArt styles in the loader
def test_loader_offers_pixart_bases_apart_from_sd15(pack):
    choices = pack.nodes.model_choices
    assert choices.pixart_choices() == [PIXART, choices.PIXART_NAME]
    assert PIXART not in choices.base_choices()


def test_sketch_styles_load_on_the_pixart_base(pack, loaded_sketch, comfy_base):
    model, encoder = loaded_sketch
    assert model.style == "sketch" and encoder is model.encoder and model.defaults.guidance_scale == 4.5
    loader = pack.NODE_CLASS_MAPPINGS["ColorFlowModelLoader"]()
    with pytest.raises(errors(pack).MissingWeightsError) as missing:
        loader.load(RELEASE, BASE, "sketch_shading", "float32", "cpu", False)  # the default PixArt-XL-2-1024-MS is not there
    assert f"'PixArt-XL-2-1024-MS/': put it in '{comfy_base / 'models' / 'diffusers'}'" in str(missing.value)


# ------------------------------------------------------------------------------------------------ preprocess choices
def test_network_preprocessing_needs_the_model(pack, pool, small_pages):
    for choice in ("screen", "sketch", "style default"):
        with pytest.raises(errors(pack).InvalidInputError, match="the ColorFlow model"):
            run(pack, "ColorFlowStitchCanvas", small_pages, pool, "custom", W, H, choice)


def staged(pack, model, pool, pages, seed, guidance, preprocess, screen_seed=None):
    """Canvas → sampler → upscaler, the upscaler fed with the canvas node's guide."""
    canvas, mask, _, guide = run(pack, "ColorFlowStitchCanvas", pages, pool, "custom", W, H, preprocess, model, screen_seed)
    _, low, _ = run(pack, "ColorFlowSampler", model, canvas, mask, seed, 1, guidance, 1.0)
    return run(pack, "ColorFlowGuidedUpscale", model, low, guide, seed, guidance, "none", True)[0], low


def sequence(pack, model, pool, pages, seed, guidance, preprocess):
    return run(pack, "ColorFlowColorizeSequence", [model], [pool], [pages], [seed], [1], [guidance], [1.0],
               ["custom"], [W], [H], [preprocess], [False])[0]


def test_gray_style_default_is_screen_and_stages_match_the_sequence(pack, loaded, pool, small_pages):
    model = loaded[0]
    final, low = staged(pack, model, pool, small_pages[:1], 5, 7.5, "style default", screen_seed=5)
    assert torch.equal(final, sequence(pack, model, pool, small_pages[:1], 5, 7.5, "style default"))
    assert torch.equal(final, sequence(pack, model, pool, small_pages[:1], 5, 7.5, "screen"))
    (again,) = run(pack, "ColorFlowGuidedUpscale", model, low, small_pages[:1], 5, 7.5, "screen", True)
    assert torch.equal(again, final), "the upscaler prepares the same screentoned guide from the page and seed"
    assert not torch.equal(final, sequence(pack, model, pool, small_pages[:1], 5, 7.5, "gray"))


@pytest.mark.parametrize("style", ["sketch", "sketch_shading"])
def test_sketch_styles_run_staged_and_in_one_node(pack, loaded_sketch, pool, style):
    model = loaded_sketch[0]
    if style != model.style:
        model = pack.NODE_CLASS_MAPPINGS["ColorFlowModelLoader"]().load(RELEASE, BASE, style, "float32", "cpu", False, PIXART)[0]
    line_art = images(pack, colour_image(30, (48, 72)))
    final, _ = staged(pack, model, pool, line_art, 2, 4.5, "style default")
    assert final.shape == (1, int(1.5 * H), int(1.5 * W), 3)
    assert torch.equal(final, sequence(pack, model, pool, line_art, 2, 4.5, "style default"))
    if style == "sketch":
        uncond, _ = staged(pack, model, pool, line_art, 2, 1.0, style)
        assert uncond.shape == final.shape and not torch.equal(uncond, final), "CFG-free run (guidance 1.0)"
