"""In-context colorization (ICP) on SD1.5: guider + LoRA UNet denoise the stitched canvas."""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel, UniPCMultistepScheduler
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from .. import runtime
from ..gpu_kernels import fast_kernels
from ..canvas import center_crop
from ..errors import InvalidInputError
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
    def encode_prompt(
        self,
        prompt: str,
        negative_prompt: str,
        do_cfg: bool,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """CLIP text states, [uncond, cond] under CFG; cached per (prompt, negative, device, dtype).

        `device`/`dtype` default to this pipeline's device and the UNet's dtype. The text encoder runs (in its
        own stage) only on a cache miss."""
        device = self.device if device is None else torch.device(device)
        dtype = self.unet.dtype if dtype is None else dtype
        key = (prompt, negative_prompt, do_cfg, device, dtype)
        if key not in self._prompt_cache:
            texts = [negative_prompt, prompt] if do_cfg else [prompt]
            with runtime.stage("text_encoder", self.text_encoder):
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
        """Denoise the canvas; `generator` draws the initial noise, `posterior_generator` the VAE samples.

        Under a preset (`self.plan`) its guidance scale, if it has one, replaces `guidance_scale`."""
        return self.sample_pages(
            [canvas], [mask], generators=[generator], posterior_generators=[posterior_generator], prompt=prompt,
            negative_prompt=negative_prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            guider_scale=guider_scale, progress=progress,
        )[0]

    @torch.no_grad()
    def sample_pages(
        self,
        canvases: list[Image.Image],
        masks: list[Image.Image],
        *,
        generators: list[torch.Generator | None],
        posterior_generators: list[torch.Generator | None],
        prompt: str = "manga",
        negative_prompt: str = "",
        num_inference_steps: int = 10,
        guidance_scale: float = 7.5,
        guider_scale: float = 1.0,
        progress: ProgressFn | None = None,
    ) -> list[ICPResult]:
        """Denoise several same-size canvases as one UNet batch; page i draws its noise from `generators[i]` and its
        VAE samples from `posterior_generators[i]`, so each result equals that page sampled alone (up to the
        rounding of a batched convolution)."""
        if not canvases or not (len(canvases) == len(masks) == len(generators) == len(posterior_generators)):
            raise InvalidInputError("sample_pages needs one mask and two generators per canvas")
        if len({c.size for c in canvases}) > 1:
            raise InvalidInputError("canvases sampled together must have the same size")
        size = (canvases[0].width // 2, canvases[0].height // 2)
        with runtime.activate(self.plan, size=size, guidance=guidance_scale, pages=len(canvases)) as run, \
                fast_kernels(self.device if run is None else run.device, self.guider, self.unet, self.vae):
            preset = run.preset if run is not None else None
            if preset is not None:
                guidance_scale = preset.guidance(guidance_scale)
            for canvas, mask in zip(canvases, masks):
                self.check_inputs(canvas, mask, num_inference_steps, guidance_scale)
            return self._sample(
                run, canvases, masks, generators, posterior_generators, prompt, negative_prompt,
                num_inference_steps, guidance_scale, guider_scale, progress,
            )

    def _sample(
        self, run, canvases, masks, generators, posterior_generators, prompt, negative_prompt,
        num_inference_steps, guidance_scale, guider_scale, progress,
    ) -> list[ICPResult]:
        do_cfg = guidance_scale > 1.0
        batch = 2 if do_cfg else 1
        pages = len(canvases)
        device = self.device if run is None else run.device
        dtype = self.unet.dtype if run is None else run.dtype_for("denoiser", self.unet)
        encode_once = run is not None and run.preset.encode_once
        channels_last = run is not None and run.channels_last("denoiser")
        prompt_embeds = self.encode_prompt(prompt, negative_prompt, do_cfg, device=device, dtype=dtype)
        if pages > 1:  # rows [uncond × pages, cond × pages], like the model input below
            prompt_embeds = prompt_embeds.repeat_interleave(pages, dim=0)

        scheduler = UniPCMultistepScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(num_inference_steps, device=device)
        width, height = canvases[0].size
        shape = (1, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        noise_rows = [randn_tensor(shape, generator=g, device=device, dtype=dtype) for g in generators]
        latents = noise_rows[0] if pages == 1 else torch.cat(noise_rows)
        latents = latents * scheduler.init_noise_sigma
        conditions = [
            self.prepare_condition(canvas, mask, batch, g, encode_once)
            for canvas, mask, g in zip(canvases, masks, posterior_generators)
        ]
        if pages == 1:
            condition = conditions[0].to(device, dtype)
        else:  # rows [row 0 of every page, row 1 of every page]: page i's uncond/cond rows meet its own latents
            condition = torch.cat([c[r : r + 1] for r in range(batch) for c in conditions]).to(device, dtype)
        if channels_last:
            condition = condition.contiguous(memory_format=torch.channels_last)

        timesteps = scheduler.timesteps
        with runtime.denoise_stage(self.guider, self.unet):
            for i, t in enumerate(timesteps):
                model_input = torch.cat([latents] * batch)
                model_input = scheduler.scale_model_input(model_input, t)
                if channels_last:
                    model_input = model_input.contiguous(memory_format=torch.channels_last)
                with runtime.model_turn(self.guider):
                    residuals = self.guider(model_input, t, condition, conditioning_scale=guider_scale)
                with runtime.model_turn(self.unet):
                    with inject_guider_residuals(self.unet, residuals):
                        noise = self.unet(model_input, t, encoder_hidden_states=prompt_embeds).sample
                del residuals
                if do_cfg:
                    uncond, cond = noise.chunk(2)
                    noise = uncond + guidance_scale * (cond - uncond)
                latents = scheduler.step(noise, t, latents).prev_sample
                if progress is not None:
                    progress(i + 1, len(timesteps))

        tiled = run is not None and run.tile_decode((width, height))
        results = []
        for row in range(pages):
            page_latents = latents if pages == 1 else latents[row : row + 1]
            decoded = self.decode_latents(page_latents, tiled)
            image = self.image_processor.postprocess(decoded.float(), output_type="pil")[0]
            results.append(ICPResult(canvas=image, query=center_crop(image), latents=page_latents))
        return results
