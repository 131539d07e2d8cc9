"""Tiny random weights for the PixArt styles: `colorflow/sketch`, `colorflow/shading` and a PixArt-α base folder.

Same file names and key layouts as the release and as PixArt-alpha/PixArt-XL-2-1024-MS (transformer, vae,
text_encoder, tokenizer, scheduler), at toy widths, written offline (the T5 tokenizer is built from a small
Unigram vocabulary).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers import PixArtTransformer2DModel
from peft import LoraConfig, inject_adapter_in_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

from .models.color_guider_pixart import ColorGuiderPixArtModel, with_alias_keys
from .models.lora import PIXART_LORA_TARGETS
from .styles import STYLES
from .tiny_common import VAE_BLOCKS, claim_tiny_folder, randomize_, tiny_vae, write_tiny_fusion

CONFIGS = Path(__file__).parent / "configs" / "pixart"
#: 3 heads × 8: the width must split in 3 (PixArt's resolution + aspect embedders take a third each).
HEADS, HEAD_DIM = 3, 8
LAYERS = 28
TEXT_DIM = 32
LORA_RANK = 4
#: The dimensions the tiny transformer and its guider share (the guider mirrors the transformer's blocks).
_TOY_WIDTH = dict(
    num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, num_layers=LAYERS,
    cross_attention_dim=HEADS * HEAD_DIM, sample_size=128, norm_num_groups=8,
)
#: Release sub-folder per PixArt style.


def tiny_pixart_transformer() -> PixArtTransformer2DModel:
    """A PixArt-XL-shaped transformer (28 blocks, learned sigma, T5 caption projection, micro-conditions) at toy width."""
    return PixArtTransformer2DModel(**_TOY_WIDTH, out_channels=8, caption_channels=TEXT_DIM)


def tiny_pixart_guider() -> ColorGuiderPixArtModel:
    """The PixArt ColorGuider at toy width: 14 blocks, 13-channel patch embedding, micro-condition embedders."""
    return ColorGuiderPixArtModel(**_TOY_WIDTH, cond_channels=9)


def tiny_t5() -> T5EncoderModel:
    """A 2-layer T5 v1.1-style encoder (gated GELU) on the tiny vocabulary."""
    config = T5Config(
        vocab_size=len(_vocabulary()), d_model=TEXT_DIM, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
        is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


def _vocabulary() -> list[tuple[str, float]]:
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0), ("▁manga", -1.0), ("▁comic", -1.5)]
    pieces += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    pieces += [("▁" + c, -3.5) for c in "abcdefghijklmnopqrstuvwxyz"]
    return pieces


def write_t5_tokenizer(folder: Path) -> None:
    """A T5-style Unigram tokenizer (pad 0, </s> 1, <unk> 2, '</s>' appended) saved as tokenizer.json."""
    backend = Tokenizer(models.Unigram(_vocabulary(), unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)]
    )
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", model_max_length=512
    )
    tokenizer.save_pretrained(folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "T5Tokenizer"
    config["extra_ids"] = 0
    config_path.write_text(json.dumps(config, indent=2))


def pixart_lora_state_dict(transformer: PixArtTransformer2DModel, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random non-zero LoRA tensors named as upstream's peft-adapted PixArt names them (`.lora_A.default.weight`)."""
    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=list(PIXART_LORA_TARGETS))
    inject_adapter_in_model(config, transformer, adapter_name="default")
    tensors = {k: v.detach().clone() for k, v in transformer.state_dict().items() if ".lora_" in k}
    for tensor in tensors.values():
        randomize_(tensor, 0.05, generator)
    return tensors


def write_pixart_style(folder: Path, vae_blocks: tuple[int, ...], generator: torch.Generator) -> None:
    """One release style folder: config.json + diffusion_pytorch_model.bin (with after_proj.*), LoRA, fusion net."""
    folder.mkdir(parents=True, exist_ok=True)
    guider = tiny_pixart_guider()
    with torch.no_grad():
        for name, param in guider.named_parameters():
            if name.startswith("adapter_linear"):
                randomize_(param, 0.2, generator)
    guider.save_config(folder)
    torch.save(with_alias_keys(guider.state_dict(), guider.num_controls), folder / "diffusion_pytorch_model.bin")
    torch.save(pixart_lora_state_dict(tiny_pixart_transformer(), generator), folder / "transformer_lora.bin")
    write_tiny_fusion(folder, vae_blocks, generator)


def write_tiny_pixart(release: Path, base: Path, seed: int = 0) -> Path:
    """Write `release/sketch`, `release/shading` and the PixArt base folder `base`; return `base`."""
    # The PixArt VAE is the SD architecture (sd-vae-ft-ema): the shared tiny VAE.
    claim_tiny_folder(base)
    generator = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed + 1)
    transformer = tiny_pixart_transformer()
    transformer.save_pretrained(base / "transformer")
    # The hub folder's config names the legacy class, as PixArt-XL-2-1024-MS's does.
    config_path = base / "transformer" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "_class_name": "Transformer2DModel"}, indent=2))
    vae = tiny_vae()
    with torch.no_grad():
        vae.quant_conv.bias[4:] -= 2.0
    vae.save_pretrained(base / "vae")
    tiny_t5().save_pretrained(base / "text_encoder")
    write_t5_tokenizer(base / "tokenizer")
    (base / "scheduler").mkdir()
    shutil.copy(CONFIGS / "scheduler" / "scheduler_config.json", base / "scheduler" / "scheduler_config.json")
    (base / "model_index.json").write_text(json.dumps({
        "_class_name": "PixArtAlphaPipeline",
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"], "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"], "transformer": ["diffusers", "Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }, indent=2))
    for style in STYLES.values():
        if style.family == "pixart":
            write_pixart_style(release / style.folder, VAE_BLOCKS, generator)
    return base
