"""The training loop: AdamW with warm-up, accumulation, autocast, EMA, data parallelism, checkpoints, validation.

Every random draw of a sample comes from a generator seeded by (seed, the sample's number in the run), the crop layout
from (seed, step), and the frame of each sample from a per-epoch permutation seeded by (seed, epoch): there is no RNG
state to save, so a resumed run repeats an uninterrupted one bit for bit, N processes with a global batch B compute
what one process computes with batch B (each takes its B/N slice; gradients are averaged with an all-reduce), and
batch B with A accumulated micro-batches trains like batch A*B.

Why this module is long: the loop's parts (optimizer and warm-up, accumulation, autocast, EMA, the data-parallel
all-reduce, checkpoints and their resume, validation) all read and write the same training state; apart, each would
have to pass that state around and its resume guarantee would be spread across modules.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from ..canvas import build_canvas
from ..errors import ColorFlowError, InvalidInputError
from ..loading import resolve_device
from ..models.lora import SD_LORA_TARGETS
from ..pipelines.guided_sr import GuidedSuperResolver
from ..retrieval.store import write_png
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .data import GUIDE_STYLE, TrainingData
from .models import TrainModels, build_models
from .objective import (
    GSRP, LAYOUT, LAYOUTS, SAMPLE, STYLE, gsrp_loss, gsrp_sample, icp_loss, icp_sample, sample_choice, sample_generator,
)
from .release import write_release
from ..evaluation.metrics import psnr, ssim

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
#: Settings a resumed run must share with the run it continues (the rest, e.g. --steps, may change).
_RESUME_FIXED = ("data", "colorflow", "target", "width", "height", "batch_size", "grad_accum", "seed", "mu",
                 "styles", "lora_rank", "lora_alpha", "lora_targets", "lr", "warmup", "ema", "holdout")


@dataclass
class TrainConfig:
    """Everything a run depends on (written to RUN_DIR/run.json)."""
    data: str
    out: str
    base: str
    colorflow: str | None = None  # None: from the SD1.5 base (guider copied from its UNet, fresh LoRA and fusion net)
    target: str = "icp"
    steps: int = 1000
    width: int | None = None  # page size in the training crop; default half the prepared size
    height: int | None = None
    lr: float = 1e-5
    warmup: int = 100
    batch_size: int = 1  # global batch per optimizer step (split over processes)
    grad_accum: int = 1
    seed: int = 0
    mu: float = 1.5
    styles: tuple[str, ...] = ("gray", "screen")
    prompt_dropout: float = 0.1
    lora_rank: int = 64
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] = SD_LORA_TARGETS
    precision: str = "auto"
    gradient_checkpointing: bool = False
    ema: float = 0.0  # EMA decay; 0 = off
    max_grad_norm: float = 1.0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 1
    validate_every: int = 0
    holdout: str | None = None  # chapter kept out of training; its first frame is the validation page
    val_steps: int = 10
    device: str = "auto"
    resume: bool = False

    @classmethod
    def from_json(cls, data: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names}
        return cls(**values)


def _rank() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: torch.device) -> bool:
    """Join the torchrun process group (gloo on the CPU, nccl on CUDA) when launched by torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: `auto` = bf16 (else fp16) on CUDA, none on the CPU (where bf16 is mostly emulated)."""
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class Trainer:
    """One training run (`run()`), single- or multi-process."""
    def __init__(self, config: TrainConfig, *, on_step: Callable[[int, dict], None] | None = None,
                 progress: Callable[[str], None] | None = None):
        self.config = config
        self.on_step = on_step
        self.progress = progress or (lambda line: print(line, file=sys.stderr, flush=True))
        self.out = Path(config.out)
        self.data = TrainingData(config.data)
        self.rank, self.world = 0, 1
        #: The run's models (set by `run`; tests and callers inspect them after training).
        self.models: TrainModels | None = None

    # ------------------------------------------------------------------------------------------- setup
    def _check(self) -> None:
        c = self.config
        if c.steps < 1 or c.batch_size < 1 or c.grad_accum < 1:
            raise InvalidInputError("--steps, --batch-size and --grad-accum must be at least 1")
        if c.batch_size % self.world:
            raise InvalidInputError(f"--batch-size {c.batch_size} (global) does not split over {self.world} processes")
        missing = sorted(set(c.styles) - set(self.data.meta["styles"]))
        if missing:
            raise InvalidInputError(f"style(s) {missing} were not prepared in {c.data} (prepared: {self.data.meta['styles']})")
        if c.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise InvalidInputError("--precision is one of auto, fp32, bf16, fp16")
        width, height = self.page_size
        if width % 16 or height % 16 or width < 16 or height < 16:
            raise InvalidInputError(f"training page size {width}x{height} must be a multiple of 16")

    @property
    def page_size(self) -> tuple[int, int]:
        """The page's W x H inside a training crop."""
        w, h = self.data.size
        return (self.config.width or w // 2, self.config.height or h // 2)

    def _frames(self) -> tuple[list[dict], dict | None]:
        frames = [f for f in self.data.frames if f["chapter"] != self.config.holdout]
        held = [f for f in self.data.frames if f["chapter"] == self.config.holdout]
        if self.config.holdout is not None and not held:
            raise InvalidInputError(f"--holdout chapter '{self.config.holdout}' is not in {self.config.data}")
        if not frames:
            raise InvalidInputError(f"{self.config.data} has no training frames")
        return frames, (held[0] if held else None)

    def _claim_out(self) -> int:
        """0 for a new run; the checkpoint step for --resume. Refuses to overwrite a run without --resume."""
        run_file = self.out / RUN_FILE
        if not run_file.is_file():
            if self.out.exists() and any(p.name != "release" for p in self.out.iterdir()) and not self.config.resume:
                raise InvalidInputError(f"{self.out} is not empty and holds no run; choose an empty --out")
            return 0
        if not self.config.resume:
            raise InvalidInputError(f"{self.out} already holds a training run; pass --resume to continue it, or another --out")
        previous = TrainConfig.from_json(json.loads(run_file.read_text()))
        changed = [k for k in _RESUME_FIXED if getattr(previous, k) != getattr(self.config, k)]
        if changed:
            raise InvalidInputError(f"--resume with other settings than the run in {self.out}: {', '.join(changed)}")
        checkpoint = latest_checkpoint(self.out / "checkpoints")
        return 0 if checkpoint is None else json.loads((checkpoint / "state.json").read_text())["step"]

    # ------------------------------------------------------------------------------------------- run
    def run(self) -> Path:
        """Train to `config.steps`; returns RUN_DIR/release. Ctrl-C writes a checkpoint first."""
        c = self.config
        device = resolve_device(c.device)
        if device.type == "cuda" and "LOCAL_RANK" in os.environ:
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        started_group = init_distributed(device)
        try:
            self.rank, self.world = _rank()
            self._check()
            start = self._claim_out() if self.rank == 0 else 0
            if self.world > 1:
                box = [start]
                dist.broadcast_object_list(box, src=0)
                start = box[0]
            return self._run(device, start)
        finally:
            if started_group:
                dist.destroy_process_group()

    def _run(self, device: torch.device, start: int) -> Path:
        c = self.config
        frames, held = self._frames()
        models = self.models = build_models(c.colorflow, c.base, c.target, device=device, lora_rank=c.lora_rank,
                                            lora_alpha=c.lora_alpha, lora_targets=c.lora_targets)
        if c.gradient_checkpointing:
            models.enable_gradient_checkpointing()
        params = list(models.trainable().values())
        optimizer = torch.optim.AdamW(params, lr=c.lr, weight_decay=1e-2, foreach=True)
        warmup = max(1, c.warmup)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        amp = autocast_dtype(c.precision, device)
        scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
        ema = self._ema(params) if c.ema > 0 else None
        frozen = models.frozen_fingerprint()
        if start > 0:
            self._restore(models, optimizer, scheduler, scaler, ema)
        elif self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / RUN_FILE).write_text(json.dumps(asdict(self.config), indent=2))
        if self.rank == 0:
            self._trim_metrics(start)
        autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp is not None else contextlib.nullcontext
        models.train_mode(True)
        step, timer = start, time.perf_counter()
        try:
            while step < c.steps:
                losses = self._step(models, frames, step, autocast, scaler)
                self._sync_gradients(params, losses)
                scaler.unscale_(optimizer)
                norm = torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm)
                if torch.isfinite(norm) or scaler.is_enabled():
                    scaler.step(optimizer)  # fp16: the scaler itself skips non-finite steps and lowers its scale
                else:
                    self.progress(f"warning: non-finite gradients at step {step + 1}; its update is skipped")
                scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.step(params)
                step += 1
                self._log(step, losses, scheduler.get_last_lr()[0], start, timer)
                if self.on_step is not None:
                    self.on_step(step, losses)
                if self.rank == 0 and step % c.checkpoint_every == 0 and step < c.steps:
                    self._save(step, models, optimizer, scheduler, scaler, ema)
                if held is not None and c.validate_every and step % c.validate_every == 0 and self.rank == 0:
                    self._validate(models, held, step, ema)
        except KeyboardInterrupt:
            if self.rank == 0 and step > start:
                self._save(step, models, optimizer, scheduler, scaler, ema)
                self.progress(f"interrupted: checkpoint of step {step} written; continue with --resume")
            raise
        if models.frozen_fingerprint() != frozen:
            raise ColorFlowError("a frozen weight changed during training (this is a bug: please report it)")
        if self.rank != 0:
            return self.out / "release"
        if step > start:
            self._save(step, models, optimizer, scheduler, scaler, ema)
        with self._ema_weights(ema, params):
            return write_release(models, Path(c.colorflow) if c.colorflow else self.data.release, self.out / "release")

    def _step(self, models: TrainModels, frames: list[dict], step: int, autocast, scaler) -> dict:
        """Forward and backward of every micro-batch of `step` on this process's slice; returns the mean losses."""
        totals: dict[str, float] = {}
        for micro in range(self.config.grad_accum):
            parts = self._losses(models, frames, step, micro, autocast)
            for key, value in parts.items():
                totals[key] = totals.get(key, 0.0) + value.item() / self.config.grad_accum
            scaler.scale(sum(parts.values()) / self.config.grad_accum).backward()
        return totals

    def _losses(self, models: TrainModels, frames: list[dict], step: int, micro: int, autocast) -> dict:
        """target -> loss of micro-batch `micro` of `step` (this process's slice), every draw seeded by its position."""
        c = self.config
        local = c.batch_size // self.world
        # One crop layout per step (a batch shares a shape); every other draw is keyed by the sample's number in the
        # run, so batch B x accumulation A trains like batch A*B, on any number of processes.
        layout = LAYOUTS[sample_choice(len(LAYOUTS), c.seed, LAYOUT, step)]
        first = (step * c.grad_accum + micro) * local * self.world + self.rank * local
        numbers = range(first, first + local)
        picks = [self._frame(frames, n) for n in numbers]
        styles = [c.styles[sample_choice(len(c.styles), c.seed, STYLE, n)] for n in numbers]
        losses = {}
        if c.target in ("icp", "all"):
            samples = [icp_sample(self.data, f, s, layout, self.page_size) for f, s in zip(picks, styles)]
            gens = [sample_generator(c.seed, SAMPLE, n) for n in numbers]
            losses["icp"] = icp_loss(models, samples, gens, c.mu, c.prompt_dropout, autocast)
        if c.target in ("gsrp", "all"):
            samples = [gsrp_sample(self.data, f, s, self.page_size) for f, s in zip(picks, styles)]
            gens = [sample_generator(c.seed, GSRP, n) for n in numbers]
            losses["gsrp"] = gsrp_loss(models, samples, gens, autocast)
        return losses

    @torch.no_grad()
    def batch_loss(self, step: int, micro: int = 0) -> dict[str, float]:
        """The losses of the training batch of `step` recomputed with the current weights (after `run`)."""
        frames, _ = self._frames()
        return {k: v.item() for k, v in self._losses(self.models, frames, step, micro, contextlib.nullcontext).items()}

    def _frame(self, frames: list[dict], number: int) -> dict:
        epoch, position = divmod(number, len(frames))
        order = np.random.default_rng([self.config.seed, epoch]).permutation(len(frames))
        return frames[int(order[position])]

    def _sync_gradients(self, params: list[torch.nn.Parameter], losses: dict) -> None:
        """Average gradients (one flat all-reduce) and the logged losses over the processes."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for param, grad in zip(params, grads):
            param.grad = flat[offset : offset + grad.numel()].view_as(grad).clone()
            offset += grad.numel()
        values = torch.tensor([losses[k] for k in sorted(losses)], dtype=torch.float64)
        dist.all_reduce(values)
        for key, value in zip(sorted(losses), (values / self.world).tolist()):
            losses[key] = value

    # ------------------------------------------------------------------------------------------- state
    def _ema(self, params):
        from diffusers.training_utils import EMAModel

        return EMAModel(params, decay=self.config.ema)

    @contextlib.contextmanager
    def _ema_weights(self, ema, params):
        if ema is None:
            yield
            return
        ema.store(params)
        ema.copy_to(params)
        try:
            yield
        finally:
            ema.restore(params)

    def _save(self, step, models, optimizer, scheduler, scaler, ema) -> None:
        ema_tensors = None
        if ema is not None:
            ema_tensors = {k: v for k, v in zip(models.trainable(), ema.shadow_params)}
        optimizer_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                           "scaler": scaler.state_dict()}
        save_checkpoint(self.out / "checkpoints", step, models.state(), ema_tensors, optimizer_state,
                        {"target": self.config.target}, keep=self.config.keep_checkpoints)

    def _restore(self, models, optimizer, scheduler, scaler, ema) -> None:
        path = latest_checkpoint(self.out / "checkpoints")
        tensors, ema_tensors, optimizer_state, state = load_checkpoint(path)
        models.load_state(tensors)
        optimizer.load_state_dict(optimizer_state["optimizer"])
        scheduler.load_state_dict(optimizer_state["scheduler"])
        scaler.load_state_dict(optimizer_state["scaler"])
        if ema is not None and ema_tensors is not None:
            for shadow, key in zip(ema.shadow_params, models.trainable()):
                shadow.copy_(ema_tensors[key])
            ema.optimization_step = state["step"]
        self.progress(f"resumed from {path.name}")

    def _trim_metrics(self, start: int) -> None:
        """Drop the lines logged after the checkpoint being resumed (they will be logged again)."""
        path = self.out / METRICS_FILE
        if not path.is_file():
            return
        lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= start]
        path.write_text("".join(line + "\n" for line in lines))

    def _log(self, step: int, losses: dict, lr: float, start: int, timer: float) -> None:
        if self.rank != 0 or (step % self.config.log_every and step != self.config.steps):
            return
        with (self.out / METRICS_FILE).open("a") as handle:
            for target, loss in losses.items():
                handle.write(json.dumps({"step": step, "target": target, "loss": loss, "lr": lr}) + "\n")
        rate = (step - start) / max(time.perf_counter() - timer, 1e-9)
        eta = (self.config.steps - step) / rate if rate > 0 else math.inf
        shown = " ".join(f"{k} {v:.4f}" for k, v in losses.items())
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
        self.progress(f"step {step}/{self.config.steps} {shown} | {rate:.2f} it/s | ETA {eta_text}")

    # ------------------------------------------------------------------------------------------- validation
    def _validate(self, models: TrainModels, frame: dict, step: int, ema) -> None:
        """Colourise the held-out page with the current (EMA) weights; save it and log PSNR/SSIM vs its colour page."""
        style = self.config.styles[0]
        size = self.data.size
        context = self.data.image(frame, style)
        canvas = build_canvas(context.resize(size), self.data.retrieval(frame).patches())
        params = list(models.trainable().values())
        models.train_mode(False)
        try:
            with self._ema_weights(ema, params):
                generator = torch.Generator().manual_seed(self.config.seed)
                icp = models.pipeline(canvas.image, canvas.mask, num_inference_steps=self.config.val_steps,
                                      generator=generator, posterior_generator=torch.Generator().manual_seed(self.config.seed))
                final = GuidedSuperResolver(models.pipeline.vae, models.fusion)(
                    icp.query, self.data.image(frame, GUIDE_STYLE[style]), generator=torch.Generator().manual_seed(0))
        finally:
            models.train_mode(True)
        truth = self.data.image(frame, "color")
        write_png(self.out / "validation" / f"step-{step:08d}.png", final)
        record = {"step": step, "target": "validation", "frame": frame["id"], "psnr": psnr(final, truth),
                  "ssim": ssim(final, truth)}
        with (self.out / METRICS_FILE).open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        self.progress(f"validation step {step}: PSNR {record['psnr']:.2f} dB, SSIM {record['ssim']:.4f}")
