"""Shared test fixtures: offline hub, the shared parity folder (skipped with a reason when absent)."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("COLORFLOW_SHARED", REPO.parent / "shared"))
PARITY = SHARED / "parity" / "sd-gray-tiny"
EXAMPLES = SHARED / "data" / "upstream-examples"


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    """The upstream golden fixtures; tests that need them skip when ../shared is not beside the checkout."""
    if not (PARITY / "manifest.json").is_file():
        pytest.skip(f"parity fixtures not found at {PARITY} (set COLORFLOW_SHARED to the shared/ folder)")
    return PARITY


@pytest.fixture(scope="session")
def examples_dir() -> Path:
    """Upstream's example pages (third-party; read from ../shared, never shipped)."""
    if not (EXAMPLES / "example_3").is_dir():
        pytest.skip(f"upstream examples not found at {EXAMPLES}")
    return EXAMPLES


@pytest.fixture(scope="session")
def tiny_release(tmp_path_factory) -> tuple[Path, Path]:
    """(release folder, SD1.5 base folder) of tiny random weights written by the project's factory."""
    from colorflow_core.tiny import write_tiny_release

    return write_tiny_release(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_model(tiny_release):
    """The tiny ColorFlow model, loaded once (tests must not mutate it)."""
    from colorflow_core.loading import load_colorflow

    release, base = tiny_release
    return load_colorflow(release, base, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny_sketch(tiny_release, tmp_path_factory):
    """The tiny 'sketch' (PixArt) model, loaded once with its own prompt cache (tests must not mutate it)."""
    from colorflow_core.loading import load_colorflow

    release, _ = tiny_release
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COLORFLOW_CACHE", str(tmp_path_factory.mktemp("user_cache")))
        return load_colorflow(release, release.parent / "pixart", style="sketch", prompt_cache=tmp_path_factory.mktemp("pc"))
