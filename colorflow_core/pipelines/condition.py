"""What both ICP samplers (SD1.5 and PixArt) share: input checks, the 9-channel canvas condition, the result."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image

from .. import runtime
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

    #: The preset this pipeline object runs under (set on the shallow copies `ColorFlowModel.with_preset` makes;
    #: None = the plain, faithful pipeline).
    plan: "runtime.RunPlan | None" = None

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

    def _encode_image(
        self, image: Image.Image, batch: int, generator: torch.Generator | None, encode_once: bool = False
    ) -> torch.Tensor:
        pixels = self.image_processor.preprocess(image, height=image.size[1], width=image.size[0])
        pixels = pixels.to(self.vae.device, self.vae.dtype)
        if not encode_once:  # upstream: a batch of `batch` identical copies, each encoded
            return self.vae.encode(pixels.repeat(batch, 1, 1, 1)).latent_dist.sample(generator) * self.vae.config.scaling_factor
        # Encoded once; the rows are sampled from the same moments with one draw of the batch shape, so the
        # random numbers (and the generator's state afterwards) are the ones upstream's batch encode uses.
        moments = self.vae.encode(pixels).latent_dist.parameters
        posterior = DiagonalGaussianDistribution(moments.expand(batch, -1, -1, -1))
        return posterior.sample(generator) * self.vae.config.scaling_factor

    @torch.no_grad()
    def encode_latents(self, image: Image.Image, generator: torch.Generator | None) -> torch.Tensor:
        """One scaled VAE posterior sample of `image` ([1, 4, H/8, W/8]), as the condition's halves are encoded."""
        return self._encode_image(image, 1, generator)

    @torch.no_grad()
    def prepare_condition(
        self,
        canvas: Image.Image,
        mask: Image.Image,
        batch: int,
        generator: torch.Generator | None,
        encode_once: bool = False,
        box: tuple[int, int, int, int] | None = None,
    ) -> torch.Tensor:
        """The guider's 9 channels: [latent of the references-only canvas, keep-mask, latent of the query-only canvas].

        The two VAE samples are drawn in that order from `generator` (upstream: the global RNG), `batch` rows each.
        `encode_once` encodes each half once instead of `batch` identical copies (same draws, less work and memory).
        `box` is the page's box in `canvas` (default: the centre half; training crops pass theirs).
        """
        references, query = split_canvas(canvas, box)
        with runtime.stage("vae", self.vae):
            latent_refs = self._encode_image(references, batch, generator, encode_once)
            latent_query = self._encode_image(query, batch, generator, encode_once)
        white = torch.from_numpy(np.asarray(mask.convert("RGB"))[:, :, 0].copy()).float().div(255)
        keep = (1 - white)[None, None].repeat(batch, 1, 1, 1).to(latent_refs.device)
        keep = F.interpolate(keep, size=latent_refs.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([latent_refs, keep.to(latent_refs.dtype), latent_query], dim=1)

    def decode_latents(self, latents: torch.Tensor, tiled: bool = False) -> torch.Tensor:
        """VAE decode of sampler latents (divided by the scaling factor here) in the "vae" stage; tiled when asked."""
        with runtime.stage("vae", self.vae):
            z = latents.to(self.vae.device, self.vae.dtype) / self.vae.config.scaling_factor
            if tiled:
                return self.vae.tiled_decode(z).sample
            return self.vae.decode(z).sample
