"""pytest at the repository root, which is also a ComfyUI pack.

pytest would import the root `__init__.py` as a test package. In a checkout whose folder name is not
a Python identifier (`ComfyUI-ColorFlow`) that import has no parent package and its relative
imports fail, so the root package is never set up here; tests load the pack under a fixed name
(tests/pack.py), the way ComfyUI does.
"""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Skip importing the root `__init__.py` when the root folder is set up as a test package."""
    for node in {n for item in items for n in item.listchain() if isinstance(n, pytest.Package) and n.path == ROOT}:
        node.setup = lambda: None
