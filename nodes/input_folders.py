"""Folders of images named by the user, confined to ComfyUI's input directory unless the user opts out."""
from __future__ import annotations

import hashlib
from pathlib import Path

from ..colorflow_core.errors import ColorFlowError, InvalidInputError
from ..colorflow_core.imaging import list_images
from . import comfy_bridge

FOLDER_TOOLTIP = "Folder of images inside ComfyUI's input directory (e.g. 'chapter01/refs'), read in file-name order."
ALLOW_OUTSIDE = ("BOOLEAN", {
    "default": False,
    "tooltip": (
        "Allow a folder outside ComfyUI's input directory (an absolute path). "
        "Off by default: a shared server should not read arbitrary folders."
    ),
})


def resolve_input_folder(folder: str, allow_outside: bool) -> Path:
    """The folder `folder` names (relative to the input directory); outside it only when allowed."""
    root = comfy_bridge.input_directory().resolve()
    path = (root / folder.strip()).resolve()
    if not allow_outside and not path.is_relative_to(root):
        raise InvalidInputError(
            f"folder '{folder}' is outside ComfyUI's input directory ({root}); move it there or turn on allow_outside_input"
        )
    if not path.is_dir():
        raise InvalidInputError(f"folder '{folder}' not found (looked for {path})")
    return path


def folder_images(folder: str, allow_outside: bool) -> list[Path]:
    """Image files of the folder, sorted by name; an error when there are none."""
    return list_images(resolve_input_folder(folder, allow_outside))


def folder_signature(folder: str, allow_outside: bool) -> str:
    """Changes whenever an image of the folder is added, removed or rewritten (for IS_CHANGED)."""
    if not folder.strip():
        return ""
    try:
        files = folder_images(folder, allow_outside)
    except ColorFlowError as exc:
        return f"error: {exc}"
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()
