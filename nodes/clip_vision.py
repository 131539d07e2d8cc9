"""ComfyUI's own CLIP_VISION model as a retrieval encoder (satisfies colorflow_core's `ImageEncoder`)."""
from __future__ import annotations

import hashlib
from typing import Any, Sequence

import torch
from PIL import Image

from .tensors import pil_to_images

#: Values per tensor that enter the identity hash (all keys and shapes always do).
_SAMPLED_VALUES = 64


def state_identity(state: dict[str, torch.Tensor]) -> str:
    """A cheap, stable identity of a state dict: every key, shape and dtype, plus the first and last values of each tensor."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach()
        flat = tensor.reshape(-1)
        sample = torch.cat([flat[:_SAMPLED_VALUES], flat[-_SAMPLED_VALUES:]]).to("cpu", torch.float32)
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


class ClipVisionEncoder:
    """Embeds PIL images with a CLIP_VISION's `encode_image` (its own CLIP preprocessing, centre crop) → `image_embeds`."""

    def __init__(self, clip_vision: Any, batch_size: int = 32):
        self.clip_vision = clip_vision
        self.batch_size = batch_size
        self.name = f"comfy-clip-vision:{state_identity(clip_vision.get_sd())}"
        self.dim = int(self._embed([Image.new("RGB", (224, 224), (127, 127, 127))]).shape[1])

    def encode(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """[N, dim] float32 CPU embeddings; images are batched by size, order kept."""
        rows: list[torch.Tensor | None] = [None] * len(images)
        by_size: dict[tuple[int, int], list[int]] = {}
        for position, image in enumerate(images):
            by_size.setdefault(image.size, []).append(position)
        for positions in by_size.values():
            for start in range(0, len(positions), self.batch_size):
                chunk = positions[start : start + self.batch_size]
                for position, row in zip(chunk, self._embed([images[p] for p in chunk])):
                    rows[position] = row
        return torch.stack(rows) if rows else torch.empty(0, self.dim)

    def _embed(self, images: list[Image.Image]) -> torch.Tensor:
        with torch.no_grad():
            output = self.clip_vision.encode_image(pil_to_images(images))
        return output["image_embeds"].detach().to("cpu", torch.float32)
