"""Stand-ins for the built-in ComfyUI nodes the shipped workflows use.

Their definitions (ids, inputs, outputs) are ComfyUI 0.3.64's own, from its /object_info
(core_object_info.json); only the behaviour is re-implemented, small and close to the original.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SNAPSHOT = json.loads((Path(__file__).parent / "core_object_info.json").read_text())
CORE_DEFINITIONS: dict = SNAPSHOT["nodes"]


def _input_types(node_id: str, combos: dict[str, Callable[[], list[str]]] | None = None) -> Callable:
    """INPUT_TYPES from the snapshot; combos listing files (empty in the snapshot) are filled by `combos`."""

    def input_types(cls):
        spec = json.loads(json.dumps(CORE_DEFINITIONS[node_id]["input"]))
        for name, options in (combos or {}).items():
            spec["required"][name][0] = options()
        return spec

    return classmethod(input_types)


def _define(node_id: str, function: Callable, combos: dict | None = None) -> type:
    info = CORE_DEFINITIONS[node_id]
    attributes = {
        "INPUT_TYPES": _input_types(node_id, combos),
        "RETURN_TYPES": tuple(info["output"]),
        "RETURN_NAMES": tuple(info["output_name"]),
        "OUTPUT_NODE": info["output_node"],
        "FUNCTION": "run",
        "run": function,
    }
    return type(node_id, (), attributes)


def core_nodes(input_dir: Path, clip_vision_factory: Callable[[str], object], saved: list) -> dict[str, type]:
    """The stand-in node classes; saved images are appended to `saved` as (node class, tensor)."""

    def load_image(self, image):
        picture = Image.open(input_dir / image).convert("RGB")
        pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0)[None]
        return (pixels, torch.zeros(1, 64, 64))  # a PNG without alpha gives ComfyUI's 64×64 zero mask

    def save_image(self, images, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
        saved.append((type(self).__name__, images))
        return {"ui": {"images": [{"filename": f"{filename_prefix}_{i:05}_.png", "subfolder": "", "type": "output"} for i in range(len(images))]}}

    def image_scale(self, image, upscale_method, width, height, crop):
        pixels = image.movedim(-1, 1)
        if crop == "center":
            old_w, old_h, aspect = pixels.shape[3], pixels.shape[2], width / height
            new_w, new_h = min(old_w, round(old_h * aspect)), min(old_h, round(old_w / aspect))
            left, top = (old_w - new_w) // 2, (old_h - new_h) // 2
            pixels = pixels[:, :, top : top + new_h, left : left + new_w]
        mode = {"nearest-exact": "nearest-exact", "bilinear": "bilinear", "area": "area"}.get(upscale_method, "bicubic")
        return (F.interpolate(pixels, size=(height, width), mode=mode).clamp(0, 1).movedim(1, -1),)

    def image_batch(self, image1, image2):
        if image1.shape[1:] != image2.shape[1:]:
            image2 = image_scale(self, image2, "bilinear", image1.shape[2], image1.shape[1], "center")[0]
        return (torch.cat([image1, image2]),)

    def mask_to_image(self, mask):
        return (mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]).movedim(1, -1).expand(-1, -1, -1, 3),)

    def input_files() -> list[str]:
        return sorted(p.name for p in input_dir.iterdir() if p.is_file())

    return {
        "LoadImage": _define("LoadImage", load_image, {"image": input_files}),
        "SaveImage": _define("SaveImage", save_image),
        "PreviewImage": _define("PreviewImage", save_image),
        "CLIPVisionLoader": _define(
            "CLIPVisionLoader",
            lambda self, clip_name: (clip_vision_factory(clip_name),),
            {"clip_name": lambda: ["CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"]},
        ),
        "ImageScale": _define("ImageScale", image_scale),
        "ImageBatch": _define("ImageBatch", image_batch),
        "MaskToImage": _define("MaskToImage", mask_to_image),
        **{node_id: _define(node_id, _needs_comfyui(node_id), MODEL_FILES.get(node_id)) for node_id in DEFINITION_ONLY},
    }


#: Core nodes of the native workflows: their real definitions validate those graphs; they run on a real server only
#: (tests/comfyui).
DEFINITION_ONLY = ("CheckpointLoaderSimple", "CLIPTextEncode", "KSampler", "VAEDecode", "ControlNetLoader", "ControlNetApplyAdvanced")

#: The model files those nodes list in the stand-in models/ folders (the names `make-tiny --comfyui` writes).
MODEL_FILES = {
    "CheckpointLoaderSimple": {"ckpt_name": lambda: ["v1-5-pruned-emaonly.safetensors"]},
    "ControlNetLoader": {"control_net_name": lambda: ["control_v11p_sd15_lineart.safetensors"]},
}


def _needs_comfyui(node_id: str) -> Callable:
    def run(self, **_):
        raise NotImplementedError(f"{node_id} runs only in a real ComfyUI (tests/comfyui, COLORFLOW_COMFYUI)")

    return run
