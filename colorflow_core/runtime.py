"""Execution of a preset: where each stage runs, in which dtype/layout, with the LoRA merged or not — per call, undone after.

The unit is a *stage* (`STAGES`): for the duration of `Run.stage(name, *modules)` the modules' parameters and
buffers are replaced by copies on the stage's device, in the stage's compute dtype and memory format (when they are
not there already), and the denoiser's LoRA is merged if the preset asks; on exit the original tensors are put back
— the very same tensor objects, so the shared model is left bit-for-bit as it was. With offload, the originals wait
on the offload device and only the running stage's models occupy the accelerator.

A `Run` is made once per call from settings already resolved (`colorflow_core.settings`: the preset `auto` has been
replaced by the one it picked) and handed to the samplers and the upscaler explicitly; `None` stands for a plain
model (what `load_colorflow` returns for the `faithful` preset), which runs no stage logic at all. Staging is an
execution policy: it decides where weights live and in which dtype a stage computes, never what is computed.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Iterator, Mapping, Sequence

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from .presets import HALF, Preset

#: The stages a page goes through, in order (each one's models are staged together).
STAGES = ("image_encoder", "text_encoder", "vae", "denoiser", "fusion")
_CAST_STAGES = ("denoiser", "vae", "fusion")
#: (parameter or buffer, what was made of it…) → (that tensor, its signature, the copy): copies a view keeps between
#: calls (`Preset.keep_copies`). An entry is used only while the tensor is the same object, at the same place and
#: version; weights changed in place through a `.data` alias are not noticed (clear the cache then).
CopyCache = dict
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


# --------------------------------------------------------------------------------------------- placement
@dataclass(frozen=True)
class Placement:
    """Where a run computes and where idle weights wait; the hook for a host's device choices (e.g. ComfyUI's).

    `device`: the compute device of every stage unless `stage_devices` names another one for it (e.g. the text
    encoder on the CPU). `offload_device`: where weights live between stages under an offloading preset.
    """

    device: torch.device
    offload_device: torch.device = torch.device("cpu")
    stage_devices: tuple[tuple[str, torch.device], ...] = ()

    @classmethod
    def create(
        cls, device: str | torch.device, offload_device: str | torch.device = "cpu", **stage_devices: str | torch.device
    ) -> "Placement":
        """`Placement.create("cuda", "cpu", text_encoder="cpu")`; stage names are those of `STAGES`."""
        unknown = sorted(set(stage_devices) - set(STAGES))
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; stages are {', '.join(STAGES)}")
        return cls(
            torch.device(device), torch.device(offload_device),
            tuple(sorted((k, torch.device(v)) for k, v in stage_devices.items())),
        )

    def device_for(self, stage: str) -> torch.device:
        """The device `stage` runs on."""
        return dict(self.stage_devices).get(stage, self.device)


@dataclass(frozen=True, eq=False)
class RunPlan:
    """A preset bound to a model's modules and a placement (what a `ColorFlowModel.with_preset` view carries)."""

    preset: Preset
    placement: Placement
    #: stage → the model's modules of that stage (for `auto`'s memory estimates).
    modules: Mapping[str, tuple[nn.Module, ...]] = field(default_factory=dict)
    #: "sd" or "pixart" (activation estimates differ).
    family: str = "sd"
    #: Free bytes on a device; None = measure (`memory.free_memory`). Tests inject a fixed value.
    free_memory: Callable[[torch.device], int] | None = None
    #: The converted / merged copies this view keeps between calls when the preset says `keep_copies`.
    copies: CopyCache = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- dtype / layout
@lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """True when this CPU has bf16 arithmetic (avx512_bf16 or AMX); oneDNN only emulates it otherwise."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        pass
    return False


def half_dtype(device: torch.device) -> torch.dtype | None:
    """The 16-bit dtype `device` computes fastest in, or None when it has none worth using."""
    if device.type == "cuda":
        if not torch.cuda.is_available():  # planning for a CUDA machine from one without: assume a current GPU
            return torch.bfloat16
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else None
    return None


def default_dtype(device: torch.device, preset: Preset) -> torch.dtype:
    """The dtype weights are loaded and computed in when the caller names none: float16 on CUDA for every preset
    (upstream runs the whole pipeline in it; bf16 would change its numbers), float16 on MPS for the presets that
    compute in half precision, else float32 (a CPU preset that wants half precision makes its own copies)."""
    if device.type == "cuda" or (device.type == "mps" and (preset.compute_dtype == HALF or preset.is_auto)):
        return torch.float16
    return torch.float32


def compute_dtype(setting: str | None, stage: str, device: torch.device, weights: torch.dtype) -> torch.dtype:
    """The dtype a stage computes in, given the preset's `compute_dtype` and the dtype its weights are stored in.

    Encoders (text, image) always keep the weights' dtype. 16-bit weights are never re-cast to another 16-bit dtype.
    """
    if setting is None or stage not in _CAST_STAGES:
        return weights
    if setting != HALF:
        return _DTYPES[setting]
    if weights in (torch.float16, torch.bfloat16):
        return weights
    half = half_dtype(device)
    return weights if half is None else half


def stage_dtype(preset: Preset, stage: str, device: torch.device, weights: torch.dtype, resident: bool) -> torch.dtype:
    """`compute_dtype` under `preset`, for weights that already live on `device` (`resident`) or are staged there."""
    if resident and not preset.cast_resident:
        return weights
    return compute_dtype(preset.compute_dtype, stage, device, weights)


def lives_on(module: nn.Module, device: torch.device) -> bool:
    """Whether `module`'s (first) parameter is on `device` (a module without parameters counts as anywhere)."""
    for param in module.parameters():
        return _same_device(param, device)
    return True


def _same_device(tensor: torch.Tensor, device: torch.device) -> bool:
    return tensor.device.type == device.type and (device.index is None or tensor.device.index == device.index)


def _convert(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None, channels_last: bool) -> torch.Tensor:
    target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
    layout = torch.channels_last if channels_last and tensor.dim() == 4 else None
    if _same_device(tensor, device) and tensor.dtype == target and (
        layout is None or tensor.is_contiguous(memory_format=layout)
    ):
        return tensor
    return tensor.to(device=device, dtype=target, memory_format=layout or torch.preserve_format)


class Staged:
    """What `stage_module` (or `merged_lora`) replaced; `restore()` puts the original tensors back."""

    def __init__(self, undo: list[Callable[[], None]]):
        self._undo = undo

    def restore(self) -> None:
        """Put the original tensors back (newest swap first); a second call does nothing."""
        for step in reversed(self._undo):
            step()
        self._undo = []


def _signature(tensors: Sequence[torch.Tensor]) -> tuple:
    """Where and at which version each tensor (a Parameter or a buffer) is: changes when it is replaced or modified
    in place through itself (not through a `.data` alias). Inference tensors (weights loaded under
    `torch.inference_mode`, as inside ComfyUI) have no version counter: only their replacement is noticed."""
    return tuple((t.data_ptr(), None if t.is_inference() else t._version, t.dtype, t.device) for t in tensors)


def _cached(
    cache: CopyCache | None, owner: torch.Tensor, tag: tuple, signature: tuple, make: Callable[[], torch.Tensor],
    original: torch.Tensor | None = None,
):
    """`make()`, or the copy `cache` holds for (owner, tag) while the owner is unchanged (its `signature`)."""
    if cache is None:
        return make()
    key = (id(owner), *tag)
    entry = cache.get(key)
    if entry is not None and entry[0] is owner and entry[1] == signature:
        return entry[2]
    new = make()
    if new is not original:
        cache[key] = (owner, signature, new)
    return new


def stage_module(
    module: nn.Module,
    device: torch.device,
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
    cache: CopyCache | None = None,
) -> Staged:
    """Give `module` copies of its parameters/buffers on `device` in `dtype` (floating tensors) and layout, where they
    differ (reusing `cache`'s copies when given); `.restore()` on the result puts the originals back (exactly those
    objects)."""
    converted: dict[int, torch.Tensor] = {}
    undo: list[Callable[[], None]] = []

    def convert(owner: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
        if id(owner) not in converted:
            converted[id(owner)] = _cached(
                cache, owner, ("staged", str(device), dtype, channels_last), _signature([owner]),
                lambda: _convert(tensor, device, dtype, channels_last), original=tensor,
            )
        return converted[id(owner)]

    try:
        for sub in module.modules():
            for name, param in sub._parameters.items():
                if param is None:
                    continue
                old = param.data
                new = convert(param, old)
                if new is not old:
                    try:
                        param.data = new
                        undo.append(lambda p=param, o=old: setattr(p, "data", o))
                    except RuntimeError:  # a device whose tensors cannot back this Parameter (e.g. meta): swap the Parameter
                        sub._parameters[name] = nn.Parameter(new, requires_grad=param.requires_grad)
                        undo.append(lambda s=sub, n=name, o=param: s._parameters.__setitem__(n, o))
            for name, buffer in sub._buffers.items():
                if buffer is None:
                    continue
                new = convert(buffer, buffer)
                if new is not buffer:
                    sub._buffers[name] = new
                    undo.append(lambda s=sub, n=name, o=buffer: s._buffers.__setitem__(n, o))
    except BaseException:  # e.g. out of memory halfway: put back what was already swapped
        Staged(undo).restore()
        raise
    return Staged(undo)


# --------------------------------------------------------------------------------------------- LoRA merge
def _lora_layers(module: nn.Module) -> list:
    return [m for m in module.modules() if isinstance(m, LoraLayer)]


def _refuse_state_dict(module, prefix, keep_vars) -> None:
    raise RuntimeError(
        "the LoRA is merged into this model for inference; its state dict is read after the run "
        "(the merge is undone when the stage ends)"
    )


def _mergeable(layer) -> list[str]:
    """The active plain-LoRA adapters of `layer` (variants such as DoRA, and LoRA biases, stay unmerged)."""
    if layer.merged or layer.disable_adapters:
        return []
    variants = getattr(layer, "lora_variant", {})
    biases = getattr(layer, "lora_bias", {})
    return [a for a in layer.active_adapters if a in layer.lora_A and a not in variants and not biases.get(a, False)]


@contextlib.contextmanager
def merged_lora(
    module: nn.Module,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
    cache: CopyCache | None = None,
) -> Iterator[int]:
    """Within the block, `module`'s active LoRA adapters are merged into its base weights; yields the layer count.

    Each merged weight is a new tensor, W + Σ peft `get_delta_weight(adapter)` computed in the weights' own dtype,
    then put on `device`/`dtype`/layout (default: where W is) — so casting and merging make one copy; peft's layers
    are marked merged (they skip their LoRA branch). On exit the original tensors are back, bit-for-bit, and the
    layers report unmerged. Reading the state dict (saving) while merged raises.
    """
    undo: list[Callable[[], None]] = []
    guard = None
    count = 0
    try:
        for layer in _lora_layers(module):
            adapters = _mergeable(layer)
            if not adapters:
                continue
            param = layer.get_base_layer().weight
            original = param.data
            target = original.device if device is None else device
            parts = [param] + [p for a in adapters for p in (layer.lora_A[a].weight, layer.lora_B[a].weight)]

            def make(layer=layer, original=original, adapters=adapters, target=target):
                with torch.no_grad():
                    weight = original.clone()
                    for adapter in adapters:
                        weight += layer.get_delta_weight(adapter).to(weight.dtype)
                return _convert(weight, target, dtype, channels_last)

            tag = ("merged", str(target), dtype, channels_last, tuple(adapters))
            param.data = _cached(cache, param, tag, _signature(parts), make)
            layer.merged_adapters[:] = adapters
            undo.append(lambda p=param, o=original, layer=layer: (setattr(p, "data", o), layer.merged_adapters.clear()))
            count += 1
        if count:
            guard = module.register_state_dict_pre_hook(_refuse_state_dict)
        yield count
    finally:
        if guard is not None:
            guard.remove()
        for step in reversed(undo):
            step()


# --------------------------------------------------------------------------------------------- the run
class Run:
    """One call's execution of a (resolved, non-auto) preset."""

    def __init__(self, plan: RunPlan, preset: Preset):
        if preset.is_auto:
            raise ValueError("a run executes a concrete preset: resolve 'auto' first (colorflow_core.settings)")
        self.plan = plan
        self.preset = preset
        self.placement = plan.placement
        self.device = plan.placement.device
        #: ("enter" | "exit", stage, module class names, device) — what was staged, in order (tests, debugging).
        self.events: list[tuple[str, str, tuple[str, ...], str]] = []

    @property
    def per_model(self) -> bool:
        """Guider and denoiser take turns on the device within each step."""
        return self.preset.offload == "model"

    def dtype_for(self, stage: str, module: nn.Module) -> torch.dtype:
        """The dtype `module` computes in during `stage`."""
        device = self.placement.device_for(stage)
        return stage_dtype(self.preset, stage, device, _dtype_of(module), lives_on(module, device))

    def channels_last(self, stage: str) -> bool:
        """Whether `stage`'s conv nets run in channels_last under this preset (on CUDA, or everywhere if asked)."""
        setting = self.preset.channels_last
        if stage not in _CAST_STAGES or setting == "never":
            return False
        return setting == "always" or self.placement.device_for(stage).type == "cuda"

    @contextlib.contextmanager
    def stage(self, stage: str, *modules: nn.Module) -> Iterator[torch.device]:
        """The modules on `stage`'s device, dtype and layout for the block (LoRA merged in the denoiser stage when the
        preset asks); yields the stage's device."""
        device = self.placement.device_for(stage)
        names = tuple(type(m).__name__ for m in modules)
        dtypes = [self.dtype_for(stage, module) for module in modules]  # before anything moves
        layout = self.channels_last(stage)
        cache = self.plan.copies if self.preset.keep_copies else None
        self.events.append(("enter", stage, names, str(device)))
        try:
            with contextlib.ExitStack() as stack:
                if self.preset.merge_lora and stage == "denoiser":
                    for module, dtype in zip(modules, dtypes):
                        stack.enter_context(merged_lora(module, device, dtype, layout, cache))
                for module, dtype in zip(modules, dtypes):
                    stack.callback(stage_module(module, device, dtype, layout, cache).restore)
                yield device
        finally:
            self.events.append(("exit", stage, names, str(device)))


def _dtype_of(module: nn.Module) -> torch.dtype:
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def stage(run: Run | None, stage_name: str, *modules: nn.Module) -> contextlib.AbstractContextManager:
    """`run.stage(...)`, or a no-op block (yielding None) for a plain model (`run` None)."""
    return run.stage(stage_name, *modules) if run is not None else contextlib.nullcontext(None)


def denoise_stage(run: Run | None, guider: nn.Module, denoiser: nn.Module) -> contextlib.AbstractContextManager:
    """The "denoiser" stage around the whole denoising loop; a no-op block when the two models take turns per step
    (offload "model": see `model_turn`) or for a plain model."""
    if run is None or run.per_model:
        return contextlib.nullcontext(None)
    return run.stage("denoiser", guider, denoiser)


def model_turn(run: Run | None, module: nn.Module) -> contextlib.AbstractContextManager:
    """`module` alone in the "denoiser" stage for one call when the guider and the denoiser take turns per step;
    else a no-op block (the whole loop is already staged by `denoise_stage`)."""
    if run is None or not run.per_model:
        return contextlib.nullcontext(None)
    return run.stage("denoiser", module)
