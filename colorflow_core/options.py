"""Per-run colorization options, upstream's defaults, and the seeded generators."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InvalidInputError
from .imaging import check_query_size
from .validation import check_finite

PROMPT = "manga"
NEGATIVE_PROMPT = ""
PREPROCESSORS = ("gray", "none", "screen", "sketch", "sketch_shading")


@dataclass(frozen=True)
class ColorizeOptions:
    """How to colour a page. `size=None` picks upstream's preset closest to each page's aspect ("auto")."""

    size: tuple[int, int] | None = None
    steps: int = 10
    seed: int = 0
    guidance_scale: float = 7.5
    guider_scale: float = 1.0
    preprocess: str | None = None  # None: the style's upstream method (gray → screen, sketch → sketch, …)
    screen_deterministic: bool = False  # ScreenStyle without dropout/noise (else seeded by `seed`)
    sample_posterior: bool = True
    batch_stat_norm: bool = True
    top_k: int = 3
    #: A preset name (colorflow_core.presets) for this run; None = the model's own (faithful for a plain model).
    #: A preset with a guidance scale of its own (`fast`: 1.0) overrides `guidance_scale`.
    preset: str | None = None

    def __post_init__(self):
        if self.size is not None:
            check_query_size(*self.size)
        if self.steps < 1:
            raise InvalidInputError("steps must be at least 1")
        check_finite(self.guider_scale, "guider scale")
        if check_finite(self.guidance_scale, "guidance scale") < 1.0:
            raise InvalidInputError("guidance scale must be >= 1.0 (1.0 = no classifier-free guidance)")
        if self.preprocess is not None and self.preprocess not in PREPROCESSORS:
            raise InvalidInputError(f"unknown preprocess '{self.preprocess}' (choose {', '.join(PREPROCESSORS)})")
        if not 0 <= self.seed < 2**63:
            raise InvalidInputError("seed must be a non-negative 64-bit integer")
        if self.preset is not None:
            from .presets import get_preset

            get_preset(self.preset)


def make_generators(seed: int, device: torch.device | str) -> tuple[torch.Generator, torch.Generator]:
    """(initial-noise generator, VAE-posterior generator), both seeded with `seed` on `device`.

    Upstream draws the posterior samples from the global RNG seeded with the same seed; a second
    generator gives the same numbers without touching global state.
    """
    device = torch.device(device)
    return (torch.Generator(device).manual_seed(seed), torch.Generator(device).manual_seed(seed))


def gsrp_generator(seed: int, device: torch.device | str, canvas_size: tuple[int, int], cfg: bool) -> torch.Generator:
    """The posterior generator as GSRP finds it after ICP drew its two canvas samples.

    Lets a separately run upscaler reproduce the one-call result: the refs-only and query-only
    canvases each drew a (batch, 4, 2H/8, 2W/8) sample first (batch 2 under CFG).
    """
    generator = make_generators(seed, device)[1]
    width, height = canvas_size
    shape = (2 if cfg else 1, 4, height // 8, width // 8)
    for _ in range(2):
        torch.randn(shape, generator=generator, device=generator.device)
    return generator
