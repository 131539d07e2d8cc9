"""Measurement: synthetic chapters with exact ground truth, colorization metrics, and the benchmark.

* `synthetic` – `make_chapter(seed, ...)`, `write_chapter(chapter, folder)` (numpy + Pillow only).
* `metrics` – `psnr`, `ssim`, `fid`, `clip_image_similarity`, `aesthetic_scores`, `color_consistency`,
  `srgb_to_lab`, `delta_e_2000`; `load_inception`, `load_aesthetic_head` read local weight files only.
* `report` – `evaluate_pages`, `load_folders`, `format_table`, `contact_sheet`.
* `bench` – `run_pipeline_bench`, `run_retrieval_bench`, `embedding_cache_check`, `instrument`.

CLI: `python -m colorflow_core evaluate | bench | make-chapter`. Submodules are imported on use so that
`import colorflow_core.evaluation` loads no model library.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "make_chapter": "synthetic",
    "write_chapter": "synthetic",
    "Chapter": "synthetic",
    "psnr": "metrics",
    "ssim": "metrics",
    "fid": "metrics",
    "clip_image_similarity": "metrics",
    "aesthetic_scores": "metrics",
    "color_consistency": "metrics",
    "delta_e_2000": "metrics",
    "srgb_to_lab": "metrics",
    "evaluate_pages": "report",
    "contact_sheet": "report",
    "run_pipeline_bench": "bench",
    "run_retrieval_bench": "bench",
    "embedding_cache_check": "bench",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'colorflow_core.evaluation' has no attribute '{name}'")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
