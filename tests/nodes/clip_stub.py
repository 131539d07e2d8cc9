"""A stand-in for ComfyUI's CLIP_VISION (comfy.clip_vision.ClipVisionModel) built on a transformers CLIP vision model."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


class StubClipVision:
    """`encode_image(IMAGE)` with ComfyUI's preprocessing (shortest side to 224, centre crop) → {'image_embeds'}; `get_sd()`."""

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()

    @classmethod
    def from_folder(cls, folder: Path) -> "StubClipVision":
        """Load a CLIPVisionModelWithProjection folder (e.g. a release's image_encoder/)."""
        from transformers import CLIPVisionModelWithProjection

        return cls(CLIPVisionModelWithProjection.from_pretrained(folder))

    def get_sd(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def encode_image(self, image: torch.Tensor, crop: bool = True) -> dict[str, torch.Tensor]:
        pixels = image[..., :3].movedim(-1, 1)
        scale = 224 / min(pixels.shape[2:])
        pixels = F.interpolate(pixels, size=(round(scale * pixels.shape[2]), round(scale * pixels.shape[3])), mode="bicubic", antialias=True)
        top, left = (pixels.shape[2] - 224) // 2, (pixels.shape[3] - 224) // 2
        pixels = (pixels[:, :, top : top + 224, left : left + 224] - CLIP_MEAN) / CLIP_STD
        return {"image_embeds": self.model(pixel_values=pixels).image_embeds}
