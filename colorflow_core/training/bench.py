"""`bench-train`: optimizer steps per second and peak memory of a training run (tiny weights on the CPU by default)."""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from ..evaluation.bench import MemoryMeter, machine_info
from ..loading import resolve_device
from .data import PrepSettings, prepare_training
from .trainer import TrainConfig, Trainer
from ..evaluation.synthetic import make_chapter
from ..tiny import write_tiny_release


def _chapters(folder: Path, size: tuple[int, int]) -> Path:

    for seed in (0, 1):
        chapter = make_chapter(seed, n_references=0, n_pages=3, size=size)
        (folder / f"ch{seed}").mkdir(parents=True)
        for page in chapter.pages:
            page.color.save(folder / f"ch{seed}" / f"{page.name}.png")
    return folder


def bench_weights(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    """(release, base): `args.colorflow`/`args.base`, or tiny random weights written under `work`."""
    if args.colorflow is None:

        return write_tiny_release(work / "weights")
    return Path(args.colorflow), Path(args.base)


def run_train_bench(args: argparse.Namespace) -> dict:
    """Prepare a synthetic 2-chapter set, train `args.steps` steps after one warm-up step; time and measure them."""
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory(prefix="colorflow-train-bench-") as tmp:
        work = Path(tmp)
        release, base = bench_weights(args, work)
        size = (args.width, args.height)
        chapters = _chapters(work / "chapters", (int(1.5 * size[0]), int(1.5 * size[1])))
        prepare_training(chapters, work / "data", release, PrepSettings(*size, styles=("gray",)), device=str(device),
                         warn=lambda m: None)
        times: list[float] = []
        meter = MemoryMeter(device)

        def tick(step: int, _losses: dict) -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter())
            if step == 1:
                meter.begin()

        config = TrainConfig(
            data=str(work / "data"), out=str(work / "run"), base=str(base), colorflow=str(release), target=args.target,
            steps=args.steps + 1, width=args.train_width, height=args.train_height, batch_size=args.batch_size,
            styles=("gray",), precision=args.precision, gradient_checkpointing=args.gradient_checkpointing,
            checkpoint_every=10**9, device=str(device), log_every=10**9,
        )
        trainer = Trainer(config, on_step=tick, progress=lambda line: None)
        trainer.run()
        peak = meter.end()
        page = trainer.page_size
    seconds = times[-1] - times[0]
    return {
        "target": args.target, "weights": "tiny" if args.colorflow is None else str(args.colorflow),
        "device": str(device), "prepared_page": list(size), "training_page": list(page), "batch_size": args.batch_size,
        "precision": args.precision, "gradient_checkpointing": args.gradient_checkpointing,
        "measured_steps": args.steps, "steps_per_s": args.steps / seconds if seconds > 0 else None,
        "peak_memory_mib": peak / 2**20 if peak else None, "machine": machine_info(str(device)),
    }
