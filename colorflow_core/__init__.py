"""ColorFlow: retrieval-augmented colorization of black-and-white comic pages (library, no ComfyUI).

Public names are imported on first use, so `import colorflow_core` stays cheap and loads no model.
"""
from __future__ import annotations

import importlib

from .errors import ColorFlowError, IncompatibleWeightsError, InvalidInputError, MissingWeightsError, NonFiniteError

_LAZY = {
    "load_colorflow": "loading",
    "ColorFlowModel": "model",
    "PageSettings": "settings",
    "resolve": "settings",
    "PageObserver": "observe",
    "prepare_canvas": "sequence",
    "STYLES": "styles",
    "ReferencePool": "retrieval",
    "Retrieval": "retrieval",
    "ReleaseClipEncoder": "retrieval",
    "OpenClipEncoder": "retrieval",
    "build_canvas": "canvas",
    "Canvas": "canvas",
    "ColorizeOptions": "options",
    "make_generators": "options",
    "colorize_page": "sequence",
    "colorize_pages": "sequence",
    "PageResult": "sequence",
    "write_tiny_release": "tiny",
    "colorize_batch": "sequence",
    "Preset": "presets",
    "PRESET_NAMES": "presets",
    "get_preset": "presets",
    "Placement": "runtime",
}

__all__ = ["ColorFlowError", "IncompatibleWeightsError", "InvalidInputError", "MissingWeightsError", "NonFiniteError", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'colorflow_core' has no attribute '{name}'")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
