"""`finetune-demo`: fine-tune on a synthetic chapter's colour references, score its held-out pages before and after."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from ..evaluation.report import evaluate_pages
from ..evaluation.synthetic import make_chapter
from ..loading import load_colorflow
from ..options import ColorizeOptions
from ..retrieval import ReferencePool
from ..sequence import colorize_pages
from .bench import bench_weights
from .data import PrepSettings, prepare_training
from .trainer import TrainConfig, Trainer


def _score(release: Path, base: Path, chapter, size: tuple[int, int], steps: int) -> dict:
    """PSNR/SSIM and colour consistency of the chapter's held-out screentone pages colourised with `release`."""
    model = load_colorflow(release, base, device="cpu", dtype="float32")
    pool = ReferencePool(model.encoder)
    pool.add([page.color for page in chapter.references])
    options = ColorizeOptions(size=size, steps=steps, preprocess="gray", seed=0)
    results = colorize_pages(model, [p.input("screentone") for p in chapter.pages], pool, options)
    preds = [r.final.resize(p.color.size) for r, p in zip(results, chapter.pages)]
    report = evaluate_pages([p.name for p in chapter.pages], preds, [p.color for p in chapter.pages],
                            labels=[p.labels for p in chapter.pages], table=chapter.label_table())
    summary = report["consistency"]["summary"]
    return {"psnr": report["mean"]["psnr"], "ssim": report["mean"]["ssim"], **{f"consistency_{k}": v for k, v in summary.items()}}


def run_finetune_demo(args: argparse.Namespace) -> dict:
    """Tiny weights (or a given release): score, fine-tune `args.steps` steps on the references, score again."""
    size = (args.width, args.height)
    chapter = make_chapter(args.seed, n_references=args.references, n_pages=args.pages,
                           size=(int(1.5 * size[0]), int(1.5 * size[1])))
    with tempfile.TemporaryDirectory(prefix="colorflow-finetune-demo-") as tmp:
        work = Path(tmp)
        release, base = bench_weights(args, work)
        folder = work / "chapters" / "series"
        folder.mkdir(parents=True)
        for page in chapter.references:
            page.color.save(folder / f"{page.name}.png")
        prepare_training(work / "chapters", work / "data", release, PrepSettings(*size, styles=("gray", "screen")),
                         warn=lambda m: None)
        before = _score(release, base, chapter, size, args.sample_steps)
        config = TrainConfig(data=str(work / "data"), out=str(work / "run"), base=str(base), colorflow=str(release),
                             target="all", steps=args.steps, lr=args.lr, warmup=1, batch_size=args.batch_size,
                             checkpoint_every=10**9, device="cpu", log_every=max(1, args.steps // 10))
        trained = Trainer(config, progress=lambda line: None).run()
        after = _score(trained, base, chapter, size, args.sample_steps)
    return {"references": args.references, "held_out_pages": args.pages, "steps": args.steps, "lr": args.lr,
            "weights": "tiny" if args.colorflow is None else str(args.colorflow), "before": before, "after": after}
