"""Page preprocessor nodes: ScreenStyle (gray style), line extraction (sketch), sketch + shading (sketch_shading).

Thin adapters over `colorflow_core.preprocessors`; the networks load on first use and stay cached by the
core (per file, modification time and device), so a second run or a second node reuses them.
"""
from __future__ import annotations

from collections.abc import Callable

from PIL import Image

from ..colorflow_core.preprocessors import (
    load_line_extractor,
    load_screen_style,
    screen_blend,
    sketch_input,
    sketch_shading_input,
)
from . import comfy_bridge, inputs, model_choices
from .tensors import images_to_pil, pil_to_images

CATEGORY = "ColorFlow/preprocess"
IMAGE_IN = ("IMAGE", {"tooltip": "Page(s), any size and mode; each image of the batch is processed on its own, at its own size."})


def line_extractor_input() -> tuple:
    """The erika.pth dropdown (listed anew each time ComfyUI asks for the node definitions)."""
    return (model_choices.line_extractor_choices(), {
        "default": model_choices.LINE_EXTRACTOR_NAME,
        "tooltip": (
            "The manga line extractor (erika.pth): a release's LE/erika.pth under models/colorflow/, or the ControlNet auxiliary "
            "preprocessors' copy (custom_nodes/comfyui_controlnet_aux/ckpts/lllyasviel/Annotators/erika.pth, or "
            "$AUX_ANNOTATOR_CKPTS_PATH, or an annotators model folder). The default entry falls back to any other erika.pth found."
        ),
    })


def _each(images, work: Callable[[Image.Image], tuple[Image.Image, ...]]) -> list[list[Image.Image]]:
    """Run `work` on every image of a batch, with progress and an interrupt check per image; outputs regrouped per slot."""
    pictures = images_to_pil(images)
    progress = comfy_bridge.progress_bar(len(pictures))
    results = []
    for index, picture in enumerate(pictures):
        comfy_bridge.check_interrupt()
        results.append(work(picture))
        progress(index + 1, len(pictures))
    return [list(slot) for slot in zip(*results)]


class ColorFlowScreenStyle:
    """ScreenStyle: screentones for a gray (or colour) page, blended 50/50 with the page as ColorFlow's gray style uses it."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": IMAGE_IN,
            "release": (model_choices.release_choices(), {
                "default": model_choices.RELEASE_NAME,
                "tooltip": "ColorFlow release folder under models/colorflow/ holding ScreenStyle/ (the G_RGB2INTSCR generator and the ScreenVAE decoder).",
            }),
            "seed": ("INT", {
                **inputs.SEED[1],
                "tooltip": "Seed of ScreenStyle's dropout and noise: the same seed gives the same screentones; every image of a batch uses it.",
            }),
            "deterministic": ("BOOLEAN", {
                "default": False,
                "tooltip": "Without dropout and noise: smoother screentones that do not depend on the seed (upstream draws new random ones on every run).",
            }),
            "device": inputs.DEVICE,
        }}

    RETURN_TYPES = ("IMAGE", "IMAGE")
    RETURN_NAMES = ("image", "screen")
    FUNCTION = "screen"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "ColorFlow's GrayImage(ScreenStyle) input: the page's screentone rendering blended 50/50 with the gray page ('image'), "
        "and the screentone rendering alone ('screen'). ColorFlow applies it to the page at 1.5× the canvas page size; "
        "the canvas and sequence nodes do that themselves with preprocess 'screen'."
    )

    def screen(self, image, release: str, seed: int, deterministic: bool, device: str):
        """Return (blends, screentone renderings), same sizes as the input."""
        network = load_screen_style(model_choices.release_folder(release), inputs.device(device))

        def work(picture: Image.Image) -> tuple[Image.Image, Image.Image]:
            tones = network.screen(picture, seed=seed, deterministic=deterministic)
            return screen_blend(tones, picture), tones

        blends, screens = _each(image, work)
        comfy_bridge.soft_empty_cache()
        return (pil_to_images(blends), pil_to_images(screens))


class _LineExtractorNode:
    """Inputs and run loop shared by the nodes built on the line extractor."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": IMAGE_IN,
            "line_extractor": line_extractor_input(),
            "device": inputs.DEVICE,
        }}

    @staticmethod
    def _run(image, line_extractor: str, device: str, work) -> list[list[Image.Image]]:
        network = load_line_extractor(model_choices.line_extractor_file(line_extractor), inputs.device(device))
        outputs = _each(image, lambda picture: work(picture, network))
        comfy_bridge.soft_empty_cache()
        return outputs


class ColorFlowLineExtract(_LineExtractorNode):
    """The manga line extractor (erika): clean black-on-white lines, ColorFlow's Sketch input and guide."""

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("lines",)
    FUNCTION = "extract"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Extracts black lines on white from a page (made gray first), as ColorFlow's Sketch style prepares it; "
        "large pages are processed in overlapping tiles with the same result."
    )

    def extract(self, image, line_extractor: str, device: str):
        """Return the line drawings, same sizes as the input."""
        (lines,) = self._run(image, line_extractor, device, lambda picture, network: (sketch_input(picture, network)[0],))
        return (pil_to_images(lines),)


class ColorFlowSketchShading(_LineExtractorNode):
    """Sketch + shading: the extracted lines with the page's dark areas black and its mid-tones gray."""

    RETURN_TYPES = ("IMAGE", "IMAGE")
    RETURN_NAMES = ("shaded", "lines")
    FUNCTION = "shade"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "ColorFlow's Sketch_Shading input: 'shaded' = the extracted lines, black where the page is darker than 30 % of white "
        "and gray where bright lines lie over mid-tones (the canvas input); 'lines' = the pure lines (the upscaler's guide)."
    )

    def shade(self, image, line_extractor: str, device: str):
        """Return (shaded line drawings, pure line drawings), same sizes as the input."""
        shaded, lines = self._run(image, line_extractor, device, sketch_shading_input)
        return (pil_to_images(shaded), pil_to_images(lines))
