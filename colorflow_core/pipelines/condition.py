"""What both ICP samplers (SD1.5 and PixArt) share: input checks, the 9-channel canvas condition, the result."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..canvas import split_canvas
from ..errors import InvalidInputError

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class ICPResult:
    """The decoded 2W×2H canvas, its centre (the colourised page at W×H) and the final latents."""

    canvas: Image.Image
    query: Image.Image
    latents: torch.Tensor


class CanvasConditionMixin:
    """Mixed into a DiffusionPipeline that has `vae`, `image_processor` and `vae_scale_factor`."""

    def check_inputs(self, canvas: Image.Image, mask: Image.Image, steps: int, guidance_scale: float) -> None:
        """Reject canvases and options the sampler cannot use, with a one-line reason."""
        width, height = canvas.size
        if width % (2 * self.vae_scale_factor) or height % (2 * self.vae_scale_factor):
            raise InvalidInputError(f"canvas {width}x{height} must be a multiple of {2 * self.vae_scale_factor}")
        if mask.size != canvas.size:
            raise InvalidInputError(f"mask {mask.size} and canvas {canvas.size} differ in size")
        if steps < 1:
            raise InvalidInputError("steps must be at least 1")
        if guidance_scale < 1.0:
            raise InvalidInputError("guidance scale must be >= 1.0 (1.0 turns classifier-free guidance off)")

    def _encode_image(self, image: Image.Image, batch: int, generator: torch.Generator | None) -> torch.Tensor:
        pixels = self.image_processor.preprocess(image, height=image.size[1], width=image.size[0])
        pixels = pixels.to(self.device, self.vae.dtype).repeat(batch, 1, 1, 1)
        return self.vae.encode(pixels).latent_dist.sample(generator) * self.vae.config.scaling_factor

    @torch.no_grad()
    def prepare_condition(
        self, canvas: Image.Image, mask: Image.Image, batch: int, generator: torch.Generator | None
    ) -> torch.Tensor:
        """The guider's 9 channels: [latent of the references-only canvas, keep-mask, latent of the query-only canvas].

        The two VAE samples are drawn in that order from `generator` (upstream: the global RNG), `batch` rows each.
        """
        references, query = split_canvas(canvas)
        latent_refs = self._encode_image(references, batch, generator)
        latent_query = self._encode_image(query, batch, generator)
        white = torch.from_numpy(np.asarray(mask.convert("RGB"))[:, :, 0].copy()).float().div(255)
        keep = (1 - white)[None, None].repeat(batch, 1, 1, 1).to(self.device)
        keep = F.interpolate(keep, size=latent_refs.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([latent_refs, keep.to(latent_refs.dtype), latent_query], dim=1)
