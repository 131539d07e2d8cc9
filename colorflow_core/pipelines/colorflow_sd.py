"""In-context colorization (ICP) on SD1.5: guider + LoRA UNet denoise the stitched canvas."""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel, UniPCMultistepScheduler
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from .. import runtime
from ..models.color_guider import ColorGuiderSDModel
from ..gpu_kernels import fast_kernels
from ..models.unet_injection import inject_guider_residuals
from ..observe import NO_OBSERVER, PageObserver
from ..validation import check_finite_tensor
from .condition import NEGATIVE_PROMPT, PROMPT, ICPResult, ICPSampler, ProgressFn

__all__ = ["ColorFlowSDPipeline", "ICPResult", "ProgressFn"]


class ColorFlowSDPipeline(ICPSampler, DiffusionPipeline):
    """SD1.5 + ColorGuider + LoRA sampler over a ColorFlow canvas (upstream's ColorFlowSDPipeline, on stock diffusers)."""

    model_cpu_offload_seq = "text_encoder->guider->unet->vae"
    family = "sd"
    default_guidance_scale = 7.5
    batches_pages = True

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        guider: ColorGuiderSDModel,
        scheduler: UniPCMultistepScheduler,
    ):
        super().__init__()
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, guider=guider, scheduler=scheduler
        )
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_convert_rgb=True)
        self._prompt_cache: dict[tuple, torch.Tensor] = {}

    @torch.no_grad()
    def encode_prompt(
        self,
        prompt: str,
        negative_prompt: str,
        do_cfg: bool,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        run: runtime.Run | None = None,
    ) -> torch.Tensor:
        """CLIP text states, [uncond, cond] under CFG; cached per (prompt, negative, device, dtype).

        `device`/`dtype` default to this pipeline's device and the UNet's dtype. The text encoder runs (in its
        own stage) only on a cache miss."""
        device = self.device if device is None else torch.device(device)
        dtype = self.unet.dtype if dtype is None else dtype
        key = (prompt, negative_prompt, do_cfg, device, dtype)
        if key not in self._prompt_cache:
            texts = [negative_prompt, prompt] if do_cfg else [prompt]
            with runtime.stage(run, "text_encoder", self.text_encoder):
                ids = self.tokenizer(
                    texts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
                    return_tensors="pt",
                ).input_ids.to(self.text_encoder.device)
                # Upstream encodes each prompt on its own; one batch of two gives the same states (no attention mask).
                states = torch.cat([self.text_encoder(row[None])[0] for row in ids])
            self._prompt_cache[key] = states.to(device, dtype)
        return self._prompt_cache[key]

    def run_modules(self) -> dict[str, tuple[torch.nn.Module, ...]]:
        """stage → this pipeline's modules (what a preset stages)."""
        return {"text_encoder": (self.text_encoder,), "vae": (self.vae,), "denoiser": (self.guider, self.unet)}

    @torch.no_grad()
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
        run: runtime.Run | None = None,
        observer: PageObserver = NO_OBSERVER,
        progress: ProgressFn | None = None,
    ) -> list[ICPResult]:
        """See `ICPSampler.sample_pages`; same-size canvases are denoised as one UNet batch."""
        # 1. Check inputs; what runs where.
        guidance_scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        self.check_pages(canvases, masks, generators, posterior_generators, num_inference_steps, guidance_scale, guider_scale)
        do_classifier_free_guidance = guidance_scale > 1.0
        batch = 2 if do_classifier_free_guidance else 1
        pages = len(canvases)
        device = self.device if run is None else run.device
        dtype = self.unet.dtype if run is None else run.dtype_for("denoiser", self.unet)
        channels_last = run is not None and run.channels_last("denoiser")
        with fast_kernels(device, self.guider, self.unet, self.vae):
            # 2. Encode the prompt; rows [uncond × pages, cond × pages], like the model input below.
            with observer.stage("text_encode"):
                prompt_embeds = self.encode_prompt(prompt, negative_prompt, do_classifier_free_guidance, device, dtype, run)
            if pages > 1:
                prompt_embeds = prompt_embeds.repeat_interleave(pages, dim=0)

            # 3. Prepare the guider's condition; rows [row 0 of every page, row 1 of every page].
            with observer.stage("vae_encode"):
                conditions = [
                    self.prepare_condition(canvas, mask, batch, g, encode_once, run)
                    for canvas, mask, g in zip(canvases, masks, posterior_generators)
                ]
            condition = torch.cat([c[r : r + 1] for r in range(batch) for c in conditions]).to(device, dtype)
            if channels_last:
                condition = condition.contiguous(memory_format=torch.channels_last)

            # 4. Timesteps (a fresh scheduler per call: its state is per sampling run).
            scheduler = UniPCMultistepScheduler.from_config(self.scheduler.config)
            scheduler.set_timesteps(num_inference_steps, device=device)

            # 5. Initial latents, each page from its own generator.
            width, height = canvases[0].size
            shape = (1, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
            latents = torch.cat([randn_tensor(shape, generator=g, device=device, dtype=dtype) for g in generators])
            latents = latents * scheduler.init_noise_sigma

            # 6. Denoising loop.
            timesteps = scheduler.timesteps
            with observer.stage("denoise"), runtime.denoise_stage(run, self.guider, self.unet):
                for i, t in enumerate(timesteps):
                    model_input = scheduler.scale_model_input(torch.cat([latents] * batch), t)
                    if channels_last:
                        model_input = model_input.contiguous(memory_format=torch.channels_last)
                    with runtime.model_turn(run, self.guider):
                        residuals = self.guider(model_input, t, condition, conditioning_scale=guider_scale)
                    with runtime.model_turn(run, self.unet), inject_guider_residuals(self.unet, residuals):
                        noise = self.unet(model_input, t, encoder_hidden_states=prompt_embeds).sample
                    del residuals
                    if do_classifier_free_guidance:
                        uncond, cond = noise.chunk(2)
                        noise = uncond + guidance_scale * (cond - uncond)
                    latents = scheduler.step(noise, t, latents).prev_sample
                    observer.step_end(i + 1, len(timesteps))
                    if progress is not None:
                        progress(i + 1, len(timesteps))
            check_finite_tensor(latents, "ICP denoising (ColorGuider + UNet)")

            # 7. Decode each page.
            with observer.stage("decode"):
                return [
                    self.to_result(self.decode_latents(latents[row : row + 1], tile_decode, run), latents[row : row + 1], g)
                    for row, g in enumerate(posterior_generators)
                ]
