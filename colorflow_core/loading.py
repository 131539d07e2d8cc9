"""Build a ready ColorFlow model from a release snapshot and an SD1.5 base, strictly and safely."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel, UniPCMultistepScheduler
from transformers import CLIPTextModel, CLIPTokenizer

from .configured import load_configured, load_fusion, place_modules, resolve_device, resolve_dtype
from .errors import IncompatibleWeightsError
from .loading_pixart import PIXART_REPO, load_pixart_colorflow
from .memory import available, estimate
from .model import ColorFlowModel
from .models.color_guider import ColorGuiderSDModel
from .models.lora import apply_lora
from .pipelines.colorflow_sd import ColorFlowSDPipeline
from .pipelines.guided_sr import GuidedSuperResolver
from .preprocessors import PREPROCESSOR_FILES
from .presets import FAITHFUL, Preset, get_preset
from .runtime import Placement, default_dtype
from .retrieval.encoders import ReleaseClipEncoder
from .single_file import is_single_file, load_sd15_single_file
from .styles import get_style
from .weights import COLORFLOW_REPO, SD15_REPO, find_weight_file, read_state_dict, require_file, resolve_snapshot
_SD15_PATTERNS = ["model_index.json", "unet/*", "vae/*", "text_encoder/*", "tokenizer/*", "scheduler/*"]


def load_guider(folder: Path, root: Path | None = None) -> ColorGuiderSDModel:
    """The ColorGuider from `config.json` + weights, all 626 released keys required."""
    return load_configured(ColorGuiderSDModel, folder, root)


def load_unet_with_lora(
    base: Path | UNet2DConditionModel, lora_folder: Path, root: Path | None = None
) -> UNet2DConditionModel:
    """The SD1.5 UNet (from `base/unet`, or one already loaded) with the release LoRA, every tensor of which must be applied."""
    if isinstance(base, UNet2DConditionModel):
        unet = base
    else:
        require_file(base / "unet" / "config.json", base, SD15_REPO)
        unet = UNet2DConditionModel.from_pretrained(base / "unet", torch_dtype=torch.float32)
    lora = find_weight_file(lora_folder, "unet_lora", root)
    apply_lora(unet, read_state_dict(lora))
    return unet.eval()


def load_tokenizer(folder: Path) -> CLIPTokenizer:
    """The CLIP tokenizer; refuses the 2-token placeholder transformers returns for an empty folder."""
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    if len(tokenizer) < 3 or tokenizer.model_max_length > 100_000:
        raise IncompatibleWeightsError(f"tokenizer in {folder} is missing or broken (vocab.json/merges.txt)")
    return tokenizer


def load_base_components(base: Path, config_dir: Path | None = None) -> dict:
    """VAE, text encoder, tokenizer and UniPC scheduler of an SD1.5 diffusers folder; for a single-file checkpoint
    (e.g. ComfyUI's v1-5-pruned-emaonly.safetensors) also its `unet`, read from the same file with the diffusers
    configs in `config_dir` (default: the shipped SD1.5 configs)."""
    if is_single_file(base):
        return load_sd15_single_file(Path(base), config_dir)
    if (base / "transformer" / "config.json").is_file():
        raise IncompatibleWeightsError(
            f"{base} is a PixArt (transformer) model; the gray style runs on an SD1.5 base (or use a sketch style)"
        )
    for sub, name in (("vae", "config.json"), ("text_encoder", "config.json"), ("scheduler", "scheduler_config.json")):
        require_file(base / sub / name, base, SD15_REPO)
    return dict(
        vae=AutoencoderKL.from_pretrained(base / "vae", torch_dtype=torch.float32).eval(),
        text_encoder=CLIPTextModel.from_pretrained(base / "text_encoder", dtype=torch.float32).eval(),
        tokenizer=load_tokenizer(base / "tokenizer"),
        scheduler=UniPCMultistepScheduler.from_config(
            json.loads((base / "scheduler" / "scheduler_config.json").read_text())
        ),
    )


def load_colorflow(
    colorflow: str | Path = COLORFLOW_REPO,
    base: str | Path | None = None,
    *,
    style: str = "gray",
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    allow_download: bool = False,
    base_config: str | Path | None = None,
    prompt_cache: str | Path | None = None,
    download_dir: str | Path | None = None,
    preset: str | Preset = "faithful",
    placement: Placement | None = None,
    free_memory: Callable[[torch.device], int] | None = None,
) -> ColorFlowModel:
    """Load one ColorFlow style from a release snapshot (folder or repo id) and its base model.

    `base` is an SD1.5 diffusers folder, a repo id, or a single-file checkpoint (.safetensors/.ckpt, original
    LDM layout). `base_config` only matters for a single file: the diffusers config folder describing it
    (default: the shipped SD1.5 configs; tests pass the tiny base folder).
    Styles "sketch"/"sketch_shading" take a PixArt-XL-2-1024-MS diffusers folder or repo id as `base` (default
    that repo); `prompt_cache` is where their T5 prompt embeddings are cached (default: beside the base model).
    Repo ids are looked up in (and, with `allow_download`, downloaded into) `download_dir/<repo name>` when given,
    else the Hugging Face cache.

    `preset` (see `colorflow_core.presets`): "faithful" returns the plain model; other presets return a
    `with_preset` view. Offloading presets ("low-vram") keep the weights on `placement.offload_device`; "auto" keeps
    them on the device when a page at the upstream size fits, else offloads. `dtype` None = `runtime.default_dtype`:
    float16 on CUDA (upstream's), float32 on the CPU. `placement` (default: everything on `device`,
    offload to the CPU) is where a host such as ComfyUI says stages run and weights wait.
    """
    get_style(style)
    preset = get_preset(preset)
    placement = placement if placement is not None else Placement(resolve_device(device))
    device = placement.device
    dtype = resolve_dtype(dtype) if dtype is not None else default_dtype(device, preset)
    offload = preset.offload != "none" or preset.is_auto
    home = placement.offload_device if offload else device
    model = _load_plain(colorflow, base, style, home, dtype, allow_download, base_config, prompt_cache, download_dir)
    if preset == FAITHFUL and placement == Placement(device):
        return model
    if preset.is_auto and home != device:
        plan = model.run_plan(preset, placement, free_memory=free_memory)
        resident = estimate(plan, FAITHFUL, (512, 800), model.defaults.guidance_scale, assume_resident=True)
        if resident.peak <= available(plan):
            for group in model.run_modules().values():
                for module in group:
                    module.to(device)
    return model.with_preset(preset, placement, free_memory=free_memory)


def _load_plain(colorflow, base, style, device, dtype, allow_download, base_config, prompt_cache, download_dir) -> ColorFlowModel:
    sub = get_style(style).folder
    if get_style(style).family == "pixart":
        return load_pixart_colorflow(
            colorflow, PIXART_REPO if base is None else base, style=style, device=device, dtype=dtype,
            allow_download=allow_download, prompt_cache=prompt_cache, download_dir=download_dir,
        )
    base = SD15_REPO if base is None else base
    root = resolve_snapshot(colorflow, [f"{sub}/*", "image_encoder/*", *PREPROCESSOR_FILES], allow_download, "the ColorFlow release", download_dir)
    if is_single_file(base):
        base_dir = Path(base).expanduser()
    else:
        base_dir = resolve_snapshot(base, _SD15_PATTERNS, allow_download, "the SD1.5 base model", download_dir)
    components = load_base_components(base_dir, Path(base_config) if base_config is not None else None)
    unet = load_unet_with_lora(components.pop("unet", base_dir), root / sub, root)
    guider = load_guider(root / sub, root)
    fusion = load_fusion(root / sub, components["vae"], root)
    encoder = ReleaseClipEncoder.from_pretrained(root / "image_encoder", device=device)

    pipeline = ColorFlowSDPipeline(unet=unet, guider=guider, **components)
    place_modules((*pipeline.components.values(), fusion), device, dtype)
    return ColorFlowModel(style, pipeline, GuidedSuperResolver(pipeline.vae, fusion), encoder, root)
