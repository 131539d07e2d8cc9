"""Stage-by-stage benchmark of one page, exact-retrieval benchmark, embedding-cache check.

Everything is measured from outside the library: the page goes through the real `colorize_page`;
stages are timed by wrapping the functions and objects it calls (`prepare_page`, `process_image`,
`build_canvas`, the pool's `search_index`/`build_index`, the encoder, the pipeline and upscaler
objects, `encode_prompt`, `prepare_condition`) and by forward hooks on the guider and the UNet plus
the per-step progress callback. Nothing in the library is changed; the wrappers live only inside
`instrument(...)`.

Memory: the peak of each stage is the process RSS high-water mark on CPU (Linux: VmHWM, reset per
stage through /proc/self/clear_refs) or `torch.cuda.max_memory_allocated` on CUDA (reset per stage).
Nested stages fold their peak into the enclosing one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch

from ..memory import proc_bytes

if TYPE_CHECKING:
    from PIL import Image

    from ..presets import Preset

MB = 1 << 20


# --------------------------------------------------------------------------------------------- memory
class MemoryMeter:
    """Per-stage peak memory with a stack of open stages (inner peaks fold into outer ones)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.kind = "cuda_max_memory_allocated" if self.cuda else "process_rss_hwm"
        self.resettable = self.cuda or self._try_reset()
        if not self.cuda and not self.resettable:
            self.kind = "process_rss_lifetime_peak"
        self._stack: list[int] = []

    @staticmethod
    def _try_reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            return MemoryMeter._hwm() is not None
        except OSError:
            return False

    @staticmethod
    def _hwm() -> int | None:
        return proc_bytes("/proc/self/status", "VmHWM")

    def current(self) -> int:
        """The peak since the last reset (bytes)."""
        if self.cuda:
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.resettable:
            return self._hwm() or 0
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    def _reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")

    def begin(self) -> int:
        """Open a stage; returns the memory in use at its start (bytes)."""
        peak = self.current()
        self._stack = [max(frame, peak) for frame in self._stack]
        self._reset()
        start = self.in_use()
        self._stack.append(max(start, self.current()))
        return start

    def in_use(self) -> int:
        """Memory in use now: allocated CUDA memory, or the current RSS."""
        if self.cuda:
            return int(torch.cuda.memory_allocated(self.device))
        rss = proc_bytes("/proc/self/status", "VmRSS")
        return self.current() if rss is None else rss

    def end(self) -> int:
        peak = max(self._stack.pop(), self.current())
        if self._stack:
            self._stack[-1] = max(self._stack[-1], peak)
        return peak


# --------------------------------------------------------------------------------------------- recording
class Recorder:
    """Accumulates stage times (and peaks) per run; `runs` keeps one dict per finished run."""

    def __init__(self, device: torch.device, memory: bool = True):
        self.device = device
        self.meter = MemoryMeter(device) if memory else None
        self.runs: list[dict[str, tuple[float, int | None]]] = []
        self.current: dict[str, tuple[float, int | None]] = {}
        self.growth: list[dict[str, int]] = []
        self._growth: dict[str, int] = {}
        self._open: dict[str, tuple[float, bool, int]] = {}
        self.active = False

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self, name: str, memory: bool = True) -> None:
        if not self.active:
            return
        self.sync()
        track = memory and self.meter is not None
        start = self.meter.begin() if track else 0
        self._open[name] = (time.perf_counter(), track, start)

    def stop(self, name: str) -> None:
        if not self.active or name not in self._open:
            return
        self.sync()
        started, track, start = self._open.pop(name)
        elapsed = time.perf_counter() - started
        peak = self.meter.end() if track else None
        if peak is not None:
            self._growth[name] = max(self._growth.get(name, 0), peak - start)
        seconds, old_peak = self.current.get(name, (0.0, None))
        peaks = [p for p in (peak, old_peak) if p is not None]
        self.current[name] = (seconds + elapsed, max(peaks) if peaks else None)

    def is_open(self, name: str) -> bool:
        return name in self._open

    @contextlib.contextmanager
    def stage(self, name: str, memory: bool = True) -> Iterator[None]:
        self.start(name, memory)
        try:
            yield
        finally:
            self.stop(name)

    @contextlib.contextmanager
    def run(self, record: bool = True) -> Iterator[None]:
        self.current, self._growth, self._open, self.active = {}, {}, {}, True
        try:
            yield
        finally:
            self.active = False
            if record:
                self.runs.append(self.current)
                self.growth.append(self._growth)

    def wrap(self, name: str, function: Callable, memory: bool = True) -> Callable:
        def timed(*args, **kwargs):
            with self.stage(name, memory):
                return function(*args, **kwargs)

        return timed

    def summary(self) -> dict[str, dict]:
        """Per stage: median/min/max seconds over runs, the runs, the largest peak and the largest growth of
        memory over the stage's start (MiB)."""
        names: list[str] = []
        for run in self.runs:
            names += [n for n in run if n not in names]
        out = {}
        for name in names:
            values = [run[name][0] for run in self.runs if name in run]
            peaks = [run[name][1] for run in self.runs if name in run and run[name][1] is not None]
            growth = [g[name] for g in self.growth if name in g]
            out[name] = {
                "median_s": statistics.median(values),
                "min_s": min(values),
                "max_s": max(values),
                "runs_s": [round(v, 6) for v in values],
                "peak_mb": round(max(peaks) / MB, 1) if peaks else None,
                "growth_mb": round(max(growth) / MB, 1) if growth else None,
            }
        return out


class _Proxy:
    """Delegates everything to `target`; calling it is timed as stage `name`."""

    def __init__(self, target: Any, recorder: Recorder, name: str, after: Callable[[], None] | None = None):
        self._target, self._recorder, self._name, self._after = target, recorder, name, after

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._target, attr)

    def __call__(self, *args, **kwargs):
        self._recorder.start(self._name)
        try:
            return self._target(*args, **kwargs)
        finally:
            if self._after is not None:
                self._after()
            self._recorder.stop(self._name)


class TimedEncoder:
    """An `ImageEncoder` whose calls are timed as `embed_references` (inside pool.embeddings) or `embed_query`."""

    def __init__(self, encoder: Any, recorder: Recorder):
        self.encoder, self.recorder = encoder, recorder
        self.name, self.dim = encoder.name, encoder.dim
        self.in_references = False
        self.images = {"embed_references": 0, "embed_query": 0}

    def encode(self, images):
        stage = "embed_references" if self.in_references else "embed_query"
        self.images[stage] += len(images)
        with self.recorder.stage(stage):
            return self.encoder.encode(images)


@contextlib.contextmanager
def _setattr(obj: Any, name: str, value: Any) -> Iterator[None]:
    """Temporarily set an attribute (instance or module), restoring or deleting it afterwards."""
    missing = object()
    old = obj.__dict__.get(name, missing) if hasattr(obj, "__dict__") else getattr(obj, name, missing)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if old is missing:
            delattr(obj, name)
        else:
            setattr(obj, name, old)


def denoiser_attr(pipeline: Any) -> str:
    """'unet' (SD1.5 styles) or 'transformer' (PixArt styles)."""
    return "unet" if getattr(pipeline, "unet", None) is not None else "transformer"


@contextlib.contextmanager
def instrument(model: Any, pool: Any, recorder: Recorder) -> Iterator[tuple[Any, Callable[[int, int], None]]]:
    """(instrumented model, step-progress callback) for `colorize_page`; all wrappers removed on exit."""
    from .. import sequence
    from ..retrieval import pool as pool_module

    pipeline = model.pipeline
    denoiser_name = denoiser_attr(pipeline)
    denoiser = getattr(pipeline, denoiser_name)
    state = {"step": 0}

    def step_start(module, args):
        # One guider call per sampler step: its start is the step's start.
        state["step"] += 1
        recorder.start(f"step_{state['step']:02d}")
        recorder.start("guider_forward", memory=False)

    def step_progress(done: int, total: int) -> None:
        recorder.stop(f"step_{done:02d}")
        if done == total:
            recorder.start("decode")

    def icp_done() -> None:
        recorder.stop("decode")
        state["step"] = 0

    def pool_embeddings(size, progress=None):
        encoder = pool.encoder
        encoder.in_references = True
        try:
            return type(pool).embeddings(pool, size, progress)
        finally:
            encoder.in_references = False

    hooks = [
        pipeline.guider.register_forward_pre_hook(step_start),
        pipeline.guider.register_forward_hook(lambda *a: recorder.stop("guider_forward")),
        denoiser.register_forward_pre_hook(lambda *a: recorder.start(f"{denoiser_name}_forward", memory=False)),
        denoiser.register_forward_hook(lambda *a: recorder.stop(f"{denoiser_name}_forward")),
    ]
    timed_model = dataclasses.replace(
        model, pipeline=_Proxy(pipeline, recorder, "icp", after=icp_done), upscaler=_Proxy(model.upscaler, recorder, "gsrp")
    )
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(_setattr(sequence, "prepare_page", recorder.wrap("preprocess", sequence.prepare_page)))
            stack.enter_context(_setattr(sequence, "process_image", recorder.wrap("preprocess", sequence.process_image)))
            stack.enter_context(_setattr(sequence, "build_canvas", recorder.wrap("canvas", sequence.build_canvas)))
            stack.enter_context(_setattr(pool_module, "search_index", recorder.wrap("search", pool_module.search_index)))
            stack.enter_context(_setattr(pool_module, "build_index", recorder.wrap("index_build", pool_module.build_index)))
            stack.enter_context(_setattr(pool, "embeddings", pool_embeddings))
            stack.enter_context(_setattr(pipeline, "encode_prompt", recorder.wrap("text_encode", pipeline.encode_prompt)))
            stack.enter_context(_setattr(pipeline, "prepare_condition", recorder.wrap("vae_encode", pipeline.prepare_condition)))
            yield timed_model, step_progress
    finally:
        for hook in hooks:
            hook.remove()


# --------------------------------------------------------------------------------------------- pipeline bench
@dataclasses.dataclass
class PipelineBench:
    width: int = 128
    height: int = 192
    style: str = "gray"
    input_style: str = "screentone"
    preprocess: str = "gray"
    dtype: str = "float32"
    device: str = "cpu"
    steps: int = 4
    guidance: float = 7.5
    guider_scale: float = 1.0
    repeats: int = 3
    warmup: int = 1
    references: int = 3
    seed: int = 0
    colorflow: str | None = None
    base: str | None = None
    #: "tiny" (random test weights), "random-sd15" (random weights at the real SD1.5 widths, built in memory) or
    #: "release" (`colorflow` + `base`).
    weights: str = "tiny"
    #: torch.compile the guider/UNet blocks after loading (`runtime.compile_models`); the first page pays for it.
    compile: bool = False


def load_model(config: PipelineBench, workdir: Path):
    """(model, description of the weights, load seconds); tiny random weights written to `workdir` by default.
    With `config.compile` the denoiser blocks are compiled (lazily: the first page pays)."""
    model, weights, load_s = _load_model(config, workdir)
    if config.compile:
        from ..runtime import compile_models

        compile_models(model.run_modules()["denoiser"])
    return model, weights, load_s


def _load_model(config: PipelineBench, workdir: Path):
    from ..loading import load_colorflow, place_modules, resolve_dtype
    from ..tiny import write_tiny_release

    if config.weights == "random-sd15":
        from .realsize import build_random_sd15

        if config.style != "gray":
            raise ValueError("random-sd15 weights exist for the gray (SD1.5) style only")
        start = time.perf_counter()
        model = build_random_sd15(workdir / "random-sd15", seed=config.seed)
        dtype = resolve_dtype(config.dtype)
        place_modules((*model.pipeline.components.values(), model.upscaler.fusion), config.device, dtype)
        model.encoder.model.to(config.device)
        weights = "random weights at SD1.5 widths (colorflow_core.evaluation.realsize, LoRA r64, tiny retrieval CLIP)"
        return model, weights, time.perf_counter() - start
    if config.colorflow is None:
        release, base = write_tiny_release(workdir / "tiny", seed=config.seed)
        if config.style != "gray":
            base = workdir / "tiny" / "pixart"
        weights = "tiny (colorflow_core.tiny.write_tiny_release, random)"
    else:
        release, base = config.colorflow, config.base
        weights = f"{config.colorflow} + {config.base}"
    start = time.perf_counter()
    model = load_colorflow(release, base, style=config.style, device=config.device, dtype=config.dtype)
    return model, weights, time.perf_counter() - start


def _chapter(config: PipelineBench):
    from .synthetic import make_chapter

    scale = max(1, -(-256 // config.width))
    return make_chapter(config.seed, n_references=config.references, n_pages=1,
                        size=(config.width * scale, config.height * scale))


def bare_forwards(model: Any, canvas, mask, config: PipelineBench, recorder: Recorder) -> dict:
    """Median time of the guider + UNet forwards alone (same inputs as the sampler), per step."""
    from diffusers import UniPCMultistepScheduler

    from ..models.unet_injection import inject_guider_residuals
    from ..options import NEGATIVE_PROMPT, PROMPT

    pipe = model.pipeline
    do_cfg = config.guidance > 1.0
    batch = 2 if do_cfg else 1
    embeds = pipe.encode_prompt(PROMPT, NEGATIVE_PROMPT, do_cfg)
    generator = torch.Generator(model.device).manual_seed(config.seed)
    condition = pipe.prepare_condition(canvas, mask, batch, generator).to(pipe.unet.dtype)
    scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(config.steps, device=model.device)
    width, height = canvas.size
    shape = (batch, pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    latents = torch.randn(shape, generator=generator, device=model.device, dtype=pipe.unet.dtype)
    times = []
    with torch.no_grad():
        for rep in range(config.repeats + config.warmup):
            for t in scheduler.timesteps:
                recorder.sync()
                start = time.perf_counter()
                residuals = pipe.guider(latents, t, condition, conditioning_scale=config.guider_scale)
                with inject_guider_residuals(pipe.unet, residuals):
                    pipe.unet(latents, t, encoder_hidden_states=embeds)
                recorder.sync()
                if rep >= config.warmup:
                    times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "samples": len(times)}


def _inputs(config: PipelineBench):
    """(references, page, options) of the benchmark page."""
    from ..options import ColorizeOptions

    chapter = _chapter(config)
    references = [page.color for page in chapter.references]
    page = chapter.pages[0].input(config.input_style)
    options = ColorizeOptions(size=(config.width, config.height), steps=config.steps, seed=config.seed,
                              guidance_scale=config.guidance, guider_scale=config.guider_scale,
                              preprocess=config.preprocess)
    return references, page, options


def measure_page(model: Any, references: list, page: Any, options: Any, recorder: Recorder, record: bool = True):
    """One instrumented `colorize_page`; a fresh pool and an empty prompt cache, so every run embeds the references
    and encodes the prompt. Returns the `PageResult`."""
    from ..retrieval import ReferencePool
    from ..sequence import colorize_page

    pool = ReferencePool(TimedEncoder(model.encoder, recorder))
    pool.add(references)
    getattr(model.pipeline, "_prompt_cache", {}).clear()
    with instrument(model, pool, recorder) as (timed_model, step_progress), recorder.run(record):
        with recorder.stage("page"):
            return colorize_page(timed_model, page, pool, options, name="bench", step_progress=step_progress)


def run_pipeline_bench(
    config: PipelineBench, workdir: Path | None = None, loaded: tuple | None = None, keep: list | None = None
) -> dict:
    """Median per-stage wall time and peak memory of `colorize_page` on one synthetic page.

    `loaded` = `load_model(config, workdir)`'s result, to reuse a model already loaded (or a preset view of one).
    `keep`, when given, receives the last measured `PageResult`."""
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="colorflow-bench-")))
        model, weights, load_s = loaded if loaded is not None else load_model(config, workdir)
        references, page, options = _inputs(config)
        recorder = Recorder(model.device)
        last, first_s = None, None
        for index in range(config.warmup + config.repeats):
            start = time.perf_counter()
            last = measure_page(model, references, page, options, recorder, record=index >= config.warmup)
            first_s = time.perf_counter() - start if first_s is None else first_s
        if keep is not None:
            keep.append(last)
        return {**summarize_pipeline(config, model, recorder, last, weights, load_s), "first_page_s": first_s}


def summarize_pipeline(config: PipelineBench, model: Any, recorder: Recorder, last: Any, weights: str, load_s: float) -> dict:
    """The `pipeline` block of the result from a recorder's runs (and the bare forwards, for a plain SD model)."""
    stages = recorder.summary()
    denoiser = denoiser_attr(model.pipeline)
    if denoiser == "unet" and model.plan is None:
        bare = bare_forwards(model, last.canvas.image, last.canvas.mask, config, Recorder(model.device, memory=False))
    else:
        bare = None
    step_names = [n for n in stages if n.startswith("step_")]
    step_times = [s for run in recorder.runs for n, (s, _) in run.items() if n.startswith("step_")]
    step_median = statistics.median(step_times)
    # Paired within each run: (all steps − the forwards inside them) / the forwards.
    paired = []
    for run in recorder.runs:
        steps_s = sum(s for n, (s, _) in run.items() if n.startswith("step_"))
        forwards_s = run["guider_forward"][0] + run[f"{denoiser}_forward"][0]
        paired.append((steps_s / forwards_s - 1, forwards_s / config.steps))
    overhead = statistics.median(p[0] for p in paired)
    forward_median = statistics.median(p[1] for p in paired)
    after = [run["icp"][0] - run.get("text_encode", (0.0, None))[0] + run["gsrp"][0] for run in recorder.runs]
    return {
        "config": dataclasses.asdict(config),
        "weights": weights,
        "load_s": round(load_s, 3),
        "memory": recorder.meter.kind if recorder.meter else None,
        "stages": stages,
        "steps": {
            "names": step_names,
            "median_step_s": step_median,
            "min_step_s": min(step_times),
            "median_forwards_in_step_s": forward_median,
            "overhead_vs_hooked_forwards": overhead,
            "bare_forwards": bare,
            "overhead_vs_bare_forwards": step_median / bare["median_s"] - 1 if bare else None,
            "overhead_vs_bare_forwards_min": min(step_times) / bare["min_s"] - 1 if bare else None,
        },
        "after_retrieval": {"median_s": statistics.median(after), "min_s": min(after), "runs_s": [round(a, 6) for a in after]},
        "notes": [
            "text_encode is measured with the prompt cache cleared; a real run encodes the prompt once per process",
            "embed_references is a cold pool (no store); see embedding_cache for the cached case",
            "guider_forward/unet_forward (transformer_forward for PixArt styles) are summed over all steps of a run",
            "after_retrieval = icp - text_encode + gsrp (VAE encode, denoising, decode, GSRP, and any weight staging)",
        ],
    }


def gpu_figures(config: PipelineBench, model: Any, measured: dict) -> dict:
    """Achieved TFLOP/s per stage against the FLOP model, and the SDPA kernel of the top-level self-attention."""
    from .. import runtime
    from ..gpu_kernels import top_level_backend
    from .roofline import page_roofline

    if denoiser_attr(model.pipeline) != "unet":
        return {}
    preset = model.preset
    cfg = preset.guidance(config.guidance) > 1.0 if not preset.is_auto else config.guidance > 1.0
    unet = model.pipeline.unet
    dtype = unet.dtype if model.plan is None or preset.is_auto else runtime.Run(model.plan, preset).dtype_for("denoiser", unet)
    real_widths = config.weights != "tiny"  # the FLOP model counts the SD1.5 networks, not the test ones
    return {
        "roofline": page_roofline(config.width, config.height, cfg, preset.encode_once, measured["stages"],
                                  measured["steps"]["median_step_s"]) if real_widths else {},
        "attention": top_level_backend(model.device, dtype, tokens=config.width * config.height // 16,
                                       batch=2 if cfg else 1),
    }


# --------------------------------------------------------------------------------------------- presets side by side
def parse_preset_spec(spec: str) -> Preset:
    """'fast' or 'fast:compute_dtype=float32:merge_lora=false' → the Preset (fields changed as given)."""
    from ..presets import get_preset

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
    import ctypes
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _preset_view(model: Any, preset: Any) -> Any:
    """The model's view under `preset`; an offloading preset computes where the weights live now."""
    from .. import runtime

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
    from .. import memory

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
        entry["picked"] = memory.choose_preset(view.plan, (config.width, config.height), config.guidance).name
    return entry


def _isolated_preset(config: PipelineBench, spec: str, workdir: str) -> tuple[dict, bytes, str, float]:
    """One preset in a fresh process (so its RSS owes nothing to another preset):
    (entry, final page as PNG, weights description, load seconds)."""
    import io

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
    from PIL import Image

    reference = "faithful" if "faithful" in specs else specs[0]
    order = [reference] + [s for s in specs if s != reference]
    runs: dict[str, dict] = {}
    finals = {}
    if isolate:
        import io
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

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
        references, page, options = _inputs(config)
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
            "after_retrieval = icp - text_encode + gsrp (VAE encode, denoising, decode, GSRP, and any weight staging)",
            "PSNR of each preset's final page against the reference preset's (identical_to_reference when equal)",
            "CPU RSS peaks are comparable between presets only when isolated",
        ],
    }


# --------------------------------------------------------------------------------------------- retrieval
def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def _timed(function: Callable[[], Any], repeats: int) -> list[float]:
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return times


def run_retrieval_bench(
    pool_sizes: Sequence[int] = (1_000, 10_000, 100_000),
    dim: int = 1024,
    batches: Sequence[int] = (4, 64),
    k: int = 3,
    repeats: int = 30,
    seed: int = 0,
    torch_baseline: bool = True,
    faiss_threads: Sequence[int] | None = None,
) -> dict:
    """Exact top-k over pools of random unit vectors with the library's `build_index`/`search_index`
    (faiss IndexFlatIP; `search_index` sets distance_compute_blas_threshold = 1), two-pass with the bf16
    prefilter where `prefilter_keys` gives one (then the float32-only search is timed too and the results
    compared). A batch of 4 queries is one page's 4 patches; larger batches are several pages searched at once."""
    import faiss

    from ..retrieval.search import build_index, prefilter_keys, search_index

    rng = np.random.default_rng(seed)
    default_threads = faiss.omp_get_max_threads()
    rows = []
    try:
        for n in pool_sizes:
            keys = _unit(rng, n, dim)
            start = time.perf_counter()
            index = build_index(keys)
            prefilter = prefilter_keys(index)
            build_s = time.perf_counter() - start
            for batch in batches:
                queries = _unit(rng, batch, dim)
                for threads in faiss_threads or [default_threads]:
                    faiss.omp_set_num_threads(threads)
                    times = _timed(lambda: search_index(index, queries, k, prefilter), repeats)
                    row = {
                        "pool": n, "dim": dim, "k": k, "queries_per_search": batch, "faiss_threads": threads,
                        "two_pass": prefilter is not None,
                        "build_s": round(build_s, 4), "median_ms_per_search": 1e3 * statistics.median(times),
                        "min_ms_per_search": 1e3 * min(times), "median_ms_per_query": 1e3 * statistics.median(times) / batch,
                        "min_ms_per_query": 1e3 * min(times) / batch, "pool_mb": round(keys.nbytes / MB, 1),
                    }
                    if prefilter is not None:
                        plain = _timed(lambda: search_index(index, queries, k), repeats)
                        row["float32_median_ms_per_query"] = 1e3 * statistics.median(plain) / batch
                        (ids, scores), (ids32, scores32) = search_index(index, queries, k, prefilter), search_index(index, queries, k)
                        row["same_as_float32"] = torch.equal(ids, ids32) and torch.allclose(scores, scores32, atol=1e-6)
                    rows.append(row)
                faiss.omp_set_num_threads(default_threads)
                if torch_baseline:
                    keys_t, queries_t = torch.from_numpy(keys), torch.from_numpy(queries)
                    base = _timed(lambda: torch.topk(queries_t @ keys_t.T, k, dim=1), repeats)
                    for row in rows[-len(faiss_threads or [default_threads]):]:
                        row["torch_topk_median_ms_per_query"] = 1e3 * statistics.median(base) / batch
            del index, keys
    finally:
        faiss.omp_set_num_threads(default_threads)
    return {
        "faiss": getattr(faiss, "__version__", "?"),
        "faiss_threads_default": default_threads,
        "blas_threshold": int(faiss.cvar.distance_compute_blas_threshold),
        "target_ms_per_query_at_100k": 5.0,
        "rows": rows,
    }


def embedding_cache_check(encoder: Any, references: Sequence, query, size: tuple[int, int], store: Path) -> dict:
    """Two runs over the same references and store: the first embeds 5 candidates per reference, the second none."""
    from ..retrieval import ReferencePool

    counts, times = [], []
    for _ in range(2):
        start = time.perf_counter()
        pool = ReferencePool(encoder, store=store)
        pool.add(list(references))
        pool.search(query, size=size)
        times.append(time.perf_counter() - start)
        counts.append(pool.embedded_count)
    return {"references": len(references), "first_run_embedded": counts[0], "second_run_embedded": counts[1],
            "first_run_s": round(times[0], 4), "second_run_s": round(times[1], 4), "ok": counts[1] == 0 and counts[0] > 0}


# --------------------------------------------------------------------------------------------- machine / report
def machine_info(device: str = "cpu") -> dict:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    if hasattr(os, "getloadavg"):
        # Other processes on the machine distort every number: keep the load next to them.
        info["load_average_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
        with open("/proc/meminfo") as handle:
            info["memory_gb"] = round(int(handle.readline().split()[1]) / (1 << 20), 1)
    except OSError:
        info["cpu"] = platform.processor()
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def format_bench(result: dict) -> str:
    """The JSON result as short text tables."""
    lines = []
    machine = result.get("machine", {})
    lines.append(f"machine: {machine.get('cpu', '?')}, {machine.get('cpu_count')} cores, torch {machine.get('torch')}"
                 + (f", {machine['gpu']}" if "gpu" in machine else "")
                 + (f", load average {machine['load_average_1_5_15'][0]}" if "load_average_1_5_15" in machine else ""))
    pipe = result.get("pipeline")
    if pipe:
        c = pipe["config"]
        lines.append(f"pipeline: {pipe['weights']}; {c['width']}x{c['height']} {c['style']}/{c['input_style']} {c['dtype']} "
                     f"{c['device']} steps={c['steps']} guidance={c['guidance']} repeats={c['repeats']}; memory={pipe['memory']}")
        lines.append(f"{'stage':<20}{'median ms':>11}{'min ms':>10}{'peak MiB':>10}{'+MiB':>8}")
        for name, s in pipe["stages"].items():
            peak = "" if s["peak_mb"] is None else f"{s['peak_mb']:.0f}"
            growth = "" if s.get("growth_mb") is None else f"{s['growth_mb']:.0f}"
            lines.append(f"{name:<20}{1e3 * s['median_s']:>11.1f}{1e3 * s['min_s']:>10.1f}{peak:>10}{growth:>8}")
        st = pipe["steps"]
        lines.append(f"sampler step {1e3 * st['median_step_s']:.2f} ms; guider+denoiser forwards in the step "
                     f"{1e3 * st['median_forwards_in_step_s']:.2f} ms (overhead {100 * st['overhead_vs_hooked_forwards']:+.1f}%)"
                     + (f"; bare forwards {1e3 * st['bare_forwards']['median_s']:.2f} ms "
                        f"(overhead {100 * st['overhead_vs_bare_forwards']:+.1f}% median, "
                        f"{100 * st['overhead_vs_bare_forwards_min']:+.1f}% min)" if st["bare_forwards"] else ""))
    presets = result.get("presets")
    if presets:
        lines.extend(format_presets(presets))
    parity = result.get("eager_parity")
    if parity:
        lines.append(f"faithful vs upstream-style eager kernels: final {parity['final_db']:.2f} dB, ICP canvas "
                     f"{parity['icp_canvas_db']:.2f} dB, low-res {parity['lowres_db']:.2f} dB")
    cache = result.get("embedding_cache")
    if cache:
        lines.append(f"embedding cache: first run embedded {cache['first_run_embedded']} images, second run "
                     f"{cache['second_run_embedded']} ({'ok' if cache['ok'] else 'FAILED'})")
    retrieval = result.get("retrieval")
    if retrieval:
        lines.append(f"retrieval (faiss {retrieval['faiss']}, exact IndexFlatIP, top-3; medians, min in brackets):")
        lines.append(f"{'pool':>8}{'dim':>6}{'queries':>9}{'threads':>9}{'ms/search':>11}{'ms/query':>18}"
                     f"{'f32-only ms/q':>15}{'torch ms/q':>12}")
        for row in retrieval["rows"]:
            base = row.get("torch_topk_median_ms_per_query")
            single = row.get("float32_median_ms_per_query")
            per_query = f"{row['median_ms_per_query']:.2f} ({row['min_ms_per_query']:.2f})"
            lines.append(f"{row['pool']:>8}{row['dim']:>6}{row['queries_per_search']:>9}{row['faiss_threads']:>9}"
                         f"{row['median_ms_per_search']:>11.2f}{per_query:>18}"
                         f"{'' if single is None else f'{single:.2f}' + ('' if row['same_as_float32'] else ' DIFFERS'):>15}"
                         f"{'' if base is None else f'{base:>12.2f}'}")
    return "\n".join(lines)


def format_presets(block: dict) -> list[str]:
    """The presets side by side: median ms and peak MiB per stage, time after retrieval, PSNR."""
    c = block["config"]
    order = block["order"]
    lines = [f"presets: {block['weights']}; {c['width']}x{c['height']} {c['style']} {c['dtype']} {c['device']} "
             f"steps={c['steps']} guidance={c['guidance']} repeats={c['repeats']} warmup={c['warmup']}; memory={block['memory']}"]
    header = f"{'stage':<18}" + "".join(f"{name[-32:]:>34}" for name in order)
    lines.append(header)
    lines.append(f"{'':<18}" + "".join(f"{'median ms':>24}{'peak MiB':>10}" for _ in order))
    names: list[str] = []
    for spec in order:
        names += [n for n in block["presets"][spec]["stages"] if n not in names]
    for name in names:
        row = f"{name:<18}"
        for spec in order:
            stage = block["presets"][spec]["stages"].get(name)
            if stage is None:
                row += f"{'-':>24}{'':>10}"
                continue
            peak = "" if stage["peak_mb"] is None else f"{stage['peak_mb']:.0f}"
            row += f"{1e3 * stage['median_s']:>24.1f}{peak:>10}"
        lines.append(row)
    row = f"{'after retrieval':<18}"
    for spec in order:
        entry = block["presets"][spec]
        cell = f"{1e3 * entry['after_retrieval']['median_s']:.1f} ({entry['after_retrieval_ratio']:.2f}x)"
        row += f"{cell:>24}{'':>10}"
    lines.append(row)
    row = f"{'PSNR vs ' + block['reference']:<18}"
    for spec in order:
        value = block["presets"][spec]["psnr_vs_faithful_db"]
        row += f"{('identical' if value is None else f'{value:.2f} dB'):>24}{'':>10}"
    lines.append(row)
    lines.extend(format_gpu_figures(block))
    picked = {s: e["picked"] for s, e in block["presets"].items() if e.get("picked")}
    if picked:
        lines.append("auto picked: " + ", ".join(f"{s} → {p}" for s, p in picked.items()))
    return lines


def format_gpu_figures(block: dict) -> list[str]:
    """Per preset: the first page (compilation, autotuning) against the median, the attention kernel, the stages
    against the FLOP model."""
    from .roofline import format_rows

    lines = []
    for spec in block["order"]:
        entry = block["presets"][spec]
        page = entry["stages"]["page"]["median_s"]
        first = entry.get("first_page_s")
        line = f"{spec}: top-level attention {entry.get('attention', '?')}"
        if first is not None:
            line += f"; first page {first:.2f} s vs median {page:.2f} s (compile/warm-up {first - page:+.2f} s)"
        lines.append(line)
        if entry.get("roofline"):
            lines.extend(format_rows(spec, entry["roofline"]))
    return lines


def write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
