"""Tiny random parts both model families' test weights share: the seeded fill, the SD-shaped VAE, the fusion net."""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL

from .models.fusion import MultiHiddenResNetModel

VAE_BLOCKS = (8, 16, 32, 32)


def randomize_(tensor: torch.Tensor, scale: float, generator: torch.Generator) -> None:
    """Fill `tensor` in place with N(0, scale²) values drawn from `generator`."""
    tensor.copy_(torch.randn(tensor.shape, generator=generator) * scale)


def tiny_vae() -> AutoencoderKL:
    """An SD-shaped VAE (scale factor 8) at tiny widths."""
    return AutoencoderKL(
        block_out_channels=VAE_BLOCKS,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        scaling_factor=0.18215,
    )


def write_tiny_fusion(folder: Path, vae_blocks: tuple[int, ...], generator: torch.Generator) -> None:
    """`folder/MultiResNetModel.bin` for a VAE with `vae_blocks`, with non-trivial BatchNorm statistics."""
    fusion = MultiHiddenResNetModel(channels_list=(vae_blocks[0], *vae_blocks))
    with torch.no_grad():
        for name, buffer in fusion.named_buffers():
            if name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0, generator=generator)
            elif name.endswith("running_mean"):
                randomize_(buffer, 0.1, generator)
    torch.save(fusion.state_dict(), folder / "MultiResNetModel.bin")
