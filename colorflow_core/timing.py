"""How long a page will take, before the first page runs, and the live s/step and ETA while pages run.

The time model counts the work of one page from the model's own sizes and divides it by a rate per device:

* denoise step, SD family, per batch row: 3,273 FLOP per latent token per first-level-width² (convs, linears, LoRA of
  guider + UNet) and 46·N²·C attention FLOPs (10 top-level self-attentions of 4·N²·C, +15 % for the lower levels);
  both from the FLOP counts of `shared/spec/physical-limits.md` §1–2 (36.5 TFLOP per CFG step at 25,600 tokens).
  PixArt family: 2 FLOP per parameter per token, and 4·T²·width per self-attention.
* VAE encode (+ its CFG copy unless the preset encodes once), canvas decode and GSRP: 3,246 FLOP per canvas pixel
  per VAE-width² (same source, 87 TFLOP at 409,600 px); the retrieval CLIP: 2 FLOP per parameter per token per crop.
* Rates (GFLOP/s, 2 CPU threads of the project's Zen-4 machine; scaled by the thread count): measured on the real
  SD1.5 widths in `docs/benchmarks.md` (a 128×192 fp32 CFG step in 7.8 s, bf16 no-CFG in 2.0 s) and the kernel table of
  physical-limits §5 (attention 133 fp32 / 123 bf16 GFLOP/s); for the tiny test weights measured here (25 GFLOP/s
  whatever the size, 128×192 to 640×640). Widths in between are interpolated on a log scale. GPU rates are generic
  guesses (no GPU was measured), so GPU estimates are labelled rough.
* A CPU shared with other processes is slower: CPU estimates are multiplied by the load average per core (≥ 1).
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from typing import TextIO

import torch

from .memory import _dtype, _first  # a module list's weight dtype and first config value (one reader for both models)
from .options import ColorizeOptions
from .runtime import compute_dtype
from .settings import resolve

#: SD family: dense FLOPs of one denoise step per batch row, per latent token per (first-level width)².
SD_DENSE_PER_TOKEN = 3273.0
#: SD family: attention FLOPs of one denoise step per batch row, per (latent tokens)² per first-level width.
SD_ATTENTION = 46.0
#: VAE encode (batch 1) + canvas decode + GSRP, per canvas pixel per (VAE first-level width)² at 2 layers per block.
VAE_PER_PIXEL = 2642.0
#: The second canvas encode row that faithful CFG makes (each canvas half encoded at batch 2).
VAE_CFG_ENCODE_PER_PIXEL = 604.0
#: Full widths the real-weight rates were measured at (SD1.5 UNet, PixArt-α transformer, SD VAE).
FULL_WIDTH = {"sd": 320, "pixart": 1152, "vae": 128}
#: Widths are interpolated between full and full / 20 (the tiny test weights: 16 vs 320).
TINY_FACTOR = 20.0
#: CPU GFLOP/s on 2 threads: (tiny widths, full widths) per work kind and compute dtype.
CPU_RATES = {
    ("dense", "float32"): (25.0, 143.0),
    ("dense", "bfloat16"): (25.0, 270.0),
    ("attention", "float32"): (25.0, 105.0),
    ("attention", "bfloat16"): (25.0, 100.0),
}
CPU_THREADS_MEASURED = 2
#: Accelerator GFLOP/s (generic guesses, full widths; tiny widths run at a fixed per-step cost instead).
GPU_RATES = {"cuda": {"half": 150_000.0, "float32": 25_000.0}, "mps": {"half": 8_000.0, "float32": 4_000.0}}
#: Seconds of per-op overhead per denoise step (kernel launches, hooks, scheduler) and per page (I/O, retrieval glue).
STEP_OVERHEAD = {"cpu": 0.01, "cuda": 0.03, "mps": 0.05}
PAGE_OVERHEAD = 0.3
#: CPU pages estimated above this many seconds get a warning with the options that make them fast.
SLOW_PAGE_SECONDS = 180.0
#: The size `--size auto` estimates with: every upstream size (640², 512×800, 800×512) has this area.
AUTO_SIZE = (640, 640)


@dataclass(frozen=True)
class PageTime:
    """Estimated seconds of one page: its denoise steps and the rest (VAE encode/decode, GSRP, retrieval)."""

    step_seconds: float
    steps: int
    other_seconds: float
    device: str
    rough: bool
    busy: float = 1.0  # the CPU's load factor the estimate includes (other processes running)

    @property
    def seconds(self) -> float:
        """The whole page."""
        return self.steps * self.step_seconds + self.other_seconds


def _params(modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def _self_attention_widths(modules) -> list[int]:
    """Inner width of every self-attention in `modules` (diffusers `Attention` that is not cross-attention)."""
    from diffusers.models.attention_processor import Attention

    return [m.inner_dim for module in modules for m in module.modules()
            if isinstance(m, Attention) and not m.is_cross_attention]


def _width_position(width: float, full: float) -> float:
    """0 at the tiny widths (full / 20), 1 at the full widths, log-linear in between, clamped."""
    return min(1.0, max(0.0, 1.0 + math.log(max(width, 1e-9) / full) / math.log(TINY_FACTOR)))


def _rate(kind: str, device: torch.device, dtype: torch.dtype, position: float) -> float:
    """FLOP/s for `kind` work ("dense" or "attention") at a width `position` (0 tiny … 1 full)."""
    if device.type == "cpu":
        name = "bfloat16" if dtype in (torch.bfloat16, torch.float16) else "float32"
        tiny, full = CPU_RATES[(kind, name)]
        threads = max(1, torch.get_num_threads())
        return tiny * (full / tiny) ** position * 1e9 * threads / CPU_THREADS_MEASURED
    rates = GPU_RATES.get(device.type, GPU_RATES["mps"])
    return rates["float32" if dtype == torch.float32 else "half"] * 1e9


def estimate_page_time(
    modules: dict[str, tuple[torch.nn.Module, ...]],
    family: str,
    device: torch.device | str,
    size: tuple[int, int] | None,
    steps: int,
    cfg: bool,
    compute_dtype: torch.dtype | None = None,
    encode_once: bool = False,
    crops: int = 9,
    busy: float = 1.0,
) -> PageTime:
    """Seconds for one W×H page (None = `--size auto`) of `steps` steps, CFG on or off, from the model's `modules`
    (stage → modules, as `ColorFlowModel.run_modules()` gives), on `device`, computing in `compute_dtype` (default: the
    weights' dtype); `crops` = CLIP crops embedded per page (4 query patches + 5 with feed-back); `busy` multiplies
    the CPU time (other processes sharing the cores, see `cpu_contention`)."""
    device = torch.device(device)
    width, height = size or AUTO_SIZE
    canvas_px = 4 * width * height
    rows = 2 if cfg else 1
    denoiser = modules.get("denoiser", ())
    dtype = compute_dtype or _dtype(denoiser)
    if family == "pixart":
        tokens = canvas_px / 256  # 8× VAE, 2×2 patches
        inner = max(_self_attention_widths(denoiser) or [FULL_WIDTH["pixart"]])
        position = _width_position(inner, FULL_WIDTH["pixart"])
        dense = 2.0 * _params(denoiser) * tokens
        attention = sum(4.0 * tokens**2 * w for w in _self_attention_widths(denoiser))
    else:
        tokens = canvas_px / 64
        c0 = (_first(denoiser, "block_out_channels") or [FULL_WIDTH["sd"]])[0]
        position = _width_position(c0, FULL_WIDTH["sd"])
        dense = SD_DENSE_PER_TOKEN * tokens * c0**2
        attention = SD_ATTENTION * tokens**2 * c0
    step = rows * (dense / _rate("dense", device, dtype, position) + attention / _rate("attention", device, dtype, position))
    step += STEP_OVERHEAD.get(device.type, STEP_OVERHEAD["mps"])

    vae = modules.get("vae", ())
    v0 = (_first(vae, "block_out_channels") or [FULL_WIDTH["vae"]])[0]
    layers = (_first(vae, "layers_per_block") or 2) / 2
    per_pixel = VAE_PER_PIXEL + (VAE_CFG_ENCODE_PER_PIXEL if cfg and not encode_once else 0.0)
    vae_flops = per_pixel * canvas_px * v0**2 * layers
    other = vae_flops / _rate("dense", device, dtype, _width_position(v0, FULL_WIDTH["vae"]))
    encoder = modules.get("image_encoder", ())
    if encoder:
        vision = getattr(encoder[0], "config", None)
        side = getattr(vision, "image_size", 224) // getattr(vision, "patch_size", 14)
        clip_flops = 2.0 * _params(encoder) * (side * side + 1) * crops
        hidden = getattr(vision, "hidden_size", 1280)
        other += clip_flops / _rate("dense", device, _dtype(encoder), _width_position(hidden, 1280))
    other += PAGE_OVERHEAD
    if device.type != "cpu":
        return PageTime(step, steps, other, device.type, rough=True)
    return PageTime(step * busy, steps, other * busy, device.type, rough=False, busy=busy)


def cpu_contention() -> float:
    """How many times slower the CPU is now than when idle: the 1-minute load average per core, at least 1."""
    if not hasattr(os, "getloadavg"):
        return 1.0
    return max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))


def estimate_for_model(model, options: ColorizeOptions, feed_back: bool = False) -> PageTime:
    """`estimate_page_time` for a loaded `ColorFlowModel` running `options`, resolved as the page loop resolves them
    (`auto` size estimated at 640×640)."""
    found = resolve(model, options, options.size or AUTO_SIZE)
    modules = model.run_modules()
    dtype = compute_dtype(found.preset.compute_dtype, "denoiser", model.device, _dtype(modules.get("denoiser", ())))
    return estimate_page_time(modules, model.pipeline.family, model.device, options.size, found.steps,
                              found.do_classifier_free_guidance, dtype, found.encode_once,
                              crops=9 if feed_back else 4, busy=cpu_contention())


def format_seconds(seconds: float) -> str:
    """'42 s', '3 min 20 s', '1 h 05 min'."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def describe(estimate: PageTime, pages: int) -> str:
    """One line: the estimated time per step, per page and for all pages."""
    rough = " (rough: GPU rates are not calibrated)" if estimate.rough else ""
    if estimate.busy > 1.05:
        rough = f" (the CPU is shared: {estimate.busy:.1f}× slower than idle)"
    return (f"estimated {estimate.step_seconds:.2f} s/step, {format_seconds(estimate.seconds)} per page, "
            f"{format_seconds(estimate.seconds * pages)} for {pages} page(s) on {estimate.device}{rough}")


def slow_warning(estimate: PageTime, size: tuple[int, int] | None, preset_name: str) -> str | None:
    """On a CPU, a page above `SLOW_PAGE_SECONDS`: what to change to make it fast; else None."""
    if estimate.device != "cpu" or estimate.seconds <= SLOW_PAGE_SECONDS:
        return None
    width, height = size or AUTO_SIZE
    smaller = (max(64, width // 2 // 32 * 32), max(64, height // 2 // 32 * 32))
    options = [f"--width {smaller[0]} --height {smaller[1]} (attention grows with the square of the area)"]
    if preset_name != "fast":
        options.insert(0, "--preset fast (no CFG, bf16 where the CPU has it)")
    options.append("fewer --steps")
    options.append("a GPU (--device cuda)")
    return (f"warning: one page will take about {format_seconds(estimate.seconds)} on this CPU. "
            f"To make it fast: {'; '.join(options)}.")


def announce_estimate(model, options, pages: int, feed_back: bool = False, stream: TextIO | None = None) -> str | None:
    """Before the first page: print the estimate of `pages` pages under `options` (and, on a slow CPU run, what would
    make it fast) to `stream` (stderr); return the warning, or None."""
    stream = stream or sys.stderr
    estimate = estimate_for_model(model, options, feed_back=feed_back)
    print(describe(estimate, pages), file=stream, flush=True)
    warning = slow_warning(estimate, options.size, model.preset.name)
    if warning:
        print(warning, file=stream, flush=True)
    return warning


class ProgressMeter:
    """A `progress(stage, done, total)` callback that prints step counts with s/step and the chapter's ETA."""

    def __init__(self, pages: int, stream: TextIO | None = None, clock=time.monotonic):
        self.pages, self.stream, self.clock = pages, stream or sys.stderr, clock
        self.start = clock()
        self.pages_done = 0
        self._first_step: tuple[float, int] | None = None
        self._page_start = self.start

    def seconds_per_step(self, done: int, now: float) -> float | None:
        """Mean seconds per step of the current page since its first step (which also paid for the encode)."""
        if self._first_step is None or done <= self._first_step[1]:
            return None
        first_time, first_done = self._first_step
        return (now - first_time) / (done - first_done)

    def eta(self, done: int, total: int, now: float) -> float | None:
        """Seconds until the last page is done: measured pages' mean time once a page finished, else the step rate."""
        remaining_pages = self.pages - self.pages_done - 1
        per_step = self.seconds_per_step(done, now)
        if self.pages_done:
            per_page = (self._page_start - self.start) / self.pages_done
            current = max(0.0, per_page - (now - self._page_start))
            if per_step is not None:
                current = (total - done) * per_step
            return current + remaining_pages * per_page
        if per_step is None:
            return None
        return (total - done) * per_step + remaining_pages * total * per_step

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = self.clock()
        if stage == "page":
            self.pages_done = done
            self._page_start, self._first_step = now, None
            print(f"page {done}/{total} done ({format_seconds(now - self.start)} so far)", file=self.stream, flush=True)
            return
        if self._first_step is None:
            self._first_step = (now, done)
        per_step, eta = self.seconds_per_step(done, now), self.eta(done, total, now)
        text = f"\r  step {done}/{total}"
        if per_step is not None:
            text += f"  {per_step:.2f} s/step"
        if eta is not None:
            text += f"  ETA {format_seconds(eta)}"
        print(text + "   ", end="" if done < total else "\n", file=self.stream, flush=True)
