"""Feed PixArt ColorGuider controls into a stock `PixArtTransformer2DModel` through forward hooks."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn


@contextmanager
def inject_controls(transformer: nn.Module, controls: Sequence[torch.Tensor]) -> Iterator[None]:
    """Within the block, the next transformer forward adds `controls[i]` to the output of transformer block i.

    This is ColorFlow's `control_list`: blocks 0..len(controls)-1 get a control (scale 1, added after the
    block), later blocks run untouched. Each control is used once; leaving the block with unused controls
    (the forward did not run, or ran partly) is an error.
    """
    blocks = transformer.transformer_blocks
    if len(controls) > len(blocks):
        raise ValueError(f"guider gives {len(controls)} controls; this transformer has only {len(blocks)} blocks")
    used = [False] * len(controls)

    def make_hook(index: int):
        def hook(module, args, output):
            if used[index]:
                raise RuntimeError(f"transformer block {index} ran twice inside inject_controls")
            used[index] = True
            return output + controls[index].to(output.dtype)

        return hook

    handles = [blocks[i].register_forward_hook(make_hook(i)) for i in range(len(controls))]
    try:
        yield
        if not all(used):
            raise RuntimeError("the transformer forward inside inject_controls did not consume every control")
    finally:
        for handle in handles:
            handle.remove()
