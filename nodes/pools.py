"""Named reference pools persisted under ComfyUI's user directory."""
from __future__ import annotations

import re
from pathlib import Path

from ..colorflow_core.errors import IncompatibleWeightsError, InvalidInputError
from ..colorflow_core.retrieval import ImageEncoder, ReferencePool
from . import comfy_bridge

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.-]{0,63}")


def pools_root() -> Path:
    """Folder holding one store per pool name."""
    return comfy_bridge.user_directory() / "colorflow" / "pools"


def pool_store(name: str) -> Path:
    """The store folder of pool `name` (letters, digits, space, '_', '.', '-'; never a path)."""
    if not _NAME.fullmatch(name):
        raise InvalidInputError(f"pool name '{name}' must be 1-64 letters, digits, spaces, '_', '.' or '-', starting with a letter or digit")
    return pools_root() / name


def check_store_encoder(store: Path, encoder: ImageEncoder) -> None:
    """Refuse an encoder whose embedding width differs from the one a persisted pool was built with."""
    stored = ReferencePool.stored_encoder(store)
    if stored is None:
        return
    name, dim = stored
    if dim != encoder.dim:
        raise IncompatibleWeightsError(
            f"pool '{store.name}' was embedded by '{name}' ({dim}-d vectors) but this encoder gives {encoder.dim}-d vectors; "
            "use that encoder again, or another pool name"
        )


def open_pool(name: str, encoder: ImageEncoder) -> ReferencePool:
    """The persisted pool `name`, bound to `encoder` (empty when new)."""
    store = pool_store(name)
    check_store_encoder(store, encoder)
    return ReferencePool.open(store, encoder)
