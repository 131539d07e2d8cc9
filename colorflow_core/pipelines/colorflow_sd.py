"""In-context colorization (ICP) on SD1.5: guider + LoRA UNet denoise the stitched canvas."""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel, UniPCMultistepScheduler
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from ..canvas import center_crop
from ..models.color_guider import ColorGuiderSDModel
from ..models.unet_injection import inject_guider_residuals
from .condition import CanvasConditionMixin, ICPResult, ProgressFn

__all__ = ["ColorFlowSDPipeline", "ICPResult", "ProgressFn"]


class ColorFlowSDPipeline(CanvasConditionMixin, DiffusionPipeline):
    """SD1.5 + ColorGuider + LoRA sampler over a ColorFlow canvas (upstream's ColorFlowSDPipeline, on stock diffusers)."""

    model_cpu_offload_seq = "text_encoder->guider->unet->vae"
    #: Upstream's CFG scale for this family (what the app used: the pipeline default).
    default_guidance_scale = 7.5

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
    def encode_prompt(self, prompt: str, negative_prompt: str, do_cfg: bool) -> torch.Tensor:
        """CLIP text states, [uncond, cond] under CFG; cached per (prompt, negative, device, dtype)."""
        key = (prompt, negative_prompt, do_cfg, self.device, self.unet.dtype)
        if key not in self._prompt_cache:
            texts = [negative_prompt, prompt] if do_cfg else [prompt]
            ids = self.tokenizer(
                texts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
            ).input_ids.to(self.text_encoder.device)
            # Upstream encodes each prompt on its own; one batch of two gives the same states (no attention mask).
            states = torch.cat([self.text_encoder(row[None])[0] for row in ids])
            self._prompt_cache[key] = states.to(self.device, self.unet.dtype)
        return self._prompt_cache[key]

    @torch.no_grad()
    def __call__(
        self,
        canvas: Image.Image,
        mask: Image.Image,
        *,
        prompt: str = "manga",
        negative_prompt: str = "",
        num_inference_steps: int = 10,
        guidance_scale: float = 7.5,
        guider_scale: float = 1.0,
        generator: torch.Generator | None = None,
        posterior_generator: torch.Generator | None = None,
        progress: ProgressFn | None = None,
    ) -> ICPResult:
        """Denoise the canvas; `generator` draws the initial noise, `posterior_generator` the VAE samples."""
        self.check_inputs(canvas, mask, num_inference_steps, guidance_scale)
        do_cfg = guidance_scale > 1.0
        batch = 2 if do_cfg else 1
        prompt_embeds = self.encode_prompt(prompt, negative_prompt, do_cfg)

        scheduler = UniPCMultistepScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(num_inference_steps, device=self.device)
        width, height = canvas.size
        shape = (1, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=self.unet.dtype)
        latents = latents * scheduler.init_noise_sigma
        condition = self.prepare_condition(canvas, mask, batch, posterior_generator).to(self.unet.dtype)

        timesteps = scheduler.timesteps
        for i, t in enumerate(timesteps):
            model_input = torch.cat([latents] * batch)
            model_input = scheduler.scale_model_input(model_input, t)
            residuals = self.guider(model_input, t, condition, conditioning_scale=guider_scale)
            with inject_guider_residuals(self.unet, residuals):
                noise = self.unet(model_input, t, encoder_hidden_states=prompt_embeds).sample
            if do_cfg:
                uncond, cond = noise.chunk(2)
                noise = uncond + guidance_scale * (cond - uncond)
            latents = scheduler.step(noise, t, latents).prev_sample
            if progress is not None:
                progress(i + 1, len(timesteps))

        decoded = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        image = self.image_processor.postprocess(decoded.float(), output_type="pil")[0]
        return ICPResult(canvas=image, query=center_crop(image), latents=latents)
