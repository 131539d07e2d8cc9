"""Which scaled-dot-product-attention kernel the heavy stages use on a GPU: a scoped choice, never a global switch.

Half of a denoising step at the upstream sizes is the top-level self-attention (25,600 tokens, 8 heads of dim 40).
PyTorch's default order tries its flash kernel first, which runs d40 on its d64 tiles; cuDNN's fused attention
(Hopper) computes the same function about twice as fast there. `fastest_attention` puts cuDNN first for the block
and falls back in PyTorch's usual order (flash, memory-efficient, math) wherever cuDNN refuses the inputs (e.g. the
VAE's single 512-wide head). Outside the block the host's own setting (ComfyUI's, a user's) is back unchanged.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

#: The kernels tried on CUDA, fastest first (measured on an H200, fp16, [2, 8, 25600, 40]: cuDNN 5.7 ms,
#: flash 10.3 ms, memory-efficient 20.3 ms).
CUDA_ORDER = (
    SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH,
)


def fastest_attention(device: torch.device | str) -> ContextManager:
    """For the block, SDPA on `device` picks its kernels in `CUDA_ORDER` (CUDA only; elsewhere nothing changes)."""
    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel(list(CUDA_ORDER), set_priority=True)


def backend_for(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> str:
    """The name of the SDPA kernel PyTorch would run for these inputs under the settings in force (e.g. "FLASH_ATTENTION")."""
    return SDPBackend(torch._fused_sdp_choice(query, key, value)).name


def top_level_backend(device: torch.device | str, dtype: torch.dtype, tokens: int, heads: int = 8, head_dim: int = 40,
                      batch: int = 2) -> str:
    """The kernel the UNet's and guider's top-level self-attention gets inside `fastest_attention` (laid out as
    diffusers' processors pass it: a transposed view of [batch, tokens, heads·dim])."""
    device = torch.device(device)
    states = torch.empty(batch, tokens, heads * head_dim, device=device, dtype=dtype)
    q = states.view(batch, tokens, heads, head_dim).transpose(1, 2)
    with fastest_attention(device):
        return backend_for(q, q, q)

