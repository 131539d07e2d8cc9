"""The ColorGuider on a core SD1.5 MODEL: ColorFlow's residual sites mapped onto ComfyUI's UNet patch points.

A DIFFUSION_MODEL wrapper runs the guider once per UNet call (same x_t, timestep, batch) and hands its residuals to
the block patches through `transformer_options`; the sites map as follows (LDM numbering, see
colorflow_core.models.residual_sites):
- input k "before_skip" → `input_block_patch` at ("input", k); input 0 "after_skip" → `input_block_patch_after_skip`;
- middle → `output_block_patch` at ("output", 0) (the middle block's output is the `h` it receives);
- output i "end" → `output_block_patch` at ("output", i + 1); the last output block has no later patch point, so an
  object patch appends a parameter-free `ResidualSite` layer to it, run by a `forward_timestep_embed_patch`
  (one for every guidance stacked on the MODEL);
- output i "before_upsample" → also at ("output", i + 1): the upsampler (nearest resize, then a convolution) is
  linear, so up(h + r) = up(h) + up(r) − up(0).
Nothing here imports ComfyUI: it runs in CI against a stand-in of openaimodel's forward.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..colorflow_core.errors import InvalidInputError
from ..colorflow_core.models.residual_sites import ResidualLayout, guider_residuals

#: ComfyUI's cond_or_uncond code of the unconditional half.
UNCOND = 1


class ResidualSite(torch.nn.Module):
    """Parameter-free layer appended to the last output block: where the last up residual is added (identity alone)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@dataclass
class _CallResiduals:
    """The residuals of one UNet call, filed by the patch point that adds them."""

    input_before: dict[int, torch.Tensor] = field(default_factory=dict)
    input_after: dict[int, torch.Tensor] = field(default_factory=dict)
    #: output block → residuals added to `h` before it (plain tensors, or (upsampling block, residual) pairs).
    output_before: dict[int, list] = field(default_factory=dict)
    end: torch.Tensor | None = None


def _upsampled(block, residual: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """up(r) − up(0) for the upsampler that ends `block`, resized like the UNet resizes (to the skip's size)."""
    upsample = block[-1]
    zero = residual.new_zeros(1, residual.shape[1], 1, 1)
    return upsample(residual, output_shape=skip.shape) - upsample(zero, output_shape=(1, residual.shape[1], 1, 1))


class ColorFlowGuidance:
    """One ColorFlow Apply: the guider, the canvas condition and where the residuals go; shared, never copied."""

    def __init__(
        self,
        guider: torch.nn.Module,
        guider_patcher,
        condition: torch.Tensor,
        layout: ResidualLayout,
        strength: float = 1.0,
        sigma_range: tuple[float, float] | None = None,
    ):
        """`guider` is the ColorGuiderSDModel that `guider_patcher` (its ComfyUI ModelPatcher) manages; `condition` [2, pages, 9, h, w] holds the uncond and cond
        rows of the 9-channel condition of every page (upstream encodes the canvas once per CFG half);
        `sigma_range` = (high, low) or None."""
        self.guider = guider
        self.guider_patcher = guider_patcher
        self.condition = condition
        self.layout = layout
        self.strength = strength
        self.sigma_range = sigma_range
        self.key = f"colorflow_residuals_{id(self)}"
        self.last_block = max(site.block for site in layout.up)

    def __deepcopy__(self, memo):
        return self  # ModelPatcher.clone deep-copies model_options; the guider and condition must stay shared

    def models(self) -> list:
        """The guider's ModelPatcher: ComfyUI loads and offloads it with the patched MODEL."""
        return [self.guider_patcher]

    def _active(self, transformer_options: dict) -> bool:
        sigmas = transformer_options.get("sigmas")
        if self.sigma_range is None or sigmas is None:
            return True
        sigma = float(sigmas.reshape(-1)[0])
        high, low = self.sigma_range
        return low <= sigma <= high

    def condition_rows(self, x: torch.Tensor, cond_or_uncond: list[int] | None) -> torch.Tensor:
        """The condition row of every batch row of `x`: chunks follow `cond_or_uncond` (ComfyUI: 0 cond, 1 uncond)."""
        codes = cond_or_uncond or [0]
        if x.shape[0] % len(codes):
            raise InvalidInputError(f"batch of {x.shape[0]} does not split into {len(codes)} cond/uncond chunks")
        per_chunk, pages = x.shape[0] // len(codes), self.condition.shape[1]
        if per_chunk % pages:
            raise InvalidInputError(f"a batch of {per_chunk} latents does not repeat the {pages} canvases of ColorFlow Apply")
        rows = [self.condition[0 if code == UNCOND else 1].repeat(per_chunk // pages, 1, 1, 1) for code in codes]
        return torch.cat(rows).to(x.device)

    def file_residuals(self, unet, x, timesteps, context, cond_or_uncond) -> _CallResiduals:
        """Run the guider for this call and file each residual under the patch point that adds it."""
        residuals = guider_residuals(
            self.guider, self.condition_rows(x, cond_or_uncond), x, timesteps, context, self.strength,
        )
        filed = _CallResiduals()
        tensors = [*residuals.down, residuals.mid, *residuals.up]
        for site, tensor in zip(self.layout.sites(), tensors):
            if site.part == "input":
                (filed.input_after if site.moment == "after_skip" else filed.input_before)[site.block] = tensor
            elif site.part == "middle":
                filed.output_before.setdefault(0, []).append(tensor)
            elif site.block == self.last_block:
                filed.end = tensor
            elif site.moment == "before_upsample":
                filed.output_before.setdefault(site.block + 1, []).append((unet.output_blocks[site.block], tensor))
            else:
                filed.output_before.setdefault(site.block + 1, []).append(tensor)
        return filed

    # ComfyUI call signatures below: a DIFFUSION_MODEL wrapper, then the block patches.
    def __call__(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        if self._active(transformer_options):
            filed = self.file_residuals(
                executor.class_obj, x, timesteps, context, transformer_options.get("cond_or_uncond"),
            )
            transformer_options = {**transformer_options, self.key: filed}
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)

    def input_block(self, h: torch.Tensor, transformer_options: dict) -> torch.Tensor:
        filed = transformer_options.get(self.key)
        residual = filed and filed.input_before.get(transformer_options["block"][1])
        return h if residual is None else h + residual

    def input_block_after_skip(self, h: torch.Tensor, transformer_options: dict) -> torch.Tensor:
        filed = transformer_options.get(self.key)
        residual = filed and filed.input_after.get(transformer_options["block"][1])
        return h if residual is None else h + residual

    def output_block(self, h: torch.Tensor, hsp: torch.Tensor, transformer_options: dict):
        filed = transformer_options.get(self.key)
        for item in (filed.output_before.get(transformer_options["block"][1], ()) if filed else ()):
            h = h + (_upsampled(*item, hsp) if isinstance(item, tuple) else item)
        return h, hsp



def add_end_residuals(layer, x, emb, context, transformer_options, *args, **kwargs) -> torch.Tensor:
    """The `forward_timestep_embed_patch` of the ResidualSite layer: every active guidance's last up residual."""
    for filed in transformer_options.values():
        if isinstance(filed, _CallResiduals) and filed.end is not None:
            x = x + filed.end
    return x


class BlockPatch:
    """One of a guidance's block patches, as ComfyUI stores it (it asks patches for `models()`; clones share it)."""

    def __init__(self, guidance: ColorFlowGuidance, point: str):
        self.guidance = guidance
        self.point = point

    def __call__(self, *args, **kwargs):
        return getattr(self.guidance, self.point)(*args, **kwargs)

    def models(self) -> list:
        return self.guidance.models()

    def __deepcopy__(self, memo):
        return self


def patch_model(model, guidance: ColorFlowGuidance, wrapper_type: str = "diffusion_model"):
    """Install `guidance` on the ModelPatcher `model` (already a clone): wrapper, block patches, end site. Returns it."""
    model.add_wrapper_with_key(wrapper_type, guidance.key, guidance)
    model.set_model_input_block_patch(BlockPatch(guidance, "input_block"))
    model.set_model_input_block_patch_after_skip(BlockPatch(guidance, "input_block_after_skip"))
    model.set_model_output_block_patch(BlockPatch(guidance, "output_block"))
    name = f"diffusion_model.output_blocks.{guidance.last_block}"
    block = model.get_model_object(name)
    if not any(isinstance(layer, ResidualSite) for layer in block):  # one site and handler serve every guidance
        model.set_model_forward_timestep_embed_patch((ResidualSite, add_end_residuals))
        model.add_object_patch(name, type(block)(*block, ResidualSite()))
    return model
