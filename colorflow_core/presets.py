"""Named run presets: documented bundles of speed/memory options, from upstream-faithful to fast and low-VRAM.

A preset never changes the weights of a loaded model. It is applied per call: a `ColorFlowModel.with_preset(...)`
view shares every weight with the model it came from, and each call under the preset stages (moves / casts /
merges) what it needs for the duration of one stage and restores the originals afterwards (`colorflow_core.runtime`).
One model object can therefore run several presets, one call after another.

| preset | numerics | what it does |
| --- | --- | --- |
| `faithful` (default) | upstream's | CFG at the style's scale, batch-2 VAE encodes with separate posterior noise, train-mode BN in GSRP, the weights' dtype. |
| `fast` | CFG off, half precision | guidance 1.0 (batch 1), each canvas half VAE-encoded once, LoRA merged into the UNet / transformer for the denoise stage (merged and cast in one copy, kept by the view for the next page), bf16 compute where the device runs it natively (CUDA, or a CPU with avx512_bf16/AMX; fp16 on CUDA without bf16, the VAE and fusion net then stay fp32), channels_last on CUDA, text embeddings cached. |
| `low-vram` | upstream's CFG, half precision | only the running stage's models on the accelerator (image encoder, text encoder, guider + UNet, VAE, fusion net take turns; weights wait on the offload device), half precision (weights loaded in it, or cast on their way to the device; a model already resident keeps its dtype), each canvas half encoded once (same random draws as upstream), and the 2W×2H VAE decode tiled when it would otherwise be the page's memory peak. |
| `auto` | as picked | reads the free accelerator memory (CPU: available RAM) before each page and picks `faithful` if it fits, else `low-vram`, else `low-vram` with the guider and UNet swapped every step. |

All accelerators use SDPA attention (diffusers' `AttnProcessor2_0`, which every attention layer of the UNet, the
ColorGuider, the VAE and PixArt already uses); no preset changes attention processors.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import InvalidInputError

OFFLOAD_MODES = ("none", "stage", "model")
TILING_MODES = ("never", "auto", "always")
#: `compute_dtype` values besides a dtype name: "half" = bf16 where native, else fp16 on CUDA/MPS, else the weights' dtype.
HALF = "half"


@dataclass(frozen=True)
class Preset:
    """A bundle of execution options. Build variants with `preset.replace(...)` (or `get_preset(name, **changes)`)."""

    name: str
    description: str = ""
    #: The CFG scale this preset runs at; None = the caller's (the style's upstream default unless set). 1.0 = no CFG.
    guidance_scale: float | None = None
    #: VAE-encode each canvas half at batch 1 and sample the CFG rows from the same moments (one random draw of the
    #: batch shape, as upstream's batch-2 encode makes), instead of encoding a batch of identical copies.
    encode_once: bool = False
    #: Merge the LoRA into the denoiser weights for the denoise stage (the original tensors are restored after it).
    merge_lora: bool = False
    #: None = the weights' dtype; "half"; or a dtype name ("bfloat16", "float16", "float32"). Applies to the denoiser,
    #: the VAE and the fusion net; the text and image encoders keep the weights' dtype.
    compute_dtype: str | None = None
    #: Also cast weights that already live on the compute device (a per-stage copy). False: only weights staged from
    #: the offload device are cast on the way (a resident model keeps its dtype: a copy would only add memory).
    cast_resident: bool = True
    #: Keep the converted / LoRA-merged copies in the view between calls (the next page reuses them), instead of
    #: making them again for every stage. Costs their memory for the view's lifetime; never with offload.
    keep_copies: bool = False
    #: channels_last weights and inputs for the conv nets: "never", "accelerator" (CUDA only) or "always".
    channels_last: str = "never"
    #: Where idle weights wait: "none" (resident), "stage" (one stage's models on the device at a time),
    #: "model" (as "stage", and the guider and denoiser also take turns within each step).
    offload: str = "none"
    #: Tiled decode of the 2W×2H canvas: "never", "auto" (when its estimated memory exceeds the denoise stage's) or "always".
    vae_tiling: str = "never"

    def __post_init__(self):
        if self.offload not in OFFLOAD_MODES:
            raise InvalidInputError(f"offload must be one of {', '.join(OFFLOAD_MODES)}, not '{self.offload}'")
        if self.vae_tiling not in TILING_MODES:
            raise InvalidInputError(f"vae_tiling must be one of {', '.join(TILING_MODES)}, not '{self.vae_tiling}'")
        if self.channels_last not in ("never", "accelerator", "always"):
            raise InvalidInputError(f"channels_last must be 'never', 'accelerator' or 'always', not '{self.channels_last}'")
        if self.compute_dtype not in (None, HALF, "float32", "float16", "bfloat16", "float64"):
            raise InvalidInputError(f"unknown compute dtype '{self.compute_dtype}'")
        if self.keep_copies and self.offload != "none":
            raise InvalidInputError("keep_copies would keep offloaded weights on the device; use it without offload")
        if self.guidance_scale is not None and self.guidance_scale < 1.0:
            raise InvalidInputError("a preset's guidance scale must be >= 1.0")

    def replace(self, **changes) -> "Preset":
        """A copy with some fields changed (the name is kept unless given)."""
        return dataclasses.replace(self, **changes)

    def guidance(self, requested: float) -> float:
        """The CFG scale a call runs at: this preset's, else the requested one."""
        return requested if self.guidance_scale is None else self.guidance_scale

    @property
    def is_auto(self) -> bool:
        """Whether this is `auto` (resolved to a concrete preset per page)."""
        return self.name == "auto"

    def offloaded(self) -> "Preset":
        """This preset with idle weights kept on the offload device (a host asked to save VRAM); numerics unchanged.
        `auto` decides offloading itself and is returned as is."""
        if self.is_auto or self.offload != "none":
            return self
        return self.replace(offload="stage", keep_copies=False)


FAITHFUL = Preset(
    "faithful",
    "upstream numerics: CFG at the style's scale, batch-2 VAE encodes with separate posterior noise, train-mode BN, "
    "the weights' dtype, everything resident",
)
FAST = Preset(
    "fast",
    "CFG off (guidance 1.0), each canvas half encoded once, LoRA merged for the denoise stage, bf16 where native, "
    "channels_last on CUDA, cached text embeddings",
    guidance_scale=1.0,
    encode_once=True,
    merge_lora=True,
    compute_dtype=HALF,
    keep_copies=True,
    channels_last="accelerator",
)
LOW_VRAM = Preset(
    "low-vram",
    "one stage's models on the accelerator at a time (sequential offload), half precision, canvas halves encoded once, "
    "tiled canvas decode when the decode would be the memory peak",
    encode_once=True,
    compute_dtype=HALF,
    cast_resident=False,
    offload="stage",
    vae_tiling="auto",
)
#: `low-vram` with the guider and the denoiser swapped on and off the device every step (the smallest footprint;
#: costs a host→device copy of both per step). `auto` falls back to it.
LOW_VRAM_STRICT = LOW_VRAM.replace(
    name="low-vram-strict", description="low-vram, and the guider and denoiser take turns on the device within each step",
    offload="model",
)
AUTO = Preset("auto", "picks faithful, low-vram or low-vram-strict from the free accelerator memory before each page")

PRESETS: dict[str, Preset] = {p.name: p for p in (FAITHFUL, FAST, LOW_VRAM, AUTO)}
#: The names a user picks from (CLI `--preset`, the nodes' dropdown); `faithful` first = the default.
PRESET_NAMES: tuple[str, ...] = tuple(PRESETS)
#: What `auto` chooses between, most faithful first.
AUTO_CANDIDATES: tuple[Preset, ...] = (FAITHFUL, LOW_VRAM, LOW_VRAM_STRICT)


def get_preset(preset: str | Preset | None = None, **changes) -> Preset:
    """The preset of that name (None = faithful), with optional field changes."""
    if preset is None:
        preset = FAITHFUL
    elif not isinstance(preset, Preset):
        if preset == LOW_VRAM_STRICT.name:
            preset = LOW_VRAM_STRICT
        elif preset not in PRESETS:
            raise InvalidInputError(f"unknown preset '{preset}' (choose {', '.join(PRESET_NAMES)})")
        else:
            preset = PRESETS[preset]
    return preset.replace(**changes) if changes else preset


def describe_presets() -> dict[str, str]:
    """name → one-line description (for help texts and node tooltips)."""
    return {name: preset.description for name, preset in PRESETS.items()}
