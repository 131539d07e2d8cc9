"""Folders of images named in a workflow, confined to ComfyUI's input directory and the folders the user allowed.

Only the user widens what a workflow may read, outside any workflow: an absolute folder per line in
`user/colorflow/allowed_folders.txt` (ComfyUI's user directory), or folders in $COLORFLOW_ALLOWED_FOLDERS
(separated like PATH). Paths are compared after resolving symlinks, so a link cannot lead outside; a refused path
gets the same message whether or not it exists.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from ..colorflow_core.errors import ColorFlowError, InvalidInputError
from ..colorflow_core.imaging import check_images_budget, list_images
from . import comfy_bridge

log = logging.getLogger(__name__)

#: Environment variable listing extra folders nodes may read images from (os.pathsep-separated absolute paths).
ALLOWED_ENV = "COLORFLOW_ALLOWED_FOLDERS"
#: Where, under ComfyUI's user directory, the user lists extra folders nodes may read (one absolute path a line).
ALLOWED_FILE = Path("colorflow") / "allowed_folders.txt"

FOLDER_TOOLTIP = "Folder of images inside ComfyUI's input directory (e.g. 'chapter01/refs'), read in file-name order."
ALLOW_OUTSIDE = ("BOOLEAN", {
    "default": False,
    "tooltip": (
        "Ignored; kept so saved workflows still load. A workflow cannot widen what it may read: to allow a folder "
        f"outside ComfyUI's input directory, add its absolute path to user/{ALLOWED_FILE.as_posix()} "
        f"(one a line) or to the {ALLOWED_ENV} environment variable."
    ),
})


def allowed_roots() -> list[Path]:
    """ComfyUI's input directory and the folders the user allowed, symlinks resolved."""
    entries = [entry for entry in os.environ.get(ALLOWED_ENV, "").split(os.pathsep) if entry.strip()]
    listing = comfy_bridge.user_directory() / ALLOWED_FILE
    if listing.is_file():
        try:
            lines = listing.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidInputError(f"cannot read the allowed folders in {listing}: {exc}") from exc
        entries += [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    roots = [comfy_bridge.input_directory()]
    for entry in entries:
        path = Path(entry.strip()).expanduser()
        if path.is_absolute():
            roots.append(path)
        else:
            log.warning("ignoring allowed folder '%s': give an absolute path", entry.strip())
    return [root.resolve() for root in roots]


def _refused(folder: str) -> InvalidInputError:
    return InvalidInputError(
        f"folder '{folder}' is outside ComfyUI's input directory and the folders allowed in "
        f"user/{ALLOWED_FILE.as_posix()} or ${ALLOWED_ENV}; move it there or allow it in one of them"
    )


def resolve_input_folder(folder: str) -> Path:
    """The folder `folder` names (relative to the input directory, or absolute inside an allowed folder)."""
    roots = allowed_roots()
    try:
        path = (roots[0] / folder.strip()).resolve()
        inside = any(path.is_relative_to(root) for root in roots)
        found = inside and path.is_dir()
    except (OSError, ValueError, RuntimeError) as exc:  # a NUL byte, a name too long, a symlink loop
        if not any(Path(os.path.abspath(roots[0] / folder.strip())).is_relative_to(root) for root in roots):
            raise _refused(folder) from None  # says nothing about what lies outside
        reason = getattr(exc, "strerror", None) or exc
        raise InvalidInputError(f"folder {folder[:200]!r} cannot be used: {type(exc).__name__}: {reason}") from exc
    if not inside:
        raise _refused(folder)
    if not found:
        raise InvalidInputError(f"folder '{folder}' not found (looked for {path})")
    return path


def folder_images(folder: str) -> list[Path]:
    """Image files of the folder, sorted by name; an error when there are none, when one links outside the allowed
    folders, or when together they exceed the per-folder pixel budget."""
    roots = allowed_roots()
    files = list_images(resolve_input_folder(folder))
    for path in files:
        if not any(path.resolve().is_relative_to(root) for root in roots):
            raise InvalidInputError(f"'{path.name}' in folder '{folder}' links outside the allowed folders; refused")
    check_images_budget(files, f"folder '{folder}'")
    return files


def folder_signature(folder: str) -> str:
    """Changes whenever an image of the folder is added, removed or rewritten (for IS_CHANGED)."""
    if not folder.strip():
        return ""
    try:
        files = folder_images(folder)
    except ColorFlowError as exc:
        return f"error: {exc}"
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()
