"""Build a ready ColorFlow model from a release snapshot and an SD1.5 base, strictly and safely."""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Sequence

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
from .presets import FAITHFUL, Preset, get_preset
from .runtime import Placement, RunPlan, default_dtype, lives_on
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
    """Everything one style needs: the ICP sampler, the guided upscaler and the retrieval encoder.

    `plan` is None for a plain model (upstream-faithful, everything where it was loaded). `with_preset` returns a view
    that shares every weight and runs its calls under a preset (see `colorflow_core.presets`).
    """

    style: str
    pipeline: ColorFlowSDPipeline  # or ColorFlowPixArtPipeline (same call and result) for the PixArt styles
    upscaler: GuidedSuperResolver
    encoder: ReleaseClipEncoder
    snapshot: Path
    plan: RunPlan | None = None

    @property
    def device(self) -> torch.device:
        """Device the diffusion models compute on (with offload, where they run, not where they wait)."""
        return self.plan.placement.device if self.plan is not None else self.pipeline.device

    @property
    def preset(self) -> Preset:
        """The preset this model's calls run under (`faithful` for a plain model; `auto` stays `auto`)."""
        return self.plan.preset if self.plan is not None else FAITHFUL

    @cached_property
    def preprocessors(self) -> Preprocessors:
        """The page preprocessing networks (ScreenStyle, line extractor) of this release, each loaded on first use."""
        return Preprocessors(self.snapshot, device=self.device)

    @property
    def default_guidance_scale(self) -> float:
        """The CFG scale to use when the user sets none (SD1.5 7.5, PixArt 4.5, as upstream)."""
        return self.pipeline.default_guidance_scale

    def effective_guidance(self, requested: float | None = None) -> float:
        """The CFG scale a call with `requested` (None = the style's default) actually runs at under this preset.

        `fast` runs at 1.0 whatever is requested; give GSRP's `gsrp_generator(cfg=...)` this value's `> 1.0`."""
        requested = self.default_guidance_scale if requested is None else requested
        return self.preset.guidance(requested) if not self.preset.is_auto else requested

    def memory_needed(self, size: tuple[int, int], guidance: float | None = None, pages: int = 1) -> int:
        """Estimated bytes a call for W×H pages needs on the compute device beyond the weights already there (what a
        host such as ComfyUI should free first); see `colorflow_core.memory`."""
        from .memory import memory_needed

        plan = self.plan if self.plan is not None else self.run_plan()
        return memory_needed(plan, size, self.default_guidance_scale if guidance is None else guidance, pages)

    def run_modules(self) -> dict[str, tuple[torch.nn.Module, ...]]:
        """stage → the modules of that stage (what presets stage, offload and count)."""
        modules = dict(self.pipeline.run_modules())
        modules.update(self.upscaler.run_modules())
        image_model = getattr(_unwrap_encoder(self.encoder), "model", None)
        if isinstance(image_model, torch.nn.Module):
            modules["image_encoder"] = (image_model,)
        return modules

    def run_plan(
        self,
        preset: str | Preset = "faithful",
        placement: Placement | None = None,
        *,
        free_memory: Callable[[torch.device], int] | None = None,
    ) -> RunPlan:
        """`preset` bound to this model's modules and `placement` (default: this model's): what a view carries."""
        if placement is None:
            placement = self.plan.placement if self.plan is not None else Placement(self.pipeline.device)
        family = "pixart" if getattr(self.pipeline, "transformer", None) is not None else "sd"
        return RunPlan(get_preset(preset), placement, self.run_modules(), family, free_memory)

    def with_preset(
        self,
        preset: str | Preset = "faithful",
        placement: Placement | None = None,
        *,
        free_memory: Callable[[torch.device], int] | None = None,
    ) -> "ColorFlowModel":
        """A view of this model whose calls run under `preset` (name or `Preset`); no weight is copied or changed.

        `placement` says where stages compute and where idle weights wait (default: this model's); ComfyUI passes its
        own devices here. `free_memory(device) -> bytes` replaces the measurement `auto` makes (for tests).
        The view's pipeline and upscaler are shallow copies sharing all modules; each call under the preset stages
        what it needs and restores the shared modules exactly when it ends.
        """
        plan = self.run_plan(preset, placement, free_memory=free_memory)
        modules = plan.modules
        plain = plan.preset == FAITHFUL and not plan.placement.stage_devices and all(
            lives_on(module, plan.placement.device) for group in modules.values() for module in group
        )
        if plain:
            plan = None
        pipeline = copy.copy(self.pipeline)
        pipeline.plan = plan
        upscaler = copy.copy(self.upscaler)
        upscaler.plan = plan
        encoder = _unwrap_encoder(self.encoder)
        if plan is not None and "image_encoder" in modules:
            encoder = StagedEncoder(encoder, plan)
        view = ColorFlowModel(self.style, pipeline, upscaler, encoder, self.snapshot, plan)
        if "preprocessors" in self.__dict__ and self.device == view.device:
            view.__dict__["preprocessors"] = self.__dict__["preprocessors"]
        return view


def _unwrap_encoder(encoder):
    return encoder.encoder if isinstance(encoder, StagedEncoder) else encoder


class StagedEncoder:
    """An image encoder whose model runs in a plan's "image_encoder" stage: on the compute device only while it
    encodes (it waits on the offload device otherwise). Same name, dim and embeddings as the encoder it wraps."""

    def __init__(self, encoder, plan: RunPlan):
        self.encoder, self.plan = encoder, plan
        self.name, self.dim = encoder.name, encoder.dim

    def encode(self, images: Sequence) -> torch.Tensor:
        from . import runtime

        with runtime.activate(self.plan), runtime.stage("image_encoder", self.encoder.model):
            return self.encoder.encode(images)

    def __getattr__(self, attr: str):
        return getattr(self.encoder, attr)


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


#: The conv nets that run at page size: on CUDA their weights are kept channels_last, cuDNN's native layout (NCHW
#: convs transpose their input and output every call), and their large GroupNorms keep it (`gpu_kernels`).
PAGE_SIZE_NETS = (AutoencoderKL, MultiHiddenResNetModel)


def place_modules(modules: Sequence[object], device: torch.device, dtype: torch.dtype) -> None:
    """Move the `nn.Module`s among `modules` to `device`, cast to `dtype` (loaded weights are float32); on CUDA the
    `PAGE_SIZE_NETS` get channels_last weights."""
    cuda = torch.device(device).type == "cuda"
    for module in modules:
        if isinstance(module, torch.nn.Module):
            # No dtype argument for float32: diffusers warns on any dtype cast, even a no-op one.
            cast = {} if dtype == torch.float32 else {"dtype": dtype}
            layout = {"memory_format": torch.channels_last} if cuda and isinstance(module, PAGE_SIZE_NETS) else {}
            module.to(device=device, **cast, **layout)


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
    them on the device when a page at the upstream size fits, else offloads. `dtype` None = `default_dtype`:
    float16 on CUDA (upstream's), float32 on the CPU. `placement` (default: everything on `device`,
    offload to the CPU) is where a host such as ComfyUI says stages run and weights wait.
    """
    if style not in STYLE_FOLDERS:
        raise InvalidInputError(f"style '{style}' is not available (choose {', '.join(STYLE_FOLDERS)})")
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
        from .memory import estimate, available

        plan = model.run_plan(preset, placement, free_memory=free_memory)
        resident = estimate(plan, FAITHFUL, (512, 800), model.default_guidance_scale, assume_resident=True)
        if resident.peak <= available(plan):
            for group in model.run_modules().values():
                for module in group:
                    module.to(device)
    return model.with_preset(preset, placement, free_memory=free_memory)


def _load_plain(colorflow, base, style, device, dtype, allow_download, base_config, prompt_cache, download_dir) -> ColorFlowModel:
    sub = STYLE_FOLDERS[style]
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
    place_modules((*pipeline.components.values(), fusion), device, dtype)
    return ColorFlowModel(style, pipeline, GuidedSuperResolver(pipeline.vae, fusion), encoder, root)
