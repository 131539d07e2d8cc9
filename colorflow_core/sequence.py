"""Colorize a chapter: the one page loop, with optional feed-back of finished pages into the pool."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from PIL import Image

from .canvas import Canvas, build_canvas
from .imaging import ImageLike, auto_size, load_image, process_image
from .loading import ColorFlowModel
from .options import NEGATIVE_PROMPT, PROMPT, ColorizeOptions, make_generators
from .pipelines.colorflow_sd import ICPResult
from .preprocess import prepare_page
from .preprocessors import STYLE_METHODS
from .retrieval import ReferencePool, Retrieval

#: progress(stage, done, total): stage is "page" or "step".
ProgressFn = Callable[[str, int, int], None]


@dataclass
class PageResult:
    """One colourised page and what led to it."""

    name: str
    final: Image.Image
    size: tuple[int, int]
    canvas: Canvas
    retrieval: Retrieval
    icp: ICPResult
    lowres: Image.Image
    extras: dict = field(default_factory=dict)


def colorize_page(
    model: ColorFlowModel,
    page: Image.Image,
    pool: ReferencePool,
    options: ColorizeOptions,
    *,
    name: str = "page",
    step_progress: Callable[[int, int], None] | None = None,
) -> PageResult:
    """Retrieval → canvas → ICP → GSRP for one page."""
    size = options.size or auto_size(page)
    context, guide = prepare_page(
        page, size, options.preprocess or STYLE_METHODS.get(model.style, "screen"),
        preprocessors=model.preprocessors, seed=options.seed, deterministic=options.screen_deterministic,
    )
    query = process_image(context, *size)
    retrieval = pool.search(query, size=size, k=options.top_k)
    canvas = build_canvas(query, retrieval.patches(), retrieval.indices.tolist())
    latent_generator, posterior_generator = make_generators(options.seed, model.device)
    icp = model.pipeline(
        canvas.image,
        canvas.mask,
        prompt=PROMPT,
        negative_prompt=NEGATIVE_PROMPT,
        num_inference_steps=options.steps,
        guidance_scale=options.guidance_scale,
        guider_scale=options.guider_scale,
        generator=latent_generator,
        posterior_generator=posterior_generator,
        progress=step_progress,
    )
    final = model.upscaler(
        icp.query,
        guide,
        generator=posterior_generator,
        sample_posterior=options.sample_posterior,
        batch_stat_norm=options.batch_stat_norm,
    )
    lowres = icp.query.resize(guide.size)
    return PageResult(name, final, size, canvas, retrieval, icp, lowres)


def colorize_pages(
    model: ColorFlowModel,
    pages: Iterable[ImageLike],
    pool: ReferencePool,
    options: ColorizeOptions = ColorizeOptions(),
    *,
    feed_back: bool = False,
    progress: ProgressFn | None = None,
) -> Iterator[PageResult]:
    """Colour each page against `pool`, in order; with `feed_back`, each finished page joins the pool."""
    pages = list(pages)
    for index, item in enumerate(pages):
        name = Path(item).stem if isinstance(item, (str, Path)) else f"page_{index:04d}"
        step_progress = (lambda done, total: progress("step", done, total)) if progress else None
        result = colorize_page(model, load_image(item), pool, options, name=name, step_progress=step_progress)
        if feed_back:
            pool.add([result.final])
        if progress is not None:
            progress("page", index + 1, len(pages))
        yield result
