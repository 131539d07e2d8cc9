"""Command line: `colorize` pages against references, `make-tiny` test weights."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import ColorFlowError
from .imaging import list_images
from .weights import COLORFLOW_REPO, SD15_REPO


def _pages(items: list[str]) -> list[Path]:
    pages: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            pages += list_images(path)
        elif path.is_file():
            pages.append(path)
        else:
            raise ColorFlowError(f"page not found: {path}")
    if not pages:
        raise ColorFlowError("no pages to colorize")
    stems = [p.stem for p in pages]
    if len(set(stems)) != len(stems):
        raise ColorFlowError("two pages share a file name stem; their outputs would overwrite each other")
    return pages


def _size(args: argparse.Namespace) -> tuple[int, int] | None:
    if args.size is not None and (args.width or args.height):
        raise ColorFlowError("give either --width/--height or --size auto, not both")
    if bool(args.width) != bool(args.height):
        raise ColorFlowError("--width and --height go together")
    return (args.width, args.height) if args.width else None


def _stderr_progress(stage: str, done: int, total: int) -> None:
    if stage == "step":
        print(f"\r  step {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)
    else:
        print(f"page {done}/{total} done", file=sys.stderr, flush=True)


def save_intermediates(folder: Path, result) -> None:
    """canvas, mask, icp, lowres, final and retrieval.json of one page under `folder/<page stem>/`."""
    from .retrieval.store import write_json, write_png

    page_dir = folder / result.name
    for name, image in (
        ("canvas", result.canvas.image),
        ("mask", result.canvas.mask),
        ("icp", result.icp.canvas),
        ("lowres", result.lowres),
        ("final", result.final),
    ):
        write_png(page_dir / f"{name}.png", image)
    write_json(page_dir / "retrieval.json", {"top3": result.retrieval.indices.tolist(), **result.retrieval.to_json()})


def _encoder(spec: str, model):
    """'release' → the release's CLIP ViT-H/14; 'open_clip:MODEL[:WEIGHTS_FILE_OR_TAG]' → an open_clip model."""
    if spec == "release":
        return model.encoder
    kind, _, rest = spec.partition(":")
    if kind != "open_clip" or not rest:
        raise ColorFlowError(f"unknown encoder '{spec}' (use 'release' or 'open_clip:MODEL[:WEIGHTS]')")
    from .retrieval import OpenClipEncoder

    name, _, weights = rest.partition(":")
    return OpenClipEncoder(name, weights or None, device=model.device)


def colorize(args: argparse.Namespace) -> int:
    """Run the whole pipeline over the given pages; write `<out>/<page stem>.png`."""
    from .loading import load_colorflow
    from .options import ColorizeOptions
    from .retrieval import ReferencePool
    from .retrieval.store import write_png
    from .sequence import colorize_pages

    pages = _pages(args.pages)
    options = ColorizeOptions(
        size=_size(args), steps=args.steps, seed=args.seed, guidance_scale=args.guidance,
        guider_scale=args.guider_scale, preprocess=args.preprocess, sample_posterior=not args.posterior_mode,
    )
    print("loading models…", file=sys.stderr, flush=True)
    model = load_colorflow(
        args.colorflow, args.base, style=args.style, device=args.device, dtype=args.dtype, allow_download=args.download
    )
    pool = ReferencePool(_encoder(args.encoder, model), store=args.pool)
    added = pool.add(args.refs)
    print(f"{len(pool)} references in the pool ({added} new)", file=sys.stderr, flush=True)
    out = Path(args.out)
    for result in colorize_pages(model, pages, pool, options, feed_back=args.feed_back, progress=_stderr_progress):
        write_png(out / f"{result.name}.png", result.final)
        if args.save_intermediates:
            save_intermediates(Path(args.save_intermediates), result)
    return 0


def make_tiny(args: argparse.Namespace) -> int:
    """Write tiny random weights in the release layout."""
    from .tiny import write_tiny_release

    release, base = write_tiny_release(Path(args.folder), seed=args.seed)
    print(json.dumps({"colorflow": str(release), "base": str(base)}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `python -m colorflow_core` argument parser."""
    parser = argparse.ArgumentParser(prog="python -m colorflow_core", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("colorize", help="colorize pages with coloured references")
    run.add_argument("--colorflow", default=COLORFLOW_REPO, help="ColorFlow release folder or Hugging Face repo id")
    run.add_argument("--base", default=SD15_REPO, help="SD1.5: diffusers folder, repo id, or a single-file checkpoint (.safetensors)")
    run.add_argument("--refs", nargs="+", required=True, help="reference images or folders")
    run.add_argument("--out", required=True, help="output folder (gets <page stem>.png)")
    run.add_argument("--style", default="gray", choices=["gray"], help="input style")
    run.add_argument("--preprocess", default="gray", choices=["screen", "gray", "none"], help="page preprocessing")
    run.add_argument("--width", type=int, help="query width (multiple of 32)")
    run.add_argument("--height", type=int, help="query height (multiple of 32)")
    run.add_argument("--size", choices=["auto"], help="pick 640x640, 512x800 or 800x512 by each page's aspect (default)")
    run.add_argument("--steps", type=int, default=10, help="denoising steps")
    run.add_argument("--seed", type=int, default=0, help="random seed (same meaning as upstream's)")
    run.add_argument("--guidance", type=float, default=7.5, help="CFG scale; 1.0 = no CFG (twice as fast)")
    run.add_argument("--guider-scale", type=float, default=1.0, help="strength of the colour guider residuals")
    run.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto")
    run.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="model dtype")
    run.add_argument("--feed-back", action="store_true", help="add each finished page to the pool for later pages")
    run.add_argument("--pool", help="folder that persists the reference pool's embeddings between runs")
    run.add_argument("--encoder", default="release",
                     help="retrieval encoder: 'release' (CLIP ViT-H/14, as upstream) or 'open_clip:MODEL[:WEIGHTS]'")
    run.add_argument("--posterior-mode", action="store_true", help="GSRP decodes the posterior mean, not a sample")
    run.add_argument("--download", action="store_true", help="download missing weights from Hugging Face")
    run.add_argument("--save-intermediates", metavar="DIR", help="write canvas, mask, icp, lowres, final, retrieval.json")
    run.add_argument("pages", nargs="+", help="page images or folders")
    run.set_defaults(func=colorize)

    tiny = commands.add_parser("make-tiny", help="write tiny random weights in the release layout")
    tiny.add_argument("folder", help="writes FOLDER/colorflow and FOLDER/sd15")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=make_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; a ColorFlowError becomes a one-line message and exit code 1."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ColorFlowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
