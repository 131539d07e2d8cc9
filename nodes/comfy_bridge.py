"""With native_bridge, the only module that imports ComfyUI (`comfy`, `folder_paths`), with plain fallbacks when it is absent.

Without ComfyUI (tests, standalone use) the input/, output/, user/ and models/ folders live under
`$COLORFLOW_COMFY_BASE`, else the working directory; progress and interrupt checks do nothing.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import torch

try:
    import comfy.model_management as model_management
    import comfy.utils as comfy_utils
    import folder_paths
except ImportError:  # not running inside ComfyUI
    model_management = comfy_utils = folder_paths = None

#: ComfyUI model folder name of the ColorFlow weights (`models/colorflow`).
MODEL_FOLDER = "colorflow"
#: Environment variable naming the stand-in ComfyUI base folder when ComfyUI is absent.
BASE_ENV = "COLORFLOW_COMFY_BASE"

Progress = Callable[[int, int], None]
T = TypeVar("T")
R = TypeVar("R")


def in_comfyui() -> bool:
    """Whether ComfyUI's modules are importable (the pack runs inside a ComfyUI server)."""
    return folder_paths is not None


def fallback_base() -> Path:
    """The folder standing in for ComfyUI's base directory when ComfyUI is absent."""
    return Path(os.environ.get(BASE_ENV) or Path.cwd())


def register_model_folder() -> None:
    """Register `models/colorflow` with ComfyUI's model folders (extra_model_paths.yaml may add more)."""
    if in_comfyui():
        folder_paths.add_model_folder_path(MODEL_FOLDER, os.path.join(folder_paths.models_dir, MODEL_FOLDER))


def model_folders(kind: str) -> list[Path]:
    """Folders searched for models of `kind` ('colorflow', 'diffusers', 'checkpoints', ...)."""
    if in_comfyui():
        if kind not in folder_paths.folder_names_and_paths:
            return []
        return [Path(path) for path in folder_paths.get_folder_paths(kind)]
    return [fallback_base() / "models" / kind]


def model_files(kind: str) -> list[str]:
    """Files under the `kind` model folders, as paths relative to their folder (ComfyUI's combo values)."""
    if in_comfyui():
        return list(folder_paths.get_filename_list(kind))
    return sorted(
        (Path(parent) / name).relative_to(folder).as_posix()
        for folder in model_folders(kind)
        for parent, _dirs, names in os.walk(folder, followlinks=True)
        for name in names
    )


def model_file(kind: str, name: str) -> Path | None:
    """Full path of the model file `name` of `kind`, or None."""
    if in_comfyui():
        found = folder_paths.get_full_path(kind, name)
        return Path(found) if found else None
    for folder in model_folders(kind):
        if (folder / name).is_file():
            return folder / name
    return None


def custom_node_folders() -> list[Path]:
    """ComfyUI's custom_nodes folders (where other packs, e.g. the ControlNet auxiliary preprocessors, keep their files)."""
    if in_comfyui():
        if "custom_nodes" not in folder_paths.folder_names_and_paths:
            return []
        return [Path(path) for path in folder_paths.get_folder_paths("custom_nodes")]
    return [fallback_base() / "custom_nodes"]


def input_directory() -> Path:
    """ComfyUI's input directory."""
    return Path(folder_paths.get_input_directory()) if in_comfyui() else fallback_base() / "input"


def user_directory() -> Path:
    """ComfyUI's user directory (where persisted reference pools live)."""
    return Path(folder_paths.get_user_directory()) if in_comfyui() else fallback_base() / "user"


def torch_device() -> torch.device:
    """The compute device ComfyUI chose (`--cpu` gives the CPU); CUDA if present when standalone."""
    if in_comfyui():
        return model_management.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def intermediate_device() -> torch.device:
    """Where IMAGE/MASK outputs live (the CPU unless ComfyUI runs with `--gpu-only`)."""
    return model_management.intermediate_device() if in_comfyui() else torch.device("cpu")


def offload_device() -> torch.device:
    """Where ComfyUI keeps idle model weights (the CPU, unless it runs with --highvram / --gpu-only)."""
    return model_management.unet_offload_device() if in_comfyui() else torch.device("cpu")


def low_vram_mode() -> bool:
    """Whether ComfyUI was started to save VRAM (--lowvram / --novram)."""
    return in_comfyui() and model_management.vram_state.name in ("LOW_VRAM", "NO_VRAM")


def make_room(needed: int, device: torch.device) -> None:
    """Have ComfyUI unload its own models until `needed` bytes are free on the accelerator `device`."""
    if in_comfyui() and device.type != "cpu":
        model_management.free_memory(needed, device)


def auto_dtype(device: torch.device) -> torch.dtype:
    """ComfyUI's choice of half precision for `device`; float16 on CUDA and float32 elsewhere when standalone."""
    if in_comfyui():
        if model_management.should_use_fp16(device):
            return torch.float16
        return torch.bfloat16 if model_management.should_use_bf16(device) else torch.float32
    return torch.float16 if device.type == "cuda" else torch.float32


def progress_bar(total: int) -> Progress:
    """A `(done, total)` callback driving the running node's progress bar; inside ComfyUI each call is an interrupt point."""
    if not in_comfyui():
        return lambda done, total: None
    bar = comfy_utils.ProgressBar(total)
    return lambda done, total: bar.update_absolute(done, total)


def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception if the user cancelled the queue."""
    if in_comfyui():
        model_management.throw_exception_if_processing_interrupted()


def soft_empty_cache() -> None:
    """Return cached accelerator memory after a big stage."""
    if in_comfyui():
        model_management.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


def each(items: Sequence[T], work: Callable[[T, Progress], R], steps: int = 1) -> list[R]:
    """`work(item, progress)` for every item under one progress bar of `len(items) * steps` (each item's `progress`
    counts its own steps); Cancel is honoured between items and at every progress report; cached memory is
    returned after."""
    total = len(items) * steps
    bar = progress_bar(total)
    results = []
    for index, item in enumerate(items):
        check_interrupt()
        offset = index * steps
        results.append(work(item, lambda done, _total, offset=offset: bar(offset + done, total)))
        bar(offset + steps, total)
    soft_empty_cache()
    return results


def chapter_progress(pages: int, steps: int) -> Callable[[str, int, int], None]:
    """The core page loop's `progress(stage, done, total)` as one bar over every page's steps, with Cancel checked at
    each report."""
    bar = progress_bar(pages * steps)
    finished = [0]

    def report(stage: str, done: int, _total: int) -> None:
        check_interrupt()
        if stage == "page":
            finished[0] = done
        else:
            bar(finished[0] * steps + done, pages * steps)

    return report

