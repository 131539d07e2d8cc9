"""The repository root imported as a ComfyUI pack, under a fixed name, the way ComfyUI imports custom node folders."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "colorflow_pack"


def load_pack() -> ModuleType:
    """Import (once) the root `__init__.py` as package `colorflow_pack`; its submodules resolve relative to it."""
    if PACK_NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK_NAME, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK_NAME] = module
        spec.loader.exec_module(module)
    return sys.modules[PACK_NAME]
