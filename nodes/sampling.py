"""Colouring nodes: the in-context sampler, the guided upscaler and the one-node chapter colorizer."""
from __future__ import annotations

from ..colorflow_core.sequence import colorize_pages, pages_per_batch, sample_canvas, upscale
from ..colorflow_core.settings import page_size
from . import comfy_bridge, inputs
from .tensors import images_to_pil, masks_to_pil, one_size, pair_batches, pil_to_images

#: Sampler results handed to Guided Upscale (the posterior generator state GSRP continues from).
SAMPLE = ("COLORFLOW_SAMPLE", {
    "tooltip": "The sampler's 'sample' output: GSRP continues its random stream, so seed and sampler_guidance are not needed.",
})


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

    RETURN_TYPES = ("IMAGE", "IMAGE", "COLORFLOW_SAMPLE")
    RETURN_NAMES = ("canvas", "page", "sample")
    FUNCTION = "sample"
    CATEGORY = "ColorFlow/sampling"
    DESCRIPTION = (
        "Colours the page in the centre of the canvas from the reference patches around it; returns the whole canvas, "
        "the W×H page, and the sample state for Guided Upscale."
    )

    def sample(self, model, canvas, mask, seed: int, steps: int, guidance: float, guider_scale: float):
        """Return (colourised canvases, their centre pages, the samples)."""
        options = inputs.colorize_options(seed=seed, steps=steps, guidance=guidance, guider_scale=guider_scale)
        pairs = pair_batches(images_to_pil(canvas), masks_to_pil(mask), "canvas and mask")
        inputs.make_room(model, options, (pairs[0][0].width // 2, pairs[0][0].height // 2))
        results = comfy_bridge.each(pairs, lambda pair, progress: sample_canvas(model, *pair, options, progress=progress), steps)
        return (pil_to_images([r.canvas for r in results]), pil_to_images([r.query for r in results]), results)


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
                    "Only without 'sample': the sampler's guidance, so that with the sampler's seed GSRP continues the "
                    "same random stream as the one-node chapter colorizer."
                ),
            }),
            "preprocess": inputs.PREPROCESS,
            "sample_posterior": ("BOOLEAN", {"default": True, "tooltip": "Sample the VAE posterior (upstream); off: use its mean."}),
        }, "optional": {
            "screen_deterministic": inputs.SCREEN_DETERMINISTIC,
            "sample": SAMPLE,
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
                screen_deterministic: bool | None = None, sample=None):
        """Return the upscaled colour pages."""
        options = inputs.colorize_options(seed=seed, guidance=sampler_guidance, preprocess=preprocess,
                                          sample_posterior=sample_posterior, screen_deterministic=screen_deterministic)
        pairs = pair_batches(images_to_pil(page), images_to_pil(gray), "colour and gray pages")
        items = pair_batches(pairs, sample or [None], "pages and samples")
        inputs.make_room(model, options, pairs[0][0].size)
        finals = comfy_bridge.each(items, lambda item, _progress: upscale(model, *item[0], options, item[1]))
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
        model, pool, seed, steps, guidance, guider_scale, size, width, height, preprocess, feed_back, deterministic, batch = (
            inputs.first(model, pool, seed, steps, guidance, guider_scale, size, width, height, preprocess, feed_back,
                         screen_deterministic, page_batch, defaults=(None,) * 11 + (False, 1))
        )
        pictures = [picture for images in pages for picture in images_to_pil(images)]
        options = inputs.colorize_options(seed=seed, steps=steps, guidance=guidance, guider_scale=guider_scale,
                                          size=inputs.size_option(size, width, height), preprocess=preprocess,
                                          screen_deterministic=deterministic)
        sizes = one_size([page_size(options, picture) for picture in pictures], "size 'auto' gives these pages")
        inputs.make_room(model, options, sizes, pages=pages_per_batch(model, batch, feed_back))
        results = colorize_pages(model, pictures, pool, options, feed_back=feed_back, page_batch=batch,
                                 progress=comfy_bridge.chapter_progress(len(pictures), steps))
        return (pil_to_images([result.final for result in results]),)
