"""Every run choice made in one place: `ColorizeOptions` resolved against a loaded model into `PageSettings`.

The CLI, the Python API and the ComfyUI nodes all call `resolve`; none of them decides a default itself. Precedence
for the CFG scale: an explicit `options.guidance_scale`, else the preset's own (`fast`: 1.0), else the style's
(7.5 gray, 4.5 sketch styles). `auto` is replaced here by the preset it picks for the page size.
"""
from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from .errors import InvalidInputError
from .imaging import auto_size
from .memory import choose_preset, decode_is_peak, memory_needed as plan_memory_needed
from .model import ColorFlowModel
from .options import ColorizeOptions
from .presets import Preset, get_preset


@dataclass(frozen=True)
class PageSettings:
    """What will be computed for a page (or a batch of same-size pages): every value concrete."""

    size: tuple[int, int]
    steps: int
    seed: int
    guidance_scale: float
    guider_scale: float
    preprocess: str
    screen_deterministic: bool
    sample_posterior: bool
    batch_stat_norm: bool
    top_k: int
    #: The concrete preset (never `auto`): its execution policy and the numerics it implies.
    preset: Preset
    tile_decode: bool

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether the sampler runs an unconditional row beside the conditional one."""
        return self.guidance_scale > 1.0

    @property
    def encode_once(self) -> bool:
        """Whether each canvas half is VAE-encoded once (same random draws as upstream's batch encode)."""
        return self.preset.encode_once

    @property
    def canvas_size(self) -> tuple[int, int]:
        """The 2W×2H canvas."""
        return (2 * self.size[0], 2 * self.size[1])


def page_size(options: ColorizeOptions, page: Image.Image) -> tuple[int, int]:
    """W×H of `page` on the canvas: the options' size, else upstream's preset closest to the page's aspect."""
    return options.size or auto_size(page)


def requested_preset(model: ColorFlowModel, options: ColorizeOptions) -> Preset:
    """The preset a call runs under before `auto` picks: the options', else the model's."""
    return model.preset if options.preset is None else get_preset(options.preset)


def guidance_scale(model: ColorFlowModel, options: ColorizeOptions) -> float:
    """The CFG scale: the options', else the preset's own, else the style's upstream scale."""
    if options.guidance_scale is not None:
        return options.guidance_scale
    preset = requested_preset(model, options)
    return preset.guidance_scale if preset.guidance_scale is not None else model.defaults.guidance_scale


def resolve(model: ColorFlowModel, options: ColorizeOptions, size: tuple[int, int], pages: int = 1) -> PageSettings:
    """The settings of `pages` same-size W×H pages run together on `model` with `options`."""
    if pages < 1:
        raise InvalidInputError("at least one page is needed")
    view = model.for_preset(options.preset)
    guidance = guidance_scale(view, options)
    preset = view.preset
    plan = view.plan if view.plan is not None else view.run_plan(preset)
    if preset.is_auto:
        preset = choose_preset(plan, size, guidance, pages)
    canvas = (2 * size[0], 2 * size[1])
    tile = preset.vae_tiling == "always" or (
        preset.vae_tiling == "auto" and decode_is_peak(plan, preset, canvas, guidance)
    )
    return PageSettings(
        size=size, steps=options.steps, seed=options.seed, guidance_scale=guidance, guider_scale=options.guider_scale,
        preprocess=options.preprocess or model.defaults.preprocess, screen_deterministic=options.screen_deterministic,
        sample_posterior=options.sample_posterior, batch_stat_norm=options.batch_stat_norm, top_k=options.top_k,
        preset=preset, tile_decode=tile,
    )


def memory_needed(model: ColorFlowModel, options: ColorizeOptions, size: tuple[int, int], pages: int = 1) -> int:
    """Estimated bytes a call for `pages` W×H pages needs on the compute device beyond the weights already there (what
    a host such as ComfyUI should free first); `auto` counts as `faithful`, the most it would use."""
    view = model.for_preset(options.preset)
    plan = view.plan if view.plan is not None else view.run_plan(view.preset)
    return plan_memory_needed(plan, size, guidance_scale(view, options), pages)
