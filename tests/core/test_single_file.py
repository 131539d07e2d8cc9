"""SD1.5 base from one original-layout checkpoint (ComfyUI's models/checkpoints/*.safetensors), offline and strict."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel, UniPCMultistepScheduler
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from colorflow_core import single_file
from colorflow_core.errors import IncompatibleWeightsError, MissingWeightsError
from colorflow_core.loading import load_colorflow
from colorflow_core.single_file import SD15_CONFIGS, load_clip_tokenizer, load_sd15_single_file

from colorflow_core.ldm_layout import sd_to_ldm, unet_to_ldm, vae_to_ldm


@pytest.fixture(scope="module")
def tiny_parts(tiny_release):
    """The tiny base's models (diffusers folder), their LDM state dict, and the folder (also a valid config_dir)."""
    _, base = tiny_release
    unet = UNet2DConditionModel.from_pretrained(base / "unet").eval()
    vae = AutoencoderKL.from_pretrained(base / "vae").eval()
    text = CLIPTextModel.from_pretrained(base / "text_encoder", dtype=torch.float32).eval()
    for model in (unet, vae, text):  # from_pretrained leaves weights in the (unaligned) file map; the loader copies
        for param in model.parameters():  # them out. CPU matmuls differ by ~1e-7 with alignment, so align both sides.
            param.data = param.data.clone()
    return unet, vae, text, sd_to_ldm(unet, vae, text), base


@pytest.fixture(scope="module")
def tiny_file(tiny_parts, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny-sd15.safetensors"
    save_file(tiny_parts[3], str(path))
    return path


def _write(tmp_path: Path, state: dict[str, torch.Tensor], name: str = "model.safetensors") -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / name))
    return tmp_path / name


def test_ldm_helper_inverts_diffusers_converters(tiny_parts):
    unet, vae, *_ = tiny_parts
    state = unet.state_dict()
    back = convert_ldm_unet_checkpoint(unet_to_ldm(state, 2, 4), dict(unet.config))
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    state = vae.state_dict()
    back = convert_ldm_vae_checkpoint(vae_to_ldm(state, 4), dict(vae.config))
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


def test_tiny_single_file_gives_identical_models(tiny_parts, tiny_file):
    unet, vae, text, _, base = tiny_parts
    parts = load_sd15_single_file(tiny_file, config_dir=base)
    assert set(parts) == {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}
    assert isinstance(parts["scheduler"], UniPCMultistepScheduler)
    for model in (parts["unet"], parts["vae"], parts["text_encoder"]):
        assert not model.training and {p.dtype for p in model.parameters()} == {torch.float32}
        assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    g = torch.Generator().manual_seed(0)
    latents, states = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 32, generator=g)
    image = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    ids = parts["tokenizer"]("a girl", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(parts["unet"](latents, 10, states).sample, unet(latents, 10, states).sample)
        assert torch.equal(parts["vae"].encode(image).latent_dist.mean, vae.encode(image).latent_dist.mean)
        assert torch.equal(parts["vae"].decode(latents).sample, vae.decode(latents).sample)
        assert torch.equal(parts["text_encoder"](ids)[0], text(ids)[0])


def test_fp16_file_loads_as_fp32_and_ema_weights_win(tiny_parts, tmp_path):
    unet, *_, state, base = tiny_parts
    half = {k: v.half() for k, v in state.items()}
    for key in [k for k in state if k.startswith("model.diffusion_model.")]:  # a full file: EMA twins, flat names
        half["model_ema." + "".join(key.split(".")[1:])] = (state[key] + 1).half()
    parts = load_sd15_single_file(_write(tmp_path, half), config_dir=base)
    assert parts["vae"].dtype == torch.float32 and parts["text_encoder"].dtype == torch.float32
    loaded = parts["unet"].state_dict()
    assert all(torch.equal(loaded[k], (v + 1).half().float()) for k, v in unet.state_dict().items())


def test_ckpt_pickle_is_read_safely(tiny_parts, tmp_path):
    unet, *_, state, base = tiny_parts
    torch.save({"state_dict": state, "global_step": 840000}, tmp_path / "model.ckpt")
    loaded = load_sd15_single_file(tmp_path / "model.ckpt", config_dir=base)["unet"].state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in unet.state_dict().items())


def test_shipped_configs_build_real_sd15_sizes():
    def config(sub: str) -> dict:
        return json.loads((SD15_CONFIGS / sub / "config.json").read_text())

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config("unet"))
        vae = AutoencoderKL.from_config(config("vae"))
        text = CLIPTextModel(CLIPTextConfig.from_json_file(str(SD15_CONFIGS / "text_encoder" / "config.json")))
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    assert (count(unet), count(vae), count(text)) == (859_520_964, 83_653_863, 123_060_480)
    # The LDM key layout of the real sizes maps back onto the models exactly (diffusers' converters, meta tensors).
    assert set(convert_ldm_unet_checkpoint(unet_to_ldm(unet.state_dict(), 2, 4), config("unet"))) == set(unet.state_dict())
    assert set(convert_ldm_vae_checkpoint(vae_to_ldm(vae.state_dict(), 4), config("vae"))) == set(vae.state_dict())
    # The shipped configs agree with what diffusers infers from the original v1-inference.yaml.
    original = {"model": {"params": {"scale_factor": 0.18215, "unet_config": {"params": {
        "in_channels": 4, "out_channels": 4, "model_channels": 320, "attention_resolutions": [4, 2, 1],
        "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4], "num_heads": 8, "transformer_depth": 1, "context_dim": 768}},
        "first_stage_config": {"params": {"ddconfig": {"z_channels": 4, "in_channels": 3, "out_ch": 3, "ch": 128,
                                                        "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2}}}}}}
    v1 = {"model.diffusion_model.output_blocks.11.0.skip_connection.weight": torch.zeros(1)}
    for inferred, model in ((create_unet_diffusers_config_from_ldm(original, v1), unet),
                            (create_vae_diffusers_config_from_ldm(original, v1), vae)):
        with torch.device("meta"):
            twin = type(model).from_config(inferred)
        assert {k: tuple(v.shape) for k, v in twin.state_dict().items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert twin.config.sample_size == model.config.sample_size


def test_real_clip_tokenizer_from_open_clip_bpe():
    tokenizer = load_clip_tokenizer()
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77
    assert tokenizer("a girl with red hair").input_ids == [49406, 320, 1611, 593, 736, 2225, 49407]
    assert tokenizer("A Girl, with RED hair!!  ").input_ids == [49406, 320, 1611, 267, 593, 736, 2225, 748, 49407]


def test_missing_open_clip_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(single_file, "find_spec", lambda name: None)
    with pytest.raises(MissingWeightsError, match="pip install open_clip_torch"):
        load_clip_tokenizer()


def _sd15_like(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Just the UNet marker keys an SD1.5 file has (shapes of the tiny model)."""
    return {k: v for k, v in state.items() if "input_blocks.0.0" in k or "input_blocks.1.1.transformer_blocks.0.attn2.to_k" in k}


@pytest.mark.parametrize("case, error, match", [
    ("sdxl", IncompatibleWeightsError, "is an SDXL checkpoint"),
    ("sd2", IncompatibleWeightsError, "SD 2.x"),
    ("inpainting", IncompatibleWeightsError, "inpainting"),
    ("unet_only", IncompatibleWeightsError, "no VAE weights"),
    ("diffusers_unet", IncompatibleWeightsError, "diffusers-format component"),
    ("random_keys", IncompatibleWeightsError, "not a Stable Diffusion 1.5 checkpoint"),
    ("garbage", IncompatibleWeightsError, "cannot read checkpoint"),
    ("missing_tensor", IncompatibleWeightsError, "UNet in model.safetensors does not fit SD1.5: 1 weights missing"),
    ("wrong_shape", IncompatibleWeightsError, "VAE in model.safetensors does not fit SD1.5: 'encoder.conv_in.weight'"),
    ("absent", MissingWeightsError, "model.safetensors"),
])
def test_wrong_files_say_what_they_are(tiny_parts, tmp_path, case, error, match):
    unet, *_, state, base = tiny_parts
    path = tmp_path / "model.safetensors"
    if case == "sdxl":
        _write(tmp_path, {**_sd15_like(state), "conditioner.embedders.1.model.positional_embedding": torch.zeros(77, 8)})
    elif case == "sd2":
        _write(tmp_path, {**state, "cond_stage_model.model.token_embedding.weight": torch.zeros(4, 8)})
    elif case == "inpainting":
        key = "model.diffusion_model.input_blocks.0.0.weight"
        _write(tmp_path, {**state, key: torch.zeros(16, 9, 3, 3)})
    elif case == "unet_only":
        _write(tmp_path, {k: v for k, v in state.items() if k.startswith("model.diffusion_model.")})
    elif case == "diffusers_unet":
        _write(tmp_path, unet.state_dict())
    elif case == "random_keys":
        _write(tmp_path, {"foo.weight": torch.zeros(3)})
    elif case == "garbage":
        path.write_bytes(b"\x00" * 64)
    elif case == "missing_tensor":
        _write(tmp_path, {k: v for k, v in state.items() if k != "model.diffusion_model.out.2.bias"})
    elif case == "wrong_shape":
        _write(tmp_path, {**state, "first_stage_model.encoder.conv_in.weight": torch.zeros(8, 3, 1, 1)})
    with pytest.raises(error, match=match):
        load_sd15_single_file(path, config_dir=base)


def test_load_colorflow_from_a_single_file(tiny_release, tiny_file, tiny_model):
    release, base = tiny_release
    model = load_colorflow(release, tiny_file, base_config=base)
    reference = tiny_model.pipeline
    for name in ("unet", "vae", "text_encoder"):
        mine, theirs = getattr(model.pipeline, name).state_dict(), getattr(reference, name).state_dict()
        assert set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in theirs), name
    assert any(".lora_A.default." in k for k in model.pipeline.unet.state_dict())  # LoRA applied as for a folder
    assert model.pipeline.tokenizer("a girl").input_ids == reference.tokenizer("a girl").input_ids
    with pytest.raises(MissingWeightsError, match="nowhere.safetensors"):
        load_colorflow(release, tiny_file.parent / "nowhere.safetensors", base_config=base)
