"""In-context colorization (ICP) on PixArt-α: guider controls + LoRA transformer denoise the stitched canvas.

Styles "sketch" and "sketch_shading" of the release. Implements `ICPSampler` like `ColorFlowSDPipeline`, so callers
(the page loop, the ComfyUI sampler) treat both families alike.
"""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, DPMSolverMultistepScheduler, PixArtTransformer2DModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from .. import runtime
from ..errors import IncompatibleWeightsError
from ..gpu_kernels import fast_kernels
from ..models.color_guider_pixart import ColorGuiderPixArtModel
from ..models.pixart_injection import inject_controls
from ..observe import NO_OBSERVER, PageObserver
from ..validation import check_finite_tensor
from .condition import NEGATIVE_PROMPT, PROMPT, ICPResult, ICPSampler, ProgressFn
from .t5_prompt import PromptEmbeddings, T5PromptEncoder


def check_pixart_pair(transformer: PixArtTransformer2DModel, guider: ColorGuiderPixArtModel) -> None:
    """The guider must fit the transformer: same width, at most as many blocks, 4 + 9 input channels."""
    t, g = transformer.config, guider.config
    inner_t, inner_g = t.num_attention_heads * t.attention_head_dim, g.num_attention_heads * g.attention_head_dim
    problems = []
    if inner_t != inner_g:
        problems.append(f"width {inner_g} vs transformer {inner_t}")
    if guider.num_controls > len(transformer.transformer_blocks):
        problems.append(f"{guider.num_controls} controls for {len(transformer.transformer_blocks)} blocks")
    if g.in_channels != t.in_channels or g.cond_channels != 9:
        problems.append(f"input {g.in_channels}+{g.cond_channels} channels (needs {t.in_channels}+9)")
    if g.patch_size != t.patch_size:
        problems.append(f"patch size {g.patch_size} vs {t.patch_size}")
    if problems:
        raise IncompatibleWeightsError("PixArt ColorGuider does not fit the PixArt transformer: " + "; ".join(problems))


class ColorFlowPixArtPipeline(ICPSampler, DiffusionPipeline):
    """PixArt-α + ColorGuider + LoRA sampler over a ColorFlow canvas (upstream's ColorFlowPixArtAlphaPipeline,
    on stock diffusers). T5 is not a component: `prompt_encoder` serves cached embeddings and loads T5 only
    when the cache lacks the prompt."""

    model_cpu_offload_seq = "guider->transformer->vae"
    family = "pixart"
    default_guidance_scale = 4.5
    batches_pages = False

    def __init__(
        self,
        vae: AutoencoderKL,
        transformer: PixArtTransformer2DModel,
        guider: ColorGuiderPixArtModel,
        scheduler: DPMSolverMultistepScheduler,
        prompt_encoder: T5PromptEncoder,
    ):
        super().__init__()
        check_pixart_pair(transformer, guider)
        self.register_modules(
            vae=vae, transformer=transformer, guider=guider, scheduler=scheduler, prompt_encoder=prompt_encoder
        )
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_convert_rgb=True)

    def prompt_embeddings(self, prompt: str, negative_prompt: str) -> PromptEmbeddings:
        """The cached T5 embeddings of the pair (T5 runs, on this pipeline's device and dtype, only on a cache miss)."""
        return self.prompt_encoder.encode(prompt, negative_prompt, device=self.device, dtype=self.transformer.dtype)

    def encode_prompt(
        self, prompt: str, negative_prompt: str, do_cfg: bool, device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(T5 states, attention mask), [uncond, cond] under CFG, on this pipeline's device and dtype (or those given)."""
        device = self.device if device is None else device
        dtype = self.transformer.dtype if dtype is None else dtype
        found = self.prompt_embeddings(prompt, negative_prompt)
        if do_cfg:
            states = torch.cat([found.negative_embeds, found.embeds])
            mask = torch.cat([found.negative_mask, found.mask])
        else:
            states, mask = found.embeds, found.mask
        return states.to(device, dtype), mask.to(device)

    def micro_conditions(
        self, width: int, height: int, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> dict[str, torch.Tensor]:
        """PixArt's resolution / aspect-ratio conditions of the *canvas* (2H, 2W), as upstream passes them."""
        device = self.device if device is None else device
        dtype = self.transformer.dtype if dtype is None else dtype
        resolution = torch.tensor([[height, width]], device=device).to(dtype).repeat(batch, 1)
        aspect = torch.tensor([[float(height / width)]], device=device).to(dtype).repeat(batch, 1)
        return {"resolution": resolution, "aspect_ratio": aspect}

    def run_modules(self) -> dict[str, tuple[torch.nn.Module, ...]]:
        """stage → this pipeline's modules (what a preset stages; T5 is managed by `prompt_encoder`)."""
        return {"vae": (self.vae,), "denoiser": (self.guider, self.transformer)}

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
        """See `ICPSampler.sample_pages`; the canvases are denoised one after another."""
        guidance_scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        self.check_pages(canvases, masks, generators, posterior_generators, num_inference_steps, guidance_scale, guider_scale)
        return [
            self._sample_one(
                canvas, mask, latent_generator, posterior_generator, prompt, negative_prompt, num_inference_steps,
                guidance_scale, guider_scale, encode_once, tile_decode, run, observer, progress,
            )
            for canvas, mask, latent_generator, posterior_generator in zip(canvases, masks, generators, posterior_generators)
        ]

    def _sample_one(
        self, canvas, mask, generator, posterior_generator, prompt, negative_prompt, num_inference_steps, guidance_scale,
        guider_scale, encode_once, tile_decode, run, observer, progress,
    ) -> ICPResult:
        # 1. What runs where.
        do_classifier_free_guidance = guidance_scale > 1.0
        batch = 2 if do_classifier_free_guidance else 1
        device = self.device if run is None else run.device
        dtype = self.transformer.dtype if run is None else run.dtype_for("denoiser", self.transformer)
        guider_dtype = self.guider.dtype if run is None else run.dtype_for("denoiser", self.guider)
        with fast_kernels(device, self.vae):
            # 2. Prompt (cached T5 embeddings).
            with observer.stage("text_encode"):
                prompt_embeds, prompt_mask = self.encode_prompt(
                    prompt, negative_prompt, do_classifier_free_guidance, device=device, dtype=dtype
                )

            # 3. The guider's condition.
            with observer.stage("vae_encode"):
                condition = self.prepare_condition(canvas, mask, batch, posterior_generator, encode_once, run)
            condition = condition.to(device, guider_dtype)

            # 4. Timesteps.
            scheduler = DPMSolverMultistepScheduler.from_config(self.scheduler.config)
            scheduler.set_timesteps(num_inference_steps, device=device)

            # 5. Initial latents and micro-conditions.
            width, height = canvas.size
            channels = self.transformer.config.in_channels
            shape = (1, channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype) * scheduler.init_noise_sigma
            added_cond_kwargs = self.micro_conditions(width, height, batch, device=device, dtype=dtype)
            learned_sigma = self.transformer.config.out_channels // 2 == channels

            # 6. Denoising loop.
            timesteps = scheduler.timesteps
            with observer.stage("denoise"), runtime.denoise_stage(run, self.guider, self.transformer):
                for i, t in enumerate(timesteps):
                    model_input = scheduler.scale_model_input(torch.cat([latents] * batch), t)
                    timestep = t[None].to(device).expand(batch)
                    with runtime.model_turn(run, self.guider):
                        controls = self.guider(
                            model_input.to(guider_dtype), timestep, condition, added_cond_kwargs, conditioning_scale=guider_scale
                        )
                    with runtime.model_turn(run, self.transformer), inject_controls(self.transformer, controls):
                        noise = self.transformer(
                            model_input.to(dtype),
                            encoder_hidden_states=prompt_embeds,
                            encoder_attention_mask=prompt_mask,
                            timestep=timestep,
                            added_cond_kwargs=added_cond_kwargs,
                            return_dict=False,
                        )[0]
                    del controls
                    if do_classifier_free_guidance:
                        uncond, cond = noise.chunk(2)
                        noise = uncond + guidance_scale * (cond - uncond)
                    if learned_sigma:
                        noise = noise.chunk(2, dim=1)[0]
                    latents = scheduler.step(noise, t, latents, return_dict=False)[0]
                    observer.step_end(i + 1, len(timesteps))
                    if progress is not None:
                        progress(i + 1, len(timesteps))
            check_finite_tensor(latents, "ICP denoising (ColorGuider + PixArt transformer)")

            # 7. Decode.
            with observer.stage("decode"):
                return self.to_result(self.decode_latents(latents, tile_decode, run), latents, posterior_generator)
