"""The options `colorize` and `colorize-series` share, and their translation into core calls."""
from __future__ import annotations

import argparse
import sys

from .configured import DTYPES, resolve_device
from .errors import ColorFlowError
from .loading import load_colorflow
from .options import ColorizeOptions
from .presets import PRESET_NAMES, get_preset
from .retrieval import OpenClipEncoder
from .runtime import default_dtype
from .styles import PREPROCESS_METHODS, STYLE_NAMES
from .weights import COLORFLOW_REPO, SD15_REPO


def add_colorize_options(parser: argparse.ArgumentParser) -> None:
    """The options `colorize` and `colorize-series` share: weights, references, pool and every ColorizeOptions field."""
    parser.add_argument("--colorflow", default=COLORFLOW_REPO, help="ColorFlow release folder or Hugging Face repo id")
    parser.add_argument("--base", help=f"style gray: SD1.5 diffusers folder, repo id, or a single-file checkpoint (.safetensors), "
                        f"default {SD15_REPO}; styles sketch/sketch_shading: PixArt-XL-2-1024-MS diffusers folder or repo id")
    parser.add_argument("--refs", nargs="+", required=True, help="reference images or folders")
    parser.add_argument("--style", default="gray", choices=STYLE_NAMES,
                        help="input style: gray (SD1.5) or sketch / sketch_shading (line art, PixArt-α)")
    parser.add_argument("--preprocess", default=None, choices=PREPROCESS_METHODS,
                        help="page preprocessing (default: the style's: gray → screen, sketch → sketch, …)")
    parser.add_argument("--screen-deterministic", action="store_true",
                        help="ScreenStyle without its dropout and noise (otherwise they are seeded by --seed)")
    parser.add_argument("--width", type=int, help="query width (multiple of 32)")
    parser.add_argument("--height", type=int, help="query height (multiple of 32)")
    parser.add_argument("--size", choices=["auto"], help="pick 640x640, 512x800 or 800x512 by each page's aspect (default)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same meaning as upstream's)")
    parser.add_argument("--guidance", type=float, help="CFG scale (default: the style's, 7.5 gray / 4.5 sketch); 1.0 = no CFG (twice as fast)")
    parser.add_argument("--guider-scale", type=float, default=1.0, help="strength of the colour guider residuals")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto")
    parser.add_argument("--dtype", default=None, choices=list(DTYPES),
                        help="weight dtype (default: float16 on CUDA, as upstream; float32 on the CPU)")
    parser.add_argument("--preset", default="faithful", choices=list(PRESET_NAMES),
                        help="faithful: upstream numerics (default); fast: no CFG, LoRA merged, half precision, each canvas half "
                             "encoded once; low-vram: one model on the GPU at a time, half precision, tiled decode; "
                             "auto: picks faithful or low-vram from the free memory. --guidance overrides fast's 1.0")
    parser.add_argument("--feed-back", action="store_true",
                        help="each finished page joins the references for later pages (in memory: --pool is not changed)")
    parser.add_argument("--pool", help="folder that persists the reference pool's embeddings between runs")
    parser.add_argument("--encoder", default="release",
                        help="retrieval encoder: 'release' (CLIP ViT-H/14, as upstream) or 'open_clip:MODEL[:WEIGHTS]'")
    parser.add_argument("--posterior-mode", action="store_true", help="GSRP decodes the posterior mean, not a sample")
    parser.add_argument("--download", action="store_true", help="download missing weights from Hugging Face")


def requested_size(args: argparse.Namespace) -> tuple[int, int] | None:
    """--width/--height as (W, H), or None for each page's auto size."""
    if args.size is not None and (args.width is not None or args.height is not None):
        raise ColorFlowError(f"give either --width/--height or --size {args.size}, not both")
    if (args.width is None) != (args.height is None):
        raise ColorFlowError("--width and --height go together")
    if args.width is None:
        return None
    for flag, value in (("--width", args.width), ("--height", args.height)):
        if value <= 0 or value % 32:
            raise ColorFlowError(f"{flag} must be a positive multiple of 32, got {value}")
    return args.width, args.height


def make_encoder(spec: str, model):
    """'release' → the release's CLIP ViT-H/14; 'open_clip:MODEL[:WEIGHTS_FILE_OR_TAG]' → an open_clip model."""
    if spec == "release":
        return model.encoder
    kind, _, rest = spec.partition(":")
    if kind != "open_clip" or not rest:
        raise ColorFlowError(f"unknown encoder '{spec}' (use 'release' or 'open_clip:MODEL[:WEIGHTS]')")
    name, _, weights = rest.partition(":")
    return OpenClipEncoder(name, weights or None, device=model.device)


def colorize_options(args: argparse.Namespace) -> ColorizeOptions:
    """The ColorizeOptions the shared colorize options ask for."""
    return ColorizeOptions(
        size=requested_size(args), steps=args.steps, seed=args.seed, guidance_scale=args.guidance, guider_scale=args.guider_scale,
        preprocess=args.preprocess, sample_posterior=not args.posterior_mode, screen_deterministic=args.screen_deterministic,
    )


def load_model(args: argparse.Namespace):
    """The model the shared colorize options name."""
    arguments = model_arguments(args)
    print(f"loading models (preset {args.preset}, {arguments['dtype']} on {arguments['device']})…",
          file=sys.stderr, flush=True)
    return load_colorflow(**arguments)


def model_arguments(args: argparse.Namespace) -> dict:
    """`load_colorflow`'s arguments from the shared options (plain data: a worker process loads its own copy); the
    device resolved and the dtype the library picks for it when none is given."""
    device = resolve_device(args.device)
    dtype = args.dtype or str(default_dtype(device, get_preset(args.preset))).removeprefix("torch.")
    return dict(colorflow=args.colorflow, base=args.base, style=args.style, device=str(device), dtype=dtype,
                allow_download=args.download, preset=args.preset)
