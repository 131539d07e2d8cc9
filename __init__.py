"""ColorFlow for ComfyUI: retrieval-augmented colorization of comic and manga page sequences.

Importing the pack registers `models/colorflow` with ComfyUI; it loads no model, touches no GPU and downloads nothing.
"""
from .nodes import comfy_bridge
from .nodes.loaders import ColorFlowEncoderFromCLIPVision, ColorFlowEncoderLoader, ColorFlowModelLoader
from .nodes.native import (
    ColorFlowApply, ColorFlowCropPage, ColorFlowGuidedUpscaleVAE, ColorFlowLoRALoader, ColorFlowPatchLoader,
)
from .nodes.preprocessing import ColorFlowLineExtract, ColorFlowScreenStyle, ColorFlowSketchShading
from .nodes.retrieval import ColorFlowLoadPages, ColorFlowReferencePool, ColorFlowStitchCanvas
from .nodes.sampling import ColorFlowColorizeSequence, ColorFlowGuidedUpscale, ColorFlowSampler

comfy_bridge.register_model_folder()

NODE_CLASS_MAPPINGS = {
    "ColorFlowModelLoader": ColorFlowModelLoader,
    "ColorFlowEncoderLoader": ColorFlowEncoderLoader,
    "ColorFlowEncoderFromCLIPVision": ColorFlowEncoderFromCLIPVision,
    "ColorFlowLoadPages": ColorFlowLoadPages,
    "ColorFlowReferencePool": ColorFlowReferencePool,
    "ColorFlowStitchCanvas": ColorFlowStitchCanvas,
    "ColorFlowSampler": ColorFlowSampler,
    "ColorFlowGuidedUpscale": ColorFlowGuidedUpscale,
    "ColorFlowColorizeSequence": ColorFlowColorizeSequence,
    "ColorFlowScreenStyle": ColorFlowScreenStyle,
    "ColorFlowLineExtract": ColorFlowLineExtract,
    "ColorFlowSketchShading": ColorFlowSketchShading,
    "ColorFlowPatchLoader": ColorFlowPatchLoader,
    "ColorFlowLoRALoader": ColorFlowLoRALoader,
    "ColorFlowApply": ColorFlowApply,
    "ColorFlowCropPage": ColorFlowCropPage,
    "ColorFlowGuidedUpscaleVAE": ColorFlowGuidedUpscaleVAE,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "ColorFlowModelLoader": "ColorFlow Model Loader",
    "ColorFlowEncoderLoader": "ColorFlow Encoder Loader",
    "ColorFlowEncoderFromCLIPVision": "ColorFlow Encoder from CLIP Vision",
    "ColorFlowLoadPages": "ColorFlow Load Pages",
    "ColorFlowReferencePool": "ColorFlow Reference Pool",
    "ColorFlowStitchCanvas": "ColorFlow Stitch Canvas",
    "ColorFlowSampler": "ColorFlow Sampler",
    "ColorFlowGuidedUpscale": "ColorFlow Guided Upscale",
    "ColorFlowColorizeSequence": "ColorFlow Colorize Sequence",
    "ColorFlowScreenStyle": "ColorFlow Screen Style",
    "ColorFlowLineExtract": "ColorFlow Line Extract",
    "ColorFlowSketchShading": "ColorFlow Sketch Shading",
    "ColorFlowPatchLoader": "ColorFlow Patch Loader",
    "ColorFlowLoRALoader": "ColorFlow LoRA Loader (model only)",
    "ColorFlowApply": "ColorFlow Apply",
    "ColorFlowCropPage": "ColorFlow Crop Page",
    "ColorFlowGuidedUpscaleVAE": "ColorFlow Guided Upscale (VAE)",
}

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
