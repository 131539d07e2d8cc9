"""ComfyUI IMAGE ([B,H,W,C] float 0..1) and MASK ([B,H,W]) tensors to and from PIL images."""
from __future__ import annotations

from typing import Sequence, TypeVar

import numpy as np
import torch
from PIL import Image

from ..colorflow_core.errors import InvalidInputError
from . import comfy_bridge

T = TypeVar("T")


def images_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """One RGB image per batch item of an IMAGE tensor (cloned; the input is never touched)."""
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise InvalidInputError(f"expected an IMAGE tensor [B,H,W,C] with C in 1, 3 or 4, got shape {tuple(images.shape)}")
    if 0 in images.shape[:3]:
        raise InvalidInputError(f"the IMAGE input is empty (shape {tuple(images.shape)}): connect at least one image")
    frames = images.detach().to("cpu", torch.float32).clone()
    frames = frames[..., :3] if frames.shape[-1] == 4 else frames.expand(*frames.shape[:3], 3)
    pixels = (frames.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return [Image.fromarray(np.ascontiguousarray(frame)) for frame in pixels]


def pil_to_images(pictures: Sequence[Image.Image]) -> torch.Tensor:
    """An IMAGE batch from same-size PIL images, on ComfyUI's intermediate device."""
    sizes = sorted({picture.size for picture in pictures})
    if len(sizes) != 1:
        shown = ", ".join(f"{w}x{h}" for w, h in sizes) or "none"
        raise InvalidInputError(f"cannot batch images of different sizes ({shown})")
    frames = np.stack([np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0 for picture in pictures])
    return torch.from_numpy(frames).to(comfy_bridge.intermediate_device())


def masks_to_pil(masks: torch.Tensor) -> list[Image.Image]:
    """One 8-bit gray image per item of a MASK tensor ([B,H,W] or [H,W]; 1 = area to colour)."""
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3:
        raise InvalidInputError(f"expected a MASK tensor [B,H,W], got shape {tuple(masks.shape)}")
    if 0 in masks.shape:
        raise InvalidInputError(f"the MASK input is empty (shape {tuple(masks.shape)}): connect at least one mask")
    values = (masks.detach().to("cpu", torch.float32).clone().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return [Image.fromarray(np.ascontiguousarray(value), mode="L") for value in values]


def pil_to_masks(pictures: Sequence[Image.Image]) -> torch.Tensor:
    """A MASK batch from same-size images (first channel, 255 → 1.0), on ComfyUI's intermediate device."""
    images = pil_to_images(pictures)
    return images[..., 0].contiguous()


def pair_batches(first: list[T], second: list, what: str) -> list[tuple[T, object]]:
    """Zip two per-page lists; a single item on either side is used for every page."""
    if len(first) != len(second) and 1 not in (len(first), len(second)):
        raise InvalidInputError(f"{what}: batch sizes {len(first)} and {len(second)} do not match (give equal sizes, or one item)")
    count = max(len(first), len(second))
    return [(first[min(i, len(first) - 1)], second[min(i, len(second) - 1)]) for i in range(count)]


def one_size(sizes: list[tuple[int, int]], what: str) -> tuple[int, int]:
    """The one W×H of pages that go out as one IMAGE batch; a one-line error naming the sizes otherwise."""
    if not sizes:
        raise InvalidInputError("no pages to colorize")
    if len(set(sizes)) > 1:
        shown = ", ".join(sorted({f"{w}x{h}" for w, h in sizes}))
        raise InvalidInputError(f"{what} different sizes ({shown}); choose one size to colour them as one batch")
    return sizes[0]
