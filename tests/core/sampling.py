"""Shared test helpers: a noise canvas and one seeded sampler run."""
from __future__ import annotations

import numpy as np
from PIL import Image

from colorflow_core.canvas import Canvas, build_canvas
from colorflow_core.options import make_generators


def sample_canvas(width: int = 64, height: int = 96) -> Canvas:
    """A canvas of a random gray page surrounded by one random colour patch."""
    rng = np.random.default_rng(0)
    query = Image.fromarray(rng.integers(0, 255, (height, width), dtype=np.uint8)).convert("RGB")
    patch = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    return build_canvas(query, [[patch] * 3] * 4)


def run(model, canvas: Canvas, seed: int = 0, steps: int = 2, **kwargs):
    """`model.pipeline` on `canvas` with seeded generators (`num_inference_steps` overrides `steps`)."""
    latent_gen, posterior_gen = make_generators(seed, "cpu")
    kwargs.setdefault("num_inference_steps", steps)
    return model.pipeline(canvas.image, canvas.mask, generator=latent_gen, posterior_generator=posterior_gen, **kwargs)
