"""Command line: `colorize` pages against references, `make-tiny` test weights."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import ColorFlowError
from .imaging import list_images
from .presets import PRESET_NAMES
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


#: Upstream's page preprocessing per style (Sketch_Shading's shading is part of its own method).
STYLE_PREPROCESS = {"gray": "screen", "sketch": "sketch", "sketch_shading": "sketch_shading"}


def style_settings(style: str, preprocess: str | None, guidance: float | None) -> tuple[str, float]:
    """(preprocessing method, CFG scale): the user's choices, else the style's upstream defaults."""
    from .loading import STYLE_GUIDANCE
    from .options import PREPROCESSORS

    if style not in STYLE_GUIDANCE:
        raise ColorFlowError(f"style '{style}' is not available (choose {', '.join(STYLE_GUIDANCE)})")
    guidance = STYLE_GUIDANCE[style] if guidance is None else guidance
    if preprocess is None:
        preprocess = STYLE_PREPROCESS[style]
        if preprocess not in PREPROCESSORS:
            raise ColorFlowError(
                f"style '{style}' is preprocessed with the '{preprocess}' line extractor, which this installation does "
                "not provide; pass --preprocess none (page used as it is) or --preprocess gray"
            )
    return preprocess, guidance


def colorize(args: argparse.Namespace) -> int:
    """Run the whole pipeline over the given pages; write `<out>/<page stem>.png`."""
    from .loading import load_colorflow, resolve_device
    from .options import ColorizeOptions
    from .presets import get_preset
    from .runtime import default_dtype
    from .retrieval import ReferencePool
    from .retrieval.store import write_png
    from .sequence import colorize_pages

    pages = _pages(args.pages)
    preprocess, guidance = style_settings(args.style, args.preprocess, args.guidance)
    preset = get_preset(args.preset)
    if args.guidance is not None and preset.guidance_scale is not None:
        preset = preset.replace(guidance_scale=None)  # an explicit --guidance wins over the preset's
    if args.page_batch < 1:
        raise ColorFlowError("--page-batch must be at least 1")
    options = ColorizeOptions(
        size=_size(args), steps=args.steps, seed=args.seed, guidance_scale=guidance,
        guider_scale=args.guider_scale, preprocess=preprocess, sample_posterior=not args.posterior_mode,
        screen_deterministic=args.screen_deterministic,
    )
    device = resolve_device(args.device)
    dtype = args.dtype or str(default_dtype(device, preset)).removeprefix("torch.")
    print(f"loading models (preset {preset.name}, {dtype} on {device})…", file=sys.stderr, flush=True)
    model = load_colorflow(
        args.colorflow, args.base, style=args.style, device=device, dtype=dtype, allow_download=args.download,
        preset=preset,
    )
    if args.compile:
        from .runtime import compile_models

        compile_models(model.run_modules()["denoiser"])
        print("torch.compile: the first page compiles the denoiser blocks (slow), later pages reuse them",
              file=sys.stderr, flush=True)
    pool = ReferencePool(_encoder(args.encoder, model), store=args.pool)
    added = pool.add(args.refs)
    print(f"{len(pool)} references in the pool ({added} new)", file=sys.stderr, flush=True)
    out = Path(args.out)
    results = colorize_pages(model, pages, pool, options, feed_back=args.feed_back, progress=_stderr_progress,
                             page_batch=args.page_batch)
    for result in results:
        write_png(out / f"{result.name}.png", result.final)
        if args.save_intermediates:
            save_intermediates(Path(args.save_intermediates), result)
    return 0


def preprocess(args: argparse.Namespace) -> int:
    """Write each page's preprocessed input context and guide: `<out>/<stem>_context.png`, `<stem>_guide.png`."""
    from .imaging import auto_size, check_query_size, load_image, process_image
    from .loading import resolve_device
    from .preprocessors import NEEDS, RELEASE_FILES, STYLE_METHODS, Preprocessors, preprocess_image
    from .retrieval.store import write_png
    from .weights import resolve_snapshot

    pages = _pages(args.pages)
    method = args.preprocess or STYLE_METHODS[args.style]
    size, native = _size(args), args.size == "native"
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
    """Write tiny random weights in the release layout."""
    from .tiny import write_tiny_release

    release, base = write_tiny_release(Path(args.folder), seed=args.seed)
    print(json.dumps({"colorflow": str(release), "base": str(base), "pixart": str(Path(args.folder) / "pixart")}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `python -m colorflow_core` argument parser."""
    parser = argparse.ArgumentParser(prog="python -m colorflow_core", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("colorize", help="colorize pages with coloured references")
    run.add_argument("--colorflow", default=COLORFLOW_REPO, help="ColorFlow release folder or Hugging Face repo id")
    run.add_argument("--base", help=f"style gray: SD1.5 diffusers folder, repo id, or a single-file checkpoint (.safetensors), "
                     f"default {SD15_REPO}; styles sketch/sketch_shading: PixArt-XL-2-1024-MS diffusers folder or repo id")
    run.add_argument("--refs", nargs="+", required=True, help="reference images or folders")
    run.add_argument("--out", required=True, help="output folder (gets <page stem>.png)")
    run.add_argument("--style", default="gray", choices=["gray", "sketch", "sketch_shading"],
                     help="input style: gray (SD1.5) or sketch / sketch_shading (line art, PixArt-α)")
    run.add_argument("--preprocess", default=None, choices=["screen", "gray", "none", "sketch", "sketch_shading"],
                     help="page preprocessing (default: the style's: gray → screen, sketch → sketch, …)")
    run.add_argument("--screen-deterministic", action="store_true",
                     help="ScreenStyle without its dropout and noise (otherwise they are seeded by --seed)")
    run.add_argument("--width", type=int, help="query width (multiple of 32)")
    run.add_argument("--height", type=int, help="query height (multiple of 32)")
    run.add_argument("--size", choices=["auto"], help="pick 640x640, 512x800 or 800x512 by each page's aspect (default)")
    run.add_argument("--steps", type=int, default=10, help="denoising steps")
    run.add_argument("--seed", type=int, default=0, help="random seed (same meaning as upstream's)")
    run.add_argument("--guidance", type=float, help="CFG scale (default: the style's, 7.5 gray / 4.5 sketch); 1.0 = no CFG (twice as fast)")
    run.add_argument("--guider-scale", type=float, default=1.0, help="strength of the colour guider residuals")
    run.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto")
    run.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                     help="weight dtype (default: float16 on CUDA, as upstream; float32 on the CPU)")
    run.add_argument("--preset", default="faithful", choices=list(PRESET_NAMES),
                     help="faithful: upstream numerics (default); fast: no CFG, LoRA merged, half precision, each canvas half "
                          "encoded once; low-vram: one model on the GPU at a time, half precision, tiled decode; "
                          "auto: picks faithful or low-vram from the free memory. --guidance overrides fast's 1.0")
    run.add_argument("--page-batch", type=int, default=1,
                     help="denoise this many same-size pages as one batch (SD styles; more memory, same result; "
                          "ignored with --feed-back)")
    run.add_argument("--compile", action="store_true",
                     help="torch.compile the guider/UNet blocks (first page pays the compilation, minutes on a CPU)")
    run.add_argument("--feed-back", action="store_true", help="add each finished page to the pool for later pages")
    run.add_argument("--pool", help="folder that persists the reference pool's embeddings between runs")
    run.add_argument("--encoder", default="release",
                     help="retrieval encoder: 'release' (CLIP ViT-H/14, as upstream) or 'open_clip:MODEL[:WEIGHTS]'")
    run.add_argument("--posterior-mode", action="store_true", help="GSRP decodes the posterior mean, not a sample")
    run.add_argument("--download", action="store_true", help="download missing weights from Hugging Face")
    run.add_argument("--save-intermediates", metavar="DIR", help="write canvas, mask, icp, lowres, final, retrieval.json")
    run.add_argument("pages", nargs="+", help="page images or folders")
    run.set_defaults(func=colorize)

    prep = commands.add_parser("preprocess", help="write the preprocessed input (context and guide) of pages")
    prep.add_argument("--style", default="gray", choices=["gray", "sketch", "sketch_shading"],
                      help="input style; picks the method: gray → screen, sketch → sketch, sketch_shading → sketch_shading")
    prep.add_argument("--preprocess", choices=["screen", "gray", "none", "sketch", "sketch_shading"],
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
    tiny.set_defaults(func=make_tiny)

    from .evaluation.cli import register as register_evaluation  # evaluate, bench, make-chapter

    register_evaluation(commands)
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
