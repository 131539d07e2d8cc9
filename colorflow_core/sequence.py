"""Colorize a chapter: the one page loop, with optional feed-back of finished pages into the pool."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from PIL import Image

from . import runtime
from .canvas import Canvas, build_canvas
from .errors import InvalidInputError
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


def with_options_preset(model: ColorFlowModel, options: ColorizeOptions) -> ColorFlowModel:
    """`model`, or its view under `options.preset` when that names another preset."""
    if options.preset is None or options.preset == model.preset.name:
        return model
    return model.with_preset(options.preset)


@dataclass
class _Prepared:
    size: tuple[int, int]
    guide: Image.Image
    retrieval: Retrieval
    canvas: Canvas


def _prepare(model: ColorFlowModel, page: Image.Image, pool: ReferencePool, options: ColorizeOptions) -> _Prepared:
    """Preprocessing, retrieval and the stitched canvas of one page."""
    size = options.size or auto_size(page)
    context, guide = prepare_page(
        page, size, options.preprocess or STYLE_METHODS.get(model.style, "screen"),
        preprocessors=model.preprocessors, seed=options.seed, deterministic=options.screen_deterministic,
    )
    query = process_image(context, *size)
    retrieval = pool.search(query, size=size, k=options.top_k)
    canvas = build_canvas(query, retrieval.patches(), retrieval.indices.tolist())
    return _Prepared(size, guide, retrieval, canvas)


def _finish(
    model: ColorFlowModel, name: str, prepared: _Prepared, icp: ICPResult, posterior_generator, options: ColorizeOptions
) -> PageResult:
    final = model.upscaler(
        icp.query,
        prepared.guide,
        generator=posterior_generator,
        sample_posterior=options.sample_posterior,
        batch_stat_norm=options.batch_stat_norm,
    )
    lowres = icp.query.resize(prepared.guide.size)
    return PageResult(name, final, prepared.size, prepared.canvas, prepared.retrieval, icp, lowres)


def colorize_page(
    model: ColorFlowModel,
    page: Image.Image,
    pool: ReferencePool,
    options: ColorizeOptions,
    *,
    name: str = "page",
    step_progress: Callable[[int, int], None] | None = None,
) -> PageResult:
    """Retrieval → canvas → ICP → GSRP for one page (under `options.preset`, else the model's preset)."""
    return colorize_batch(model, [page], pool, options, names=[name], step_progress=step_progress)[0]


def colorize_batch(
    model: ColorFlowModel,
    pages: list[Image.Image],
    pool: ReferencePool,
    options: ColorizeOptions,
    *,
    names: list[str] | None = None,
    step_progress: Callable[[int, int], None] | None = None,
) -> list[PageResult]:
    """Several pages with their denoising in one UNet batch (same-size pages, SD styles); page i's result equals
    `colorize_page` of that page alone up to the rounding of a batched convolution, since each page draws from its
    own generators seeded with `options.seed`. Pipelines without batching (PixArt) take the pages one by one."""
    if not pages:
        raise InvalidInputError("no pages to colorize")
    model = with_options_preset(model, options)
    names = names or [f"page_{i:04d}" for i in range(len(pages))]
    if len(pages) > 1 and not hasattr(model.pipeline, "sample_pages"):
        return [colorize_page(model, page, pool, options, name=n, step_progress=step_progress) for page, n in zip(pages, names)]
    size = options.size or auto_size(pages[0])
    with runtime.activate(model.plan, size=size, guidance=options.guidance_scale, pages=len(pages)):
        prepared = [_prepare(model, page, pool, options) for page in pages]
        if len({p.size for p in prepared}) > 1:
            raise InvalidInputError("pages colourised as one batch must have the same size")
        generators = [make_generators(options.seed, model.device) for _ in pages]
        settings = dict(
            prompt=PROMPT, negative_prompt=NEGATIVE_PROMPT, num_inference_steps=options.steps,
            guidance_scale=options.guidance_scale, guider_scale=options.guider_scale, progress=step_progress,
        )
        if len(pages) == 1:
            (page,), ((latent, posterior),) = prepared, generators
            icps = [model.pipeline(page.canvas.image, page.canvas.mask, generator=latent, posterior_generator=posterior, **settings)]
        else:
            icps = model.pipeline.sample_pages(
                [p.canvas.image for p in prepared], [p.canvas.mask for p in prepared],
                generators=[g[0] for g in generators], posterior_generators=[g[1] for g in generators], **settings,
            )
        return [_finish(model, n, p, icp, g[1], options) for n, p, icp, g in zip(names, prepared, icps, generators)]


def _batches(
    items: list[ImageLike], names: list[str], size: tuple[int, int] | None, limit: int
) -> Iterator[tuple[list[Image.Image], list[str]]]:
    """Consecutive pages of one canvas size (`size`, else each page's auto size), at most `limit` per batch; each
    page is loaded only when its batch is formed."""
    batch: list[Image.Image] = []
    batch_names: list[str] = []
    batch_size = None
    for item, name in zip(items, names):
        image = load_image(item)
        page_size = size or auto_size(image)
        if batch and (page_size != batch_size or len(batch) == limit):
            yield batch, batch_names
            batch, batch_names = [], []
        batch.append(image)
        batch_names.append(name)
        batch_size = page_size
    if batch:
        yield batch, batch_names


def colorize_pages(
    model: ColorFlowModel,
    pages: Iterable[ImageLike],
    pool: ReferencePool,
    options: ColorizeOptions = ColorizeOptions(),
    *,
    feed_back: bool = False,
    progress: ProgressFn | None = None,
    page_batch: int = 1,
) -> Iterator[PageResult]:
    """Colour each page against `pool`, in order; with `feed_back`, each finished page joins the pool.

    `page_batch` > 1 denoises up to that many consecutive pages of the same canvas size as one UNet batch (SD styles;
    more memory, same results; a size change starts a new batch); with `feed_back` pages run one at a time (each
    page may retrieve the ones before it).
    """
    if page_batch < 1:
        raise InvalidInputError("page_batch must be at least 1")
    model = with_options_preset(model, options)  # one view for the chapter (it may keep converted copies)
    pages = list(pages)
    names = [Path(item).stem if isinstance(item, (str, Path)) else f"page_{index:04d}" for index, item in enumerate(pages)]
    step_progress = (lambda done, total: progress("step", done, total)) if progress else None
    done = 0
    for images, batch_names in _batches(pages, names, options.size, 1 if feed_back else page_batch):
        # A batch's steps advance all its pages: reported as that many pages' steps.
        batch_progress = (lambda d, t, k=len(images): step_progress(d * k, t * k)) if progress else None
        results = colorize_batch(model, images, pool, options, names=batch_names, step_progress=batch_progress)
        for result in results:
            done += 1
            if progress is not None:
                progress("page", done, len(pages))
            yield result  # before feed-back: the caller saves the page even if adding it to the pool fails
            if feed_back:
                pool.add([result.final])
