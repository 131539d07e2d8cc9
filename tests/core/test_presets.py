"""Presets (faithful / fast / low-vram / auto): end to end, staging, LoRA merge, memory choice, page batches."""
from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from colorflow_core import compiling, memory, runtime
from colorflow_core.cli import main
from colorflow_core.errors import InvalidInputError
from colorflow_core.loading import load_colorflow
from colorflow_core.model import ColorFlowModel
from colorflow_core.models.color_guider import ColorGuiderSDModel
from colorflow_core.models.fusion import MultiHiddenResNetModel
from colorflow_core.options import ColorizeOptions
from colorflow_core.pipelines.guided_sr import GuidedSuperResolver
from colorflow_core.presets import PRESET_NAMES, get_preset
from colorflow_core.retrieval import ReferencePool
from colorflow_core.runtime import Placement, merged_lora, stage_module
from colorflow_core.sequence import colorize_batch, colorize_page, colorize_pages
from colorflow_core.settings import guidance_scale, resolve

from .sampling import sample_canvas

CONFIGS = Path(__file__).resolve().parents[2] / "colorflow_core" / "configs" / "sd15"
GB = 10**9
#: low-vram with float64 as a stand-in for "on the accelerator": a staged model's parameters turn float64, a
#: waiting one's stay float32, so the test sees which models sit on the "device" at every forward.
MARKED_LOW_VRAM = get_preset("low-vram", compute_dtype="float64", cast_resident=True, vae_tiling="never")


def refs(n=2):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (96, 64, 3), dtype=np.uint8)) for _ in range(n)]


def page(seed=1):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (96, 64), dtype=np.uint8))


@pytest.fixture(scope="module")
def sketch(tiny_sketch):
    return tiny_sketch


def lora_is_merged(module: torch.nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(layer.merged for layer in module.modules() if isinstance(layer, LoraLayer))


def snapshot(model: ColorFlowModel) -> dict[str, tuple]:
    """Every tensor of the shared model: (object id of its data, dtype, device, a copy of its values)."""
    out = {}
    for stage, modules in model.run_modules().items():
        for i, module in enumerate(modules):
            for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
                out[f"{stage}.{i}.{name}"] = (tensor.data_ptr(), tensor.dtype, tensor.device, tensor.detach().clone())
    return out


def assert_unchanged(model: ColorFlowModel, before: dict[str, tuple]) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys()
    for key, (ptr, dtype, device, values) in before.items():
        now = after[key]
        assert (now[0], now[1], now[2]) == (ptr, dtype, device), key
        assert torch.equal(now[3], values), key
    assert not lora_is_merged(model.run_modules()["denoiser"][1])
    assert model.plan is None


# ---- names, options ---------------------------------------------------------------------------------------

def test_preset_names_lookup_and_validation():
    assert PRESET_NAMES == ("faithful", "fast", "low-vram", "auto")
    assert get_preset(None).name == "faithful" and get_preset("fast").guidance_scale == 1.0
    assert get_preset("low-vram").guidance_scale is None
    with pytest.raises(InvalidInputError, match="unknown preset"):
        get_preset("turbo")
    with pytest.raises(InvalidInputError, match="unknown preset"):
        ColorizeOptions(preset="turbo")
    with pytest.raises(InvalidInputError, match="offload"):
        get_preset("fast", offload="sometimes")
    offloaded = get_preset("fast").offloaded()
    assert (offloaded.offload, offloaded.keep_copies, offloaded.merge_lora) == ("stage", False, True)
    assert get_preset("auto").offloaded() == get_preset("auto") and get_preset("low-vram").offloaded() == get_preset("low-vram")
    with pytest.raises(ValueError, match="unknown stage"):
        Placement.create("cpu", unet="cpu")
    placement = Placement.create("cpu", "cpu", text_encoder="meta")
    assert placement.device_for("text_encoder") == torch.device("meta") and placement.device_for("vae") == torch.device("cpu")


def test_faithful_view_is_the_plain_model_and_fast_pins_no_cfg(tiny_model):
    view = tiny_model.with_preset("faithful")
    assert view.plan is None and view.pipeline.unet is tiny_model.pipeline.unet
    fast = tiny_model.with_preset("fast")
    assert fast.plan is not None and fast.preset.name == "fast"
    assert guidance_scale(fast, ColorizeOptions()) == 1.0 and guidance_scale(fast, ColorizeOptions(guidance_scale=7.5)) == 7.5
    assert fast.pipeline is tiny_model.pipeline and fast.upscaler is tiny_model.upscaler
    assert fast.encoder.name == tiny_model.encoder.name and tiny_model.plan is None


# ---- every preset end to end, shared model untouched ------------------------------------------------------

@pytest.mark.parametrize("style", ["gray", "sketch"])
def test_every_attention_layer_runs_sdpa_so_no_preset_needs_to_swap_processors(style, tiny_model, sketch):
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    model = tiny_model if style == "gray" else sketch
    layers = 0
    for modules in model.run_modules().values():
        for module in modules:
            config = getattr(module, "config", None)
            if hasattr(config, "_attn_implementation"):  # transformers' CLIP text / vision models
                assert config._attn_implementation == "sdpa", type(module).__name__
            for sub in module.modules():
                if isinstance(sub, Attention):
                    assert isinstance(sub.processor, AttnProcessor2_0), f"{type(module).__name__}: {type(sub.processor).__name__}"
                    layers += 1
    assert layers >= (50 if style == "gray" else 72)  # VAE mid-block + guider + UNet / PixArt transformer


@pytest.mark.parametrize("style", ["gray", "sketch"])
def test_every_preset_runs_end_to_end_and_leaves_the_shared_model_unchanged(style, tiny_model, sketch):
    model = tiny_model if style == "gray" else sketch
    before = snapshot(model)
    pool = ReferencePool(model.encoder)
    pool.add(refs())
    finals = {}
    for name in (*PRESET_NAMES, "low-vram-strict"):
        options = ColorizeOptions(size=(32, 32), steps=1, seed=3, preprocess="gray", preset=name)
        result = colorize_page(model, page(), pool, options)
        final = np.asarray(result.final)
        assert final.shape == (48, 48, 3) and result.icp.latents.isfinite().all(), name
        finals[name] = final
    assert np.array_equal(finals["auto"], finals["faithful"])  # plenty of free memory: auto runs faithful
    assert not np.array_equal(finals["fast"], finals["faithful"])  # CFG off changes the picture
    assert_unchanged(model, before)


def test_faithful_plan_runs_the_staged_path_with_identical_numbers(tiny_model):
    """A faithful *plan* (here forced by naming a stage device) stages everything, yet computes what the plain model does."""
    planned = tiny_model.with_preset("faithful", Placement.create("cpu", text_encoder="cpu"))
    assert planned.plan is not None
    pool = ReferencePool(tiny_model.encoder)
    pool.add(refs())
    options = ColorizeOptions(size=(32, 32), steps=2, seed=4, preprocess="gray")
    plain = colorize_page(tiny_model, page(), pool, options)
    staged = colorize_page(planned, page(), pool, options)
    assert torch.equal(plain.icp.latents, staged.icp.latents)
    assert np.array_equal(np.asarray(plain.final), np.asarray(staged.final))


# ---- low-vram: which models sit on the device during each stage -------------------------------------------

#: Stages open right now, as `track_stages` sees them.
OPEN_STAGES: list[str] = []


@pytest.fixture
def track_stages(monkeypatch):
    """Every `Run.stage` block records its stage in OPEN_STAGES while it is open."""
    real = runtime.Run.stage

    @contextlib.contextmanager
    def tracked(self, stage, *modules):
        OPEN_STAGES.append(stage)
        try:
            with real(self, stage, *modules) as device:
                yield device
        finally:
            OPEN_STAGES.remove(stage)

    monkeypatch.setattr(runtime.Run, "stage", tracked)


def _watch(model: ColorFlowModel, log: list):
    """Forward pre-hooks that log (running model, models currently float64 = 'on the device', open stages)."""
    pipe = model.pipeline
    watched = {
        "guider": pipe.guider, "unet": pipe.unet, "vae": pipe.vae, "fusion": model.upscaler.fusion,
        "text_encoder": pipe.text_encoder,
    }

    def on_device():
        return {n for n, m in watched.items() if next(m.parameters()).dtype == torch.float64}

    def open_stages():
        return set(OPEN_STAGES)

    targets = {
        "guider": pipe.guider, "unet": pipe.unet, "vae.encoder": pipe.vae.encoder, "vae.decoder": pipe.vae.decoder,
        "fusion": model.upscaler.fusion.two_layer_resnets[0], "text_encoder": pipe.text_encoder,
        "image_encoder": model.encoder.model,
    }
    return [
        module.register_forward_pre_hook(lambda m, a, name=name: log.append((name, on_device(), open_stages())))
        for name, module in targets.items()
    ]


@pytest.mark.parametrize("offload", ["stage", "model"])
def test_low_vram_puts_only_the_running_stage_on_the_device(tiny_model, offload, track_stages):
    before = snapshot(tiny_model)
    view = tiny_model.with_preset(MARKED_LOW_VRAM.replace(offload=offload))
    pool = ReferencePool(view.encoder)
    log: list = []
    hooks = _watch(tiny_model, log)
    try:
        pool.add(refs())
        tiny_model.pipeline._prompt_cache.clear()
        colorize_page(view, page(), pool, ColorizeOptions(size=(32, 32), steps=2, seed=0, preprocess="gray"))
    finally:
        for hook in hooks:
            hook.remove()
    seen = {name for name, _, _ in log}
    assert seen == {"guider", "unet", "vae.encoder", "vae.decoder", "fusion", "text_encoder", "image_encoder"}
    for name, on_device, stages in log:
        if name in ("guider", "unet"):
            assert on_device == ({"guider", "unet"} if offload == "stage" else {name}), (name, on_device)
            assert "denoiser" in stages
        elif name.startswith("vae"):
            assert on_device == {"vae"} and "vae" in stages, (name, on_device)
        elif name == "fusion":
            assert on_device == {"fusion"} and stages == {"fusion"}, (name, on_device, stages)
        else:  # the encoders keep their dtype: their stage is open, nothing else is on the device
            assert on_device == set() and name in stages, (name, on_device, stages)
    assert_unchanged(tiny_model, before)


def test_stage_module_moves_to_another_device_and_restores_the_same_tensors():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    originals = [t for t in [*net.parameters(), *net.buffers()]]
    values = [t.clone() for t in originals]
    staged = stage_module(net, torch.device("meta"), torch.float16, channels_last=True)
    assert all(p.device.type == "meta" for p in net.parameters()) and net[0].weight.dtype == torch.float16
    assert net[1].num_batches_tracked.dtype == torch.long  # integer buffers keep their dtype
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
    staged.restore()
    for tensor, original, value in zip([*net.parameters(), *net.buffers()], originals, values):
        assert tensor.data_ptr() == original.data_ptr() and torch.equal(tensor, value)


def test_stage_module_failing_halfway_leaves_the_module_as_it_was(monkeypatch):
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    originals = [p.data for p in net.parameters()]
    calls = []

    def convert(tensor, *args):  # the third tensor's copy fails, as an out-of-memory on the device would
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("device full")
        return tensor.to(torch.float64)

    monkeypatch.setattr(runtime, "_convert", convert)
    with pytest.raises(torch.OutOfMemoryError):
        stage_module(net, torch.device("cpu"), torch.float64)
    assert len(calls) == 3
    for param, original in zip(net.parameters(), originals):
        assert param.dtype == torch.float32 and param.data_ptr() == original.data_ptr()


# ---- LoRA merge ----------------------------------------------------------------------------------------------

def _unet_out(unet, seed=0):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(sample, 10, encoder_hidden_states=text).sample


def test_merged_lora_equals_unmerged_within_fp32_rounding_and_is_undone_exactly(tiny_model):
    unet = tiny_model.pipeline.unet
    before = {k: (v.data_ptr(), v.clone()) for k, v in unet.state_dict().items()}
    unmerged = _unet_out(unet)
    with merged_lora(unet) as count:
        assert count > 0
        assert lora_is_merged(unet)
        merged = _unet_out(unet)
        with pytest.raises(RuntimeError, match="merged"):
            unet.state_dict()
    unet.disable_adapters()
    try:
        without_lora = _unet_out(unet)
    finally:
        unet.enable_adapters()
    assert not torch.equal(without_lora, unmerged)  # the LoRA does something…
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)  # …and merging it changes only rounding
    assert not lora_is_merged(unet)
    for key, value in unet.state_dict().items():
        assert value.data_ptr() == before[key][0] and torch.equal(value, before[key][1]), key


def test_merge_and_cast_make_one_copy_kept_by_the_view_until_the_weights_change(tiny_model):
    unet = tiny_model.pipeline.unet
    before = {k: (v.data_ptr(), v.clone()) for k, v in unet.state_dict().items()}
    reference = _unet_out(unet).double()
    cache: dict = {}

    def merged64():
        with merged_lora(unet, torch.device("cpu"), torch.float64, cache=cache) as count:
            staged = stage_module(unet, torch.device("cpu"), torch.float64, cache=cache)
            try:
                generator = torch.Generator().manual_seed(0)
                sample = torch.randn(1, 4, 8, 8, generator=generator).double()
                text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator).double()
                with torch.no_grad():
                    out = unet(sample, 10, encoder_hidden_states=text).sample
                lora = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
                return out, lora.get_base_layer().weight.data_ptr(), count
            finally:
                staged.restore()

    first, weight, count = merged64()
    assert count > 0 and len(cache) > 0
    torch.testing.assert_close(first, reference, rtol=1e-5, atol=1e-5)
    second, again, _ = merged64()
    assert again == weight and torch.equal(second, first)  # the cached merged copy is reused
    lora = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    with torch.no_grad():
        lora.lora_B["default"].weight.mul_(2)  # a changed LoRA must not be served from the cache
    try:
        third, fresh, _ = merged64()
        assert fresh != weight and not torch.equal(third, first)
    finally:
        with torch.no_grad():
            lora.lora_B["default"].weight.div_(2)
    for key, value in unet.state_dict().items():
        assert value.data_ptr() == before[key][0] and torch.equal(value, before[key][1]), key


def test_fast_view_reuses_its_copies_between_pages(tiny_model):
    pool = ReferencePool(tiny_model.encoder)
    pool.add(refs())
    view = tiny_model.with_preset("fast")
    options = ColorizeOptions(size=(32, 32), steps=1, seed=2, preprocess="gray")
    first = colorize_page(view, page(), pool, options)
    copies = dict(view.plan.copies)
    assert copies and all(entry[2].dtype == torch.bfloat16 for entry in copies.values() if entry[2].is_floating_point()) \
        or not runtime.cpu_has_native_bf16()
    second = colorize_page(view, page(), pool, options)
    assert view.plan.copies.keys() == copies.keys() and all(view.plan.copies[k][2] is v[2] for k, v in copies.items())
    assert np.array_equal(np.asarray(first.final), np.asarray(second.final))


@pytest.mark.parametrize("preset", ["fast", "low-vram"])
def test_presets_run_on_weights_loaded_in_inference_mode_as_comfyui_does(tiny_release, tiny_model, preset):
    pool = ReferencePool(tiny_model.encoder)
    pool.add(refs())
    options = ColorizeOptions(size=(32, 32), steps=1, seed=2, preprocess="gray")
    expected = colorize_page(tiny_model.with_preset(preset), page(), pool, options)
    with torch.inference_mode():  # inference tensors have no version counter for the copy cache to read
        model = load_colorflow(*tiny_release)
        view = model.with_preset(preset)
        results = [colorize_page(view, page(), pool, options) for _ in range(2)]
    for result in results:
        assert np.array_equal(np.asarray(result.final), np.asarray(expected.final))


# ---- encode once ------------------------------------------------------------------------------------------

def test_encode_once_draws_the_same_numbers_as_the_batch_encode(tiny_model):
    canvas = sample_canvas(32, 32)
    pipe = tiny_model.pipeline
    gen_a, gen_b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    batch = pipe.prepare_condition(canvas.image, canvas.mask, 2, gen_a)
    once = pipe.prepare_condition(canvas.image, canvas.mask, 2, gen_b, encode_once=True)
    torch.testing.assert_close(once, batch, rtol=1e-5, atol=1e-5)
    assert torch.equal(gen_a.get_state(), gen_b.get_state())
    assert not torch.equal(once[0], once[1])  # two rows, two posterior samples


# ---- auto ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd15_on_meta() -> ColorFlowModel:
    """A ColorFlow model with real SD1.5 widths on the meta device (no memory): for memory estimates only."""
    from diffusers import AutoencoderKL, UNet2DConditionModel, UniPCMultistepScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    from colorflow_core.pipelines.colorflow_sd import ColorFlowSDPipeline

    def config(name):
        return {k: v for k, v in json.loads((CONFIGS / name / "config.json").read_text()).items() if not k.startswith("_")}

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config("unet"))
        vae = AutoencoderKL.from_config(config("vae"))
        text = CLIPTextModel(CLIPTextConfig(**config("text_encoder")))
        guider = ColorGuiderSDModel()
        fusion = MultiHiddenResNetModel()
    pipe = ColorFlowSDPipeline(vae=vae, text_encoder=text, tokenizer=None, unet=unet, guider=guider,
                               scheduler=UniPCMultistepScheduler())
    return ColorFlowModel("gray", pipe, GuidedSuperResolver(vae, fusion), encoder=None, snapshot=Path("."))


def test_auto_picks_a_lower_memory_plan_when_less_memory_is_free(sd15_on_meta):
    cuda = Placement.create("cuda", "cpu")
    picked = {}
    for free_gb in (40, 9, 5, 1):
        view = sd15_on_meta.with_preset("auto", cuda, free_memory=lambda device, f=free_gb: f * GB)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            picked[free_gb] = memory.choose_preset(view.plan, (512, 800), 7.5).name
        assert any("no preset fits" in str(w.message) for w in caught) == (free_gb == 1)
    assert picked == {40: "faithful", 9: "low-vram", 5: "low-vram-strict", 1: "low-vram-strict"}
    view = sd15_on_meta.with_preset("auto", cuda, free_memory=lambda device: 40 * GB)
    peaks = {p.name: memory.estimate(view.plan, p, (512, 800), 7.5).peak / GB
             for p in (get_preset("faithful"), get_preset("low-vram"), get_preset("low-vram-strict"))}
    assert peaks["faithful"] > 10 > peaks["low-vram"] > peaks["low-vram-strict"]  # fp32 weights vs bf16 staged per stage
    assert 4 < peaks["low-vram"] < 8


def test_auto_counts_every_page_of_a_denoise_batch(sd15_on_meta):
    cuda = Placement.create("cuda", "cpu")
    probe = sd15_on_meta.with_preset("auto", cuda, free_memory=lambda device: 0).plan
    one, eight = (memory.estimate(probe, get_preset("faithful"), (512, 800), 7.5, pages=n).peak for n in (1, 8))
    assert eight > one + 7 * 2 * 0.5 * GB  # 16 more CFG rows of UNet activations
    view = sd15_on_meta.with_preset("auto", cuda, free_memory=lambda device: (one + eight) // 2)
    assert memory.choose_preset(view.plan, (512, 800), 7.5).name == "faithful"
    assert memory.choose_preset(view.plan, (512, 800), 7.5, pages=8).name != "faithful"
    # What a host frees first: auto counts as faithful; weights already on the device are not asked for again.
    assert memory.memory_needed(view.plan, (512, 800), 7.5, pages=8) == eight
    low = sd15_on_meta.with_preset("low-vram", cuda).plan
    assert memory.memory_needed(low, (512, 800), 7.5) == memory.estimate(low, get_preset("low-vram"), (512, 800), 7.5).peak < one


def test_low_vram_tiles_the_canvas_decode_only_where_it_is_the_peak(sd15_on_meta):
    view = sd15_on_meta.with_preset("low-vram", Placement.create("cuda", "cpu"))
    assert not memory.decode_is_peak(view.plan, view.preset, (1024, 1600), 7.5)  # 512×800: denoise stays the peak
    assert memory.decode_is_peak(view.plan, view.preset, (2048, 3200), 7.5)  # 1024×1600: the full decode exceeds it
    assert resolve(view, ColorizeOptions(), (1024, 1600)).tile_decode


def test_auto_on_the_tiny_model_follows_the_injected_free_memory(tiny_model, monkeypatch):
    """On the CPU everything is resident: `auto` can only choose leaner activations (encode once, lean GSRP, tiling)."""
    size = (128, 128)
    probe = tiny_model.with_preset("auto", free_memory=lambda device: 0).plan
    held = memory.available(probe)  # free 0 + the weights already on the device
    need = {p: memory.estimate(probe, get_preset(p), size, 7.5).peak for p in ("faithful", "low-vram")}
    assert need["low-vram"] < need["faithful"]
    between = (need["low-vram"] + need["faithful"]) // 2 - held
    pool = ReferencePool(tiny_model.encoder)
    pool.add(refs())
    executed = []
    real = ColorFlowModel.execution
    monkeypatch.setattr(ColorFlowModel, "execution", lambda self, preset: executed.append(preset.name) or real(self, preset))
    for free in (100 * GB, between):
        view = tiny_model.with_preset("auto", free_memory=lambda device, f=free: f)
        colorize_page(view, page(), pool, ColorizeOptions(size=size, steps=1, preprocess="gray"))
    assert executed == ["faithful"] * 2 + ["low-vram"] * 2  # the sampler's run, then GSRP's


# ---- page batches ---------------------------------------------------------------------------------------

def test_batched_pages_equal_pages_one_at_a_time(tiny_model):
    pool = ReferencePool(tiny_model.encoder)
    pool.add(refs(3))
    pages = [page(1), page(2), page(3)]
    options = ColorizeOptions(size=(32, 32), steps=2, seed=9, preprocess="gray")
    one = list(colorize_pages(tiny_model, pages, pool, options))
    batched = list(colorize_pages(tiny_model, pages, pool, options, page_batch=2))
    assert [r.name for r in batched] == [r.name for r in one]
    for a, b in zip(one, batched):
        torch.testing.assert_close(b.icp.latents, a.icp.latents, rtol=1e-4, atol=1e-4)
        diff = np.abs(np.asarray(a.final).astype(int) - np.asarray(b.final).astype(int))
        assert diff.max() <= 1
    assert not torch.equal(one[0].icp.latents, one[1].icp.latents)  # different pages, different results
    with pytest.raises(InvalidInputError, match="page_batch"):
        list(colorize_pages(tiny_model, pages, pool, options, page_batch=0))
    with pytest.raises(InvalidInputError, match="no pages"):
        colorize_batch(tiny_model, [], pool, options)


def test_page_batches_never_mix_canvas_sizes_and_stay_in_reading_order(tiny_model, monkeypatch):
    from colorflow_core import sequence

    batches = []

    def record(model, images, pool, options, *, names, step_progress, observer):
        batches.append(names)
        return [sequence.PageResult(n, image, image.size, None, None, None, image) for n, image in zip(names, images)]

    monkeypatch.setattr(sequence, "colorize_batch", record)
    tall, wide = Image.new("L", (500, 800), 128), Image.new("L", (800, 500), 128)
    pages = [tall, tall, tall, wide, tall, wide, wide]  # size auto: 512x800 or 800x512 per page
    results = list(colorize_pages(tiny_model, pages, ReferencePool(tiny_model.encoder), ColorizeOptions(), page_batch=2))
    assert [r.name for r in results] == [f"page_{i:04d}" for i in range(7)]
    assert batches == [["page_0000", "page_0001"], ["page_0002"], ["page_0003"], ["page_0004"], ["page_0005", "page_0006"]]


# ---- compile (explicit configuration step) -------------------------------------------------------------

def test_compile_models_is_an_explicit_reversible_step(tiny_model, monkeypatch):
    from torch._dynamo import config as dynamo_config

    monkeypatch.setattr(dynamo_config, "recompile_limit", 2)
    guider = tiny_model.pipeline.guider
    sample, cond = torch.randn(1, 4, 4, 4), torch.randn(1, 9, 4, 4)
    with torch.no_grad():
        eager = guider(sample, 5, cond).mid
    compiled_blocks = compiling.compile_models([guider], backend="eager")
    assert compiled_blocks > 2 and dynamo_config.recompile_limit == compiled_blocks  # none left to run eagerly
    try:
        with torch.no_grad():
            compiled = guider(sample, 5, cond).mid
    finally:
        count = compiling.uncompile_models([guider])
    assert count > 0 and compiling.uncompile_models([guider]) == 0
    torch.testing.assert_close(compiled, eager)


# ---- CLI ---------------------------------------------------------------------------------------------------

def test_cli_preset_and_page_batch(tiny_release, tmp_path, capsys):
    release, base = tiny_release
    ref, pages = tmp_path / "ref.png", tmp_path / "pages"
    refs(1)[0].save(ref)
    pages.mkdir()
    for i in range(2):
        page(i).save(pages / f"p{i}.png")
    common = ["colorize", "--colorflow", str(release), "--base", str(base), "--refs", str(ref), "--steps", "1",
              "--width", "32", "--height", "32", "--preprocess", "gray", "--device", "cpu", str(pages)]
    assert main([*common, "--out", str(tmp_path / "fast"), "--preset", "fast", "--page-batch", "2"]) == 0
    assert "preset fast" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "fast").iterdir()) == ["p0.png", "p1.png"]
    assert main([*common, "--out", str(tmp_path / "lv"), "--preset", "low-vram", "--guidance", "3"]) == 0
    with pytest.raises(SystemExit):
        main([*common, "--out", str(tmp_path / "x"), "--preset", "turbo"])
