"""What both model families' tiny test weights share: the folder guard, the seeded fill, the SD-shaped VAE, the fusion net."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from .errors import InvalidInputError
from .models.fusion import MultiHiddenResNetModel

VAE_BLOCKS = (8, 16, 32, 32)
#: Written first into every folder make-tiny creates: the only folders it will ever delete and rewrite.
TINY_MARKER = ".colorflow-tiny"


def check_tiny_folder(path: Path) -> None:
    """Refuse a `path` that exists and was not written by make-tiny (a downloaded release, say)."""
    if path.exists() and not (path / TINY_MARKER).is_file():
        raise InvalidInputError(
            f"'{path}' already exists and was not written by make-tiny; nothing was changed: give a new or empty folder"
        )


def claim_tiny_folder(path: Path) -> None:
    """Empty `path` for tiny weights: create it, or clear it when make-tiny wrote it; refuse any other folder."""
    check_tiny_folder(path)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    (path / TINY_MARKER).write_text("tiny random weights written by `python -m colorflow_core make-tiny`\n")


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
