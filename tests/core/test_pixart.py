"""The PixArt-α path (styles sketch / sketch_shading): release layout, strict loading, LoRA, injection, T5 cache, CLI."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import PixArtTransformer2DModel
from peft import LoraConfig, inject_adapter_in_model
from PIL import Image

from colorflow_core.cli import main
from colorflow_core.errors import IncompatibleWeightsError
from colorflow_core.loading import load_colorflow
from colorflow_core.loading_pixart import load_pixart_guider
from colorflow_core.models.color_guider_pixart import ColorGuiderPixArtModel, drop_alias_keys, with_alias_keys
from colorflow_core.models.lora import PIXART_LORA_TARGETS, apply_lora, lora_module_count, normalize_lora_keys
from colorflow_core.models.pixart_injection import inject_controls
from colorflow_core.options import make_generators
from colorflow_core.pipelines import ColorFlowPixArtPipeline, ColorFlowSDPipeline
from colorflow_core.tiny_pixart import tiny_pixart_guider, tiny_pixart_transformer
from colorflow_core.weights import read_state_dict

from .sampling import run as run_sampler, sample_canvas


def run(model, canvas, seed=0, **kwargs):
    return run_sampler(model, canvas, seed, steps=1, **kwargs)

CONFIGS = Path(__file__).resolve().parents[2] / "colorflow_core" / "configs" / "pixart"


@pytest.fixture(scope="module")
def folders(tiny_release):
    """(release, PixArt base) of the session's tiny weights."""
    release, _ = tiny_release
    return release, release.parent / "pixart"


@pytest.fixture(scope="module")
def sketch(folders, tmp_path_factory):
    """The tiny sketch model (tests must not mutate it); its prompt cache in a private folder."""
    release, pixart = folders
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COLORFLOW_CACHE", str(tmp_path_factory.mktemp("user_cache")))
        return load_colorflow(release, pixart, style="sketch", device="cpu", prompt_cache=tmp_path_factory.mktemp("pc"))


# ---- the released layout at real size (meta device, no weights) -------------------------------------------

def test_released_guider_layout_228_tensors_and_the_released_parameter_count():
    with torch.device("meta"):
        guider = ColorGuiderPixArtModel()
    state = with_alias_keys(guider.state_dict(), guider.num_controls)
    assert len(state) == 228 and guider.num_controls == 14
    assert sum(p.numel() for p in guider.parameters()) == 251_938_944
    assert state["pos_embed.proj.weight"].shape == (1152, 13, 2, 2)
    assert state["adaln_single.emb.resolution_embedder.linear_2.weight"].shape == (384, 384)
    assert state["adaln_single.linear.weight"].shape == (6912, 1152)
    assert not any(".attn2." in key or "caption" in key for key in state)
    assert len(guider.state_dict()) == 226 and set(state) - set(guider.state_dict()) == {"after_proj.weight", "after_proj.bias"}


def test_lora_targets_cover_291_modules_of_pixart_xl():
    config = json.loads((CONFIGS / "transformer" / "config.json").read_text())
    with torch.device("meta"):
        transformer = PixArtTransformer2DModel.from_config(config)
        assert sum(p.numel() for p in transformer.parameters()) == 611_349_152
        inject_adapter_in_model(LoraConfig(r=128, lora_alpha=128, target_modules=list(PIXART_LORA_TARGETS)), transformer)
    lora = {k: v for k, v in transformer.state_dict().items() if ".lora_" in k}
    assert len(lora) == 582 and lora_module_count(transformer) == 291
    assert sum(t.numel() for t in lora.values()) == 110_483_456
    assert lora["pos_embed.proj.lora_A.default.weight"].shape == (128, 4, 2, 2)  # the patch-embedding Conv2d
    assert lora["pos_embed.proj.lora_B.default.weight"].shape == (1152, 128, 1, 1)
    assert lora["proj_out.lora_B.default.weight"].shape == (32, 128)
    assert "caption_projection.linear_1.lora_A.default.weight" in lora


def test_shipped_scheduler_gives_upstream_timesteps():
    from colorflow_core.loading_pixart import pixart_scheduler

    scheduler = pixart_scheduler(Path("/nonexistent"))  # falls back to the shipped config
    scheduler.set_timesteps(10)
    assert scheduler.timesteps.tolist() == [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]
    assert scheduler.config.algorithm_type == "dpmsolver++" and scheduler.config.beta_schedule == "linear"


# ---- factory files and strict loading --------------------------------------------------------------------

def test_factory_writes_both_styles_and_the_pixart_base(folders):
    release, pixart = folders
    for sub in ("sketch", "shading"):
        state = torch.load(release / sub / "diffusion_pytorch_model.bin", map_location="cpu", weights_only=True)
        assert len(state) == 228 and torch.equal(state["after_proj.weight"], state["adapter_linear.13.weight"])
        assert state["pos_embed.proj.weight"].shape[1] == 13
        assert json.loads((release / sub / "config.json").read_text())["cond_channels"] == 9
        lora = torch.load(release / sub / "transformer_lora.bin", map_location="cpu", weights_only=True)
        assert len(lora) == 582 and all(k.endswith((".lora_A.default.weight", ".lora_B.default.weight")) for k in lora)
        assert all(t.abs().sum() > 0 for t in lora.values())
        assert len(torch.load(release / sub / "MultiResNetModel.bin", map_location="cpu", weights_only=True)) == 258
    sketch = torch.load(release / "sketch" / "transformer_lora.bin", weights_only=True)
    shading = torch.load(release / "shading" / "transformer_lora.bin", weights_only=True)
    assert not torch.equal(sketch["proj_out.lora_B.default.weight"], shading["proj_out.lora_B.default.weight"])
    for path in ("model_index.json", "transformer/config.json", "vae/config.json", "text_encoder/config.json",
                 "tokenizer/tokenizer.json", "scheduler/scheduler_config.json"):
        assert (pixart / path).is_file()
    assert json.loads((pixart / "transformer" / "config.json").read_text())["_class_name"] == "Transformer2DModel"


def _copy_style(release: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "sketch"
    shutil.copytree(release / "sketch", folder)
    return folder


def test_guider_loads_strictly_and_drops_the_after_proj_duplicates(folders, tmp_path):
    release, _ = folders
    guider = load_pixart_guider(release / "sketch")
    stored = read_state_dict(release / "sketch" / "diffusion_pytorch_model.bin")
    own = guider.state_dict()
    assert len(own) == 226 and "after_proj.weight" not in own
    assert all(torch.equal(own[k], stored[k]) for k in own)
    assert not guider.pos_embed.pos_embed.is_meta

    folder = _copy_style(release, tmp_path)
    target = folder / "diffusion_pytorch_model.bin"
    without_alias = drop_alias_keys(stored, 14)
    torch.save(without_alias, target)
    load_pixart_guider(folder)  # the alias is optional
    cases = {
        "differs from": {**stored, "after_proj.bias": stored["after_proj.bias"] + 1},
        "Missing": {k: v for k, v in without_alias.items() if k != "adaln_single.linear.bias"},
        "Unexpected": {**stored, "adapter_linear.14.weight": stored["adapter_linear.13.weight"]},
        "size mismatch": {**stored, "pos_embed.proj.weight": torch.zeros(24, 5, 2, 2)},
    }
    for message, state in cases.items():
        torch.save(state, target)
        with pytest.raises(IncompatibleWeightsError, match=message):
            load_pixart_guider(folder)


def test_lora_is_fully_applied_and_changes_the_output(folders, sketch):
    release, pixart = folders
    transformer = sketch.pipeline.transformer
    assert lora_module_count(transformer) == 291
    stored = normalize_lora_keys(read_state_dict(release / "sketch" / "transformer_lora.bin"))
    own = {k: v for k, v in transformer.state_dict().items() if ".lora_" in k}
    assert set(own) == set(stored) and all(torch.equal(own[k], v) for k, v in stored.items())

    plain = PixArtTransformer2DModel.from_pretrained(pixart / "transformer").eval()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kwargs = dict(
        encoder_hidden_states=torch.randn(1, 5, 32), timestep=torch.tensor([500]),
        added_cond_kwargs={"resolution": torch.tensor([[64.0, 64.0]]), "aspect_ratio": torch.tensor([[1.0]])},
    )
    with torch.no_grad():
        base_out = plain(x, **kwargs).sample
        lora_out = transformer(x, **kwargs).sample
    assert not torch.allclose(base_out, lora_out, atol=1e-4)
    # The same check on a transformer whose LoRA step was skipped would fail: prove the assertion bites.
    skipped = PixArtTransformer2DModel.from_pretrained(pixart / "transformer").eval()
    assert lora_module_count(skipped) == 0
    with torch.no_grad():
        assert torch.equal(skipped(x, **kwargs).sample, base_out)


def test_lora_that_does_not_fit_fails_and_unwraps_the_model(folders):
    release, pixart = folders
    stored = read_state_dict(release / "sketch" / "transformer_lora.bin")
    partial = {k: v for k, v in stored.items() if not k.startswith("pos_embed.proj.")}
    transformer = tiny_pixart_transformer()
    keys = set(transformer.state_dict())
    with pytest.raises(IncompatibleWeightsError, match="absent from the file"):
        apply_lora(transformer, partial, targets=PIXART_LORA_TARGETS)
    assert set(transformer.state_dict()) == keys and lora_module_count(transformer) == 0
    sd_lora = read_state_dict(release / "GraySD" / "unet_lora.bin")  # the SD LoRA does not fit PixArt
    with pytest.raises(IncompatibleWeightsError, match="none of the LoRA file.s tensors match a PixArtTransformer2DModel module"):
        apply_lora(tiny_pixart_transformer(), sd_lora, targets=PIXART_LORA_TARGETS)
    renamed = {"transformer." + k.replace(".default.", "."): v for k, v in stored.items()}
    assert apply_lora(tiny_pixart_transformer(), renamed, targets=PIXART_LORA_TARGETS) == 291


# ---- injection --------------------------------------------------------------------------------------------

def test_controls_are_added_after_exactly_blocks_0_to_13():
    torch.manual_seed(0)
    transformer = tiny_pixart_transformer().eval()
    guider = tiny_pixart_guider().eval()
    x, cond = torch.randn(1, 4, 8, 8), torch.randn(1, 9, 8, 8)
    t = torch.tensor([700])
    added = {"resolution": torch.tensor([[64.0, 64.0]]), "aspect_ratio": torch.tensor([[1.0]])}
    with torch.no_grad():
        controls = guider(x, t, cond, added)
    assert len(controls) == 14 and all(c.shape == (1, 16, 24) for c in controls)
    controls = [torch.full_like(c, float(i + 1)) for i, c in enumerate(controls)]

    before, after = {}, {}
    blocks = transformer.transformer_blocks
    handles = [b.register_forward_hook(lambda m, a, o, i=i: before.__setitem__(i, o.clone())) for i, b in enumerate(blocks)]
    kwargs = dict(encoder_hidden_states=torch.randn(1, 5, 32), timestep=t, added_cond_kwargs=added)
    try:
        with torch.no_grad(), inject_controls(transformer, controls):
            handles += [b.register_forward_hook(lambda m, a, o, i=i: after.__setitem__(i, o.clone())) for i, b in enumerate(blocks)]
            transformer(x, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    assert len(blocks) == 28
    for i in range(28):
        expected = float(i + 1) if i < 14 else 0.0
        assert torch.allclose(after[i] - before[i], torch.full_like(before[i], expected)), i
    with torch.no_grad():  # hooks are gone after the block
        assert all(not b._forward_hooks for b in blocks)
        with pytest.raises(RuntimeError, match="did not consume"):
            with inject_controls(transformer, controls):
                pass


def test_micro_conditions_are_the_canvas_size_for_guider_and_transformer(sketch):
    seen = []

    def grab(module, args, kwargs):
        seen.append({k: v.clone() for k, v in kwargs["added_cond_kwargs"].items()})

    hook = sketch.pipeline.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        run(sketch, sample_canvas(64, 96))
    finally:
        hook.remove()
    assert torch.equal(seen[0]["resolution"], torch.tensor([[192.0, 128.0]] * 2))
    assert torch.equal(seen[0]["aspect_ratio"], torch.tensor([[1.5]] * 2))
    assert len(seen) == 1


# ---- sampling ---------------------------------------------------------------------------------------------

def test_same_interface_and_shared_condition_code(sketch):
    assert isinstance(sketch.pipeline, ColorFlowPixArtPipeline)
    assert ColorFlowPixArtPipeline.prepare_condition is ColorFlowSDPipeline.prepare_condition
    assert sketch.defaults.guidance_scale == 4.5 and sketch.pipeline.default_guidance_scale == 4.5
    canvas = sample_canvas(64, 64)
    a, b, c = run(sketch, canvas, 3, num_inference_steps=2), run(sketch, canvas, 3, num_inference_steps=2), run(sketch, canvas, 4)
    assert torch.equal(a.latents, b.latents) and not torch.equal(a.latents, c.latents)
    assert a.canvas.size == (128, 128) and a.query.size == (64, 64) and a.latents.shape == (1, 4, 16, 16)


def test_cfg_and_cfg_free_runs(sketch):
    canvas = sample_canvas(64, 64)
    batches = []
    hook = sketch.pipeline.transformer.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        default = run(sketch, canvas)
        free = run(sketch, canvas, guidance_scale=1.0)
    finally:
        hook.remove()
    assert batches == [2, 1]
    assert torch.equal(default.latents, run(sketch, canvas, guidance_scale=4.5).latents)
    assert torch.isfinite(free.latents).all() and not torch.equal(free.latents, default.latents)
    zero = run(sketch, canvas, guider_scale=0.0)
    assert not torch.equal(zero.latents, default.latents)


def test_prompt_embeddings_cached_and_t5_never_built_again(folders, sketch, tmp_path, monkeypatch):
    import transformers

    from colorflow_core.loading_pixart import pixart_prompt_encoder

    release, pixart = folders
    base = tmp_path / "pixart"
    shutil.copytree(pixart, base, ignore=shutil.ignore_patterns("colorflow_prompt_cache"))
    monkeypatch.setenv("COLORFLOW_CACHE", str(tmp_path / "user"))
    built = []
    original = transformers.T5EncoderModel.__init__

    def counting_init(self, *args, **kwargs):
        built.append(1)
        original(self, *args, **kwargs)

    def refuse(self, *args, **kwargs):
        raise AssertionError("T5 must not be constructed while the cache is valid")

    def fresh_pipeline():
        """What a new process gets: the same networks, a new encoder with an empty memory (only the disk cache)."""
        p = sketch.pipeline
        return ColorFlowPixArtPipeline(vae=p.vae, transformer=p.transformer, guider=p.guider, scheduler=p.scheduler,
                                       prompt_encoder=pixart_prompt_encoder(base))

    def sample(pipeline, **kwargs):
        latent_gen, posterior_gen = make_generators(0, "cpu")
        canvas = sample_canvas(64, 64)
        return pipeline(canvas.image, canvas.mask, num_inference_steps=1, generator=latent_gen,
                        posterior_generator=posterior_gen, **kwargs)

    monkeypatch.setattr(transformers.T5EncoderModel, "__init__", refuse)
    loaded = load_colorflow(release, base, style="sketch_shading", device="cpu")  # loading never builds T5
    monkeypatch.setattr(transformers.T5EncoderModel, "__init__", counting_init)
    first = sample(loaded.pipeline)
    assert built == [1] and loaded.pipeline.prompt_encoder.text_encoder_loads == 1
    assert len(list((base / "colorflow_prompt_cache").glob("t5_*.safetensors"))) == 1
    sample(loaded.pipeline, guidance_scale=1.0)  # in-memory hit
    assert built == [1]

    monkeypatch.setattr(transformers.T5EncoderModel, "__init__", refuse)
    second = fresh_pipeline()
    assert second.prompt_encoder.is_cached("manga", "")
    reference = sample(sketch.pipeline)
    assert torch.equal(sample(second).latents, reference.latents)  # same embeddings from disk as from T5
    assert not torch.equal(first.latents, reference.latents)  # (sketch_shading vs sketch weights)

    # A different tokenizer is a different cache key: T5 must run again.
    tokenizer_config = base / "tokenizer" / "tokenizer_config.json"
    tokenizer_config.write_text(tokenizer_config.read_text().replace('"model_max_length": 512', '"model_max_length": 513'))
    monkeypatch.setattr(transformers.T5EncoderModel, "__init__", counting_init)
    changed = fresh_pipeline()
    assert not changed.prompt_encoder.is_cached("manga", "")
    changed.prompt_encoder.encode("manga", "")
    assert built == [1, 1]
    assert len(list((base / "colorflow_prompt_cache").glob("t5_*.safetensors"))) == 2

    # T5 weights deleted after caching: the cached pair is still served.
    for weights in (base / "text_encoder").glob("*.safetensors"):
        weights.unlink()
    monkeypatch.setattr(transformers.T5EncoderModel, "__init__", refuse)
    assert torch.equal(fresh_pipeline().prompt_encoder.encode("manga", "").embeds, second.prompt_encoder.encode("manga").embeds)


def test_read_only_model_folder_caches_in_the_user_folder(folders, tmp_path, monkeypatch):
    from colorflow_core.pipelines.t5_prompt import T5PromptEncoder

    _, pixart = folders
    blocked = tmp_path / "blocked"
    blocked.write_text("a file, so no folder can be made here")
    encoder = T5PromptEncoder(pixart / "text_encoder", pixart / "tokenizer", cache_dirs=[blocked / "cache", tmp_path / "user"])
    found = encoder.encode("Manga ", "")
    assert found.embeds.shape == (1, 120, 32) and found.mask.shape == (1, 120) and found.mask.sum() == 2
    assert found.negative_mask.sum() == 1  # "" → just </s>
    assert len(list((tmp_path / "user").glob("t5_*.safetensors"))) == 1
    again = T5PromptEncoder(pixart / "text_encoder", pixart / "tokenizer", cache_dirs=[blocked / "cache", tmp_path / "user"])
    assert again.is_cached("manga", "") and torch.equal(again.encode("manga").embeds, found.embeds)
    assert again.text_encoder_loads == 0
    # A corrupt entry is ignored and rewritten.
    entry = next((tmp_path / "user").glob("t5_*.safetensors"))
    entry.write_bytes(b"garbage")
    third = T5PromptEncoder(pixart / "text_encoder", pixart / "tokenizer", cache_dirs=[tmp_path / "user"])
    assert torch.equal(third.encode("manga").embeds, found.embeds) and third.text_encoder_loads == 1


def test_sentencepiece_only_tokenizer_without_its_packages_is_a_clear_error(folders, tmp_path):
    import importlib.util

    from colorflow_core.pipelines.t5_prompt import T5PromptEncoder

    if importlib.util.find_spec("sentencepiece") is not None:
        pytest.skip("sentencepiece is installed")
    _, pixart = folders
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "spiece.model").write_bytes(b"\x0a\x00")
    (tokenizer / "tokenizer_config.json").write_text('{"tokenizer_class": "T5Tokenizer"}')
    encoder = T5PromptEncoder(pixart / "text_encoder", tokenizer, cache_dirs=[tmp_path / "cache"])
    with pytest.raises(IncompatibleWeightsError, match="pip install sentencepiece protobuf"):
        encoder.encode("manga")


# ---- command line -----------------------------------------------------------------------------------------

def _cli_args(folders, tmp_path, style, *extra):
    release, pixart = folders
    ref = tmp_path / "ref.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 64, 3), dtype=np.uint8)).save(ref)
    page = tmp_path / "page.png"
    Image.new("L", (64, 96), 200).save(page)
    return ["colorize", "--style", style, "--colorflow", str(release), "--base", str(pixart), "--refs", str(ref),
            "--out", str(tmp_path / "out"), "--steps", "2", "--width", "64", "--height", "96", "--device", "cpu",
            *extra, str(page)]


@pytest.mark.parametrize("style, extra", [("sketch", ["--preprocess", "none"]),
                                          ("sketch_shading", ["--preprocess", "gray", "--guidance", "1.0"]),
                                          ("sketch_shading", [])])  # the style's own line extraction + shading
def test_cli_colorizes_with_both_pixart_styles(folders, tmp_path, monkeypatch, style, extra):
    monkeypatch.setenv("COLORFLOW_CACHE", str(tmp_path / "user"))
    inter = tmp_path / "inter"
    assert main(_cli_args(folders, tmp_path, style, "--save-intermediates", str(inter), *extra)) == 0
    final = Image.open(tmp_path / "out" / "page.png")
    assert final.size == (96, 144)
    assert Image.open(inter / "page" / "icp.png").size == (128, 192)


