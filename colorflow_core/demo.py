"""`demo`: colour a synthetic chapter end to end and show every stage in one HTML page.

With the released weights on this machine (the Hugging Face cache, or `--colorflow/--base`) it uses them; without,
it makes tiny random weights once (cached) so that every stage runs in about a minute on a CPU. Tiny weights give
noise colours: the demo shows the machinery (retrieval, canvas, feed-back, evaluation), not the model's quality.
"""
from __future__ import annotations

import argparse
import html
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .errors import ColorFlowError, MissingWeightsError
from .evaluation.report import contact_sheet, evaluate_pages, format_table
from .evaluation.synthetic import make_chapter, write_chapter
from .loading import load_colorflow
from .memory import _first
from .options import ColorizeOptions
from .pipelines.t5_prompt import user_cache_dir
from .presets import PRESET_NAMES
from .retrieval import ReferencePool
from .retrieval.store import atomic_write
from .retrieval.store import write_json, write_png
from .sequence import colorize_pages
from .timing import FULL_WIDTH
from .timing import ProgressMeter, announce_estimate
from .tiny import write_tiny_release
from .weights import COLORFLOW_REPO

#: Query size of the tiny demo (the pages are 1.5× it): about a minute for four pages on two CPU cores.
TINY_SIZE = (192, 288)
#: Query size with the real weights on a CPU (`--preset fast` keeps it to a few minutes a page).
CPU_SIZE = (256, 384)
#: Page size of the demo chapter with the real weights on an accelerator (auto picks upstream's 512×800 query).
GPU_PAGE_SIZE = (768, 1200)
SHEET_COLUMNS = ("page", "canvas", "retrieved patches", "result", "ground truth")
INPUT_STYLE = "screentone"  # the chapter's B/W pages for the gray (SD1.5) style
REAL_WEIGHTS_HELP = (
    "Real weights: `./run demo --download` (or `colorflow demo --download`) fetches TencentARC/ColorFlow and "
    "stable-diffusion-v1-5 from Hugging Face into its cache (several GB; a GPU makes the pages quick), or pass "
    "--colorflow DIR --base DIR. See README.md, 'Weights'."
)


def tiny_weights_dir() -> Path:
    """Where the demo keeps its tiny random weights: `<user cache>/tiny-weights` ($COLORFLOW_CACHE to move it)."""
    return user_cache_dir() / "tiny-weights"


def ensure_tiny_weights(folder: Path | None = None) -> tuple[Path, Path]:
    """(release, SD1.5 base) of the cached tiny weights, written once; a half-written copy is never used."""
    folder = Path(folder) if folder is not None else tiny_weights_dir()
    release, base = folder / "colorflow", folder / "sd15"
    if (folder / "complete").is_file():
        return release, base
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=folder.parent))
    try:
        write_tiny_release(staging)
        (staging / "complete").write_text("written by colorflow_core.tiny\n")
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return release, base


def _load(args: argparse.Namespace):
    """(model, note): the weights asked for, else the release in the usual places, else the cached tiny weights."""
    kwargs = dict(device=args.device, dtype=args.dtype, preset=args.preset, allow_download=args.download)
    if args.colorflow or args.base or args.download:  # asked for: its errors are the user's to see

        return load_colorflow(args.colorflow or COLORFLOW_REPO, args.base, **kwargs), None
    if not args.tiny:
        try:
            return load_colorflow(**kwargs), None
        except MissingWeightsError:
            note = "no ColorFlow release and SD1.5 base in the Hugging Face cache"
    else:
        note = "--tiny"
    print(f"{note}: using tiny random weights", file=sys.stderr, flush=True)
    release, base = ensure_tiny_weights()
    return load_colorflow(release, base, **kwargs), note


def is_tiny(model) -> bool:
    """Whether `model` has the test widths of `colorflow_core.tiny` rather than the release's."""
    widths = _first(model.run_modules().get("denoiser", ()), "block_out_channels")
    return bool(widths) and widths[0] < FULL_WIDTH["sd"]


def _query_size(args: argparse.Namespace, tiny: bool, accelerator: bool) -> tuple[int, int] | None:
    if bool(args.width) != bool(args.height):
        raise ColorFlowError("--width and --height go together")
    if args.width:
        return args.width, args.height
    if tiny:
        return TINY_SIZE
    return None if accelerator else CPU_SIZE


def patch_grid(patches: list[list[Image.Image]], cell: tuple[int, int]) -> Image.Image:
    """The retrieved patches as a grid: one row per query quadrant (TL, TR, BL, BR), best match first."""
    cols = max((len(row) for row in patches), default=1)
    grid = Image.new("RGB", (cols * (cell[0] + 2), len(patches) * (cell[1] + 2)), (255, 255, 255))
    for r, row in enumerate(patches):
        for c, patch in enumerate(row):
            grid.paste(patch.convert("RGB").resize(cell, Image.BICUBIC), (c * (cell[0] + 2), r * (cell[1] + 2)))
    return grid


@dataclass
class DemoPage:
    """Relative paths (inside the demo folder) of one page's pictures."""
    name: str
    images: dict[str, str]


def write_index(out: Path, pages: list[DemoPage], table: str, notes: list[str]) -> Path:
    """`out/index.html`: the notes, the contact sheet, every page's five pictures and the metrics table."""
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in SHEET_COLUMNS)
    rows = []
    for page in pages:
        cells = "".join(
            f'<td><a href="{esc(page.images[c])}"><img src="{esc(page.images[c])}" alt="{esc(c)}"></a></td>'
            for c in SHEET_COLUMNS
        )
        rows.append(f"<tr><th>{esc(page.name)}</th>{cells}</tr>")
    body = "\n".join(f"<p class=note>{esc(n)}</p>" for n in notes)
    text = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>ColorFlow demo</title>
<style>body{{font-family:sans-serif;margin:1.5em}} img{{max-height:240px;border:1px solid #ccc}}
.note{{background:#fff6d6;padding:.5em;border-left:4px solid #e0b000}} td,th{{padding:4px;vertical-align:top}}</style>
</head><body>
<h1>ColorFlow demo: a synthetic chapter, coloured with feed-back</h1>
{body}
<h2>Contact sheet</h2>
<p><a href="contact_sheet.png"><img src="contact_sheet.png" alt="contact sheet" style="max-height:none;max-width:100%"></a></p>
<h2>Pages</h2>
<table><tr><th></th>{head}</tr>
{chr(10).join(rows)}
</table>
<h2>Metrics</h2>
<pre>{esc(table)}</pre>
<p>Files: <a href="metrics.json">metrics.json</a>, <a href="chapter/">chapter/</a> (inputs, references, ground truth,
labels), <a href="colored/">colored/</a>, <a href="canvas/">canvas/</a>, <a href="patches/">patches/</a>.</p>
</body></html>
"""

    path = out / "index.html"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def run_demo(args: argparse.Namespace) -> int:
    """Make the chapter, colour it with feed-back, evaluate it, write the contact sheet and index.html."""
    if args.pages < 1 or args.references < 1:
        raise ColorFlowError("--pages and --references must be at least 1")
    out = Path(args.out)
    print("loading models…", file=sys.stderr, flush=True)
    model, fallback = _load(args)
    tiny = is_tiny(model)
    accelerator = model.device.type != "cpu"
    size = _query_size(args, tiny, accelerator)
    # Tiny weights make a random ScreenStyle: the plain gray page keeps the canvas readable.
    options = ColorizeOptions(size=size, steps=args.steps, seed=args.seed, guidance_scale=None,
                              preprocess="gray" if tiny else None)
    page_size = (max(64, size[0] * 3 // 2), max(64, size[1] * 3 // 2)) if size else GPU_PAGE_SIZE
    chapter = make_chapter(args.seed, n_references=args.references, n_pages=args.pages, size=page_size)
    folder = write_chapter(chapter, out / "chapter")
    pool = ReferencePool(model.encoder)
    pool.add(sorted((folder / "references").glob("*.png")))
    announce_estimate(model, options, args.pages, feed_back=True)
    inputs = [folder / "input" / INPUT_STYLE / f"{p.name}.png" for p in chapter.pages]
    results = colorize_pages(model, inputs, pool, options, feed_back=True, progress=ProgressMeter(len(inputs)))
    pages, rows, preds = [], [], []
    for result, page in zip(results, chapter.pages):
        write_png(out / "colored" / f"{result.name}.png", result.final)
        write_png(out / "canvas" / f"{result.name}.png", result.canvas.image)
        patches = patch_grid(result.retrieval.patches(), (96, 96 * page_size[1] // page_size[0]))
        write_png(out / "patches" / f"{result.name}.png", patches)
        images = {
            "page": f"chapter/input/{INPUT_STYLE}/{page.name}.png",
            "canvas": f"canvas/{result.name}.png",
            "retrieved patches": f"patches/{result.name}.png",
            "result": f"colored/{result.name}.png",
            "ground truth": f"chapter/gt/{page.name}.png",
        }
        pages.append(DemoPage(result.name, images))
        rows.append((result.name, [page.input(INPUT_STYLE), result.canvas.image, patches, result.final, page.color]))
        preds.append(result.final)
    report = evaluate_pages([p.name for p in chapter.pages], preds, [p.color for p in chapter.pages],
                            labels=[p.labels for p in chapter.pages], table=chapter.to_json()["labels"],
                            skipped={"fid": "the demo skips FID (needs Inception weights and more pages)"})
    write_json(out / "metrics.json", report)
    write_png(out / "contact_sheet.png", contact_sheet(rows, height=args.sheet_height, columns=SHEET_COLUMNS))
    table = format_table(report)
    notes = _notes(model, tiny, fallback)
    index = write_index(out, pages, table, notes)
    print(table)
    for note in notes:
        print(note, file=sys.stderr)
    print(f"open {index.resolve()} (contact sheet: {(out / 'contact_sheet.png').resolve()})", file=sys.stderr, flush=True)
    return 0


def _notes(model, tiny: bool, fallback: str | None) -> list[str]:
    where = f"weights: {model.snapshot}; device: {model.device}; preset: {model.preset.name}."
    if not tiny:
        return [f"Coloured with the ColorFlow release ({where})"]
    why = f" ({fallback})" if fallback else ""
    return [
        f"These colours are noise: this run used TINY RANDOM WEIGHTS{why}, which exercise every stage (retrieval, "
        f"canvas, ICP, GSRP, feed-back, evaluation) but know nothing about colour. {where}",
        REAL_WEIGHTS_HELP,
    ]


def register(commands) -> None:
    """Add the `demo` subcommand to the `python -m colorflow_core` subparsers."""
    demo = commands.add_parser("demo", help="colour a synthetic chapter end to end (tiny weights if no release is here)")
    demo.add_argument("--out", default="colorflow-demo", help="output folder (default ./colorflow-demo)")
    demo.add_argument("--colorflow", help="ColorFlow release folder or repo id (default: the Hugging Face cache)")
    demo.add_argument("--base", help="SD1.5 base folder, repo id or single-file checkpoint")
    demo.add_argument("--tiny", action="store_true", help="use the tiny random weights even if the release is here")
    demo.add_argument("--download", action="store_true",
                      help="download the release and the SD1.5 base from Hugging Face when missing (several GB)")
    demo.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default: a GPU if there is one)")
    demo.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="weight dtype")
    demo.add_argument("--preset", default="faithful", choices=list(PRESET_NAMES), help="run preset (see colorize)")
    demo.add_argument("--pages", type=int, default=4, help="query pages in the chapter")
    demo.add_argument("--references", type=int, default=3, help="coloured reference pages")
    demo.add_argument("--width", type=int, help=f"query width (default {TINY_SIZE[0]} tiny, {CPU_SIZE[0]} real on a CPU, "
                                                "auto on a GPU)")
    demo.add_argument("--height", type=int, help="query height (multiple of 32)")
    demo.add_argument("--steps", type=int, default=10, help="denoising steps")
    demo.add_argument("--seed", type=int, default=0, help="chapter and sampling seed")
    demo.add_argument("--sheet-height", type=int, default=200, help="contact-sheet row height (px)")
    demo.set_defaults(func=run_demo)
