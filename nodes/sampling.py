"""Colouring nodes: the in-context sampler, the guided upscaler and the one-node chapter colorizer."""
from __future__ import annotations

from ..colorflow_core.errors import InvalidInputError
from ..colorflow_core.options import ColorizeOptions, gsrp_generator, make_generators
from ..colorflow_core.preprocess import prepare_page
from ..colorflow_core.sequence import colorize_pages
from . import comfy_bridge, inputs
from .comfy_bridge import Progress
from .tensors import images_to_pil, masks_to_pil, pair_batches, pil_to_images


def _offset(progress: Progress, offset: int, total: int) -> Progress:
    """Report one page's steps as part of the whole batch's progress."""
    return lambda done, _total: progress(offset + done, total)


class ColorFlowSampler:
    """In-context colorization (ICP): the LoRA UNet and ColorGuider denoise the stitched canvas."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": inputs.MODEL,
            "canvas": ("IMAGE", {"tooltip": "Stitched 2W×2H canvas(es) from ColorFlow Stitch Canvas."}),
            "mask": ("MASK", {"tooltip": "The canvas mask (1 = page area), same size as the canvas."}),
            "seed": inputs.SEED,
            "steps": inputs.STEPS,
            "guidance": inputs.GUIDANCE,
            "guider_scale": inputs.GUIDER_SCALE,
        }}

    RETURN_TYPES = ("IMAGE", "IMAGE")
    RETURN_NAMES = ("canvas", "page")
    FUNCTION = "sample"
    CATEGORY = "ColorFlow/sampling"
    DESCRIPTION = "Colours the page in the centre of the canvas from the reference patches around it; returns the whole canvas and the W×H page."

    def sample(self, model, canvas, mask, seed: int, steps: int, guidance: float, guider_scale: float):
        """Return (colourised canvases, their centre pages)."""
        pairs = pair_batches(images_to_pil(canvas), masks_to_pil(mask), "canvas and mask")
        page_size = (pairs[0][0].width // 2, pairs[0][0].height // 2)
        comfy_bridge.make_room(model.memory_needed(page_size, guidance), model.device)
        total = len(pairs) * steps
        progress = comfy_bridge.progress_bar(total)
        results = []
        for index, (picture, area) in enumerate(pairs):
            comfy_bridge.check_interrupt()
            latents, posterior = make_generators(seed, model.device)
            results.append(model.pipeline(
                picture, area, num_inference_steps=steps, guidance_scale=guidance, guider_scale=guider_scale,
                generator=latents, posterior_generator=posterior, progress=_offset(progress, index * steps, total),
            ))
        comfy_bridge.soft_empty_cache()
        return (pil_to_images([r.canvas for r in results]), pil_to_images([r.query for r in results]))


class ColorFlowGuidedUpscale:
    """Guided super-resolution (GSRP): the colour page at 1.5× with the gray page's line detail."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": inputs.MODEL,
            "page": ("IMAGE", {"tooltip": "Low-resolution colour page(s), e.g. the sampler's 'page' output (W×H)."}),
            "gray": ("IMAGE", {
                "tooltip": (
                    "The original page(s), any size, prepared to 1.5W×1.5H like the canvas page (preprocess); or the canvas "
                    "node's 'guide' output with preprocess 'none'."
                ),
            }),
            "seed": inputs.SEED,
            "sampler_guidance": ("FLOAT", {
                **inputs.GUIDANCE[1],
                "tooltip": (
                    "The sampler's guidance; with the sampler's seed it continues the same random stream, "
                    "so the result equals the one-node chapter colorizer's."
                ),
            }),
            "preprocess": inputs.PREPROCESS,
            "sample_posterior": ("BOOLEAN", {"default": True, "tooltip": "Sample the VAE posterior (upstream); off: use its mean."}),
        }, "optional": {
            "screen_deterministic": inputs.SCREEN_DETERMINISTIC,
        }}

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "upscale"
    CATEGORY = "ColorFlow/upscaling"
    DESCRIPTION = (
        "Decodes the colour page at 1.5× its size through the guided VAE, restoring line detail from the prepared page "
        "(gray page, screentones or extracted lines, as the model's style wants)."
    )

    def upscale(self, model, page, gray, seed: int, sampler_guidance: float, preprocess: str, sample_posterior: bool,
                screen_deterministic: bool | None = None):
        """Return the upscaled colour pages."""
        pairs = pair_batches(images_to_pil(page), images_to_pil(gray), "colour and gray pages")
        comfy_bridge.make_room(model.memory_needed(pairs[0][0].size, sampler_guidance), model.device)
        method = inputs.preprocess_method(preprocess, model)
        progress = comfy_bridge.progress_bar(len(pairs))
        finals = []
        for index, (colour, line_art) in enumerate(pairs):
            comfy_bridge.check_interrupt()
            _context, guide = prepare_page(
                line_art, colour.size, method, preprocessors=inputs.page_preprocessors(method, model), seed=seed,
                deterministic=bool(screen_deterministic),
            )
            canvas_size = (2 * colour.width, 2 * colour.height)
            cfg = model.effective_guidance(sampler_guidance) > 1.0  # the 'fast' preset samples without CFG
            generator = gsrp_generator(seed, model.device, canvas_size, cfg=cfg)
            finals.append(model.upscaler(colour, guide, generator=generator, sample_posterior=sample_posterior))
            progress(index + 1, len(pairs))
        comfy_bridge.soft_empty_cache()
        return (pil_to_images(finals),)


class ColorFlowColorizeSequence:
    """The whole chapter in one node: retrieval, canvas, sampling and guided upscaling, page after page."""

    INPUT_IS_LIST = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": inputs.MODEL,
            "pool": inputs.POOL,
            "pages": ("IMAGE", {"tooltip": "Pages (gray, or line art for the sketch styles), in reading order: a batch, or a list (ColorFlow Load Pages) of pages of any size."}),
            "seed": inputs.SEED,
            "steps": inputs.STEPS,
            "guidance": inputs.GUIDANCE,
            "guider_scale": inputs.GUIDER_SCALE,
            "size": inputs.SIZE,
            "width": inputs.WIDTH,
            "height": inputs.HEIGHT,
            "preprocess": inputs.PREPROCESS,
            "feed_back": ("BOOLEAN", {
                "default": False,
                "tooltip": "Each finished page joins the pool for the pages after it (page-to-page colour memory); the saved pool is not changed.",
            }),
        }, "optional": {
            "screen_deterministic": inputs.SCREEN_DETERMINISTIC,
            "page_batch": ("INT", {
                "default": 1, "min": 1, "max": 16,
                "tooltip": (
                    "Denoise this many pages as one UNet batch (gray style): faster on a GPU that one page does not fill, "
                    "more memory, the same result per page. Pages run one at a time with feed_back."
                ),
            }),
        }}

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    FUNCTION = "colorize"
    CATEGORY = "ColorFlow"
    DESCRIPTION = "Colourises a chapter against a reference pool, page after page with one seed; returns the pages at 1.5× the canvas page size."

    def colorize(self, model, pool, pages, seed, steps, guidance, guider_scale, size, width, height, preprocess, feed_back,
                 screen_deterministic=None, page_batch=None):
        """Return the colourised pages as one batch; every argument arrives as a list (INPUT_IS_LIST)."""
        model, pool, seed, steps, guidance, guider_scale, size, width, height, preprocess, feed_back = (
            values[0] for values in (model, pool, seed, steps, guidance, guider_scale, size, width, height, preprocess, feed_back)
        )
        screen_deterministic = bool(screen_deterministic[0]) if screen_deterministic else False
        page_batch = page_batch[0] if page_batch else 1
        pictures = [picture for batch in pages for picture in images_to_pil(batch)]
        if not pictures:
            raise InvalidInputError("no pages to colorize")
        sizes = [inputs.query_size(size, width, height, picture) for picture in pictures]
        if len(set(sizes)) > 1:
            shown = ", ".join(sorted({f"{w}x{h}" for w, h in sizes}))
            raise InvalidInputError(f"size 'auto' gives these pages different sizes ({shown}); choose one size to colour them as one batch")
        options = ColorizeOptions(
            size=sizes[0], steps=steps, seed=seed, guidance_scale=guidance, guider_scale=guider_scale,
            preprocess=None if preprocess == inputs.STYLE_DEFAULT else preprocess,  # None: the core uses the model's style's method
            screen_deterministic=screen_deterministic,
        )
        batch = 1 if feed_back else min(page_batch, len(pictures))
        comfy_bridge.make_room(model.memory_needed(sizes[0], guidance, pages=batch), model.device)
        total = len(pictures) * steps
        progress = comfy_bridge.progress_bar(total)
        pages_done = [0]

        def report(stage: str, done: int, _total: int) -> None:
            comfy_bridge.check_interrupt()
            if stage == "page":
                pages_done[0] = done
            else:
                progress(pages_done[0] * steps + done, total)

        work_pool = pool.fork() if feed_back else pool
        results = colorize_pages(model, pictures, work_pool, options, feed_back=feed_back, progress=report, page_batch=page_batch)
        finals = [r.final for r in results]
        comfy_bridge.soft_empty_cache()
        return (pil_to_images(finals),)
