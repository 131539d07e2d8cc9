"""`ColorFlowModel`: one style's networks behind one interface (the `COLORFLOW_MODEL` socket of the node pack).

Both model families (SD1.5 for "gray", PixArt-α for the line-art styles) implement `pipelines.ICPSampler`; nothing
here or in the callers tells them apart by their attributes.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Sequence

import torch

from .pipelines.condition import ICPSampler
from .pipelines.guided_sr import GuidedSuperResolver
from .preprocessors import Preprocessors
from .presets import FAITHFUL, Preset, get_preset
from .runtime import Placement, Run, RunPlan, lives_on
from .styles import Style, get_style


@dataclass
class ColorFlowModel:
    """Everything one style needs: the ICP sampler, the guided upscaler and the retrieval encoder.

    `plan` is None for a plain model (upstream-faithful, everything where it was loaded). `with_preset` returns a view
    that shares every module and carries a plan: the execution policy of its calls (see `colorflow_core.presets`).
    """

    style: str
    pipeline: ICPSampler
    upscaler: GuidedSuperResolver
    encoder: object  # retrieval.ImageEncoder
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

    @property
    def defaults(self) -> Style:
        """This style's upstream defaults (guidance scale, page preparation) and model family."""
        return get_style(self.style)

    @cached_property
    def preprocessors(self) -> Preprocessors:
        """The page preprocessing networks (ScreenStyle, line extractor) of this release, each loaded on first use."""
        return Preprocessors(self.snapshot, device=self.device)

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
        return RunPlan(get_preset(preset), placement, self.run_modules(), self.pipeline.family, free_memory)

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
        Each call under the preset stages what it needs and restores the shared modules exactly when it ends.
        """
        plan = self.run_plan(preset, placement, free_memory=free_memory)
        plain = plan.preset == FAITHFUL and not plan.placement.stage_devices and all(
            lives_on(module, plan.placement.device) for group in plan.modules.values() for module in group
        )
        if plain:
            plan = None
        encoder = _unwrap_encoder(self.encoder)
        if plan is not None and "image_encoder" in plan.modules:
            encoder = StagedEncoder(encoder, plan)
        view = ColorFlowModel(self.style, self.pipeline, self.upscaler, encoder, self.snapshot, plan)
        if "preprocessors" in self.__dict__ and self.device == view.device:
            view.__dict__["preprocessors"] = self.__dict__["preprocessors"]
        return view

    def for_preset(self, preset: str | None) -> "ColorFlowModel":
        """This model, or its view under `preset` when that names another preset (None: this model's own)."""
        if preset is None or preset == self.preset.name:
            return self
        return self.with_preset(preset)

    def execution(self, preset: Preset) -> Run | None:
        """How a call under the concrete `preset` runs on this model: None for a plain model under `faithful`
        (nothing is staged), else a `Run` of this model's plan."""
        if self.plan is None and preset == FAITHFUL:
            return None
        return Run(self.plan if self.plan is not None else self.run_plan(preset), preset)


def _unwrap_encoder(encoder):
    return encoder.encoder if isinstance(encoder, StagedEncoder) else encoder


class StagedEncoder:
    """An image encoder whose model runs in a plan's "image_encoder" stage: on the compute device only while it
    encodes (it waits on the offload device otherwise). Same name, dim and embeddings as the encoder it wraps."""

    def __init__(self, encoder, plan: RunPlan):
        self.encoder, self.plan = encoder, plan
        self.name, self.dim = encoder.name, encoder.dim

    def encode(self, images: Sequence) -> torch.Tensor:
        """Embeddings of `images`, the model staged on the compute device for the call."""
        # The encoder stage keeps the weights' dtype and layout under every preset: only placement matters here.
        run = Run(self.plan, FAITHFUL if self.plan.preset.is_auto else self.plan.preset)
        with run.stage("image_encoder", self.encoder.model):
            return self.encoder.encode(images)

    def __getattr__(self, attr: str):
        return getattr(self.encoder, attr)
