"""`colorize-series`: every chapter folder of a series, in one process or on Ray, resumable."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .cli_options import colorize_options, make_encoder, model_arguments
from .errors import ColorFlowError
from .loading import load_colorflow
from .series import (
    POOL_FOLDER, SeriesJob, SeriesProgress, SeriesWorker, count_pages, find_chapters, prepare_pool, run_in_process,
    summary,
)


def colorize_series(args: argparse.Namespace) -> int:
    """Colour SERIES_DIR/<chapter>/<page> into OUT/<chapter>/<page stem>.png; 0 when every chapter finished."""
    if args.workers is not None and args.workers < 1:
        raise ColorFlowError("--workers must be at least 1")
    out = Path(args.out)
    chapters = find_chapters(Path(args.series))
    job = SeriesJob(out, model_arguments(args), colorize_options(args), Path(args.pool or out / POOL_FOLDER),
                    args.encoder, args.feed_back)
    model = load_colorflow(**job.model)  # the driver embeds the pool once for every worker
    pool = prepare_pool(job, make_encoder(job.encoder, model), args.refs, chapters)
    progress = SeriesProgress(len(chapters), count_pages(chapters))
    if args.ray is None:
        reports, used = run_in_process(SeriesWorker(job, model, pool), chapters, progress), {"workers": 1}
    else:
        from .series_ray import run_on_ray

        del model, pool  # the workers load their own
        reports, used = run_on_ray(job, chapters, progress, args.ray, args.gpus_per_worker, args.workers)
    result = summary(reports, progress, **used)
    print(json.dumps(result, indent=2))
    return 0 if result["finished"] == result["chapters"] else 1


def register(commands, add_colorize_options) -> None:
    """Add `colorize-series` to the CLI's subcommands."""
    series = commands.add_parser("colorize-series", help="colorize every chapter folder of a series (resumable)")
    series.add_argument("series", help="folder of chapter folders of pages")
    series.add_argument("--out", required=True, help="output folder (gets <chapter>/<page stem>.png)")
    add_colorize_options(series)
    series.add_argument("--ray", metavar="auto|ADDRESS",
                        help="run chapters on Ray workers: 'auto' joins the cluster running here or starts one")
    series.add_argument("--gpus-per-worker", type=float,
                        help="GPUs per Ray worker (fractions share a GPU; default 1 with GPUs, else CPU workers)")
    series.add_argument("--workers", type=int, help="Ray workers (default: as many as the GPUs/CPUs allow)")
    series.set_defaults(func=colorize_series)

