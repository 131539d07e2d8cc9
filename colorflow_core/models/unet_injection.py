"""Feed ColorGuider residuals into a stock `UNet2DConditionModel` through forward hooks."""
from __future__ import annotations

from collections import deque
from contextlib import contextmanager
from typing import Iterator

import torch
from diffusers import UNet2DConditionModel

from .color_guider import GuiderResiduals


def _add_to_output(queue: deque):
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (output[0] + queue.popleft(),) + tuple(output[1:])
        return output + queue.popleft()

    return hook


def _block_hook_targets(block) -> list[torch.nn.Module]:
    """Modules after which the fork adds a residual: each resnet(+attention) pair, then the resampler."""
    attentions = getattr(block, "attentions", None)
    layers = list(attentions) if attentions is not None and len(attentions) else list(block.resnets)
    resamplers = getattr(block, "downsamplers", None) or getattr(block, "upsamplers", None) or []
    return layers + list(resamplers[:1])


@contextmanager
def inject_guider_residuals(unet: UNet2DConditionModel, residuals: GuiderResiduals) -> Iterator[None]:
    """Within the block, the next UNet forward adds the residuals exactly where ColorFlow's fork does.

    The first down residual is added to the conv_in output after it was stored as the first skip
    (so the skip stays clean); every later one is added before the block stores its skip.
    """
    down = deque(residuals.down)
    up = deque(residuals.up)
    mid = deque([residuals.mid])
    first = down.popleft()

    def add_first(module, args, kwargs):
        kwargs["hidden_states"] = kwargs["hidden_states"] + first
        return args, kwargs

    down_targets = [m for block in unet.down_blocks for m in _block_hook_targets(block)]
    up_targets = [m for block in unet.up_blocks for m in _block_hook_targets(block)]
    if len(down_targets) != len(down) or len(up_targets) != len(up):
        raise ValueError(
            f"guider gives {len(residuals.down)} down / {len(residuals.up)} up residuals; "
            f"this UNet takes {len(down_targets) + 1} / {len(up_targets)}"
        )
    handles = [unet.down_blocks[0].register_forward_pre_hook(add_first, with_kwargs=True)]
    try:
        handles += [m.register_forward_hook(_add_to_output(down)) for m in down_targets]
        handles.append(unet.mid_block.register_forward_hook(_add_to_output(mid)))
        handles += [m.register_forward_hook(_add_to_output(up)) for m in up_targets]
        yield
        if down or up or mid:
            raise RuntimeError("the UNet forward inside inject_guider_residuals did not consume every residual")
    finally:
        for handle in handles:
            handle.remove()
