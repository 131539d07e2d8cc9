"""Command line: `colorize` pages against references, `make-tiny` test weights."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .configured import resolve_device
from .demo import register as register_demo
from .errors import ColorFlowError
from .evaluation.cli import register as register_evaluation
from .imaging import auto_size, check_query_size, list_images, load_image, process_image
from .preprocessors import NEEDS, RELEASE_FILES, Preprocessors, preprocess_image
from .retrieval import ReferencePool
from .retrieval.store import write_json, write_png
from .compiling import compile_models
from .sequence import colorize_pages
from .cli_options import add_colorize_options, colorize_options, load_model, make_encoder, requested_size
from .series_cli import register as register_series
from .styles import PREPROCESS_METHODS, STYLE_NAMES, get_style
from .timing import ProgressMeter, announce_estimate
from .tiny import write_tiny_release
from .tiny_comfyui import write_comfyui_tree
from .training.cli import register as register_training
from .validation import check_writable_folder
from .weights import COLORFLOW_REPO, resolve_snapshot


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


def _references(items: list[str]) -> list[str]:
    """The --refs items, each an existing file or folder (checked before any model is loaded)."""
    for item in items:
        if not Path(item).exists():
            raise ColorFlowError(f"reference not found: {item}")
    return items


def _destinations(args: argparse.Namespace) -> Path:
    """The output folder; it, the intermediates folder and a pool that pages will be added to are checked writable
    before any work, so that no finished page is lost to a destination failing later."""
    out = check_writable_folder(args.out, "--out")
    if args.save_intermediates:
        check_writable_folder(args.save_intermediates, "--save-intermediates")
    if args.pool and Path(args.pool).is_file():
        raise ColorFlowError(f"--pool '{args.pool}' is a file, not a folder")
    if args.pool and (args.feed_back_into_pool or not Path(args.pool).exists()):
        check_writable_folder(args.pool, "--pool (new references and --feed-back-into-pool pages are added to it)")
    return out


def save_intermediates(folder: Path, result) -> None:
    """canvas, mask, icp, lowres, final and retrieval.json of one page under `folder/<page stem>/`."""
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


def colorize(args: argparse.Namespace) -> int:
    """Run the whole pipeline over the given pages; write `<out>/<page stem>.png`."""
    pages = _pages(args.pages)
    refs = _references(args.refs)
    if args.page_batch < 1:
        raise ColorFlowError("--page-batch must be at least 1")
    options = colorize_options(args)
    out = None if args.estimate else _destinations(args)  # --estimate writes nothing
    model = load_model(args)
    if args.compile:
        compile_models(model.run_modules()["denoiser"])
        print("torch.compile: the first page compiles the denoiser blocks (slow), later pages reuse them",
              file=sys.stderr, flush=True)
    announce_estimate(model, options, len(pages), args.feed_back or args.feed_back_into_pool)
    if args.estimate:
        return 0
    pool = ReferencePool(make_encoder(args.encoder, model), store=args.pool)
    added = pool.add(refs)
    print(f"{len(pool)} references in the pool ({added} new)", file=sys.stderr, flush=True)
    results = colorize_pages(
        model, pages, pool, options, feed_back=args.feed_back or args.feed_back_into_pool,
        feed_back_into_pool=args.feed_back_into_pool, progress=ProgressMeter(len(pages)), page_batch=args.page_batch,
    )
    for result in results:
        write_png(out / f"{result.name}.png", result.final)
        if args.save_intermediates:
            save_intermediates(Path(args.save_intermediates), result)
    return 0


def preprocess(args: argparse.Namespace) -> int:
    """Write each page's preprocessed input context and guide: `<out>/<stem>_context.png`, `<stem>_guide.png`."""
    pages = _pages(args.pages)
    out = check_writable_folder(args.out, "--out")
    method = args.preprocess or get_style(args.style).preprocess
    size, native = requested_size(args), args.size == "native"
    if size is not None:
        check_query_size(*size)
    needs, root = NEEDS.get(method), None
    if needs == "screen_style" or (needs == "line_extractor" and args.erika is None):
        root = resolve_snapshot(args.colorflow, RELEASE_FILES[needs], args.download, "the ColorFlow release")
    preprocessors = Preprocessors(root, erika=args.erika, device=resolve_device(args.device))
    out = Path(args.out)
    for index, path in enumerate(pages):
        image = load_image(path)
        if not native:
            width, height = size or auto_size(image)
            image = process_image(image, int(1.5 * width), int(1.5 * height))
        context, guide = preprocess_image(image, method, preprocessors, seed=args.seed, deterministic=args.deterministic)
        write_png(out / f"{path.stem}_context.png", context)
        write_png(out / f"{path.stem}_guide.png", guide)
        print(f"page {index + 1}/{len(pages)} done", file=sys.stderr, flush=True)
    return 0


def make_tiny(args: argparse.Namespace) -> int:
    """Write tiny random weights in the release layout (or, with --comfyui, a ComfyUI models/ tree)."""
    if args.comfyui:
        print(json.dumps({name: str(path) for name, path in write_comfyui_tree(Path(args.folder), seed=args.seed).items()}))
        return 0
    release, base = write_tiny_release(Path(args.folder), seed=args.seed)
    print(json.dumps({"colorflow": str(release), "base": str(base), "pixart": str(Path(args.folder) / "pixart")}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `python -m colorflow_core` argument parser."""
    parser = argparse.ArgumentParser(prog="python -m colorflow_core", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("colorize", help="colorize pages with coloured references")
    add_colorize_options(run)
    run.add_argument("--out", required=True, help="output folder (gets <page stem>.png)")
    run.add_argument("--page-batch", type=int, default=1,
                     help="denoise this many same-size pages as one batch (SD styles; more memory, same result; "
                          "ignored with --feed-back)")
    run.add_argument("--compile", action="store_true",
                     help="torch.compile the guider/UNet blocks (first page pays the compilation, minutes on a CPU)")
    run.add_argument("--feed-back-into-pool", action="store_true",
                     help="--feed-back, and the finished pages are added to --pool's store for good")
    run.add_argument("--save-intermediates", metavar="DIR", help="write canvas, mask, icp, lowres, final, retrieval.json")
    run.add_argument("--estimate", action="store_true", help="load the models, print the time estimate and stop")
    run.add_argument("pages", nargs="+", help="page images or folders")
    run.set_defaults(func=colorize)

    prep = commands.add_parser("preprocess", help="write the preprocessed input (context and guide) of pages")
    prep.add_argument("--style", default="gray", choices=STYLE_NAMES,
                      help="input style; picks the method: gray → screen, sketch → sketch, sketch_shading → sketch_shading")
    prep.add_argument("--preprocess", choices=PREPROCESS_METHODS,
                      help="override the style's method")
    prep.add_argument("--colorflow", default=COLORFLOW_REPO, help="ColorFlow release folder or Hugging Face repo id")
    prep.add_argument("--erika", help="line extractor weights (erika.pth, or a folder holding it); default <colorflow>/LE/erika.pth")
    prep.add_argument("--out", required=True, help="output folder (gets <stem>_context.png and <stem>_guide.png)")
    prep.add_argument("--width", type=int, help="query width (multiple of 32); the output is 1.5× it")
    prep.add_argument("--height", type=int, help="query height (multiple of 32); the output is 1.5× it")
    prep.add_argument("--size", choices=["auto", "native"],
                      help="auto (default): 1.5× the preset closest to each page's aspect; native: the page's own size")
    prep.add_argument("--seed", type=int, default=0, help="seed of the ScreenStyle decoder's dropout and noise")
    prep.add_argument("--deterministic", action="store_true", help="ScreenStyle without dropout and noise")
    prep.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto")
    prep.add_argument("--download", action="store_true", help="download missing weights from Hugging Face")
    prep.add_argument("pages", nargs="+", help="page images or folders")
    prep.set_defaults(func=preprocess)

    tiny = commands.add_parser("make-tiny", help="write tiny random weights in the release layout")
    tiny.add_argument("folder", help="writes FOLDER/colorflow, FOLDER/sd15 and FOLDER/pixart")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument(
        "--comfyui", action="store_true",
        help="write FOLDER/models/ for a real ComfyUI server instead: a shallow SD1.5-width checkpoint, a ControlNet, "
        "the release and the diffusers bases, under the names the shipped workflows use",
    )
    tiny.set_defaults(func=make_tiny)

    register_evaluation(commands)  # evaluate, bench, make-chapter
    register_series(commands, add_colorize_options)  # colorize-series
    register_training(commands)  # prepare-training, train, bench-train
    register_demo(commands)  # demo
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; a ColorFlowError (or a file system error) becomes a one-line message and exit code 1."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ColorFlowError, OSError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
