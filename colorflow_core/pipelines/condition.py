"""What both ICP samplers (SD1.5 and PixArt) share: the family interface, input checks, the 9-channel canvas
condition, the decode, and the result."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image

from .. import runtime
from ..canvas import center_crop, split_canvas
from ..errors import InvalidInputError
from ..observe import NO_OBSERVER, PageObserver
from ..validation import check_finite

ProgressFn = Callable[[int, int], None]
#: Upstream's prompts (the app never changed them).
PROMPT = "manga"
NEGATIVE_PROMPT = ""


@dataclass(frozen=True)
class ICPResult:
    """The decoded 2W×2H canvas, its centre (the colourised page at W×H), the final latents, and the state of the
    posterior generator after the sampler's draws (what GSRP continues from, so it needs no sampler setting)."""

    canvas: Image.Image
    query: Image.Image
    latents: torch.Tensor
    posterior_state: torch.Tensor | None = None

    def posterior_generator(self, device: torch.device | str) -> torch.Generator | None:
        """A generator on `device` in the state the sampler left the posterior generator in."""
        if self.posterior_state is None:
            return None
        return torch.Generator(device).set_state(self.posterior_state)


class ICPSampler:
    """The interface both model families implement (mixed into a `DiffusionPipeline` that has `vae`,
    `image_processor` and `vae_scale_factor`): sample canvases, name the modules a preset stages."""

    #: "sd" or "pixart" (memory estimates differ).
    family: ClassVar[str]
    #: Upstream's CFG scale for this family (the pipeline default when a call gives none).
    default_guidance_scale: ClassVar[float]
    #: Whether several same-size canvases are denoised as one batch (else one after another).
    batches_pages: ClassVar[bool]

    def run_modules(self) -> dict[str, tuple[torch.nn.Module, ...]]:
        """stage → this pipeline's modules (what a preset stages)."""
        raise NotImplementedError

    def sample_pages(
        self,
        canvases: list[Image.Image],
        masks: list[Image.Image],
        *,
        generators: list[torch.Generator | None],
        posterior_generators: list[torch.Generator | None],
        prompt: str = PROMPT,
        negative_prompt: str = NEGATIVE_PROMPT,
        num_inference_steps: int = 10,
        guidance_scale: float | None = None,
        guider_scale: float = 1.0,
        encode_once: bool = False,
        tile_decode: bool = False,
        run: "runtime.Run | None" = None,
        observer: PageObserver = NO_OBSERVER,
        progress: ProgressFn | None = None,
    ) -> list[ICPResult]:
        """Denoise the canvases; page i draws its noise from `generators[i]` and its VAE samples from
        `posterior_generators[i]`, so each result equals that page sampled alone (up to batched rounding).

        What is computed is given here: `guidance_scale` (None = the family's default; 1.0 = no CFG, one batch row),
        `encode_once` (each canvas half VAE-encoded once, same random draws), `tile_decode`. `run` is only where the
        weights live and which dtype each stage computes in (None: as loaded)."""
        raise NotImplementedError

    @torch.no_grad()
    def __call__(
        self, canvas: Image.Image, mask: Image.Image, *, generator: torch.Generator | None = None,
        posterior_generator: torch.Generator | None = None, **settings,
    ) -> ICPResult:
        """One canvas: `sample_pages` with one page (same settings)."""
        return self.sample_pages(
            [canvas], [mask], generators=[generator], posterior_generators=[posterior_generator], **settings
        )[0]

    def check_pages(
        self, canvases: list[Image.Image], masks: list[Image.Image], generators: list, posterior_generators: list,
        steps: int, guidance_scale: float, guider_scale: float = 1.0,
    ) -> None:
        """Reject canvases and options the sampler cannot use, with a one-line reason."""
        check_finite(guider_scale, "guider scale")
        if not canvases or not (len(canvases) == len(masks) == len(generators) == len(posterior_generators)):
            raise InvalidInputError("sampling needs one mask and two generators per canvas")
        if len({c.size for c in canvases}) > 1:
            raise InvalidInputError("canvases sampled together must have the same size")
        width, height = canvases[0].size
        if width % (2 * self.vae_scale_factor) or height % (2 * self.vae_scale_factor):
            raise InvalidInputError(f"canvas {width}x{height} must be a multiple of {2 * self.vae_scale_factor}")
        for mask in masks:
            if mask.size != canvases[0].size:
                raise InvalidInputError(f"mask {mask.size} and canvas {canvases[0].size} differ in size")
        if steps < 1:
            raise InvalidInputError("steps must be at least 1")
        if check_finite(guidance_scale, "guidance scale") < 1.0:
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
        run: "runtime.Run | None" = None,
        box: tuple[int, int, int, int] | None = None,
    ) -> torch.Tensor:
        """The guider's 9 channels: [latent of the references-only canvas, keep-mask, latent of the query-only canvas].

        The two VAE samples are drawn in that order from `generator` (upstream: the global RNG), `batch` rows each.
        `encode_once` encodes each half once instead of `batch` identical copies (same draws, less work and memory).
        `box` is the page's box in `canvas` (default: the centre half; training crops pass theirs).
        """
        references, query = split_canvas(canvas, box)
        with runtime.stage(run, "vae", self.vae):
            latent_refs = self._encode_image(references, batch, generator, encode_once)
            latent_query = self._encode_image(query, batch, generator, encode_once)
        white = torch.from_numpy(np.asarray(mask.convert("RGB"))[:, :, 0].copy()).float().div(255)
        keep = (1 - white)[None, None].repeat(batch, 1, 1, 1).to(latent_refs.device)
        keep = F.interpolate(keep, size=latent_refs.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([latent_refs, keep.to(latent_refs.dtype), latent_query], dim=1)

    def decode_latents(self, latents: torch.Tensor, tiled: bool = False, run: "runtime.Run | None" = None) -> torch.Tensor:
        """VAE decode of sampler latents (divided by the scaling factor here) in the "vae" stage; tiled when asked."""
        with runtime.stage(run, "vae", self.vae):
            z = latents.to(self.vae.device, self.vae.dtype) / self.vae.config.scaling_factor
            if tiled:
                return self.vae.tiled_decode(z).sample
            return self.vae.decode(z).sample

    def to_result(self, decoded: torch.Tensor, latents: torch.Tensor, posterior: torch.Generator | None) -> ICPResult:
        """The result of one page from its decoded canvas."""
        image = self.image_processor.postprocess(decoded.float(), output_type="pil")[0]
        state = posterior.get_state() if posterior is not None else None
        return ICPResult(canvas=image, query=center_crop(image), latents=latents, posterior_state=state)
