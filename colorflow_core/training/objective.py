"""The paper's two objectives: ICP's ε-MSE on a patch-wise crop of the stitched canvas, GSRP's L1 of the fused decode.

Each sample is built from the same functions inference uses: `build_canvas` for the stitched image, the pipeline's
`prepare_condition` for the guider's 9 channels, `encode_with_features`/`decode_with_features` for GSRP.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..canvas import build_canvas, canvas_mask
from ..models.guided_vae import decode_with_features, encode_with_features
from ..models.unet_injection import inject_guider_residuals
from ..pipelines.condition import NEGATIVE_PROMPT, PROMPT
from ..pipelines.guided_sr import to_unit_tensor
from .data import GUIDE_STYLE, TrainingData

#: The paper's Fig. 3 training crops as (first row, last row, first col, last col) of the 4x4 cell grid; the page
#: is rows 1-2 x cols 1-2. The last one is the page alone (all-white mask, no references).
LAYOUTS = (
    (0, 3, 1, 2), (0, 2, 1, 2), (1, 3, 1, 2),
    (1, 2, 0, 3), (1, 2, 0, 2), (1, 2, 1, 3),
    (0, 2, 0, 2), (0, 2, 1, 3), (1, 3, 0, 2), (1, 3, 1, 3),
    (1, 2, 1, 2),
)
#: SD1.5's DDPM training steps.
NUM_TRAIN_TIMESTEPS = 1000


def shift_timesteps(s: torch.Tensor, mu: float) -> torch.Tensor:
    """The paper's Eq. 5 on s = t/T in (0, 1]: s' = e^µ s / (1 + (e^µ - 1) s) (µ = 0: no shift)."""
    scale = math.exp(mu)
    return scale * s / (1 + (scale - 1) * s)


def sample_timesteps(generator: torch.Generator, count: int, mu: float, steps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """`count` DDPM timesteps in [0, steps): t' = shift(U(0, 1]) * T, rounded up, minus one (T -> index T - 1)."""
    s = 1.0 - torch.rand(count, generator=generator, dtype=torch.float64)  # (0, 1]
    shifted = shift_timesteps(s, mu)
    return (torch.ceil(shifted * steps).long() - 1).clamp(0, steps - 1)


#: What a draw is for (the first key after the seed): a sample's noise and latents, the step's crop layout, a
#: sample's input style, a sample's GSRP posterior.
SAMPLE, LAYOUT, STYLE, GSRP = range(4)


def _state(seed: int, keys: tuple[int, ...]) -> int:
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1, dtype=np.uint64)[0])


def sample_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator for one (seed, purpose, sample number or step) tuple: no RNG state to carry, so a resumed or
    data-parallel run draws exactly the numbers of an uninterrupted single-process run."""
    return torch.Generator().manual_seed(_state(seed, keys))


def sample_choice(count: int, seed: int, *keys: int) -> int:
    """A seeded choice in range(count) for one (seed, purpose, sample number or step) tuple."""
    return _state(seed, keys) % count


@dataclass(frozen=True)
class ICPSample:
    """One training crop: the conditioning canvas (page in its input style), the colour target, mask, page box."""

    canvas: Image.Image
    target: Image.Image
    mask: Image.Image
    box: tuple[int, int, int, int]


def crop_layout(image: Image.Image, layout: tuple[int, int, int, int], page: tuple[int, int]) -> Image.Image:
    """The cells of `layout` cut from a 2W x 2H canvas and resized so that the page in it is `page` (W', H')."""
    width, height = image.size
    cell_w, cell_h = width // 4, height // 4
    r0, r1, c0, c1 = layout
    crop = image.crop((c0 * cell_w, r0 * cell_h, (c1 + 1) * cell_w, (r1 + 1) * cell_h))
    size = ((c1 - c0 + 1) * page[0] // 2, (r1 - r0 + 1) * page[1] // 2)
    return crop.resize(size, Image.BICUBIC) if crop.size != size else crop


def page_box(layout: tuple[int, int, int, int], page: tuple[int, int]) -> tuple[int, int, int, int]:
    """Where the page sits in a crop of `layout` whose page is `page` (W', H')."""
    r0, _, c0, _ = layout
    left, top = (1 - c0) * page[0] // 2, (1 - r0) * page[1] // 2
    return (left, top, left + page[0], top + page[1])


def icp_sample(data: TrainingData, frame: dict, style: str, layout, page: tuple[int, int]) -> ICPSample:
    """The canvas inference would build for `frame` in `style` (cached retrieval), its colour twin, cut to `layout`."""
    size = data.size
    retrieval = data.retrieval(frame)
    patches = retrieval.patches()
    context = data.image(frame, style).resize(size, Image.BICUBIC)
    color = data.image(frame, "color").resize(size, Image.BICUBIC)
    canvas = build_canvas(context, patches).image
    target = build_canvas(color, patches).image
    mask = canvas_mask(*size)
    return ICPSample(
        crop_layout(canvas, layout, page), crop_layout(target, layout, page), crop_layout(mask, layout, page),
        page_box(layout, page),
    )


def icp_loss(models, samples: list[ICPSample], generators: list[torch.Generator], mu: float, prompt_dropout: float,
             autocast) -> torch.Tensor:
    """Eq. 4: mean over the batch of ||ε - ε_θ({VAE(C_bw), M, Z_t}, t)||² on the whole crop latent."""
    pipeline = models.pipeline
    device = pipeline.vae.device
    conditions, latents, noises, steps, prompts = [], [], [], [], []
    for sample, generator in zip(samples, generators):
        # Order of the draws per sample: condition (2 VAE samples), target latent, noise, timestep, prompt dropout.
        conditions.append(pipeline.prepare_condition(sample.canvas, sample.mask, 1, generator, box=sample.box))
        latent = pipeline.encode_latents(sample.target, generator)
        latents.append(latent)
        noises.append(torch.randn(latent.shape, generator=generator).to(device))
        steps.append(sample_timesteps(generator, 1, mu))
        prompts.append(NEGATIVE_PROMPT if torch.rand(1, generator=generator).item() < prompt_dropout else PROMPT)
    latents, noise = torch.cat(latents), torch.cat(noises)
    timesteps = torch.cat(steps).to(device)
    condition = torch.cat(conditions)
    noisy = models.noise_scheduler.add_noise(latents, noise, timesteps)
    text = torch.cat([pipeline.encode_prompt(p, NEGATIVE_PROMPT, False, dtype=torch.float32) for p in prompts])
    with autocast():
        residuals = models.run_guider(noisy, timesteps, condition)
        with inject_guider_residuals(pipeline.unet, residuals):
            prediction = pipeline.unet(noisy, timesteps, encoder_hidden_states=text).sample
    return F.mse_loss(prediction.float(), noise.float())


@dataclass(frozen=True)
class GSRPSample:
    """The colour page at 1.5x (target), its W x H version upscaled back (the ICP result's stand-in), the guide."""

    target: Image.Image
    upscaled: Image.Image
    guide: Image.Image


def gsrp_sample(data: TrainingData, frame: dict, style: str, page: tuple[int, int]) -> GSRPSample:
    """GSRP inputs as inference makes them: the W x H colour page resized to the 1.5x guide (PIL default filter)."""
    big = (int(1.5 * page[0]), int(1.5 * page[1]))
    color = data.image(frame, "color").resize(big, Image.BICUBIC)
    guide = data.image(frame, GUIDE_STYLE[style]).resize(big, Image.BICUBIC)
    lowres = color.resize(page, Image.BICUBIC)
    return GSRPSample(color, lowres.resize(big), guide)


def gsrp_loss(models, samples: list[GSRPSample], generators: list[torch.Generator], autocast) -> torch.Tensor:
    """Eq. 6: L1 between the fused decode of the upscaled colour latent and the 1.5x colour page (VAE frozen)."""
    vae = models.pipeline.vae
    device = vae.device
    batch = lambda images: torch.cat([to_unit_tensor(image) for image in images]).to(device)  # noqa: E731
    target = batch([s.target for s in samples])
    with torch.no_grad():
        posterior, color_features = encode_with_features(vae, batch([s.upscaled for s in samples]))
        _, gray_features = encode_with_features(vae, batch([s.guide for s in samples]))
        noise = torch.cat([torch.randn(posterior.mean[:1].shape, generator=g) for g in generators]).to(device)
        latent = posterior.mean + posterior.std * noise
    with autocast():
        additions = models.fusion([torch.cat([c, g], dim=1) for c, g in zip(color_features, gray_features)])
        decoded = decode_with_features(vae, latent, additions)
    return F.l1_loss(decoded.float(), target)
