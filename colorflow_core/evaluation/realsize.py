"""A ColorFlow SD1.5 model with random weights at the real widths, built in memory (for timing, never for images).

UNet 859.5 M (SD1.5 config) + a rank-64 LoRA on the release's targets, ColorGuider 842 M (the released config's
dims), SD VAE 83.7 M, CLIP ViT-L text encoder 123 M, GSRP fusion net at [128, 128, 256, 512, 512] with random
BatchNorm statistics. The retrieval encoder is tiny (references are embedded once; retrieval is not what the
real-size benchmark measures) and the tokenizer is the byte-level test tokenizer. Nothing is written to disk
except the tokenizer files in `workdir`. fp32 needs about 8 GB of RAM.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel, UniPCMultistepScheduler
from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

from ..loading import ColorFlowModel, load_tokenizer
from ..models.color_guider import ColorGuiderSDModel
from ..models.fusion import MultiHiddenResNetModel
from ..models.lora import SD_LORA_TARGETS, apply_lora
from ..pipelines.colorflow_sd import ColorFlowSDPipeline
from ..pipelines.guided_sr import GuidedSuperResolver
from ..retrieval.encoders import ReleaseClipEncoder
from ..tiny import CONFIGS, write_tokenizer

LORA_RANK = 64


def _config(path: Path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def _random_lora(unet: UNet2DConditionModel, rank: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """LoRA tensors for every SD1.5 target (A ~ N(0, 1/rank), B ~ N(0, 1e-3²): non-zero, small)."""
    shapes = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in SD_LORA_TARGETS):
            shapes[name] = (module.in_features, module.out_features)
    tensors = {}
    for name, (fan_in, fan_out) in shapes.items():
        tensors[f"{name}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) / rank
        tensors[f"{name}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) * 1e-3
    return tensors


def build_random_sd15(workdir: Path, seed: int = 0, lora_rank: int = LORA_RANK) -> ColorFlowModel:
    """The real-width random ColorFlow model (fp32, CPU); `workdir` receives the tokenizer files."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    sd15 = CONFIGS / "sd15"
    unet = UNet2DConditionModel.from_config(_config(sd15 / "unet" / "config.json"))
    apply_lora(unet, _random_lora(unet, lora_rank, generator))
    guider = ColorGuiderSDModel()
    with torch.no_grad():
        for name, param in guider.named_parameters():
            if name.startswith("brushnet_"):  # zero convs: small random values so the residuals matter
                param.copy_(torch.randn(param.shape, generator=generator) * 1e-3)
    vae = AutoencoderKL.from_config(_config(sd15 / "vae" / "config.json"))
    with torch.no_grad():
        vae.quant_conv.bias[4:] -= 2.0  # a smaller posterior std, like the real VAE
    text_encoder = CLIPTextModel(CLIPTextConfig(**_config(sd15 / "text_encoder" / "config.json")))
    write_tokenizer(Path(workdir) / "tokenizer")
    tokenizer = load_tokenizer(Path(workdir) / "tokenizer")
    scheduler = UniPCMultistepScheduler.from_config(json.loads((CONFIGS / "sd15_scheduler_config.json").read_text()))
    fusion = MultiHiddenResNetModel(channels_list=(128, 128, 256, 512, 512))
    with torch.no_grad():
        for name, buffer in fusion.named_buffers():
            if name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0, generator=generator)
            elif name.endswith("running_mean"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.1)
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=224,
        patch_size=14, projection_dim=16,
    ))
    pipeline = ColorFlowSDPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(), guider=guider.eval(),
        scheduler=scheduler,
    )
    encoder = ReleaseClipEncoder(vision, name=f"random-tiny-clip-{seed}")
    return ColorFlowModel("gray", pipeline, GuidedSuperResolver(vae, fusion), encoder, Path(workdir))


def parameter_counts(model: ColorFlowModel) -> dict[str, int]:
    """Parameters per network (LoRA counted with the UNet)."""
    pipe = model.pipeline
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {
        "unet+lora": count(pipe.unet), "guider": count(pipe.guider), "vae": count(pipe.vae),
        "text_encoder": count(pipe.text_encoder), "fusion": count(model.upscaler.fusion),
    }
