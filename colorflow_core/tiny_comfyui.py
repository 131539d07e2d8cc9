"""`make-tiny --comfyui`: random weights a real ComfyUI server loads on a CPU, as a ComfyUI `models/` tree.

ComfyUI recognises SD1.5 by its widths (320 model channels, 768-wide text states) and builds the full CLIP-L text
encoder and SD VAE whatever the file holds, so those two are full size; the UNet is shallow (320 channels at every
level, the release's 2 layers per level, so the guider still gives 12 + 1 + 15 residuals). Every file is written
under the name the shipped workflows ask for.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from .ldm_layout import controlnet_to_ldm, sd_to_ldm
from .models.color_guider import ColorGuiderSDModel
from .single_file import write_clip_vocab
from .tiny import CONFIGS, lora_state_dict, randomize_, randomize_guider_outputs_, write_diffusers_base, write_tiny_fusion, write_tiny_release

#: Shallow SD1.5: ComfyUI's detection reads the widths from the file and matches model_channels 320 / context 768.
BLOCKS = (320, 320, 320, 320)
SD15 = CONFIGS / "sd15"
#: Names under models/ that the shipped workflows use.
CHECKPOINT = "checkpoints/v1-5-pruned-emaonly.safetensors"
CONTROLNET = "controlnet/control_v11p_sd15_lineart.safetensors"
RELEASE = "colorflow/ColorFlow"
BASE = "diffusers/stable-diffusion-v1-5"
PIXART = "diffusers/PixArt-XL-2-1024-MS"


def comfy_unet() -> UNet2DConditionModel:
    """A shallow SD1.5 UNet that ComfyUI still detects as SD1.5."""
    return UNet2DConditionModel(
        sample_size=64, block_out_channels=BLOCKS, layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8,
    )


def _tokenizer(folder: Path) -> None:
    write_clip_vocab(folder)
    shutil.copy(SD15 / "tokenizer" / "tokenizer_config.json", folder / "tokenizer_config.json")


def write_comfyui_tree(folder: Path, seed: int = 0) -> dict[str, Path]:
    """Write `folder/models/…` (checkpoint, ControlNet, ColorFlow release, diffusers bases); return what went where."""
    models = Path(folder) / "models"
    paths = {name: models / rel for name, rel in (
        ("checkpoint", CHECKPOINT), ("controlnet", CONTROLNET), ("colorflow", RELEASE), ("base", BASE), ("pixart", PIXART),
    )}
    for path in paths.values():
        if path.is_dir():
            shutil.rmtree(path)
    # The tiny release gives the parts ComfyUI never sees (retrieval encoder, preprocessors, the PixArt styles).
    build = models / ".colorflow-build"
    shutil.rmtree(build, ignore_errors=True)
    release, _tiny_base = write_tiny_release(build, seed=seed)
    paths["colorflow"].parent.mkdir(parents=True, exist_ok=True)
    shutil.move(release, paths["colorflow"])
    paths["pixart"].parent.mkdir(parents=True, exist_ok=True)
    shutil.move(build / "pixart", paths["pixart"])
    shutil.rmtree(build)

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    unet = comfy_unet()
    vae = AutoencoderKL.from_config(json.loads((SD15 / "vae" / "config.json").read_text()))
    with torch.no_grad():
        vae.quant_conv.bias[4:] = -30.0  # a near-zero posterior std: ComfyUI encodes the mean, upstream samples
    text_encoder = CLIPTextModel(CLIPTextConfig.from_json_file(str(SD15 / "text_encoder" / "config.json")))
    write_diffusers_base(paths["base"], unet, vae, text_encoder, _tokenizer)
    paths["checkpoint"].parent.mkdir(parents=True, exist_ok=True)
    save_file(sd_to_ldm(unet, vae, text_encoder), paths["checkpoint"])

    controlnet = ControlNetModel.from_unet(unet)  # before the LoRA wraps the UNet's modules
    with torch.no_grad():
        for name, param in controlnet.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                randomize_(param, 0.02, generator)
    paths["controlnet"].parent.mkdir(parents=True, exist_ok=True)
    save_file(controlnet_to_ldm(controlnet.state_dict(), unet.config.layers_per_block), paths["controlnet"])
    gray = paths["colorflow"] / "GraySD"
    shutil.rmtree(gray)
    guider = ColorGuiderSDModel(block_out_channels=BLOCKS)
    randomize_guider_outputs_(guider, 0.02, generator)
    guider.save_pretrained(gray)
    torch.save(lora_state_dict(unet, generator), gray / "unet_lora.bin")
    write_tiny_fusion(gray, tuple(vae.config.block_out_channels), generator)

    return paths
