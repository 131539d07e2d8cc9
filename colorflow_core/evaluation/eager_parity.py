"""The GPU path of a page against upstream-style eager kernels on the same model, page and seed.

Upstream ran every network in NCHW with torch's own GroupNorm and SDPA choice. The faster path (channels_last
weights for the page-size nets, `gpu_kernels.fast_kernels`) computes the same functions with other roundings; this
measures by how much (PSNR of the final page, the ICP canvas and the low-res page). On the CPU both paths are the same.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from ..gpu_kernels import upstream_kernels
from ..retrieval import ReferencePool
from ..sequence import colorize_page
from .bench.presets import image_psnr


@contextlib.contextmanager
def contiguous_weights(modules) -> Iterator[int]:
    """For the block, the modules whose conv weights are channels_last hold them NCHW; yields how many."""
    converted = []
    for module in modules:
        first = next((p for p in module.parameters() if p.dim() == 4), None)
        if first is not None and not first.is_contiguous() and first.is_contiguous(memory_format=torch.channels_last):
            module.to(memory_format=torch.contiguous_format)
            converted.append(module)
    try:
        yield len(converted)
    finally:
        for module in converted:
            module.to(memory_format=torch.channels_last)


def eager_parity(model: Any, references: list, page: Any, options: Any) -> dict:
    """PSNR (dB) of the page under `model`'s kernels against the same page with upstream's (inf = identical)."""
    def run():
        pool = ReferencePool(model.encoder)
        pool.add(references)
        return colorize_page(model, page, pool, options)

    fast = run()
    modules = [m for group in model.run_modules().values() for m in group]
    with upstream_kernels(), contiguous_weights(modules) as count:
        eager = run()
    return {
        "final_db": image_psnr(fast.final, eager.final),
        "icp_canvas_db": image_psnr(fast.icp.canvas, eager.icp.canvas),
        "lowres_db": image_psnr(fast.lowres, eager.lowres),
        "nets_made_nchw": count,
    }
