"""Write tiny random weights in the exact release layout: try everything without the 17 GB download."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

from .models.color_guider import ColorGuiderSDModel
from .models.lora import SD_LORA_TARGETS
from .preprocessors.tiny_weights import write_tiny_preprocessors
from .tiny_common import VAE_BLOCKS, check_tiny_folder, claim_tiny_folder, randomize_, tiny_vae, write_tiny_fusion
from .tiny_pixart import write_tiny_pixart

CONFIGS = Path(__file__).parent / "configs"
#: Tiny widths; four distinct-enough levels keep every conv_shortcut of the release (626 guider keys).
BLOCKS = (16, 32, 64, 64)
TEXT_DIM = 32
LORA_RANK = 4
_SPECIALS = ("<|startoftext|>", "<|endoftext|>")



def _byte_symbols() -> list[str]:
    """GPT-2/CLIP byte-to-unicode table: printable bytes map to themselves, the rest above 255."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def write_tokenizer(folder: Path) -> None:
    """A byte-level CLIP BPE tokenizer (514 tokens, no merges) that loads offline."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": 256 + i for i, s in enumerate(symbols)})
    vocab.update({token: 512 + i for i, token in enumerate(_SPECIALS)})
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": _SPECIALS[0],
        "eos_token": _SPECIALS[1],
        "pad_token": _SPECIALS[1],
        "unk_token": _SPECIALS[1],
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def tiny_unet() -> UNet2DConditionModel:
    """An SD1.5-shaped UNet at tiny widths."""
    return UNet2DConditionModel(
        sample_size=16,
        block_out_channels=BLOCKS,
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def tiny_guider() -> ColorGuiderSDModel:
    """A ColorGuider at tiny widths with the released config keys and non-zero zero-convs."""
    guider = ColorGuiderSDModel(block_out_channels=BLOCKS, norm_num_groups=8, cross_attention_dim=TEXT_DIM)
    return guider


def randomize_guider_outputs_(guider: ColorGuiderSDModel, scale: float, generator: torch.Generator) -> None:
    """Non-zero zero-convs and condition input (a fresh guider's residuals would all be zero)."""
    with torch.no_grad():
        for name, param in guider.named_parameters():
            if name.startswith("brushnet_") or name.startswith("conv_in_condition"):
                randomize_(param, scale, generator)


def lora_state_dict(unet: UNet2DConditionModel, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random non-zero LoRA tensors named as upstream's peft-adapted UNet names them."""
    unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=list(SD_LORA_TARGETS)))
    tensors = {k: v.clone() for k, v in unet.state_dict().items() if ".lora_" in k}
    unet.delete_adapters("default")
    for tensor in tensors.values():
        randomize_(tensor, 0.05, generator)
    return tensors


def write_diffusers_base(base: Path, unet, vae, text_encoder, write_tokenizer_files: Callable[[Path], object]) -> None:
    """`base` as an SD1.5 diffusers folder: the three models, a tokenizer, SD1.5's scheduler config, model_index.json."""
    unet.save_pretrained(base / "unet")
    vae.save_pretrained(base / "vae")
    text_encoder.save_pretrained(base / "text_encoder")
    write_tokenizer_files(base / "tokenizer")
    (base / "scheduler").mkdir(parents=True)
    shutil.copy(CONFIGS / "sd15_scheduler_config.json", base / "scheduler" / "scheduler_config.json")
    (base / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline",
        "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "safety_checker": [None, None],
    }, indent=2))


def write_tiny_release(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write `folder/colorflow` (release layout) and `folder/sd15` (diffusers base); return both paths.

    Also writes the PixArt styles (`colorflow/sketch`, `colorflow/shading`) and their base, `folder/pixart`.
    """
    folder = Path(folder)
    release, base = folder / "colorflow", folder / "sd15"
    for path in (release, base, folder / "pixart"):  # all checked before any is cleared
        check_tiny_folder(path)
    for path in (release, base):
        claim_tiny_folder(path)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)

    unet = tiny_unet()
    vae = tiny_vae()
    with torch.no_grad():
        vae.quant_conv.bias[4:] -= 2.0  # smaller posterior std, like the real VAE
    text = CLIPTextConfig(
        vocab_size=514, hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=TEXT_DIM, bos_token_id=512, eos_token_id=513, pad_token_id=513,
    )
    write_diffusers_base(base, unet, vae, CLIPTextModel(text), write_tokenizer)

    gray = release / "GraySD"
    guider = tiny_guider()
    randomize_guider_outputs_(guider, 0.1, generator)
    guider.save_pretrained(gray)
    torch.save(lora_state_dict(unet, generator), gray / "unet_lora.bin")
    write_tiny_fusion(gray, VAE_BLOCKS, generator)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        image_size=224, patch_size=14, projection_dim=16,
    )
    CLIPVisionModelWithProjection(vision).save_pretrained(release / "image_encoder")
    write_tiny_preprocessors(release, generator)  # LE/erika.pth, ScreenStyle/…
    write_tiny_pixart(release, folder / "pixart", seed=seed)
    return release, base
