"""Where ColorFlow adds each ColorGuider residual in an SD1.5 UNet, in the LDM block numbering that single-file
checkpoints (and UNets built from them) use, and the residuals of one model call.

LDM numbering: `input_blocks[0]` is conv_in, every later input block is one resnet(+attention) pair or one
downsampler; the middle block is resnet → attention → resnet; every output block is one resnet(+attention) pair,
the last of each level followed by its upsampler. The release adds residuals (`colorflow-upstream.md` §4.4):
- down 0 to conv_in's output *after* it was stored as the first skip (that skip stays clean);
- down k ≥ 1 to input block k's output, before it is stored as a skip;
- mid to the middle block's output;
- up: to every output block's resnet(+attention) output (inside the block, before its upsampler where it has
  one), and to the upsampler's output.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import InvalidInputError
from .color_guider import ColorGuiderSDModel, GuiderResiduals

Part = Literal["input", "middle", "output"]
#: "after_skip": added after the block's output was stored as a skip; "before_skip": added before it is stored;
#: "before_upsample": added inside the output block, between its last layer and its upsampler; "end": added to the
#: block's output.
Moment = Literal["after_skip", "before_skip", "before_upsample", "end"]


@dataclass(frozen=True)
class ResidualSite:
    """One place a guider residual is added: a block of the LDM UNet and the moment within it."""

    part: Part
    block: int
    moment: Moment


@dataclass(frozen=True)
class ResidualLayout:
    """The sites of the guider's down, mid and up residuals, in the order the guider returns them."""

    down: tuple[ResidualSite, ...]
    mid: ResidualSite
    up: tuple[ResidualSite, ...]

    def sites(self) -> list[ResidualSite]:
        """All sites in the guider's output order (down, mid, up)."""
        return [*self.down, self.mid, *self.up]


def residual_layout(levels: int, layers_per_block: int) -> ResidualLayout:
    """The sites for an SD-style UNet with `levels` resolutions and `layers_per_block` resnets per down level
    (SD1.5: 4 and 2 → 12 down, 1 mid, 15 up)."""
    down = [ResidualSite("input", 0, "after_skip")]
    block = 0
    for level in range(levels):
        layers = layers_per_block + (0 if level == levels - 1 else 1)  # + the downsampler, except at the bottom
        for _ in range(layers):
            block += 1
            down.append(ResidualSite("input", block, "before_skip"))
    up = []
    per_level = layers_per_block + 1
    for level in range(levels):
        for layer in range(per_level):
            index = level * per_level + layer
            has_upsampler = layer == per_level - 1 and level != levels - 1
            up.append(ResidualSite("output", index, "before_upsample" if has_upsampler else "end"))
            if has_upsampler:
                up.append(ResidualSite("output", index, "end"))
    return ResidualLayout(tuple(down), ResidualSite("middle", 0, "end"), tuple(up))


def guider_layout(guider: ColorGuiderSDModel) -> ResidualLayout:
    """The residual sites of `guider` (its UNet must have the same levels and layers per block)."""
    layout = residual_layout(len(guider.config.block_out_channels), guider.config.layers_per_block)
    if len(layout.down) != len(guider.brushnet_down_blocks) or len(layout.up) != len(guider.brushnet_up_blocks):
        raise InvalidInputError(
            f"guider gives {len(guider.brushnet_down_blocks)} down / {len(guider.brushnet_up_blocks)} up residuals, "
            f"its config implies {len(layout.down)} / {len(layout.up)}"
        )
    return layout


@torch.no_grad()
def guider_residuals(
    guider: ColorGuiderSDModel,
    condition: torch.Tensor,
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    context: torch.Tensor | None = None,
    scale: float = 1.0,
) -> GuiderResiduals:
    """The 12 + 1 + 15 residuals for one UNet call on `sample` at `timestep`, in the guider's dtype, returned in
    `sample`'s dtype. `condition` (9 channels: reference latents, keep-mask, query latents) has one row per sample
    row or a single row for all; `context` (the text states) is accepted because the release passes it, but no
    guider layer reads it."""
    del context
    if condition.shape[-2:] != sample.shape[-2:]:
        raise InvalidInputError(
            f"the canvas condition is {condition.shape[-1]}x{condition.shape[-2]} latents but the sampled latent is "
            f"{sample.shape[-1]}x{sample.shape[-2]}: sample the LATENT of the canvas size"
        )
    if condition.shape[0] not in (1, sample.shape[0]):
        raise InvalidInputError(f"condition has {condition.shape[0]} rows for {sample.shape[0]} samples")
    dtype = guider.dtype
    condition = condition.to(sample.device, dtype).expand(sample.shape[0], -1, -1, -1)
    if torch.is_tensor(timestep):
        timestep = timestep.to(sample.device)
    residuals = guider(sample.to(dtype), timestep, condition, conditioning_scale=scale)
    cast = lambda t: t.to(sample.dtype)  # noqa: E731
    return GuiderResiduals([cast(t) for t in residuals.down], cast(residuals.mid), [cast(t) for t in residuals.up])
