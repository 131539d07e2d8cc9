"""Retrieval nodes: load pages, build a persisted reference pool, stitch the retrieval canvas."""
from __future__ import annotations

from ..colorflow_core.errors import InvalidInputError
from ..colorflow_core.imaging import load_image, to_rgb
from ..colorflow_core.retrieval import ReferencePool
from ..colorflow_core.sequence import prepare_canvas
from . import comfy_bridge, inputs
from .input_folders import ALLOW_OUTSIDE, FOLDER_TOOLTIP, folder_images, folder_signature
from .pools import open_pool
from .preview import retrieval_preview, retrieval_summary
from .tensors import images_to_pil, pil_to_images, pil_to_masks

class ColorFlowLoadPages:
    """Load every page of a chapter folder, in file-name order."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "folder": ("STRING", {"default": "chapter", "tooltip": FOLDER_TOOLTIP}),
            "allow_outside_input": ALLOW_OUTSIDE,
        }}

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("pages",)
    OUTPUT_IS_LIST = (True,)
    FUNCTION = "load"
    CATEGORY = "ColorFlow/loaders"
    DESCRIPTION = "Loads a folder of pages as a list of images (pages may differ in size); sorted by file name."

    @classmethod
    def IS_CHANGED(cls, folder: str, allow_outside_input: bool):
        """Re-run when the folder's images change."""
        return folder_signature(folder)

    def load(self, folder: str, allow_outside_input: bool):
        """Return the pages, one IMAGE per file (`allow_outside_input` is ignored: see its tooltip)."""
        return ([pil_to_images([to_rgb(load_image(path))]) for path in folder_images(folder)],)


class ColorFlowReferencePool:
    """A named, persisted, incremental pool of coloured reference images."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "encoder": ("COLORFLOW_ENCODER", {"tooltip": "Retrieval encoder (model loader's encoder output, or a CLIP_VISION adapter)."}),
                "pool_name": ("STRING", {
                    "default": "chapter",
                    "tooltip": "Pool kept under ComfyUI's user/colorflow/pools/<name>; references are only ever added, use a new name to start over.",
                }),
                "folder": ("STRING", {"default": "", "tooltip": FOLDER_TOOLTIP + " Empty: no folder."}),
                "allow_outside_input": ALLOW_OUTSIDE,
            },
            "optional": {
                "images": ("IMAGE", {"tooltip": "Reference images to add (a batch)."}),
            },
        }

    RETURN_TYPES = ("COLORFLOW_POOL", "STRING")
    RETURN_NAMES = ("pool", "summary")
    FUNCTION = "build"
    CATEGORY = "ColorFlow/retrieval"
    DESCRIPTION = "Adds reference images (a batch and/or a folder) to a persisted pool; only new images are embedded, on first search."

    @classmethod
    def IS_CHANGED(cls, folder: str = "", allow_outside_input: bool = False, **_):
        """Re-run when the folder's images change."""
        return folder_signature(folder)

    def build(self, encoder, pool_name: str, folder: str, allow_outside_input: bool, images=None):
        """Open the pool, add the references, return it with a summary (`allow_outside_input` is ignored)."""
        items: list = images_to_pil(images) if images is not None else []
        if folder.strip():
            items += folder_images(folder)
        pool = open_pool(pool_name, encoder)
        added = pool.add(items, progress=comfy_bridge.progress_bar(len(items)))
        if len(pool) == 0:
            raise InvalidInputError(f"reference pool '{pool_name}' is empty: connect reference images or name a folder of them")
        summary = f"pool '{pool_name}': {len(pool)} reference(s), {added} new\nencoder: {encoder.name} ({encoder.dim}-d)"
        return {"ui": {"colorflow_info": [summary]}, "result": (pool, summary)}


class ColorFlowStitchCanvas:
    """Retrieve reference patches for a gray page and stitch ColorFlow's 2W×2H canvas."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "page": ("IMAGE", {"tooltip": "Gray page(s); each page of the batch gets its own canvas."}),
            "pool": inputs.POOL,
            "size": inputs.SIZE,
            "width": inputs.WIDTH,
            "height": inputs.HEIGHT,
            "preprocess": inputs.PREPROCESS,
        }, "optional": {
            "model": ("COLORFLOW_MODEL", {
                "tooltip": "The ColorFlow model: needed for preprocess screen / sketch / sketch_shading (its release's networks) and 'style default'.",
            }),
            "screen_seed": ("INT", {
                "default": 0, "min": 0, "max": inputs.SEED_LIMIT - 1,
                "tooltip": "Seed of the ScreenStyle screentones ('screen' only); the sequence node uses its seed here, so set the sampler's seed to get its pages.",
            }),
            "screen_deterministic": inputs.SCREEN_DETERMINISTIC,
        }}

    RETURN_TYPES = ("IMAGE", "MASK", "IMAGE", "IMAGE")
    RETURN_NAMES = ("canvas", "mask", "retrieval", "guide")
    FUNCTION = "stitch"
    CATEGORY = "ColorFlow/retrieval"
    DESCRIPTION = (
        "Retrieval (RAP): the page in the centre of a 2W×2H canvas with the 12 best reference patches around it, "
        "its mask, a labelled grid of the patches, and the prepared page at 1.5W×1.5H ('guide', for Guided Upscale's "
        "gray input with preprocess 'none')."
    )

    def stitch(self, page, pool: ReferencePool, size: str, width: int, height: int, preprocess: str, model=None,
               screen_seed: int | None = None, screen_deterministic: bool | None = None):
        """Return (canvases, masks, retrieval previews, guides)."""
        options = inputs.colorize_options(size=inputs.size_option(size, width, height), preprocess=preprocess,
                                          seed=screen_seed or 0, screen_deterministic=screen_deterministic)
        prepared = comfy_bridge.each(
            images_to_pil(page), lambda picture, _progress: prepare_canvas(picture, pool, options, model)
        )
        summary = "\n\n".join(retrieval_summary(p.retrieval) for p in prepared)
        result = (
            pil_to_images([p.canvas.image for p in prepared]),
            pil_to_masks([p.canvas.mask for p in prepared]),
            pil_to_images([retrieval_preview(p.retrieval) for p in prepared]),
            pil_to_images([p.guide for p in prepared]),
        )
        return {"ui": {"colorflow_info": [summary]}, "result": result}
