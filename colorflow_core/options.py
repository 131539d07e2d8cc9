"""What a user asks of a run (`ColorizeOptions`, with None = "the model's style default"), and the seeded generators.

The options are resolved against a loaded model once, by `colorflow_core.settings.resolve`; no front end resolves
them itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InvalidInputError
from .imaging import check_query_size
from .presets import get_preset
from .styles import check_preprocess
from .validation import check_finite


@dataclass(frozen=True)
class ColorizeOptions:
    """How to colour pages. Fields left None take the model's style default when resolved: `size` the upstream
    preset closest to each page's aspect ("auto"), `guidance_scale` the preset's own scale (`fast`: 1.0) or the
    style's (7.5 gray, 4.5 sketch styles), `preprocess` the style's page preparation, `preset` the model's."""

    size: tuple[int, int] | None = None
    steps: int = 10
    seed: int = 0
    guidance_scale: float | None = None
    guider_scale: float = 1.0
    preprocess: str | None = None
    screen_deterministic: bool = False  # ScreenStyle without dropout/noise (else seeded by `seed`)
    sample_posterior: bool = True
    batch_stat_norm: bool = True
    top_k: int = 3
    preset: str | None = None

    def __post_init__(self):
        if self.size is not None:
            check_query_size(*self.size)
        if self.steps < 1:
            raise InvalidInputError("steps must be at least 1")
        check_finite(self.guider_scale, "guider scale")
        if self.guidance_scale is not None and check_finite(self.guidance_scale, "guidance scale") < 1.0:
            raise InvalidInputError("guidance scale must be >= 1.0 (1.0 = no classifier-free guidance)")
        if self.preprocess is not None:
            check_preprocess(self.preprocess)
        if not 0 <= self.seed < 2**63:
            raise InvalidInputError("seed must be a non-negative 64-bit integer")
        if self.preset is not None:
            get_preset(self.preset)


def make_generators(seed: int, device: torch.device | str) -> tuple[torch.Generator, torch.Generator]:
    """(initial-noise generator, VAE-posterior generator), both seeded with `seed` on `device`.

    Upstream draws the posterior samples from the global RNG seeded with the same seed; a second
    generator gives the same numbers without touching global state.
    """
    device = torch.device(device)
    return (torch.Generator(device).manual_seed(seed), torch.Generator(device).manual_seed(seed))


def gsrp_generator(seed: int, device: torch.device | str, canvas_size: tuple[int, int], cfg: bool) -> torch.Generator:
    """The posterior generator as GSRP finds it after ICP drew its two canvas samples, rebuilt from the sampler's
    seed and CFG choice (for graphs saved before the sampler passed its generator state on).

    The refs-only and query-only canvases each drew a (batch, 4, 2H/8, 2W/8) sample first (batch 2 under CFG).
    """
    generator = make_generators(seed, device)[1]
    width, height = canvas_size
    shape = (2 if cfg else 1, 4, height // 8, width // 8)
    for _ in range(2):
        torch.randn(shape, generator=generator, device=generator.device)
    return generator
