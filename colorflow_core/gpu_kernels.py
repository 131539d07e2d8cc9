"""Faster kernels for the heavy stages on a GPU, chosen for the duration of a call: never a global switch.

* Attention: half of a denoising step at the upstream sizes is the top-level self-attention (25,600 tokens, 8 heads
  of dim 40). Flash runs d40 on its d64 tiles; cuDNN's fused attention computes the same function about twice as
  fast there (H200, fp16, [2, 8, 25600, 40]: cuDNN 5.4 ms, flash 10.3 ms, memory-efficient 20.7 ms). torch 2.11
  already tries cuDNN first for these inputs; `fastest_attention` makes that order explicit for the block (and for
  torch versions that try flash first), falling back in PyTorch's usual order wherever cuDNN refuses the inputs
  (the VAE's single 512-wide head runs the memory-efficient kernel).
* GroupNorm: PyTorch's CUDA kernel reduces each (sample, group) row with one thread block, so a batch-1 VAE map
  (32 groups × 6.5 M values at 1024×1600) keeps 32 of 132 SMs busy: 5.9 ms for GroupNorm + SiLU of one
  128-channel map (0.3 TB/s); GroupNorm was 20 % of a page's GPU time. `group_norm` computes the same function with
  PyTorch's own reductions (float32 statistics, one fused float32 affine with a single rounding) and keeps
  channels_last tensors channels_last (PyTorch's kernel returns them contiguous, so the next conv transposes again).
  It replaces torch's kernel for large rows only (`LARGE_ROWS`: the VAE and GSRP at page size).

Outside the block the host's own settings (ComfyUI's, a user's) and the modules' own forwards are back unchanged.
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import ContextManager, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

#: The kernels tried on CUDA, fastest first.
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



#: Largest float32 copy (elements) `group_norm` makes at once for its statistics: groups are reduced in chunks.
STATS_CHUNK = 1 << 26


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float) -> torch.Tensor:
    """`F.group_norm` with float32 statistics from PyTorch's multi-block reductions, for contiguous or channels-last
    (also transposed [B, C, N]) inputs; the output has the input's layout and dtype. Other layouts use `F.group_norm`."""
    b, c = x.shape[:2]
    per = c // num_groups
    if x.is_contiguous():
        grouped, axis, dims = x.view(b, num_groups, -1), 1, (2,)
    elif x.movedim(1, -1).is_contiguous():  # channels_last, or [B, C, N] transposed from [B, N, C]
        grouped, axis, dims = x.movedim(1, -1).reshape(b, -1, num_groups, per), 2, (1, 3)
    else:
        return F.group_norm(x, num_groups, weight, bias, eps)
    chunk = max(1, STATS_CHUNK // max(1, x.numel() // num_groups))
    stats = [torch.var_mean(part.float(), dim=dims, correction=0) for part in grouped.split(chunk, dim=axis)]
    var, mean = torch.cat([v for v, _ in stats], dim=1), torch.cat([m for _, m in stats], dim=1)
    scale = (var + eps).rsqrt().repeat_interleave(per, dim=1)
    shift = -mean.repeat_interleave(per, dim=1) * scale
    if weight is not None:
        scale, shift = scale * weight, shift * weight
    if bias is not None:
        shift = shift + bias
    shape = (b, c) + (1,) * (x.dim() - 2)
    # y = (x - mean) * rstd * w + b as x * scale + shift, computed in float32 and rounded once into x's dtype
    return torch.addcmul(shift.view(shape), x, scale.view(shape), out=torch.empty_like(x))


#: Values per (sample, group) from which `group_norm` replaces torch's kernel. Below, torch's one-block-per-row kernel
#: keeps up, and `group_norm`'s ten small ops cost more CPU time than they save GPU time: the UNet and guider steps
#: (≤ 256 K values per row at 512×800) became CPU-bound with it on an H200. The VAE at the canvas size has 1.6–6.5 M.
LARGE_ROWS = 1 << 20


def _group_norm_forward(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    if x.device.type != "cuda" or x.numel() < LARGE_ROWS * norm.num_groups * x.shape[0]:
        return F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    return group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)


@contextlib.contextmanager
def fast_group_norm(*modules: nn.Module) -> Iterator[int]:
    """For the block, every `nn.GroupNorm` in `modules` runs `group_norm` on CUDA inputs with rows of at least
    `LARGE_ROWS` values (`F.group_norm` otherwise); yields how many. Modules staged onto the GPU inside the block are covered too; a nested block changes nothing."""
    norms = [m for module in modules for m in module.modules() if type(m) is nn.GroupNorm and "forward" not in vars(m)]
    for norm in norms:
        norm.forward = lambda x, n=norm: _group_norm_forward(n, x)
    try:
        yield len(norms)
    finally:
        for norm in norms:
            del norm.forward


_UPSTREAM = ContextVar("colorflow_upstream_kernels", default=False)


@contextlib.contextmanager
def upstream_kernels() -> Iterator[None]:
    """Within the block `fast_kernels` changes nothing: torch's own GroupNorm and SDPA choice, as upstream ran
    (for measuring what the faster kernels change)."""
    token = _UPSTREAM.set(True)
    try:
        yield
    finally:
        _UPSTREAM.reset(token)


def fast_kernels(device: torch.device | str, *modules: nn.Module) -> ContextManager:
    """`fastest_attention(device)` and `fast_group_norm(*modules)` for the block (a no-op away from CUDA and inside
    `upstream_kernels`)."""
    stack = contextlib.ExitStack()
    if torch.device(device).type == "cuda" and not _UPSTREAM.get():
        stack.enter_context(fastest_attention(device))
        stack.enter_context(fast_group_norm(*modules))
    return stack
