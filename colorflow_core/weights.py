"""Locate, download and safely read weight files, with errors that say which file goes where."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import IncompatibleWeightsError, MissingWeightsError

COLORFLOW_REPO = "TencentARC/ColorFlow"
SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a .bin/.pth/.pt read with `weights_only=True` (never plain pickle)."""
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path), device="cpu")
        if path.suffix in (".bin", ".pth", ".pt", ".ckpt"):
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise IncompatibleWeightsError(f"weight file {path} holds a {type(state).__name__}, not named tensors")
            return state.get("state_dict", state)
    except (pickle.UnpicklingError, RuntimeError, EOFError, SafetensorError, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise IncompatibleWeightsError(f"cannot read weight file {path}: {reason} (corrupt, truncated or not a plain tensor file)") from exc
    raise IncompatibleWeightsError(f"unsupported weight file {path} (expected .safetensors, .bin or .pth)")


def find_weight_file(folder: Path, stem: str, root: Path | None = None, source: str = COLORFLOW_REPO) -> Path:
    """`folder/stem.safetensors` if present, else `folder/stem.bin`/`.pth`; a clear error when none exists."""
    for suffix in (".safetensors", ".bin", ".pth"):
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    shown = folder.relative_to(root).as_posix() + "/" if root is not None else ""
    raise MissingWeightsError(f"{shown}{stem}.safetensors (or .bin)", folder, f"from {source}")


def require_file(path: Path, root: Path | None = None, source: str = COLORFLOW_REPO) -> Path:
    """Return `path` if it is a file, else raise MissingWeightsError naming it and its folder."""
    if not path.is_file():
        shown = path.relative_to(root).as_posix() if root is not None else path.name
        raise MissingWeightsError(shown, path.parent, f"from {source}")
    return path


def looks_like_repo_id(text: str) -> bool:
    """'owner/name' with no local meaning."""
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not Path(text).exists() and not text.startswith((".", "~"))


def resolve_snapshot(
    location: str | Path, allow_patterns: list[str], allow_download: bool, what: str, download_dir: str | Path | None = None
) -> Path:
    """A local folder as-is. A repo id: `download_dir/<repo name>` if present (e.g. ComfyUI's models/colorflow), else the
    Hugging Face cache; missing files are downloaded (with progress) only if allowed, into `download_dir` when given."""
    path = Path(location).expanduser()
    if path.exists() or not looks_like_repo_id(str(location)):
        if not path.is_dir():
            raise MissingWeightsError(str(path), path.parent, what, kind="folder")
        return path
    from huggingface_hub import snapshot_download  # imported here: nothing touches the hub at import time

    target = Path(download_dir).expanduser() / str(location).split("/")[1] if download_dir is not None else None
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    if target is not None and target.is_dir() and (not allow_download or offline):
        return target
    if target is None:
        try:
            return Path(snapshot_download(repo_id=str(location), allow_patterns=allow_patterns, local_files_only=True))
        except Exception:  # noqa: BLE001 - any cache miss means "not here yet"
            pass
    if not allow_download or offline:
        why = "downloads are off" if not allow_download else "HF_HUB_OFFLINE is set"
        where = target if target is not None else "a local folder"
        raise MissingWeightsError(
            str(location), where, f"{what} is not on this machine and {why}; download {location} and pass its folder"
        )
    try:
        return Path(snapshot_download(repo_id=str(location), allow_patterns=allow_patterns, local_dir=target))
    except Exception as exc:  # noqa: BLE001 - network errors come in many types
        raise MissingWeightsError(str(location), target or "a local folder", f"download of {what} failed: {exc}") from exc
