"""Dropdown choices for the loaders, and where each choice lives on disk.

Release snapshots are folders under `models/colorflow/`; the SD1.5 base is a diffusers folder under
`models/diffusers/` or `models/colorflow/`, or a single checkpoint file under `models/checkpoints/`.
The canonical names are always offered, so shipped workflows validate and a missing download gives
a message that names the folder.
"""
from __future__ import annotations

from pathlib import Path

from ..colorflow_core.loading import STYLE_FOLDERS
from . import comfy_bridge

#: Folder name of the TencentARC/ColorFlow release under models/colorflow/.
RELEASE_NAME = "ColorFlow"
#: The SD1.5 checkpoint most ComfyUI users already have in models/checkpoints/.
BASE_NAME = "checkpoints/v1-5-pruned-emaonly.safetensors"
#: Folder kinds searched for diffusers-layout SD1.5 bases, as shown in the dropdown prefix.
BASE_FOLDER_KINDS = ("diffusers", comfy_bridge.MODEL_FOLDER)
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
ENCODER_FOLDER = "image_encoder"


def _subfolders(kind: str) -> list[tuple[str, Path]]:
    """(name, path) of every folder directly inside the `kind` model folders."""
    found = []
    for root in comfy_bridge.model_folders(kind):
        if root.is_dir():
            found += [(path.name, path) for path in sorted(root.iterdir()) if path.is_dir()]
    return found


def _is_release(folder: Path) -> bool:
    return (folder / ENCODER_FOLDER).is_dir() or any((folder / sub).is_dir() for sub in STYLE_FOLDERS.values())


def _is_diffusers(folder: Path) -> bool:
    return (folder / "model_index.json").is_file() or (folder / "unet").is_dir()


def _with_canonical(canonical: str, names: list[str]) -> list[str]:
    return list(dict.fromkeys([*names, canonical]))


def release_choices() -> list[str]:
    """Release snapshot folders found under models/colorflow/, plus the canonical 'ColorFlow'."""
    return _with_canonical(RELEASE_NAME, [name for name, path in _subfolders(comfy_bridge.MODEL_FOLDER) if _is_release(path)])


def release_path(choice: str) -> Path | None:
    """The folder of a release choice, or None when it is not on disk."""
    return next((path for name, path in _subfolders(comfy_bridge.MODEL_FOLDER) if name == choice and _is_release(path)), None)


def encoder_choices() -> list[str]:
    """`<release>/image_encoder` for every release snapshot."""
    return [f"{name}/{ENCODER_FOLDER}" for name in release_choices()]


def encoder_path(choice: str) -> Path:
    """The image encoder folder of an encoder choice (its release folder may be missing)."""
    release = choice.split("/")[0]
    folder = release_path(release)
    if folder is None:
        folder = comfy_bridge.model_folders(comfy_bridge.MODEL_FOLDER)[0] / release
    return folder / ENCODER_FOLDER


def base_choices() -> list[str]:
    """SD1.5 bases: '<kind>/<folder>' diffusers folders and 'checkpoints/<file>' checkpoints, plus the canonical one."""
    folders = [f"{kind}/{name}" for kind in BASE_FOLDER_KINDS for name, path in _subfolders(kind) if _is_diffusers(path)]
    files = [f"checkpoints/{name}" for name in comfy_bridge.model_files("checkpoints") if name.lower().endswith(CHECKPOINT_SUFFIXES)]
    return _with_canonical(BASE_NAME, folders + files)


def base_path(choice: str) -> Path | None:
    """The folder or checkpoint file of a base choice, or None when it is not on disk."""
    kind, _, name = choice.partition("/")
    if kind == "checkpoints":
        return comfy_bridge.model_file("checkpoints", name)
    return next((path for path_name, path in _subfolders(kind) if path_name == name and _is_diffusers(path)), None)


def missing_location(choice: str) -> tuple[str, Path]:
    """(what is missing, the folder it belongs in) for a release or base choice not on disk."""
    kind, _, name = choice.partition("/") if "/" in choice else (comfy_bridge.MODEL_FOLDER, "", choice)
    folders = comfy_bridge.model_folders(kind) or [comfy_bridge.fallback_base() / "models" / kind]
    return (name if kind == "checkpoints" else f"{name}/"), folders[0]
