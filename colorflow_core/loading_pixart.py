"""Load the PixArt styles ("sketch", "sketch_shading") from a release snapshot and a PixArt-α base folder."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtTransformer2DModel
from diffusers.models.embeddings import get_2d_sincos_pos_embed

from .configured import load_configured, load_fusion, place_modules
from .model import ColorFlowModel
from .models.color_guider_pixart import ColorGuiderPixArtModel, drop_alias_keys
from .models.lora import PIXART_LORA_TARGETS, apply_lora
from .pipelines.colorflow_pixart import ColorFlowPixArtPipeline
from .pipelines.guided_sr import GuidedSuperResolver
from .preprocessors import PREPROCESSOR_FILES
from .pipelines.t5_prompt import CACHE_FOLDER, T5PromptEncoder, user_cache_dir
from .retrieval.encoders import ReleaseClipEncoder
from .styles import get_style
from .weights import find_weight_file, read_state_dict, require_file, resolve_snapshot

PIXART_REPO = "PixArt-alpha/PixArt-XL-2-1024-MS"
SHIPPED_SCHEDULER = Path(__file__).parent / "configs" / "pixart" / "scheduler" / "scheduler_config.json"
_PIXART_PATTERNS = ["model_index.json", "transformer/*", "vae/*", "text_encoder/*", "tokenizer/*", "scheduler/*"]


def load_pixart_guider(folder: Path, root: Path | None = None) -> ColorGuiderPixArtModel:
    """The PixArt ColorGuider from `config.json` + weights: every released key required, `after_proj.*` dropped."""
    guider = load_configured(
        ColorGuiderPixArtModel, folder, root, adapt=lambda model, state: drop_alias_keys(state, model.num_controls)
    )
    # PatchEmbed's sin-cos table is a non-persistent buffer: rebuild it off the meta device.
    _rebuild_position_table(guider)
    return guider.eval()


def _rebuild_position_table(guider: ColorGuiderPixArtModel) -> None:
    embed = guider.pos_embed
    if getattr(embed, "pos_embed", None) is not None and embed.pos_embed.is_meta:
        grid = int(embed.height)
        table = get_2d_sincos_pos_embed(
            embed.pos_embed.shape[-1], grid, base_size=embed.base_size,
            interpolation_scale=embed.interpolation_scale, output_type="pt",
        )
        embed.register_buffer("pos_embed", table.float().unsqueeze(0), persistent=False)


def load_pixart_transformer(base: Path | PixArtTransformer2DModel, lora_folder: Path, root: Path | None = None):
    """PixArt-α's transformer (from `base/transformer`, or one already loaded) with the release LoRA, fully applied."""
    if isinstance(base, PixArtTransformer2DModel):
        transformer = base
    else:
        require_file(base / "transformer" / "config.json", base, PIXART_REPO)
        transformer = PixArtTransformer2DModel.from_pretrained(base / "transformer", torch_dtype=torch.float32)
    lora = find_weight_file(lora_folder, "transformer_lora", root)
    apply_lora(transformer, read_state_dict(lora), targets=PIXART_LORA_TARGETS)
    return transformer.eval()


def pixart_scheduler(base: Path) -> DPMSolverMultistepScheduler:
    """DPM-Solver++ from the base folder's scheduler config (the shipped PixArt config when the folder has none)."""
    path = base / "scheduler" / "scheduler_config.json"
    config = json.loads((path if path.is_file() else SHIPPED_SCHEDULER).read_text())
    return DPMSolverMultistepScheduler.from_config(config)


def pixart_prompt_encoder(base: Path, prompt_cache: str | Path | None = None) -> T5PromptEncoder:
    """The lazy T5 encoder of `base`; its cache lives in `prompt_cache`, else beside the model, else the user cache."""
    folders = [Path(prompt_cache).expanduser()] if prompt_cache is not None else []
    folders += [base / CACHE_FOLDER, user_cache_dir() / "prompt_embeds"]
    return T5PromptEncoder(base / "text_encoder", base / "tokenizer", cache_dirs=folders)


def load_pixart_colorflow(
    colorflow: str | Path,
    base: str | Path,
    *,
    style: str,
    device: torch.device,
    dtype: torch.dtype,
    allow_download: bool = False,
    prompt_cache: str | Path | None = None,
    download_dir: str | Path | None = None,
) -> ColorFlowModel:
    """The ColorFlow model of a PixArt style; T5 is not loaded here (see `T5PromptEncoder`)."""
    sub = get_style(style).folder
    patterns = [f"{sub}/*", "image_encoder/*", *PREPROCESSOR_FILES]
    root = resolve_snapshot(colorflow, patterns, allow_download, "the ColorFlow release", download_dir)
    base_dir = resolve_snapshot(base, _PIXART_PATTERNS, allow_download, "the PixArt-α base model", download_dir)
    require_file(base_dir / "vae" / "config.json", base_dir, PIXART_REPO)
    guider = load_pixart_guider(root / sub, root)
    transformer = load_pixart_transformer(base_dir, root / sub, root)
    vae = AutoencoderKL.from_pretrained(base_dir / "vae", torch_dtype=torch.float32).eval()
    fusion = load_fusion(root / sub, vae, root)
    encoder = ReleaseClipEncoder.from_pretrained(root / "image_encoder", device=device)

    pipeline = ColorFlowPixArtPipeline(
        vae=vae, transformer=transformer, guider=guider, scheduler=pixart_scheduler(base_dir),
        prompt_encoder=pixart_prompt_encoder(base_dir, prompt_cache),
    )
    place_modules((*pipeline.components.values(), fusion), device, dtype)
    return ColorFlowModel(style, pipeline, GuidedSuperResolver(pipeline.vae, fusion), encoder, root)
