"""`prepare-training`, `train` and `bench-train`: argparse definitions and handlers."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..models.lora import SD_LORA_TARGETS
from ..weights import SD15_REPO
from .bench import run_train_bench
from .data import PrepSettings, prepare_training
from .demo import run_finetune_demo
from .trainer import TrainConfig
from .trainer import Trainer


def _styles(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def prepare(args: argparse.Namespace) -> int:
    """Prepare or extend DATA_DIR from CHAPTERS_DIR."""
    settings = PrepSettings(
        width=args.width, height=args.height, pool_size=args.pool_size, top_k=args.top_k,
        styles=_styles(args.styles), seed=args.seed,
    )
    data = prepare_training(args.chapters, args.out, args.colorflow, settings, device=args.device,
                            warn=lambda m: _say(f"warning: {m}"), progress=lambda m: _say(f"prepared {m}"))
    chapters = len({f["chapter"] for f in data.frames})
    print(json.dumps({"data": str(data.folder), "frames": len(data.frames), "chapters": chapters}))
    return 0


def _config(args: argparse.Namespace):
    return TrainConfig(
        data=args.data, out=args.out, base=args.base,
        colorflow=None if args.colorflow.lower() == "none" else args.colorflow, target=args.target, steps=args.steps,
        width=args.width, height=args.height, lr=args.lr, warmup=args.warmup, batch_size=args.batch_size,
        grad_accum=args.grad_accum, seed=args.seed, mu=args.mu, styles=_styles(args.styles),
        prompt_dropout=args.prompt_dropout, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        lora_targets=_styles(args.lora_targets), precision=args.precision,
        gradient_checkpointing=args.gradient_checkpointing, ema=args.ema, checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints, log_every=args.log_every, validate_every=args.validate_every,
        holdout=args.holdout, val_steps=args.val_steps, device=args.device, resume=args.resume,
    )


def train(args: argparse.Namespace) -> int:
    """Train; print the release folder as JSON."""
    release = Trainer(_config(args)).run()
    print(json.dumps({"release": str(release), "metrics": str(Path(args.out) / "metrics.jsonl")}))
    return 0


def bench_train(args: argparse.Namespace) -> int:
    """Steps/s and peak memory of training the tiny (or a given) model on a synthetic chapter."""
    result = run_train_bench(args)
    print(json.dumps(result, indent=2))
    return 0


def finetune_demo(args: argparse.Namespace) -> int:
    """Held-out PSNR / colour consistency of a synthetic chapter before and after fine-tuning."""
    print(json.dumps(run_finetune_demo(args), indent=2))
    return 0


def register(commands) -> None:
    """Add the training subcommands to the `python -m colorflow_core` subparsers."""
    prep = commands.add_parser("prepare-training", help="training data from coloured chapters (cached retrieval, styles)")
    prep.add_argument("chapters", metavar="CHAPTERS_DIR", help="one folder of colour pages per chapter")
    prep.add_argument("--out", required=True, metavar="DATA_DIR", help="data folder (a rerun extends it)")
    prep.add_argument("--colorflow", required=True, metavar="RELEASE",
                      help="ColorFlow release folder: its CLIP image encoder retrieves, its ScreenStyle / line extractor make the styles")
    prep.add_argument("--width", type=int, default=512, help="page width W (multiple of 32; canvas 2W)")
    prep.add_argument("--height", type=int, default=800, help="page height H (multiple of 32; canvas 2H)")
    prep.add_argument("--styles", default="gray,screen,sketch,sketch_shading",
                      help="input styles to synthesise: gray (luma), screen (ScreenStyle blend, gray share ~ U(0,1)), "
                           "sketch (line extractor), sketch_shading (lines + the release's shading rule)")
    prep.add_argument("--pool-size", type=int, default=20, help="other frames of the chapter in each frame's pool")
    prep.add_argument("--top-k", type=int, default=12, help="retrieved patches per frame (top-k/4 per query quadrant)")
    prep.add_argument("--seed", type=int, default=0, help="seed of the pool choice and the ScreenStyle augmentation")
    prep.add_argument("--device", default="cpu", help="device of the encoder and preprocessors")
    prep.set_defaults(func=prepare)

    tr = commands.add_parser("train", help="train/fine-tune the ICP guider + LoRA and/or the GSRP fusion net",
                             description="Writes RUN_DIR/release (a release folder `colorize --colorflow` loads), "
                                         "RUN_DIR/metrics.jsonl and resumable checkpoints. Data-parallel under torchrun.")
    tr.add_argument("data", metavar="DATA_DIR", help="folder made by prepare-training")
    tr.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder (refused if it holds a run, unless --resume)")
    tr.add_argument("--colorflow", required=True, metavar="RELEASE|none",
                    help="release to fine-tune (its GraySD), or 'none' to start from the base: guider copied from the "
                         "base UNet with zero outputs, fresh LoRA, fresh fusion net")
    tr.add_argument("--base", default=SD15_REPO, metavar="SD15", help="SD1.5 diffusers folder (or single-file checkpoint)")
    tr.add_argument("--target", default="icp", choices=["icp", "gsrp", "all"], help="what to train")
    tr.add_argument("--steps", type=int, default=1000, help="total optimizer steps (with --resume: the new total)")
    tr.add_argument("--width", type=int, help="page width inside a training crop (default half the prepared width)")
    tr.add_argument("--height", type=int, help="page height inside a training crop (default half the prepared height)")
    tr.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (the paper's 1e-5)")
    tr.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    tr.add_argument("--batch-size", type=int, default=1, help="global batch per step (split over torchrun processes)")
    tr.add_argument("--grad-accum", type=int, default=1, help="micro-batches accumulated per step")
    tr.add_argument("--seed", type=int, default=0, help="seed of every draw (frames, crops, noise, timesteps)")
    tr.add_argument("--mu", type=float, default=1.5, help="timestep shift µ (paper Eq. 5; 0 = uniform timesteps)")
    tr.add_argument("--styles", default="gray,screen", help="input styles drawn per sample (prepared ones)")
    tr.add_argument("--prompt-dropout", type=float, default=0.1, help="share of samples trained with the empty prompt")
    tr.add_argument("--lora-rank", type=int, default=64, help="LoRA rank when starting from the base (a release's is kept)")
    tr.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: the rank)")
    tr.add_argument("--lora-targets", default=",".join(SD_LORA_TARGETS), help="LoRA target module names")
    tr.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                    help="autocast: auto = bf16 (else fp16) on CUDA, fp32 on the CPU")
    tr.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (less memory)")
    tr.add_argument("--ema", type=float, default=0.0, help="EMA decay of the trained weights (0 = off); the release gets the EMA")
    tr.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    tr.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept")
    tr.add_argument("--log-every", type=int, default=1, help="steps between metrics.jsonl lines")
    tr.add_argument("--holdout", metavar="CHAPTER", help="chapter kept out of training; its first page is the validation page")
    tr.add_argument("--validate-every", type=int, default=0, help="steps between validation images (needs --holdout)")
    tr.add_argument("--val-steps", type=int, default=10, help="denoising steps of the validation image")
    tr.add_argument("--device", default="auto", help="cpu, cuda or auto (under torchrun: cuda:LOCAL_RANK)")
    tr.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its latest checkpoint")
    tr.set_defaults(func=train)

    be = commands.add_parser("bench-train", help="training steps/s and peak memory (tiny model on the CPU by default)")
    be.add_argument("--colorflow", help="release folder (default: tiny random weights)")
    be.add_argument("--base", help="SD1.5 base folder (with --colorflow)")
    be.add_argument("--target", default="icp", choices=["icp", "gsrp", "all"])
    be.add_argument("--width", type=int, default=64, help="prepared page width")
    be.add_argument("--height", type=int, default=96, help="prepared page height")
    be.add_argument("--train-width", type=int, help="page width in the crop (default half)")
    be.add_argument("--train-height", type=int, help="page height in the crop (default half)")
    be.add_argument("--batch-size", type=int, default=1)
    be.add_argument("--steps", type=int, default=6, help="measured steps (after one warm-up step)")
    be.add_argument("--gradient-checkpointing", action="store_true")
    be.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    be.add_argument("--device", default="auto")
    be.set_defaults(func=bench_train)

    de = commands.add_parser("finetune-demo", help="fine-tune on a synthetic chapter's references; held-out scores before/after")
    de.add_argument("--colorflow", help="release folder (default: tiny random weights)")
    de.add_argument("--base", help="SD1.5 base folder (with --colorflow)")
    de.add_argument("--width", type=int, default=64, help="page width (multiple of 32)")
    de.add_argument("--height", type=int, default=96, help="page height (multiple of 32)")
    de.add_argument("--references", type=int, default=6, help="coloured pages trained on (and retrieved from)")
    de.add_argument("--pages", type=int, default=3, help="held-out pages scored")
    de.add_argument("--steps", type=int, default=60, help="training steps")
    de.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    de.add_argument("--batch-size", type=int, default=2, help="global batch")
    de.add_argument("--sample-steps", type=int, default=4, help="denoising steps when scoring")
    de.add_argument("--seed", type=int, default=0, help="seed of the synthetic chapter")
    de.set_defaults(func=finetune_demo)
