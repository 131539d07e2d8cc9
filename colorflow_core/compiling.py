"""torch.compile as an explicit, reversible configuration step (not a per-call option): compiled code computes the
same function, but the first call at each shape pays for compilation."""
from __future__ import annotations

from typing import Sequence

from torch import nn

#: Block classes compiled regionally: the residual-injection hooks sit on the modules around them, so hooks
#: changing every step cost no recompilation.
COMPILED_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")


def compile_models(modules: Sequence[nn.Module], **compile_kwargs) -> int:
    """torch.compile the repeated blocks (transformer blocks, resnets) of `modules` in place; return how many.

    An explicit configuration step (not a preset): the first call at each new shape pays for compilation (tens of
    seconds to minutes with inductor), later calls run the compiled code. `uncompile_models` undoes it.
    """
    count = 0
    for module in modules:
        for sub in module.modules():
            if type(sub).__name__ in COMPILED_BLOCKS and getattr(sub, "_compiled_call_impl", None) is None:
                sub.compile(**compile_kwargs)
                count += 1
    # Blocks of one class share a code object, and each width/shape is one more specialisation of it: past
    # dynamo's default limit (8) the remaining blocks would silently run eagerly.
    from torch._dynamo import config as dynamo_config

    limit = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
    setattr(dynamo_config, limit, max(getattr(dynamo_config, limit), count))
    return count


def uncompile_models(modules: Sequence[nn.Module]) -> int:
    """Undo `compile_models`: the blocks run eagerly again. Returns how many were compiled."""
    count = 0
    for module in modules:
        for sub in module.modules():
            if getattr(sub, "_compiled_call_impl", None) is not None:
                sub._compiled_call_impl = None
                count += 1
    return count
