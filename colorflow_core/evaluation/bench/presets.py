"""Presets side by side on the same page: time after retrieval, peak memory, PSNR against faithful."""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import io
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from ... import runtime
from ...presets import Preset, get_preset
from ...settings import resolve
from .meter import Recorder
from .page import PipelineBench, gpu_figures, bench_inputs, load_model, measure_page, run_pipeline_bench, summarize_pipeline

def parse_preset_spec(spec: str) -> Preset:
    """'fast' or 'fast:compute_dtype=float32:merge_lora=false' → the Preset (fields changed as given)."""
    name, *changes = spec.split(":")
    fields = {}
    for change in changes:
        key, _, raw = change.partition("=")
        value: Any = raw
        if raw.lower() in ("none", "null"):
            value = None
        elif raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        else:
            try:
                value = float(raw)
            except ValueError:
                pass
        fields[key] = value
    return get_preset(name, **fields)


def image_psnr(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> float:
    """PSNR (dB) of two uint8 images of the same size; inf when identical."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = float(((x - y) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _weight_device(model) -> torch.device:
    return next(model.pipeline.guider.parameters()).device


def _move(model, device: torch.device) -> None:
    """Move every model of `model` to `device` (same dtype: exact both ways)."""
    for modules in model.run_modules().values():
        for module in modules:
            module.to(device)


def release_memory() -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc `malloc_trim`), so that a later stage's RSS
    peak is not inflated by memory an earlier one freed but the allocator kept."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _preset_view(model: Any, preset: Any) -> Any:
    """The model's view under `preset`; an offloading preset computes where the weights live now."""
    home = _weight_device(model)
    offload = preset.offload != "none" and home.type != "cpu"
    return model.with_preset(preset, runtime.Placement(home) if offload else None)


@contextlib.contextmanager
def _offloaded(model: Any, view: Any) -> Iterator[None]:
    """An offloading preset measures what `load_colorflow(preset=...)` gives on an accelerator: for the block, the
    weights wait on the CPU (moved there and back, same dtype: exact)."""
    plan = view.plan
    offload = plan is not None and plan.preset.offload != "none" and plan.placement.device.type != "cpu"
    if offload:
        _move(model, plan.placement.offload_device)
    try:
        yield
    finally:
        if offload:
            _move(model, plan.placement.device)


def _preset_entry(config: PipelineBench, spec: str, view: Any, measured: dict) -> dict:
    preset = parse_preset_spec(spec)
    entry = {
        "preset": dataclasses.asdict(preset),
        "picked": None,
        "stages": measured["stages"],
        "after_retrieval": measured["after_retrieval"],
        "steps": {k: measured["steps"][k] for k in ("median_step_s", "min_step_s", "median_forwards_in_step_s")},
        "page_peak_mb": measured["stages"]["page"]["peak_mb"],
        "page_growth_mb": measured["stages"]["page"]["growth_mb"],
        "first_page_s": measured.get("first_page_s"),
        **gpu_figures(config, view, measured),
    }
    if preset.is_auto and view.plan is not None:
        entry["picked"] = resolve(view, bench_inputs(config)[2], (config.width, config.height)).preset.name
    return entry


def _isolated_preset(config: PipelineBench, spec: str, workdir: str) -> tuple[dict, bytes, str, float]:
    """One preset in a fresh process (so its RSS owes nothing to another preset):
    (entry, final page as PNG, weights description, load seconds)."""
    loaded = load_model(config, Path(workdir))
    view = _preset_view(loaded[0], parse_preset_spec(spec))
    with _offloaded(loaded[0], view):
        keep: list = []
        measured = run_pipeline_bench(config, Path(workdir), (view, *loaded[1:]), keep=keep)
        entry = _preset_entry(config, spec, view, measured)
    buffer = io.BytesIO()
    keep[0].final.save(buffer, format="PNG")
    return entry, buffer.getvalue(), loaded[1], loaded[2]


def run_preset_bench(
    config: PipelineBench, workdir: Path, loaded: tuple | None, specs: Sequence[str], isolate: bool = False
) -> dict:
    """Each preset (spec, see `parse_preset_spec`) on the same page and seed: per-stage times and peaks, the time
    after retrieval, and the final page's PSNR against the `faithful` run (the first spec when none is 'faithful').

    In one process (default) every preset uses the same loaded model; after the warm-up pages the measured pages
    go round-robin over the presets, so load changes on a shared machine spread over all of them. RSS peaks are
    then not comparable between presets on the CPU (freed memory stays in the process); `isolate` runs each
    preset in its own fresh process instead (the model is loaded again there, identically), one after another.
    """
    reference = "faithful" if "faithful" in specs else specs[0]
    order = [reference] + [s for s in specs if s != reference]
    runs: dict[str, dict] = {}
    finals = {}
    if isolate:
        context = multiprocessing.get_context("spawn")
        weights, load_s = config.weights, 0.0
        for spec in order:
            with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                entry, png, weights, load_s = pool.submit(
                    _isolated_preset, config, spec, str(workdir / f"isolated-{len(runs)}")
                ).result()
            runs[spec], finals[spec] = entry, Image.open(io.BytesIO(png)).convert("RGB")
    else:
        model, weights, load_s = loaded
        references, page, options = bench_inputs(config)
        views = {spec: _preset_view(model, parse_preset_spec(spec)) for spec in order}
        recorders = {spec: Recorder(model.device) for spec in order}
        last: dict = {}
        first: dict = {}
        for round_index in range(config.warmup + config.repeats):
            for spec in order:
                with _offloaded(model, views[spec]):
                    release_memory()
                    start = time.perf_counter()
                    last[spec] = measure_page(views[spec], references, page, options, recorders[spec],
                                              record=round_index >= config.warmup)
                    first.setdefault(spec, time.perf_counter() - start)
        for spec in order:
            measured = summarize_pipeline(config, views[spec], recorders[spec], last[spec], weights, load_s)
            measured["first_page_s"] = first[spec]
            runs[spec] = _preset_entry(config, spec, views[spec], measured)
            finals[spec] = last[spec].final
    base = runs[reference]["after_retrieval"]["median_s"]
    for spec, entry in runs.items():
        value = float(image_psnr(finals[spec], finals[reference]))
        entry["identical_to_reference"] = bool(value == float("inf"))
        entry["psnr_vs_faithful_db"] = None if value == float("inf") else round(value, 3)
        entry["after_retrieval_ratio"] = entry["after_retrieval"]["median_s"] / base
    return {
        "config": dataclasses.asdict(config),
        "weights": weights,
        "load_s": round(load_s, 3),
        "reference": reference,
        "order": order,
        "isolated": isolate,
        "memory": "cuda_max_memory_allocated" if str(config.device).startswith("cuda") else "process_rss_hwm",
        "presets": runs,
        "notes": [
            "same page and seed for every preset; " + (
                "each preset in its own process, one after another" if isolate else
                "one loaded model; measured pages round-robin over the presets after the warm-up"),
            "after_retrieval = vae_encode + denoise + decode + gsrp (and any weight staging inside them)",
            "PSNR of each preset's final page against the reference preset's (identical_to_reference when equal)",
            "CPU RSS peaks are comparable between presets only when isolated",
        ],
    }
