"""Each node's FUNCTION run directly on tiny weights, ComfyUI absent (the bridge's fallbacks run)."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from PIL import Image

from .clip_stub import StubClipVision
from .conftest import BASE, CHAPTER, REFS, RELEASE, SIZE, colour_image, gray_page

W, H = SIZE
STEPS = 2


def run(pack, node_id: str, *args, **kwargs):
    """Call a node's FUNCTION; returns its result tuple (the 'result' of a ui dict)."""
    node_class = pack.NODE_CLASS_MAPPINGS[node_id]
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        output = getattr(node_class(), node_class.FUNCTION)(*args, **kwargs)
    return output["result"] if isinstance(output, dict) else output


def images(pack, *pictures: Image.Image) -> torch.Tensor:
    return pack.nodes.tensors.pil_to_images(list(pictures))


def errors(pack):
    return pack.colorflow_core.errors


@pytest.fixture
def pool(pack, loaded, user_dir):
    """A persisted pool 'refs' of the three reference files."""
    return run(pack, "ColorFlowReferencePool", loaded[1], "refs", REFS, False)[0]


@pytest.fixture
def pages(pack):
    return images(pack, gray_page(10), gray_page(11))


def stitch(pack, pool, page_batch):
    """(canvas, mask, retrieval preview) of the gray-preprocessed pages."""
    return run(pack, "ColorFlowStitchCanvas", page_batch, pool, "custom", W, H, "gray")[:3]


# ------------------------------------------------------------------------------------------------ loaders
def test_model_loader_gives_model_and_its_encoder(loaded):
    model, encoder = loaded
    assert encoder is model.encoder and encoder.dim == 16
    assert model.device == torch.device("cpu") and model.style == "gray"


def test_loader_dropdowns_list_what_is_on_disk(pack, comfy_base):
    choices = pack.nodes.model_choices
    assert choices.release_choices() == [RELEASE]
    assert choices.base_choices() == [BASE, choices.BASE_NAME]
    assert choices.encoder_choices() == [f"{RELEASE}/image_encoder"]
    (comfy_base / "models" / "checkpoints").mkdir(exist_ok=True)
    (comfy_base / "models" / "checkpoints" / "sd15.safetensors").write_bytes(b"")
    try:
        assert "checkpoints/sd15.safetensors" in choices.base_choices()
        assert choices.base_path("checkpoints/sd15.safetensors") == comfy_base / "models" / "checkpoints" / "sd15.safetensors"
    finally:
        (comfy_base / "models" / "checkpoints" / "sd15.safetensors").unlink()


def test_missing_weights_name_the_file_and_its_folder(pack, comfy_base):
    loader = pack.NODE_CLASS_MAPPINGS["ColorFlowModelLoader"]()
    with pytest.raises(errors(pack).MissingWeightsError) as missing:
        loader.load("ColorFlow-v2", BASE, "gray", "float32", "cpu", False)
    assert f"'ColorFlow-v2/': put it in '{comfy_base / 'models' / 'colorflow'}'" in str(missing.value)
    with pytest.raises(errors(pack).MissingWeightsError) as missing:
        loader.load(RELEASE, "checkpoints/v1-5-pruned-emaonly.safetensors", "gray", "float32", "cpu", False)
    assert f"'v1-5-pruned-emaonly.safetensors': put it in '{comfy_base / 'models' / 'checkpoints'}'" in str(missing.value)
    with pytest.raises(errors(pack).MissingWeightsError) as missing:
        run(pack, "ColorFlowEncoderLoader", "ColorFlow-v2/image_encoder", "cpu")
    assert "config.json" in str(missing.value) and "ColorFlow-v2" in str(missing.value)


def test_encoder_loader_loads_the_release_encoder(pack, loaded):
    (encoder,) = run(pack, "ColorFlowEncoderLoader", f"{RELEASE}/image_encoder", "cpu")
    assert encoder.name == loaded[1].name and encoder.dim == 16


def test_clip_vision_adapter_is_a_stable_image_encoder(pack, tiny_release):
    stub = StubClipVision.from_folder(tiny_release[0] / "image_encoder")
    (encoder,) = run(pack, "ColorFlowEncoderFromCLIPVision", stub)
    assert encoder.dim == 16 and isinstance(encoder, pack.colorflow_core.retrieval.ImageEncoder)
    assert clip_encoder(pack, StubClipVision.from_folder(tiny_release[0] / "image_encoder")).name == encoder.name
    other = StubClipVision(copy.deepcopy(stub.model))
    with torch.no_grad():
        next(other.model.parameters()).add_(0.01)
    assert clip_encoder(pack, other).name != encoder.name
    pictures = [colour_image(1), colour_image(2, (60, 90)), colour_image(3)]
    together = encoder.encode(pictures)
    one_by_one = torch.cat([encoder.encode([picture]) for picture in pictures])
    assert together.shape == (3, 16) and together.dtype == torch.float32
    torch.testing.assert_close(together, one_by_one, rtol=1e-4, atol=1e-5)


def clip_encoder(pack, clip_vision):
    return pack.nodes.clip_vision.ClipVisionEncoder(clip_vision)


# ------------------------------------------------------------------------------------------------ pages and folders
def test_load_pages_lists_the_folder_in_name_order(pack, comfy_base):
    (loaded_pages,) = run(pack, "ColorFlowLoadPages", CHAPTER, False)
    assert [tuple(page.shape) for page in loaded_pages] == [(1, 192, 128, 3)] * 2
    expected = images(pack, Image.open(comfy_base / "input" / CHAPTER / "p01.png"))
    assert torch.equal(loaded_pages[0], expected)


def test_folders_outside_the_input_directory_are_refused(pack, loaded, tmp_path, user_dir):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    colour_image(5).save(outside / "a.png")
    load_pages = lambda folder, allow: run(pack, "ColorFlowLoadPages", folder, allow)  # noqa: E731
    add_references = lambda folder, allow: run(pack, "ColorFlowReferencePool", loaded[1], "p", folder, allow)  # noqa: E731
    for node in (load_pages, add_references):
        for folder in (str(outside), "../models/colorflow/ColorFlow"):
            for allow in (False, True):  # the old widget no longer widens anything
                with pytest.raises(errors(pack).InvalidInputError, match="outside ComfyUI's input directory"):
                    node(folder, allow)
    listing = user_dir / "colorflow" / "allowed_folders.txt"
    listing.parent.mkdir(parents=True, exist_ok=True)
    listing.write_text(f"# folders ColorFlow nodes may read\n{outside}\n")
    try:
        for node in (load_pages, add_references):
            assert node(str(outside), False)[0]
    finally:
        listing.unlink()


def test_is_changed_follows_the_folder(pack, comfy_base):
    signature = pack.NODE_CLASS_MAPPINGS["ColorFlowLoadPages"].IS_CHANGED
    before = signature(CHAPTER, False)
    extra = comfy_base / "input" / CHAPTER / "p03.png"
    gray_page(13).save(extra)
    try:
        assert signature(CHAPTER, False) != before
    finally:
        extra.unlink()
    assert signature(CHAPTER, False) == before


# ------------------------------------------------------------------------------------------------ reference pool
def test_pool_persists_and_embeds_only_new_references(pack, loaded, user_dir, pages):
    encoder = loaded[1]
    first, summary = run(pack, "ColorFlowReferencePool", encoder, "ch1", REFS, False, images=images(pack, colour_image(7)))
    assert len(first) == 4 and "4 reference(s), 4 new" in summary
    assert (user_dir / "colorflow" / "pools" / "ch1" / "pool.json").is_file()
    stitch(pack, first, pages)
    assert first.embedded_count == 4 * 5

    again, summary = run(pack, "ColorFlowReferencePool", encoder, "ch1", REFS, False)
    assert len(again) == 4 and "0 new" in summary
    stitch(pack, again, pages)
    assert again.embedded_count == 0, "reopened pool re-embedded cached references"

    grown, summary = run(pack, "ColorFlowReferencePool", encoder, "ch1", "", False, images=images(pack, colour_image(8)))
    stitch(pack, grown, pages)
    assert len(grown) == 5 and "1 new" in summary and grown.embedded_count == 5


def test_pool_refuses_bad_names_and_emptiness(pack, loaded, user_dir):
    for name in ("../escape", "a/b", "", ".hidden"):
        with pytest.raises(errors(pack).InvalidInputError, match="pool name"):
            run(pack, "ColorFlowReferencePool", loaded[1], name, REFS, False)
    with pytest.raises(errors(pack).InvalidInputError, match="empty"):
        run(pack, "ColorFlowReferencePool", loaded[1], "nothing", "", False)


class NarrowEncoder:
    """A 12-d encoder: its vectors cannot share an index with the release encoder's 16-d ones."""

    name, dim = "narrow:v1", 12

    def encode(self, pictures):
        return torch.ones(len(pictures), self.dim)


def snapshot(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_pool_refuses_an_encoder_of_another_width_and_keeps_the_store(pack, loaded, user_dir, pages):
    pool = run(pack, "ColorFlowReferencePool", loaded[1], "ch1", REFS, False)[0]
    stitch(pack, pool, pages)
    before = snapshot(pool.store)
    with pytest.raises(errors(pack).IncompatibleWeightsError, match="16-d.*12-d"):
        run(pack, "ColorFlowReferencePool", NarrowEncoder(), "ch1", REFS, False)
    assert snapshot(pool.store) == before


class Interrupted(Exception):
    pass


def interrupt_on_call(monkeypatch, pack, function: str, call: int):
    """Make comfy_bridge.<function> raise on its `call`-th use, as ComfyUI does after /interrupt."""
    bridge = pack.nodes.comfy_bridge
    count = {"n": 0}

    def tick(*_args):
        count["n"] += 1
        if count["n"] >= call:
            raise Interrupted()

    if function == "progress_bar":
        monkeypatch.setattr(bridge, "progress_bar", lambda total: tick)
    else:
        monkeypatch.setattr(bridge, function, tick)


def test_interrupt_while_adding_writes_nothing(pack, loaded, user_dir, monkeypatch):
    pool = run(pack, "ColorFlowReferencePool", loaded[1], "ch1", REFS, False)[0]
    before = snapshot(pool.store)
    interrupt_on_call(monkeypatch, pack, "progress_bar", 2)
    with pytest.raises(Interrupted):
        run(pack, "ColorFlowReferencePool", loaded[1], "ch1", "", False, images=images(pack, colour_image(20), colour_image(21)))
    assert snapshot(pool.store) == before
    with pytest.raises(Interrupted):
        run(pack, "ColorFlowReferencePool", loaded[1], "new", REFS, False)
    assert not (user_dir / "colorflow" / "pools" / "new" / "pool.json").exists()


# ------------------------------------------------------------------------------------------------ canvas
def test_stitch_canvas_outputs(pack, pool, pages):
    node = pack.NODE_CLASS_MAPPINGS["ColorFlowStitchCanvas"]()
    output = node.stitch(pages, pool, "custom", W, H, "gray")
    canvas, mask, preview, guide = output["result"]
    assert guide.shape == (2, int(1.5 * H), int(1.5 * W), 3) and torch.equal(guide[..., 0], guide[..., 2]), "the gray page at 1.5×"
    assert canvas.shape == (2, 2 * H, 2 * W, 3) and mask.shape == (2, 2 * H, 2 * W)
    assert mask[:, H, W].eq(1).all() and mask[:, 0, 0].eq(0).all()
    cell_height = round(pack.nodes.preview.CELL_WIDTH * H / W)
    assert preview.shape == (2, 4 * (cell_height + pack.nodes.preview.LABEL_HEIGHT), 3 * pack.nodes.preview.CELL_WIDTH, 3)
    info = output["ui"]["colorflow_info"][0]
    assert info.count("TL: ") == 2 and any(f"ref{i}.png:" in info for i in range(3))


def test_page_sizes_and_defaults_translate_to_core_options(pack):
    inputs = pack.nodes.inputs
    assert inputs.size_option("auto", 0, 0) is None  # the core picks each page's closest upstream size
    assert inputs.size_option("800x512", 0, 0) == (800, 512)
    assert inputs.size_option("custom", 64, 96) == (64, 96)
    with pytest.raises(errors(pack).InvalidInputError, match="multiple of 32"):
        inputs.size_option("custom", 70, 96)
    options = inputs.colorize_options(guidance=0.0, preprocess=inputs.STYLE_DEFAULT)
    assert options.guidance_scale is None and options.preprocess is None  # resolved by the core, per model
    assert inputs.colorize_options(guidance=4.5, preprocess="gray").guidance_scale == 4.5
    for bad in (0.5, float("nan")):
        with pytest.raises(errors(pack).InvalidInputError, match="guidance"):
            inputs.colorize_options(guidance=bad)


# ------------------------------------------------------------------------------------------------ sampler and upscaler
def test_sampler_outputs_and_one_seed_for_every_page(pack, loaded, pool, pages):
    canvas, mask, _ = stitch(pack, pool, pages[:1])
    twice = canvas.repeat(2, 1, 1, 1)
    full, page, samples = run(pack, "ColorFlowSampler", loaded[0], twice, mask, 3, STEPS, 7.5, 1.0)
    assert len(samples) == 2 and all(sample.posterior_state is not None for sample in samples)
    assert full.shape == (2, 2 * H, 2 * W, 3) and page.shape == (2, H, W, 3)
    assert torch.equal(page[0], page[1]), "every page of a batch uses the same seed"
    _, alone, _ = run(pack, "ColorFlowSampler", loaded[0], canvas, mask, 3, STEPS, 7.5, 1.0)
    assert torch.equal(alone[0], page[1])
    _, other, _ = run(pack, "ColorFlowSampler", loaded[0], canvas, mask, 4, STEPS, 7.5, 1.0)
    assert not torch.equal(other[0], page[0])
    assert canvas.shape == (1, 2 * H, 2 * W, 3), "input left untouched"


def test_sampler_refuses_a_mask_of_another_size(pack, loaded, pool, pages):
    canvas, _, _ = stitch(pack, pool, pages[:1])
    with pytest.raises(errors(pack).InvalidInputError, match="mask"):
        run(pack, "ColorFlowSampler", loaded[0], canvas, torch.zeros(1, 64, 64), 0, STEPS, 7.5, 1.0)


def test_upscale_gives_one_and_a_half_times_the_page(pack, loaded, pages):
    low = images(pack, colour_image(3, (W, H)))
    (final,) = run(pack, "ColorFlowGuidedUpscale", loaded[0], low, pages[:1], 0, 7.5, "gray", True)
    assert final.shape == (1, int(1.5 * H), int(1.5 * W), 3)


def model_state(model) -> tuple:
    """What a node must never change on a cached model: its components, their settings and weights."""
    components = {name: id(module) for name, module in model.pipeline.components.items()}
    weights = [(n, p.data_ptr(), float(p.detach().double().sum())) for n, p in list(model.pipeline.unet.named_parameters())[:8]]
    return components, dict(model.pipeline.scheduler.config), model.pipeline.unet.training, weights


def test_staged_nodes_reproduce_the_sequence_node(pack, loaded, pool, pages):
    model = loaded[0]
    before = model_state(model)
    canvas, mask, _ = stitch(pack, pool, pages)
    _, low, samples = run(pack, "ColorFlowSampler", model, canvas, mask, 5, STEPS, 7.5, 1.0)
    (staged,) = run(pack, "ColorFlowGuidedUpscale", model, low, pages, 5, 7.5, "gray", True)
    (chapter,) = run(pack, "ColorFlowColorizeSequence", [model], [pool], [pages], [5], [STEPS], [7.5], [1.0],
                     ["custom"], [W], [H], ["gray"], [False])
    assert chapter.shape == (2, int(1.5 * H), int(1.5 * W), 3)
    assert torch.equal(staged, chapter)
    # With the sampler's samples connected the upscaler needs neither its seed nor the sampler's guidance.
    (linked,) = run(pack, "ColorFlowGuidedUpscale", model, low, pages, 123, 0.0, "gray", True, False, samples)
    assert torch.equal(linked, chapter)
    assert model_state(model) == before


def test_fast_preset_loader_runs_the_staged_nodes_like_the_sequence_node(pack, loaded, pool, pages):
    fast = run(pack, "ColorFlowModelLoader", RELEASE, BASE, "gray", "float32", "cpu", False, None, "fast")[0]
    assert fast.preset.name == "fast" and fast.plan is not None
    canvas, mask, _ = stitch(pack, pool, pages)
    # Guidance left at its default (0): the fast preset samples without CFG, and GSRP continues that stream.
    _, low, samples = run(pack, "ColorFlowSampler", fast, canvas, mask, 5, STEPS, 0.0, 1.0)
    (staged,) = run(pack, "ColorFlowGuidedUpscale", fast, low, pages, 5, 0.0, "gray", True)
    (linked,) = run(pack, "ColorFlowGuidedUpscale", fast, low, pages, 5, 7.5, "gray", True, False, samples)
    (chapter,) = run(pack, "ColorFlowColorizeSequence", [fast], [pool], [pages], [5], [STEPS], [0.0], [1.0],
                     ["custom"], [W], [H], ["gray"], [False])
    assert torch.equal(staged, chapter) and torch.equal(linked, chapter)
    (no_cfg,) = run(pack, "ColorFlowColorizeSequence", [fast], [pool], [pages], [5], [STEPS], [1.0], [1.0],
                    ["custom"], [W], [H], ["gray"], [False])
    assert torch.equal(no_cfg, chapter), "fast's default is guidance 1.0"
    (faithful,) = run(pack, "ColorFlowColorizeSequence", [loaded[0]], [pool], [pages], [5], [STEPS], [0.0], [1.0],
                      ["custom"], [W], [H], ["gray"], [False])
    assert not torch.equal(chapter, faithful)


def test_comfyui_low_vram_mode_offloads_under_any_preset_with_the_same_numerics(pack, monkeypatch):
    monkeypatch.setattr(pack.nodes.comfy_bridge, "low_vram_mode", lambda: True)
    faithful = run(pack, "ColorFlowModelLoader", RELEASE, BASE, "gray", "float32", "cpu", False)[0].preset
    assert (faithful.name, faithful.offload, faithful.compute_dtype, faithful.guidance_scale) == ("faithful", "stage", None, None)
    fast = run(pack, "ColorFlowModelLoader", RELEASE, BASE, "gray", "float32", "cpu", False, None, "fast")[0].preset
    assert (fast.offload, fast.keep_copies, fast.guidance_scale) == ("stage", False, 1.0)


def test_heavy_nodes_ask_comfyui_for_room_before_they_run(pack, loaded, pool, pages, monkeypatch):
    requests, asked = [], []
    monkeypatch.setattr(pack.nodes.comfy_bridge, "make_room", lambda needed, device: requests.append((needed, device)))
    model = loaded[0]
    estimate = pack.nodes.inputs.memory_needed

    def recorded(model, options, size, pages=1):
        asked.append((size, options.guidance_scale, pages))
        return estimate(model, options, size, pages)

    monkeypatch.setattr(pack.nodes.inputs, "memory_needed", recorded)
    run(pack, "ColorFlowColorizeSequence", [model], [pool], [pages], [0], [STEPS], [7.5], [1.0],
        ["custom"], [W], [H], ["gray"], [False], None, [2])
    canvas, mask, _ = stitch(pack, pool, pages)
    _, low, _ = run(pack, "ColorFlowSampler", model, canvas, mask, 0, STEPS, 7.5, 1.0)
    run(pack, "ColorFlowGuidedUpscale", model, low, pages, 0, 7.5, "gray", True)
    assert [device for _, device in requests] == [model.device] * 3 and all(needed > 0 for needed, _ in requests)
    assert asked == [((W, H), 7.5, 2), ((W, H), 7.5, 1), ((W, H), 7.5, 1)]


def test_sequence_page_batch_gives_the_pages_of_one_at_a_time(pack, loaded, pool, pages, monkeypatch):
    reports = []
    monkeypatch.setattr(pack.nodes.comfy_bridge, "progress_bar", lambda total: lambda done, of: reports.append((done, of)))
    arguments = [[loaded[0]], [pool], [pages], [0], [STEPS], [1.0], [1.0], ["custom"], [W], [H], ["gray"], [False]]
    (single,) = run(pack, "ColorFlowColorizeSequence", *arguments)
    reports.clear()
    (batched,) = run(pack, "ColorFlowColorizeSequence", *arguments, None, [2])
    assert reports == [(2 * step, 2 * STEPS) for step in range(1, STEPS + 1)]
    assert (batched - single).abs().max() <= 1 / 255 + 1e-6


def test_feed_back_never_changes_the_saved_pool(pack, loaded, pool, pages):
    before, count = snapshot(pool.store), len(pool)
    (chapter,) = run(pack, "ColorFlowColorizeSequence", [loaded[0]], [pool], [pages], [0], [STEPS], [1.0], [1.0],
                     ["custom"], [W], [H], ["gray"], [True])
    assert chapter.shape[0] == 2
    assert len(pool) == count and snapshot(pool.store) == before


def test_sequence_takes_a_list_of_pages_of_mixed_sizes(pack, loaded, pool):
    mixed = [images(pack, gray_page(1)), images(pack, gray_page(2, (160, 160)))]
    arguments = [[loaded[0]], [pool], mixed, [0], [1], [1.0], [1.0]]
    (chapter,) = run(pack, "ColorFlowColorizeSequence", *arguments, ["custom"], [W], [H], ["gray"], [False])
    assert chapter.shape == (2, int(1.5 * H), int(1.5 * W), 3)
    with pytest.raises(errors(pack).InvalidInputError, match="different sizes"):
        run(pack, "ColorFlowColorizeSequence", *arguments, ["auto"], [W], [H], ["gray"], [False])


def test_sequence_progress_counts_every_step_of_every_page(pack, loaded, pool, pages, monkeypatch):
    reports = []
    monkeypatch.setattr(pack.nodes.comfy_bridge, "progress_bar", lambda total: lambda done, of: reports.append((done, of)))
    run(pack, "ColorFlowColorizeSequence", [loaded[0]], [pool], [pages], [0], [STEPS], [1.0], [1.0],
        ["custom"], [W], [H], ["gray"], [False])
    assert reports == [(step, 2 * STEPS) for step in range(1, 2 * STEPS + 1)]


@pytest.mark.parametrize("function, call", [("check_interrupt", 2), ("progress_bar", 1)])
def test_sequence_honours_interrupts(pack, loaded, pool, pages, monkeypatch, function, call):
    interrupt_on_call(monkeypatch, pack, function, call)
    with pytest.raises(Interrupted):
        run(pack, "ColorFlowColorizeSequence", [loaded[0]], [pool], [pages], [0], [STEPS], [1.0], [1.0],
            ["custom"], [W], [H], ["gray"], [False])


def test_tensor_conversions_clone_and_check(pack):
    tensors = pack.nodes.tensors
    batch = torch.rand(2, 5, 7, 4)
    original = batch.clone()
    pictures = tensors.images_to_pil(batch)
    assert [p.size for p in pictures] == [(7, 5)] * 2 and torch.equal(batch, original)
    roundtrip = tensors.pil_to_images(pictures)
    assert roundtrip.shape == (2, 5, 7, 3) and (roundtrip - batch[..., :3]).abs().max() <= 0.5 / 255 + 1e-6
    masks = tensors.pil_to_masks(tensors.masks_to_pil(torch.tensor([[[0.0, 1.0]]])))
    assert masks.tolist() == [[[0.0, 1.0]]]
    with pytest.raises(errors(pack).InvalidInputError, match="different sizes"):
        tensors.pil_to_images([Image.new("RGB", (2, 2)), Image.new("RGB", (3, 2))])
    with pytest.raises(errors(pack).InvalidInputError, match="shape"):
        tensors.images_to_pil(torch.rand(2, 5, 7, 2))
    with pytest.raises(errors(pack).InvalidInputError, match="batch sizes"):
        tensors.pair_batches([1, 2], [1, 2, 3], "x")
    assert json.dumps(tensors.pair_batches([1], [1, 2], "x")) == "[[1, 1], [1, 2]]"
