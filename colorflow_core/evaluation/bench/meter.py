"""Measuring a page: the memory meter, the stage recorder (a `PageObserver`), the timed encoder, forward timers.

Memory: the peak of each stage is the process RSS high-water mark on CPU (Linux: VmHWM, reset per
stage through /proc/self/clear_refs) or `torch.cuda.max_memory_allocated` on CUDA (reset per stage).
Nested stages fold their peak into the enclosing one.
"""
from __future__ import annotations

import contextlib
import resource
import statistics
import sys
import time
from typing import Any, Iterator

import torch

from ...memory import proc_bytes
from ...observe import PageObserver

MB = 1 << 20
#: The stages after retrieval (what presets change).
AFTER_RETRIEVAL = ("vae_encode", "denoise", "decode", "gsrp")


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


class Recorder(PageObserver):
    """Accumulates stage times (and peaks) per run; `runs` keeps one dict per finished run. As the page loop's
    observer it times every stage, and each denoising step as `step_NN`."""

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
        if name == "denoise":
            self.start("step_01")
        try:
            yield
        finally:
            self.stop(name)

    def step_end(self, step: int, total: int) -> None:
        self.stop(f"step_{step:02d}")
        if step < total:
            self.start(f"step_{step + 1:02d}")

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


class TimedEncoder:
    """An `ImageEncoder` whose calls are timed as `embed_query`, or inside an open `embed_references` stage as part
    of it (the reference candidates, embedded by `pool.embeddings` before the page)."""

    def __init__(self, encoder: Any, recorder: Recorder):
        self.encoder, self.recorder = encoder, recorder
        self.name, self.dim = encoder.name, encoder.dim
        self.images = {"embed_references": 0, "embed_query": 0}

    def encode(self, images):
        if self.recorder.is_open("embed_references"):
            self.images["embed_references"] += len(images)
            return self.encoder.encode(images)
        self.images["embed_query"] += len(images)
        with self.recorder.stage("embed_query"):
            return self.encoder.encode(images)


def denoiser_name(model: Any) -> str:
    """'unet' (SD1.5 family) or 'transformer' (PixArt family): the denoiser's name in the stage table."""
    return "unet" if model.pipeline.family == "sd" else "transformer"


@contextlib.contextmanager
def forward_timers(model: Any, recorder: Recorder) -> Iterator[None]:
    """Forward hooks timing the guider and the denoiser (summed over a run's steps); removed on exit."""
    name = denoiser_name(model)
    modules = model.run_modules()["denoiser"]
    hooks = []
    for module, stage in zip(modules, ("guider_forward", f"{name}_forward")):
        hooks.append(module.register_forward_pre_hook(lambda *a, stage=stage: recorder.start(stage, memory=False)))
        hooks.append(module.register_forward_hook(lambda *a, stage=stage: recorder.stop(stage)))
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
