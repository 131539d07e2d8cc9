"""The series plan on Ray: one `SeriesWorker` actor per GPU (or CPU), chapters streamed to whichever is free, a
chapter whose worker died handed to a fresh one, which resumes it from the chapter's manifest.

Ray is an optional extra (`pip install -r requirements-ray.txt`); only this module imports it, only when asked.
"""
from __future__ import annotations

import os
import sys
from collections import Counter, deque
from pathlib import Path

from .errors import ColorFlowError
from .series import Chapter, ChapterReport, SeriesJob, SeriesProgress, SeriesWorker

#: A chapter is given up after its worker died this many times.
MAX_ATTEMPTS = 3


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise ColorFlowError("--ray needs Ray: pip install -r requirements-ray.txt (or colorflow[ray])") from exc
    return ray


def _connect(ray, address: str) -> bool:
    """Join the cluster at `address` ('auto': a running one on this machine, else a new local one); True when this
    call started Ray (and so shuts it down)."""
    if ray.is_initialized():
        return False
    # Workers import this package from where the driver found it (a cluster installs it on every node instead).
    package_root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    ray.init(address=None if address == "auto" else address, runtime_env={"env_vars": {"PYTHONPATH": path}},
             include_dashboard=False, log_to_driver=True)
    return True


def worker_count(ray, gpus_per_worker: float, chapters: int) -> int:
    """As many workers as the cluster's GPUs allow at `gpus_per_worker` each (its CPUs for CPU workers), at most
    one per chapter."""
    resources = ray.cluster_resources()
    slots = resources.get("GPU", 0) / gpus_per_worker if gpus_per_worker > 0 else resources.get("CPU", 1)
    if slots < 1:
        raise ColorFlowError(f"the Ray cluster has {resources.get('GPU', 0)} GPUs: not one worker at "
                             f"--gpus-per-worker {gpus_per_worker}")
    return max(1, min(int(slots), chapters))


def run_on_ray(job: SeriesJob, chapters: list[Chapter], progress: SeriesProgress, address: str = "auto",
               gpus_per_worker: float | None = None, workers: int | None = None) -> tuple[list[ChapterReport], dict]:
    """Every chapter on Ray actors; returns the reports in chapter order and what the run used."""
    ray = _import_ray()
    started = _connect(ray, address)
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    count = workers or worker_count(ray, gpus_per_worker, len(chapters))
    actor_class = ray.remote(SeriesWorker).options(num_gpus=gpus_per_worker, num_cpus=1, max_restarts=0)
    idle = [actor_class.remote(job) for _ in range(count)]
    pending, running, reports, attempts = deque(chapters), {}, {}, Counter()
    try:
        while pending or running:
            while pending and idle:
                actor, chapter = idle.pop(), pending.popleft()
                running[actor.colorize.remote(chapter)] = (actor, chapter)
            (ready,), _ = ray.wait(list(running), num_returns=1)
            actor, chapter = running.pop(ready)
            try:
                report = ray.get(ready)
            except ray.exceptions.RayActorError as exc:
                attempts[chapter.name] += 1
                print(f"worker died during chapter {chapter.name} (attempt {attempts[chapter.name]}): "
                      f"{type(exc).__name__}", file=sys.stderr, flush=True)
                if attempts[chapter.name] < MAX_ATTEMPTS:
                    pending.appendleft(chapter)  # the next worker resumes it from its manifest
                else:
                    reports[chapter.name] = ChapterReport(chapter.name, error=f"its worker died {MAX_ATTEMPTS} times")
                    progress.chapter(reports[chapter.name], pages_counted=False)
                idle.append(actor_class.remote(job))
                continue
            reports[chapter.name] = report
            progress.chapter(report, pages_counted=False)
            idle.append(actor)
    finally:
        for actor in idle + [actor for actor, _ in running.values()]:
            ray.kill(actor)
        if started:
            ray.shutdown()
    used = {"workers": count, "gpus_per_worker": gpus_per_worker, "worker_restarts": sum(attempts.values())}
    return [reports[chapter.name] for chapter in chapters], used
