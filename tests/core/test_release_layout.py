"""The real release key layout, built on the meta device at full SD1.5 size (no weights needed)."""
from __future__ import annotations

import json

import torch
from diffusers import UNet2DConditionModel

from colorflow_core.models import ColorGuiderSDModel, MultiHiddenResNetModel
from colorflow_core.models.lora import SD_LORA_TARGETS
from peft import LoraConfig

#: GraySD/config.json as released (diffusers formatting aside).
RELEASED_GUIDER_CONFIG = {
    "_class_name": "ColorGuiderSDModel", "_diffusers_version": "0.27.0.dev0", "act_fn": "silu",
    "addition_embed_type": None, "addition_embed_type_num_heads": 64, "addition_time_embed_dim": None,
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "brushnet_conditioning_channel_order": "rgb",
    "class_embed_type": None, "conditioning_channels": 9, "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "cross_attention_dim": 768, "down_block_types": ["SelfAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "downsample_padding": 1, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True,
    "freq_shift": 0, "global_pool_conditions": False, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DSelfAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "projection_class_embeddings_input_dim": None, "resnet_time_scale_shift": "default",
    "transformer_layers_per_block": 1, "up_block_types": ["UpBlock2D"] + ["SelfAttnUpBlock2D"] * 3,
    "upcast_attention": False, "use_linear_projection": False,
}


def test_released_guider_config_gives_626_tensors_and_the_released_parameter_count():
    assert len(RELEASED_GUIDER_CONFIG) == 35
    with torch.device("meta"):
        guider = ColorGuiderSDModel.from_config(RELEASED_GUIDER_CONFIG)
    state = guider.state_dict()
    assert len(state) == 626
    assert sum(t.numel() for t in state.values()) == 842_093_440
    assert state["conv_in_condition.weight"].shape == (320, 13, 3, 3)
    assert state["brushnet_up_blocks.14.weight"].shape == (320, 320, 1, 1)
    assert not any(".attn2." in key for key in state)


def test_released_fusion_net_has_258_tensors():
    with torch.device("meta"):
        fusion = MultiHiddenResNetModel(channels_list=(128, 128, 256, 512, 512))
    state = fusion.state_dict()
    assert len(state) == 258
    assert sum(t.numel() for t in state.values()) == 85_014_571
    assert MultiHiddenResNetModel.channels_from_state_dict(state) == [128, 128, 256, 512, 512]


def test_lora_targets_cover_the_160_released_modules_of_sd15():
    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768)
        unet.add_adapter(LoraConfig(r=64, lora_alpha=64, target_modules=list(SD_LORA_TARGETS)))
    lora = {k: v for k, v in unet.state_dict().items() if ".lora_" in k}
    assert len(lora) == 320
    assert sum(t.numel() for t in lora.values()) == 23_937_024


def test_factory_writes_the_release_layout(tiny_release):
    release, base = tiny_release
    config = json.loads((release / "GraySD" / "config.json").read_text())
    assert set(config) == set(RELEASED_GUIDER_CONFIG)
    assert config["conditioning_channels"] == 9
    from safetensors.torch import load_file

    assert len(load_file(str(release / "GraySD" / "diffusion_pytorch_model.safetensors"))) == 626
    lora = torch.load(release / "GraySD" / "unet_lora.bin", map_location="cpu", weights_only=True)
    assert len(lora) == 320 and all(k.endswith((".lora_A.default.weight", ".lora_B.default.weight")) for k in lora)
    assert all(t.abs().sum() > 0 for t in lora.values())
    assert len(torch.load(release / "GraySD" / "MultiResNetModel.bin", map_location="cpu", weights_only=True)) == 258
    for path in ("image_encoder/config.json", "image_encoder/model.safetensors"):
        assert (release / path).is_file()
    for path in ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                 "tokenizer/vocab.json", "scheduler/scheduler_config.json"):
        assert (base / path).is_file()
