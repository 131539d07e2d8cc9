"""Memory estimates per stage and the `auto` preset's choice.

The activation model is calibrated on the SD1.5 numbers of `shared/spec/physical-limits.md` §4 (bf16, no_grad,
flash-style attention, 409,600-px pages): VAE encode 2.11 GB per canvas image, denoise step 0.78 GB per batch row,
canvas decode 2.52 GB, GSRP 2.60 GB (each feature map freed once fused, as `GuidedSuperResolver` does), CLIP 0.16 GB. Each is
expressed per pixel (or latent token) and per channel of the network's first level, so it scales with the page size
and the model width. PixArt's denoiser is a rougher guess (26 live token × width maps per batch row). Estimates are
peaks of live tensors; a CUDA context, workspaces and allocator slack are added as a fixed 0.8 GB + 15 %.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .presets import AUTO_CANDIDATES, FAITHFUL, Preset
from .runtime import Placement, RunPlan, lives_on, stage_dtype

#: Live full-resolution maps of the first level's width, per image (see the module docstring).
VAE_ENCODE_MAPS = 5.03
VAE_DECODE_MAPS = 6.0
GSRP_MAPS = 11.0
UNET_STEP_MAPS = 47.6  # per batch row, at the latent resolution, first-level width (320 for SD1.5)
PIXART_STEP_MAPS = 26.0  # per batch row, per patch token, at the transformer width
ENCODER_ACTIVATION = 0.2e9
CUDA_OVERHEAD = 0.8e9
SLACK = 1.15


@dataclass(frozen=True)
class Estimate:
    """Estimated peak bytes on the compute device: per stage and overall (with overhead and slack)."""

    preset: str
    stages: dict[str, int]
    peak: int


def free_memory(device: torch.device) -> int:
    """Free bytes for new tensors on `device`: CUDA `mem_get_info` + what torch's cache holds; CPU: MemAvailable."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory() - torch.mps.current_allocated_memory())
    available = proc_bytes("/proc/meminfo", "MemAvailable")
    if available is not None:
        return available
    pages, size = os.sysconf("SC_AVPHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return int(pages * size)


def proc_bytes(path: str, field: str) -> int | None:
    """A `field:  N kB` line of a Linux /proc file (meminfo, self/status) in bytes; None where there is none."""
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _bytes(module: nn.Module, dtype: torch.dtype | None = None) -> int:
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        size = torch.empty((), dtype=dtype).element_size() if dtype is not None and tensor.is_floating_point() else tensor.element_size()
        total += tensor.numel() * size
    return total


def _on(module: nn.Module, device: torch.device) -> bool:
    return any(True for _ in module.parameters()) and lives_on(module, device)


def _first(modules: tuple[nn.Module, ...], attr: str):
    for module in modules:
        config = getattr(module, "config", None)
        if config is not None and attr in config:
            return config[attr]
    return None


def activations(plan: RunPlan, preset: Preset, size: tuple[int, int], guidance: float, pages: int = 1) -> dict[str, int]:
    """Estimated peak activation bytes per stage for W×H pages under `preset` at CFG scale `guidance` (as resolved:
    1.0 = no CFG), `pages` of them denoised as one batch (the other stages take the pages one at a time)."""
    width, height = size
    canvas_px, gsrp_px = 4 * width * height, 2.25 * width * height
    placement = plan.placement
    vae = plan.modules.get("vae", ())
    c0 = (_first(vae, "block_out_channels") or [128])[0]
    tile = _first(vae, "sample_size") or 512
    tile = tile[0] if isinstance(tile, (list, tuple)) else tile

    def nbytes(stage: str, modules) -> int:
        device = placement.device_for(stage)
        resident = all(lives_on(m, device) for m in modules)
        dtype = stage_dtype(preset, stage, device, _dtype(modules), resident)
        return torch.empty((), dtype=dtype).element_size()

    rows = 2 if guidance > 1.0 else 1
    vae_bytes = nbytes("vae", vae)
    out: dict[str, int] = {
        "image_encoder": int(ENCODER_ACTIVATION * _width_ratio(plan.modules.get("image_encoder", ()), 1280)),
        "text_encoder": int(ENCODER_ACTIVATION / 4 * _width_ratio(plan.modules.get("text_encoder", ()), 768)),
        "vae_encode": int(VAE_ENCODE_MAPS * c0 * canvas_px * vae_bytes * (1 if preset.encode_once else rows)),
    }
    denoiser = plan.modules.get("denoiser", ())
    den_bytes = nbytes("denoiser", denoiser)
    if plan.family == "pixart":
        inner = None
        for module in denoiser:
            config = getattr(module, "config", None)
            if config is not None and "num_attention_heads" in config and "attention_head_dim" in config:
                inner = config["num_attention_heads"] * config["attention_head_dim"]
                break
        tokens = canvas_px / (64 * 4)
        out["denoise"] = int(PIXART_STEP_MAPS * (inner or 1152) * tokens * den_bytes * rows * pages)
    else:
        c_unet = (_first(denoiser, "block_out_channels") or [320])[0]
        out["denoise"] = int(UNET_STEP_MAPS * c_unet * (canvas_px / 64) * den_bytes * rows * pages)
    out["vae_decode"] = int(VAE_DECODE_MAPS * c0 * canvas_px * vae_bytes + 3 * canvas_px * 4)
    out["vae_decode_tiled"] = int(VAE_DECODE_MAPS * c0 * min(canvas_px, tile * tile) * vae_bytes + 3 * canvas_px * 4)
    fusion_bytes = nbytes("fusion", plan.modules.get("fusion", ()))
    out["gsrp"] = int(GSRP_MAPS * c0 * gsrp_px * max(vae_bytes, fusion_bytes))
    return out


def _width_ratio(modules, reference: int) -> float:
    """A transformers encoder's hidden size over the size the activation constant was calibrated at."""
    for module in modules:
        width = getattr(getattr(module, "config", None), "hidden_size", None)
        if width:
            return width / reference
    return 1.0


def _dtype(modules) -> torch.dtype:
    for module in modules:
        for param in module.parameters():
            if param.is_floating_point():
                return param.dtype
    return torch.float32


#: Which models each activation stage needs on the device (a model's weights count once per stage).
_STAGE_MODELS = {
    "image_encoder": ("image_encoder",),
    "text_encoder": ("text_encoder",),
    "vae_encode": ("vae",),
    "denoise": ("denoiser",),
    "vae_decode": ("vae",),
    "vae_decode_tiled": ("vae",),
    "gsrp": ("vae", "fusion"),
}


def estimate(
    plan: RunPlan, preset: Preset, size: tuple[int, int], guidance: float, assume_resident: bool = False, pages: int = 1,
) -> Estimate:
    """Peak bytes on the compute device for W×H pages under `preset` (non-auto), `pages` denoised as one batch, given
    where the weights are now (`assume_resident`: as if every model had been moved to the device)."""
    placement: Placement = plan.placement
    device = placement.device
    acts = activations(plan, preset, size, guidance, pages)

    def on_device(module: nn.Module) -> bool:
        return assume_resident or _on(module, device)

    resident = 0
    for stage_name, modules in plan.modules.items():
        for module in modules:
            if on_device(module):
                resident += _bytes(module)
    stages: dict[str, int] = {}
    tiled_decode = acts.pop("vae_decode_tiled")
    for name, act in acts.items():
        staged = 0
        for stage_name in _STAGE_MODELS[name]:
            modules = plan.modules.get(stage_name, ())
            if name == "denoise" and preset.offload == "model" and modules:
                modules = (max(modules, key=_bytes),)  # guider and denoiser take turns
            for module in modules:
                home = _dtype((module,))
                stage_device = placement.device_for(stage_name)
                target = stage_dtype(preset, stage_name, stage_device, home, on_device(module))
                if placement.device_for(stage_name).type != device.type:
                    continue
                if not on_device(module) or target != home:
                    staged += _bytes(module, target)
        stages[name] = resident + staged + act
    # vae_tiling: "always" tiles; "auto" tiles when the full decode would need more than the denoise stage.
    if preset.vae_tiling == "always" or (preset.vae_tiling == "auto" and stages["vae_decode"] > stages["denoise"]):
        stages["vae_decode"] += tiled_decode - acts["vae_decode"]
    overhead = CUDA_OVERHEAD if device.type == "cuda" else 0
    peak = int(max(stages.values()) * SLACK + overhead)
    return Estimate(preset.name, stages, peak)


def held(plan: RunPlan) -> int:
    """Bytes the plan's own weights already hold on its compute device."""
    device = plan.placement.device
    return sum(_bytes(m) for modules in plan.modules.values() for m in modules if _on(m, device))


def available(plan: RunPlan) -> int:
    """Free bytes on the plan's device plus what the plan's own weights already hold there (they are in the estimate)."""
    measure = plan.free_memory or free_memory
    return int(measure(plan.placement.device)) + held(plan)


def memory_needed(plan: RunPlan, size: tuple[int, int], guidance: float, pages: int = 1) -> int:
    """Bytes a call for W×H pages would need on the device beyond what the plan's weights hold there already (for a
    host to make room before it starts). `auto` counts as `faithful`: the most it would use."""
    preset = FAITHFUL if plan.preset.is_auto else plan.preset
    return max(0, estimate(plan, preset, size, guidance, pages=pages).peak - held(plan))


def choose_preset(plan: RunPlan, size: tuple[int, int], guidance: float, pages: int = 1) -> Preset:
    """`auto`: the first of faithful, low-vram, low-vram-strict whose estimated peak fits the free memory; the
    smallest (with a warning) when none does."""
    budget = available(plan)
    estimates = [(candidate, estimate(plan, candidate, size, guidance, pages=pages)) for candidate in AUTO_CANDIDATES]
    for candidate, found in estimates:
        if found.peak <= budget:
            return candidate
    smallest = min(estimates, key=lambda pair: pair[1].peak)
    warnings.warn(
        f"no preset fits the free memory ({budget / 1e9:.1f} GB) for a {size[0]}x{size[1]} page; running "
        f"'{smallest[0].name}' (estimated {smallest[1].peak / 1e9:.1f} GB)", RuntimeWarning, stacklevel=2,
    )
    return smallest[0]


def decode_is_peak(plan: RunPlan, preset: Preset, canvas_size: tuple[int, int], guidance: float) -> bool:
    """`vae_tiling="auto"`: tile the canvas decode when, untiled, it would need more than the denoise stage."""
    vae = plan.modules.get("vae", ())
    tile = _first(vae, "sample_size") or 512
    tile = tile[0] if isinstance(tile, (list, tuple)) else tile
    if canvas_size[0] <= tile and canvas_size[1] <= tile:
        return False
    size = (canvas_size[0] // 2, canvas_size[1] // 2)
    found = estimate(plan, preset.replace(vae_tiling="never"), size, guidance)
    return found.stages["vae_decode"] > found.stages["denoise"]
