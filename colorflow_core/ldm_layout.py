"""Write diffusers SD models back in the original LDM/CompVis single-file key layout.

diffusers only ships the LDM→diffusers direction; this is its inverse for SD1.5-shaped models (the tests check the
round trip through diffusers' own converters), so tiny single-file checkpoints (and ComfyUI's `models/` tree of
`make-tiny --comfyui`) can be made without the 4 GB file.
"""
from __future__ import annotations

import re

import torch

_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
           ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str) -> str:
    for new, old in _RESNET:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    raise KeyError(rest)


def _unet_name(key: str, state: dict[str, torch.Tensor], layers_per_block: int) -> str:
    """The LDM name (input/middle/output_blocks numbering) of one diffusers UNet key."""
    per = layers_per_block + 1
    module, _, leaf = key.rpartition(".")
    if module in _UNET_FIXED:
        return f"{_UNET_FIXED[module]}.{leaf}"
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + block * per + layer
        return f"input_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{index}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * per + layers_per_block}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        kind, layer, rest = m[1], int(m[2]), m[3]
        return f"middle_block.{2 * layer}.{_resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = block * per + layer
        return f"output_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{index}.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        block = int(m[1])
        has_attention = any(k.startswith(f"up_blocks.{block}.attentions.") for k in state)
        return f"output_blocks.{block * per + layers_per_block}.{2 if has_attention else 1}.conv.{m[2]}"
    raise KeyError(f"no LDM name for UNet key {key}")


def unet_to_ldm(state: dict[str, torch.Tensor], layers_per_block: int, num_blocks: int) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel keys → `model.diffusion_model.*` (input/middle/output_blocks)."""
    per = layers_per_block + 1
    out = {"model.diffusion_model." + _unet_name(key, state, layers_per_block): tensor for key, tensor in state.items()}
    assert num_blocks * per == sum(1 for k in out if re.search(r"output_blocks\.\d+\.0\.in_layers\.0\.weight$", k))
    return out


def controlnet_to_ldm(state: dict[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    """diffusers ControlNetModel keys → the original `control_model.*` layout (input_hint_block, zero_convs,
    middle_block_out), the one ComfyUI's ControlNet loader detects for any UNet width."""
    out = {}
    for key, tensor in state.items():
        module, _, leaf = key.rpartition(".")
        if m := re.fullmatch(r"controlnet_down_blocks\.(\d+)", module):
            name = f"zero_convs.{m[1]}.0.{leaf}"
        elif module == "controlnet_mid_block":
            name = f"middle_block_out.0.{leaf}"
        elif module == "controlnet_cond_embedding.conv_in":
            name = f"input_hint_block.0.{leaf}"
        elif m := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)", module):
            name = f"input_hint_block.{2 + 2 * int(m[1])}.{leaf}"
        elif module == "controlnet_cond_embedding.conv_out":
            name = f"input_hint_block.{2 + 2 * sum(k.endswith('.weight') and '.blocks.' in k for k in state)}.{leaf}"
        else:
            name = _unet_name(key, state, layers_per_block)
        out["control_model." + name] = tensor.contiguous()
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], num_blocks: int) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL keys → `first_stage_model.*`; attention projections become 1×1 convs, as in LDM files."""
    out = {}
    for key, tensor in state.items():
        side, _, rest = key.partition(".")
        if side in ("quant_conv", "post_quant_conv"):
            out[f"first_stage_model.{key}"] = tensor
            continue
        rest = rest.replace("conv_norm_out.", "norm_out.")
        if m := re.match(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
            block = int(m[2]) if m[1] == "down" else num_blocks - 1 - int(m[2])
            rest = f"{m[1]}.{block}.block.{m[3]}.{m[4].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.(.+)", rest):
            rest = f"down.{m[1]}.downsample.{m[2]}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", rest):
            rest = f"up.{num_blocks - 1 - int(m[1])}.upsample.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)", rest):
            rest = f"mid.block_{int(m[1]) + 1}.{m[2]}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.+)\.(weight|bias)", rest):
            rest = f"mid.attn_1.{_VAE_ATTN[m[1]]}.{m[2]}"
            if m[1] != "group_norm" and tensor.ndim == 2:
                tensor = tensor[:, :, None, None]
        out[f"first_stage_model.{side}.{rest}"] = tensor
    return out


def clip_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel keys (flattened or `text_model.`-prefixed) → `cond_stage_model.transformer.text_model.*`."""
    return {"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v for k, v in state.items()}


def sd_to_ldm(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    """One LDM-layout state dict of the three models (tensors shared, made contiguous for safetensors)."""
    state = unet_to_ldm(unet.state_dict(), unet.config.layers_per_block, len(unet.config.block_out_channels))
    state |= vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels))
    state |= clip_to_ldm({k: v for k, v in text_encoder.state_dict().items() if not k.endswith("position_ids")})
    return {k: v.contiguous() for k, v in state.items()}
