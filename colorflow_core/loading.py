"""Build a ready ColorFlow model from a release snapshot and an SD1.5 base, strictly and safely."""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel, UniPCMultistepScheduler
from transformers import CLIPTextModel, CLIPTokenizer

from .errors import IncompatibleWeightsError, InvalidInputError
from .models.color_guider import ColorGuiderSDModel
from .models.fusion import MultiHiddenResNetModel
from .models.lora import apply_lora
from .pipelines.colorflow_sd import ColorFlowSDPipeline
from .pipelines.guided_sr import GuidedSuperResolver
from .preprocessors import PREPROCESSOR_FILES, Preprocessors
from .retrieval.encoders import ReleaseClipEncoder
from .single_file import is_single_file, load_sd15_single_file
from .weights import COLORFLOW_REPO, SD15_REPO, find_weight_file, read_state_dict, require_file, resolve_snapshot

#: Release sub-folder per input style ("sketch"/"sketch_shading" run on PixArt-α, see loading_pixart).
STYLE_FOLDERS = {"gray": "GraySD", "sketch": "sketch", "sketch_shading": "shading"}
#: Upstream's CFG scale per style (the pipelines' defaults; the app never overrode them).
STYLE_GUIDANCE = {"gray": 7.5, "sketch": 4.5, "sketch_shading": 4.5}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SD15_PATTERNS = ["model_index.json", "unet/*", "vae/*", "text_encoder/*", "tokenizer/*", "scheduler/*"]


@dataclass
class ColorFlowModel:
    """Everything one style needs: the ICP sampler, the guided upscaler and the retrieval encoder."""

    style: str
    pipeline: ColorFlowSDPipeline  # or ColorFlowPixArtPipeline (same call and result) for the PixArt styles
    upscaler: GuidedSuperResolver
    encoder: ReleaseClipEncoder
    snapshot: Path

    @property
    def device(self) -> torch.device:
        """Device the diffusion models run on."""
        return self.pipeline.device

    @cached_property
    def preprocessors(self) -> Preprocessors:
        """The page preprocessing networks (ScreenStyle, line extractor) of this release, each loaded on first use."""
        return Preprocessors(self.snapshot, device=self.device)

    @property
    def default_guidance_scale(self) -> float:
        """The CFG scale to use when the user sets none (SD1.5 7.5, PixArt 4.5, as upstream)."""
        return self.pipeline.default_guidance_scale


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' → CUDA if available, else MPS, else CPU."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from its name ('float32', 'float16', 'bfloat16')."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InvalidInputError(f"unknown dtype '{dtype}' (choose {', '.join(DTYPES)})")
    return DTYPES[dtype]


def _load_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], path: Path) -> torch.nn.Module:
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise IncompatibleWeightsError(f"{path} does not fit its model: {' '.join(first)[:400]}") from exc
    return model


def load_configured(cls, folder: Path, root: Path | None = None, adapt=lambda model, state: state):
    """`cls` from `folder/config.json` built on the meta device, then strictly loaded with the folder's weights
    (`adapt(model, state_dict)` may first drop known aliases)."""
    config_path = require_file(folder / "config.json", root)
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise IncompatibleWeightsError(f"{config_path} is not valid JSON: {exc}") from exc
    weights = find_weight_file(folder, "diffusion_pytorch_model", root)
    with torch.device("meta"):
        model = cls.from_config(config)
    return _load_strict(model, adapt(model, read_state_dict(weights)), weights).eval()


def load_guider(folder: Path, root: Path | None = None) -> ColorGuiderSDModel:
    """The ColorGuider from `config.json` + weights, all 626 released keys required."""
    return load_configured(ColorGuiderSDModel, folder, root)


def load_fusion(folder: Path, vae: AutoencoderKL, root: Path | None = None) -> MultiHiddenResNetModel:
    """The GSRP fusion net; its widths must match the VAE encoder's feature widths."""
    weights = find_weight_file(folder, "MultiResNetModel", root)
    state_dict = read_state_dict(weights)
    channels = MultiHiddenResNetModel.channels_from_state_dict(state_dict)
    expected = [vae.config.block_out_channels[0], *vae.config.block_out_channels]
    if channels != expected:
        raise IncompatibleWeightsError(f"{weights} has feature widths {channels}; this VAE gives {expected}")
    with torch.device("meta"):
        fusion = MultiHiddenResNetModel(channels_list=tuple(channels), num_tensors=len(channels))
    return _load_strict(fusion, state_dict, weights)


def load_unet_with_lora(
    base: Path | UNet2DConditionModel, lora_folder: Path, root: Path | None = None
) -> UNet2DConditionModel:
    """The SD1.5 UNet (from `base/unet`, or one already loaded) with the release LoRA, every tensor of which must be applied."""
    if isinstance(base, UNet2DConditionModel):
        unet = base
    else:
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
    dtype: str | torch.dtype = torch.float32,
    allow_download: bool = False,
    base_config: str | Path | None = None,
    prompt_cache: str | Path | None = None,
    download_dir: str | Path | None = None,
) -> ColorFlowModel:
    """Load one ColorFlow style from a release snapshot (folder or repo id) and its base model.

    `base` is an SD1.5 diffusers folder, a repo id, or a single-file checkpoint (.safetensors/.ckpt, original
    LDM layout). `base_config` only matters for a single file: the diffusers config folder describing it
    (default: the shipped SD1.5 configs; tests pass the tiny base folder).
    Styles "sketch"/"sketch_shading" take a PixArt-XL-2-1024-MS diffusers folder or repo id as `base` (default
    that repo); `prompt_cache` is where their T5 prompt embeddings are cached (default: beside the base model).
    Repo ids are looked up in (and, with `allow_download`, downloaded into) `download_dir/<repo name>` when given,
    else the Hugging Face cache.
    """
    if style not in STYLE_FOLDERS:
        raise InvalidInputError(f"style '{style}' is not available (choose {', '.join(STYLE_FOLDERS)})")
    sub = STYLE_FOLDERS[style]
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    if style != "gray":
        from .loading_pixart import PIXART_REPO, load_pixart_colorflow

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
    for module in (*pipeline.components.values(), fusion):
        if isinstance(module, torch.nn.Module):
            module.to(device=device, dtype=None if dtype == torch.float32 else dtype)
    return ColorFlowModel(style, pipeline, GuidedSuperResolver(pipeline.vae, fusion), encoder, root)
