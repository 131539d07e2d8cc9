"""The page benchmark: one synthetic page through the real `colorize_page`, observed stage by stage."""
from __future__ import annotations

import contextlib
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import UniPCMultistepScheduler

from ...compiling import compile_models
from ...configured import place_modules, resolve_dtype
from ...gpu_kernels import top_level_backend
from ...loading import load_colorflow
from ...models.unet_injection import inject_guider_residuals
from ...options import ColorizeOptions
from ...pipelines.condition import NEGATIVE_PROMPT, PROMPT
from ...retrieval import ReferencePool
from ...sequence import colorize_page
from ...settings import guidance_scale, page_size, resolve
from ...tiny import write_tiny_release
from ..realsize import build_random_sd15
from ..roofline import page_roofline
from ..synthetic import make_chapter
from .meter import AFTER_RETRIEVAL, Recorder, TimedEncoder, denoiser_name, forward_timers

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
    #: None: as the options resolve it (the preset's own, else the style's upstream scale).
    guidance: float | None = None
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
    #: torch.compile the guider/UNet blocks after loading (`compiling.compile_models`); the first page pays for it.
    compile: bool = False


def load_model(config: PipelineBench, workdir: Path):
    """(model, description of the weights, load seconds); tiny random weights written to `workdir` by default.
    With `config.compile` the denoiser blocks are compiled (lazily: the first page pays)."""
    model, weights, load_s = _load_model(config, workdir)
    if config.compile:
        compile_models(model.run_modules()["denoiser"])
    return model, weights, load_s


def _load_model(config: PipelineBench, workdir: Path):
    if config.weights == "random-sd15":
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
    scale = max(1, -(-256 // config.width))
    return make_chapter(config.seed, n_references=config.references, n_pages=1,
                        size=(config.width * scale, config.height * scale))


def bare_forwards(model: Any, canvas, mask, config: PipelineBench, recorder: Recorder) -> dict:
    """Median time of the guider + UNet forwards alone (same inputs as the sampler), per step."""
    pipe = model.pipeline
    do_cfg = guidance_scale(model, bench_inputs(config)[2]) > 1.0
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


def bench_inputs(config: PipelineBench):
    """(references, page, options) of the benchmark page."""
    chapter = _chapter(config)
    references = [page.color for page in chapter.references]
    page = chapter.pages[0].input(config.input_style)
    options = ColorizeOptions(size=(config.width, config.height), steps=config.steps, seed=config.seed,
                              guidance_scale=config.guidance, guider_scale=config.guider_scale,
                              preprocess=config.preprocess)
    return references, page, options


def measure_page(model: Any, references: list, page: Any, options: Any, recorder: Recorder, record: bool = True):
    """One observed `colorize_page`; a fresh pool and an empty prompt cache, so every run embeds the references
    and encodes the prompt. Returns the `PageResult`."""
    pool = ReferencePool(TimedEncoder(model.encoder, recorder))
    pool.add(references)
    getattr(model.pipeline, "_prompt_cache", {}).clear()
    with forward_timers(model, recorder), recorder.run(record), recorder.stage("page"):
        with recorder.stage("embed_references"):
            pool.embeddings(page_size(options, page))
        return colorize_page(model, page, pool, options, name="bench", observer=recorder)


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
        references, page, options = bench_inputs(config)
        recorder = Recorder(model.device)
        last, first_s = None, None
        for index in range(config.warmup + config.repeats):
            start = time.perf_counter()
            last = measure_page(model, references, page, options, recorder, record=index >= config.warmup)
            first_s = time.perf_counter() - start if first_s is None else first_s
        if keep is not None:
            keep.append(last)
        return {**summarize_pipeline(config, model, recorder, last, weights, load_s), "first_page_s": first_s}


def gpu_figures(config: PipelineBench, model: Any, measured: dict) -> dict:
    """Achieved TFLOP/s per stage against the FLOP model, and the SDPA kernel of the top-level self-attention."""
    if model.pipeline.family != "sd":
        return {}
    found = resolve(model, bench_inputs(config)[2], (config.width, config.height))
    unet = model.pipeline.unet
    run = model.execution(found.preset)
    dtype = unet.dtype if run is None else run.dtype_for("denoiser", unet)
    cfg = found.do_classifier_free_guidance
    real_widths = config.weights != "tiny"  # the FLOP model counts the SD1.5 networks, not the test ones
    return {
        "roofline": page_roofline(config.width, config.height, cfg, found.encode_once, measured["stages"],
                                  measured["steps"]["median_step_s"]) if real_widths else {},
        "attention": top_level_backend(model.device, dtype, tokens=config.width * config.height // 16,
                                       batch=2 if cfg else 1),
    }


def summarize_pipeline(config: PipelineBench, model: Any, recorder: Recorder, last: Any, weights: str, load_s: float) -> dict:
    """The `pipeline` block of the result from a recorder's runs (and the bare forwards, for a plain SD model)."""
    stages = recorder.summary()
    denoiser = denoiser_name(model)
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
    after = [sum(run[name][0] for name in AFTER_RETRIEVAL if name in run) for run in recorder.runs]
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
            "after_retrieval = vae_encode + denoise + decode + gsrp (and any weight staging inside them)",
        ],
    }
