"""The ControlNet that `make-tiny --comfyui` writes is in the original layout, which diffusers' own converter reads back."""
from __future__ import annotations

import torch
from diffusers import ControlNetModel
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

from colorflow_core.ldm_layout import controlnet_to_ldm
from colorflow_core.tiny import tiny_unet


def test_controlnet_layout_round_trips_through_diffusers():
    torch.manual_seed(0)
    unet = tiny_unet()
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 32, 64))
    state = controlnet.state_dict()
    ldm = controlnet_to_ldm(state, unet.config.layers_per_block)
    names = set(ldm)
    assert {"control_model.input_hint_block.0.weight", "control_model.input_hint_block.14.weight",
            "control_model.zero_convs.11.0.weight", "control_model.middle_block_out.0.weight",
            "control_model.input_blocks.0.0.weight", "control_model.time_embed.0.weight"} <= names
    back = convert_controlnet_checkpoint(ldm, dict(controlnet.config))
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)
