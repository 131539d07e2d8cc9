"""The page loop: retrieval → canvas → ICP → GSRP for each page, with optional feed-back of finished pages.

Every front end runs pages through these functions: the CLI and the chapter node through `colorize_pages`, the
staged nodes through `prepare_canvas`, `sample_canvases` and `upscale_page`. Options are resolved once per page
batch (`settings.resolve`), and what a call computes is passed to the samplers explicitly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from PIL import Image

from .canvas import Canvas, build_canvas
from .errors import InvalidInputError
from .imaging import ImageLike, load_image, process_image
from .model import ColorFlowModel
from .observe import NO_OBSERVER, PageObserver
from .options import ColorizeOptions, gsrp_generator, make_generators
from .pipelines.condition import ICPResult
from .preprocess import prepare_page
from .preprocessors import NEEDS, Preprocessors
from .retrieval import ReferencePool, Retrieval
from .settings import PageSettings, page_size, resolve

#: progress(stage, done, total): stage is "page" or "step".
ProgressFn = Callable[[str, int, int], None]
StepProgress = Callable[[int, int], None]


@dataclass
class PreparedPage:
    """A page ready to sample: its canvas and mask, the retrieval behind it, and the GSRP guide."""

    size: tuple[int, int]
    guide: Image.Image
    retrieval: Retrieval
    canvas: Canvas


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


def page_preprocessors(method: str, model: ColorFlowModel | None) -> Preprocessors | None:
    """The networks `method` needs (the model's release's), None when it needs none; an error when there is no model."""
    if method not in NEEDS:
        return None
    if model is None:
        raise InvalidInputError(
            f"preprocess '{method}' runs the preprocessing networks of the model's release: it needs the ColorFlow model (connect or pass it)"
        )
    return model.preprocessors


def prepare_canvas(
    page: Image.Image,
    pool: ReferencePool,
    options: ColorizeOptions,
    model: ColorFlowModel | None = None,
    *,
    observer: PageObserver = NO_OBSERVER,
    search_progress: StepProgress | None = None,
) -> PreparedPage:
    """Preprocessing, retrieval and the stitched canvas of one page (everything before sampling), with `options`'
    size and preparation; `model` gives the preprocessing networks and the style's preparation when the options name
    none (a model is needed only then, or for the methods that run networks)."""
    if options.preprocess is None and model is None:
        raise InvalidInputError("preprocess 'style default' follows the model's style: it needs the ColorFlow model (connect or pass it)")
    method = options.preprocess or model.defaults.preprocess
    return _stitch(
        page, pool, page_size(options, page), method, page_preprocessors(method, model), options.seed,
        options.screen_deterministic, options.top_k, observer, search_progress,
    )


def _stitch(
    page: Image.Image, pool: ReferencePool, size: tuple[int, int], preprocess: str, preprocessors: Preprocessors | None,
    seed: int, deterministic: bool, top_k: int, observer: PageObserver, search_progress: StepProgress | None = None,
) -> PreparedPage:
    with observer.stage("preprocess"):
        context, guide = prepare_page(
            page, size, preprocess, preprocessors=preprocessors, seed=seed, deterministic=deterministic
        )
        query = process_image(context, *size)
    with observer.stage("retrieval"):
        retrieval = pool.search(query, size=size, k=top_k, progress=search_progress)
    with observer.stage("canvas"):
        canvas = build_canvas(query, retrieval.patches(), retrieval.indices.tolist())
    return PreparedPage(size, guide, retrieval, canvas)


def _prepare(model: ColorFlowModel, page: Image.Image, pool: ReferencePool, settings: PageSettings,
             observer: PageObserver) -> PreparedPage:
    return _stitch(
        page, pool, settings.size, settings.preprocess, page_preprocessors(settings.preprocess, model), settings.seed,
        settings.screen_deterministic, settings.top_k, observer,
    )


def sample_canvases(
    model: ColorFlowModel,
    canvases: list[Image.Image],
    masks: list[Image.Image],
    settings: PageSettings,
    *,
    observer: PageObserver = NO_OBSERVER,
    progress: StepProgress | None = None,
) -> list[ICPResult]:
    """ICP over same-size canvases with the resolved settings; each page draws from its own generators seeded with
    `settings.seed`, so a page sampled alone comes out the same as in a batch. The results carry the posterior
    generator's state for GSRP."""
    generators = [make_generators(settings.seed, model.device) for _ in canvases]
    return model.pipeline.sample_pages(
        canvases, masks, generators=[g[0] for g in generators], posterior_generators=[g[1] for g in generators],
        num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale, guider_scale=settings.guider_scale,
        encode_once=settings.encode_once, tile_decode=settings.tile_decode, run=model.execution(settings.preset),
        observer=observer, progress=progress,
    )


def upscale_page(
    model: ColorFlowModel, icp: ICPResult, guide: Image.Image, settings: PageSettings,
    observer: PageObserver = NO_OBSERVER,
) -> Image.Image:
    """GSRP of the sampled page against its guide, continuing the sampler's posterior generator."""
    with observer.stage("gsrp"):
        return model.upscaler(
            icp.query, guide, generator=icp.posterior_generator(model.device), sample_posterior=settings.sample_posterior,
            batch_stat_norm=settings.batch_stat_norm, run=model.execution(settings.preset),
        )


def sample_canvas(
    model: ColorFlowModel, canvas: Image.Image, mask: Image.Image, options: ColorizeOptions,
    *, progress: StepProgress | None = None,
) -> ICPResult:
    """ICP of one stitched 2W×2H canvas with `options` (what the staged sampler node runs)."""
    model = model.for_preset(options.preset)
    settings = resolve(model, options, (canvas.width // 2, canvas.height // 2))
    return sample_canvases(model, [canvas], [mask], settings, progress=progress)[0]


def upscale(
    model: ColorFlowModel, page: Image.Image, gray: Image.Image, options: ColorizeOptions,
    sample: ICPResult | None = None,
) -> Image.Image:
    """GSRP of a W×H colour page against `gray` prepared like the canvas page (what the staged upscale node runs).

    The posterior generator continues `sample`'s (the sampler's result); without one it is rebuilt from the options'
    seed and guidance, which must then be the sampler's."""
    model = model.for_preset(options.preset)
    settings = resolve(model, options, page.size)
    _context, guide = prepare_page(
        gray, page.size, settings.preprocess, preprocessors=page_preprocessors(settings.preprocess, model),
        seed=settings.seed, deterministic=settings.screen_deterministic,
    )
    if sample is not None:
        generator = sample.posterior_generator(model.device)
    else:
        generator = gsrp_generator(settings.seed, model.device, settings.canvas_size, settings.do_classifier_free_guidance)
    return model.upscaler(
        page, guide, generator=generator, sample_posterior=settings.sample_posterior,
        batch_stat_norm=settings.batch_stat_norm, run=model.execution(settings.preset),
    )


def colorize_batch(
    model: ColorFlowModel,
    pages: list[Image.Image],
    pool: ReferencePool,
    options: ColorizeOptions,
    *,
    names: list[str] | None = None,
    step_progress: StepProgress | None = None,
    observer: PageObserver = NO_OBSERVER,
) -> list[PageResult]:
    """Pages of one canvas size, their denoising in one UNet batch where the model family batches pages; page i's
    result equals `colorize_page` of that page alone up to the rounding of a batched convolution."""
    if not pages:
        raise InvalidInputError("no pages to colorize")
    model = model.for_preset(options.preset)
    names = names or [f"page_{i:04d}" for i in range(len(pages))]
    sizes = {page_size(options, page) for page in pages}
    if len(sizes) > 1:
        raise InvalidInputError("pages colourised as one batch must have the same size")
    settings = resolve(model, options, sizes.pop(), len(pages) if model.pipeline.batches_pages else 1)
    prepared = [_prepare(model, page, pool, settings, observer) for page in pages]
    icps = sample_canvases(
        model, [p.canvas.image for p in prepared], [p.canvas.mask for p in prepared], settings,
        observer=observer, progress=step_progress,
    )
    return [
        PageResult(name, upscale_page(model, icp, p.guide, settings, observer), p.size, p.canvas, p.retrieval, icp,
                   icp.query.resize(p.guide.size))
        for name, p, icp in zip(names, prepared, icps)
    ]


def colorize_page(
    model: ColorFlowModel,
    page: Image.Image,
    pool: ReferencePool,
    options: ColorizeOptions,
    *,
    name: str = "page",
    step_progress: StepProgress | None = None,
    observer: PageObserver = NO_OBSERVER,
) -> PageResult:
    """Retrieval → canvas → ICP → GSRP for one page."""
    return colorize_batch(model, [page], pool, options, names=[name], step_progress=step_progress, observer=observer)[0]


def page_names(pages: list[ImageLike]) -> list[str]:
    """Output names: a file's stem, else `page_0000`, `page_0001`, …"""
    return [Path(item).stem if isinstance(item, (str, Path)) else f"page_{i:04d}" for i, item in enumerate(pages)]


def _batches(
    items: list[ImageLike], names: list[str], options: ColorizeOptions, limit: int
) -> Iterator[tuple[list[Image.Image], list[str]]]:
    """Consecutive pages of one canvas size, at most `limit` per batch; each page is loaded when its batch forms."""
    batch: list[Image.Image] = []
    batch_names: list[str] = []
    batch_size = None
    for item, name in zip(items, names):
        image = load_image(item)
        size = page_size(options, image)
        if batch and (size != batch_size or len(batch) == limit):
            yield batch, batch_names
            batch, batch_names = [], []
        batch.append(image)
        batch_names.append(name)
        batch_size = size
    if batch:
        yield batch, batch_names


def pages_per_batch(model: ColorFlowModel, page_batch: int, feed_back: bool) -> int:
    """How many pages `colorize_pages` denoises together at most: one with feed-back (each page may retrieve the ones
    before it) or where the model family samples pages one by one, else `page_batch`."""
    if page_batch < 1:
        raise InvalidInputError("page_batch must be at least 1")
    return 1 if feed_back or not model.pipeline.batches_pages else page_batch


def colorize_pages(
    model: ColorFlowModel,
    pages: Iterable[ImageLike],
    pool: ReferencePool,
    options: ColorizeOptions = ColorizeOptions(),
    *,
    feed_back: bool = False,
    feed_back_into_pool: bool = False,
    progress: ProgressFn | None = None,
    page_batch: int = 1,
    observer: PageObserver = NO_OBSERVER,
) -> Iterator[PageResult]:
    """Colour each page against `pool`, in order.

    With `feed_back`, each finished page joins the references for the pages after it — in a private copy of the pool
    (`pool.fork()`), so a persisted pool is never changed and a rerun gives the same pages; `feed_back_into_pool`
    adds them to `pool` itself (and its store) instead. `page_batch` > 1 denoises up to that many consecutive pages
    of one canvas size as one UNet batch where the model family batches pages (more memory, same results; a size
    change starts a new batch); with feed-back pages run one at a time (each may retrieve the ones before it).
    Bad arguments are refused here, before any page is coloured; the pages come as the returned iterator advances.
    """
    limit = pages_per_batch(model, page_batch, feed_back)
    pages = list(pages)
    if not pages:
        raise InvalidInputError("no pages to colorize")
    model = model.for_preset(options.preset)  # one view for the chapter (it may keep converted copies)
    work_pool = pool.fork() if feed_back and not feed_back_into_pool else pool
    return _colorize_in_order(model, pages, work_pool, options, feed_back, progress, limit, observer)


def _colorize_in_order(
    model: ColorFlowModel, pages: list[ImageLike], pool: ReferencePool, options: ColorizeOptions, feed_back: bool,
    progress: ProgressFn | None, limit: int, observer: PageObserver,
) -> Iterator[PageResult]:
    done = 0
    for images, names in _batches(pages, page_names(pages), options, limit):
        # A batch's steps advance all its pages: reported as that many pages' steps.
        steps = (lambda d, t, k=len(images): progress("step", d * k, t * k)) if progress else None
        for result in colorize_batch(model, images, pool, options, names=names, step_progress=steps, observer=observer):
            done += 1
            if progress is not None:
                progress("page", done, len(pages))
            yield result  # before feed-back: the caller saves the page even if adding it to the pool fails
            if feed_back:
                pool.add([result.final])
