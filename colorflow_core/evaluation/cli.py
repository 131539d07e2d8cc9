"""`evaluate`, `bench` and `make-chapter` subcommands (registered by colorflow_core.cli)."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from ..configured import resolve_device
from ..errors import InvalidInputError
from ..presets import FAITHFUL
from ..runtime import default_dtype
from ..retrieval import OpenClipEncoder, ReleaseClipEncoder
from . import bench as B
from . import metrics as M
from .eager_parity import eager_parity
from .report import contact_sheet, evaluate_pages, format_table, load_folders, sheet_rows
from .synthetic import make_chapter as build_chapter
from .synthetic import write_chapter


def _ints(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from exc


def clip_encoder(spec: str, device: str = "cpu"):
    """'release:FOLDER' (a CLIPVisionModelWithProjection folder, e.g. the release's image_encoder/) or
    'open_clip:MODEL[:WEIGHTS_FILE_OR_CACHED_TAG]'."""
    kind, _, rest = spec.partition(":")
    if kind == "release" and rest:
        return ReleaseClipEncoder.from_pretrained(rest, device=device)
    if kind == "open_clip" and rest:
        name, _, weights = rest.partition(":")
        return OpenClipEncoder(name, weights or None, device=device)
    raise InvalidInputError(f"unknown CLIP model '{spec}' (use 'release:FOLDER' or 'open_clip:MODEL[:WEIGHTS]')")


def evaluate(args: argparse.Namespace) -> int:
    """Metrics of --pred against --gt (+ consistency with --labels): table, metrics.json, contact_sheet.png."""
    pred, gt = Path(args.pred), Path(args.gt)
    labels = Path(args.labels) if args.labels else None
    names, preds, gts, label_maps, table = load_folders(pred, gt, labels)
    skipped: dict[str, str] = {}
    extractor = None
    if args.no_fid:
        skipped["fid"] = "--no-fid"
    else:
        if args.fid_weights or M.find_inception_weights() is not None:
            extractor = M.load_inception(args.fid_weights, device=args.device)
        else:
            skipped["fid"] = "no Inception-v3 weights found in torch's hub cache; pass --fid-weights FILE"
    clip = clip_encoder(args.clip, args.device) if args.clip else None
    aesthetic = None
    if args.aesthetic:
        aesthetic = (clip_encoder(args.aesthetic_clip, args.device), M.load_aesthetic_head(args.aesthetic))
    report = evaluate_pages(names, preds, gts, labels=label_maps, table=table, fid_extractor=extractor, clip_encoder=clip,
                            aesthetic=aesthetic, min_pixels=args.min_pixels, erode=args.erode, skipped=skipped)
    out = Path(args.out) if args.out else pred.parent / f"{pred.name}_eval"
    out.mkdir(parents=True, exist_ok=True)
    report["inputs"] = {"pred": str(pred), "gt": str(gt), "labels": str(labels) if labels else None}
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    rows = sheet_rows(names, preds, gts, Path(args.inputs) if args.inputs else None,
                      Path(args.intermediates) if args.intermediates else None)
    contact_sheet(rows, height=args.sheet_height).save(out / "contact_sheet.png")
    print(format_table(report))
    print(f"wrote {out / 'metrics.json'} and {out / 'contact_sheet.png'}", file=sys.stderr)
    return 0


def bench(args: argparse.Namespace) -> int:
    """Per-stage timing/memory of one page, exact retrieval over large pools, embedding-cache check."""
    result: dict = {"machine": B.machine_info(args.device)}
    if args.dtype is None:
        args.dtype = str(default_dtype(resolve_device(args.device), FAITHFUL)).removeprefix("torch.")
    config = B.PipelineBench(
        width=args.width, height=args.height, style=args.style, input_style=args.input_style, preprocess=args.preprocess,
        dtype=args.dtype, device=args.device, steps=args.steps, guidance=args.guidance, guider_scale=args.guider_scale,
        repeats=args.repeats, warmup=args.warmup, references=args.references, seed=args.seed,
        colorflow=args.colorflow, base=args.base, weights="release" if args.colorflow else args.weights,
        compile=args.compile,
    )
    if bool(args.colorflow) != bool(args.base):
        raise InvalidInputError("--colorflow and --base go together (leave both out for tiny random weights)")
    if args.colorflow and args.weights != "tiny":
        raise InvalidInputError("--weights picks random weights; leave it out with --colorflow/--base")
    specs = list(dict.fromkeys(args.presets or []))
    for spec in specs:
        B.parse_preset_spec(spec)  # fail before loading anything
    with tempfile.TemporaryDirectory(prefix="colorflow-bench-") as tmp:
        if not args.skip_pipeline:
            if specs and args.isolate:
                result["presets"] = B.run_preset_bench(config, Path(tmp), None, specs, isolate=True)
            else:
                loaded = B.load_model(config, Path(tmp))
                if specs:
                    result["presets"] = B.run_preset_bench(config, Path(tmp), loaded, specs)
                else:
                    result["pipeline"] = B.run_pipeline_bench(config, Path(tmp), loaded)
                result["embedding_cache"] = _cache_check(config, loaded[0].encoder, Path(tmp))
                if args.eager_parity:
                    result["eager_parity"] = eager_parity(loaded[0], *B.bench_inputs(config))
    if args.pool_sizes:
        result["retrieval"] = B.run_retrieval_bench(args.pool_sizes, dim=args.dim, batches=args.query_batches,
                                                    repeats=args.search_repeats, seed=args.seed,
                                                    faiss_threads=args.faiss_threads)
    text = B.format_bench(result)
    if args.json == "-":
        print(text, file=sys.stderr)
        print(json.dumps(result, indent=2))
    else:
        print(text)
        if args.json:
            B.write_json(Path(args.json), result)
            print(f"wrote {args.json}", file=sys.stderr)
    return 0


def _cache_check(config, encoder, workdir: Path) -> dict:
    chapter = build_chapter(config.seed, n_references=config.references, n_pages=1, size=(256, 384))
    return B.embedding_cache_check(encoder, [p.color for p in chapter.references], chapter.pages[0].input("screentone"),
                                   (config.width, config.height), workdir / "pool-store")


def make_chapter(args: argparse.Namespace) -> int:
    """Write a synthetic chapter (references, ground truth, labels, B/W inputs in three styles)."""
    chapter = build_chapter(args.seed, n_references=args.references, n_pages=args.pages, n_characters=args.characters,
                    size=(args.width, args.height))
    folder = write_chapter(chapter, Path(args.folder))
    print(json.dumps({"chapter": str(folder), "references": len(chapter.references), "pages": len(chapter.pages)}))
    return 0


def register(commands) -> None:
    """Add the evaluation subcommands to the `python -m colorflow_core` subparsers."""
    ev = commands.add_parser("evaluate", help="PSNR/SSIM/FID/CLIP-IS/aesthetic and colour consistency of colourised pages")
    ev.add_argument("--pred", required=True, help="folder of colourised pages")
    ev.add_argument("--gt", required=True, help="folder of ground-truth colour pages (matched by file stem)")
    ev.add_argument("--labels", help="folder of label maps (uint8 PNG per page, + labels.json) for colour consistency")
    ev.add_argument("--inputs", help="folder of the black-and-white inputs (contact sheet)")
    ev.add_argument("--intermediates", help="colorize --save-intermediates folder (canvas in the contact sheet)")
    ev.add_argument("--out", help="output folder for metrics.json and contact_sheet.png (default: <pred>_eval)")
    ev.add_argument("--fid-weights", help="local Inception-v3 weights (default: torch hub cache; never downloaded)")
    ev.add_argument("--no-fid", action="store_true", help="skip FID")
    ev.add_argument("--clip", help="CLIP for CLIP-IS: 'release:FOLDER' or 'open_clip:MODEL[:WEIGHTS]'")
    ev.add_argument("--aesthetic", help="LAION aesthetic head file (.pth)")
    ev.add_argument("--aesthetic-clip", default="open_clip:ViT-L-14:openai",
                    help="CLIP the aesthetic head expects (default ViT-L/14 OpenAI, from a local file or the cache)")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--min-pixels", type=int, default=16, help="ignore a part on a page with fewer interior pixels")
    ev.add_argument("--erode", type=int, default=1, help="drop pixels this close to another label (px)")
    ev.add_argument("--sheet-height", type=int, default=256, help="contact-sheet row height (px)")
    ev.set_defaults(func=evaluate)

    be = commands.add_parser("bench", help="per-stage time and peak memory, exact retrieval over large pools, cache check")
    be.add_argument("--colorflow", help="release folder (default: tiny random weights in a temp folder)")
    be.add_argument("--base", help="SD1.5 base folder or single file (with --colorflow)")
    be.add_argument("--width", type=int, default=128)
    be.add_argument("--height", type=int, default=192)
    be.add_argument("--style", default="gray", help="model style (gray; sketch / sketch_shading where installed)")
    be.add_argument("--input-style", default="screentone", choices=["screentone", "lineart", "lineart_shading"],
                    help="synthetic B/W page style")
    be.add_argument("--preprocess", default="gray", help="page preprocessing (default gray: needs no extra weights)")
    be.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                    help="weight dtype (default: the library's, float16 on CUDA and float32 on the CPU)")
    be.add_argument("--device", default="cpu")
    be.add_argument("--steps", type=int, default=4)
    be.add_argument("--guidance", type=float, help="CFG scale (default: the style's upstream value)")
    be.add_argument("--guider-scale", type=float, default=1.0)
    be.add_argument("--repeats", type=int, default=3, help="measured pages (median over them)")
    be.add_argument("--warmup", type=int, default=1, help="unmeasured pages first")
    be.add_argument("--references", type=int, default=3)
    be.add_argument("--seed", type=int, default=0)
    be.add_argument("--skip-pipeline", action="store_true", help="retrieval benchmark only")
    be.add_argument("--weights", default="tiny", choices=["tiny", "random-sd15"],
                    help="without --colorflow: tiny random test weights, or random weights at the real SD1.5 widths "
                         "built in memory (~8 GB RAM in fp32)")
    be.add_argument("--presets", nargs="+", metavar="PRESET",
                    help="run these presets side by side on the same page (faithful, fast, low-vram, auto; fields "
                         "can be changed: fast:compute_dtype=float32); reports time, peak memory and PSNR vs faithful")
    be.add_argument("--compile", action="store_true",
                    help="torch.compile the guider/UNet blocks; the first page's extra time is the compile cost")
    be.add_argument("--eager-parity", action="store_true",
                    help="also compare one page against upstream-style eager kernels (NCHW, torch's GroupNorm and "
                         "SDPA choice) on the same model: PSNR of the final page, ICP canvas and low-res page")
    be.add_argument("--isolate", action="store_true",
                    help="with --presets: each preset in its own fresh process (CPU RSS peaks become comparable; "
                         "the model is loaded once per preset)")
    be.add_argument("--pool-sizes", type=_ints, default=[1_000, 10_000, 100_000],
                    help="comma-separated pool sizes in patch vectors ('' = no retrieval benchmark)")
    be.add_argument("--dim", type=int, default=1024, help="embedding size (CLIP ViT-H/14: 1024)")
    be.add_argument("--query-batches", type=_ints, default=[4, 64], help="query patches per search (4 = one page)")
    be.add_argument("--search-repeats", type=int, default=30)
    be.add_argument("--faiss-threads", type=_ints, help="faiss OpenMP thread counts to compare, e.g. 1,2 (default: as set)")
    be.add_argument("--json", help="write the result as JSON to FILE ('-' = stdout, table to stderr)")
    be.set_defaults(func=bench)

    mc = commands.add_parser("make-chapter", help="write a synthetic chapter with ground truth and label maps")
    mc.add_argument("folder")
    mc.add_argument("--seed", type=int, default=0)
    mc.add_argument("--references", type=int, default=3)
    mc.add_argument("--pages", type=int, default=4)
    mc.add_argument("--characters", type=int, default=3)
    mc.add_argument("--width", type=int, default=512)
    mc.add_argument("--height", type=int, default=768)
    mc.set_defaults(func=make_chapter)
