"""Guided super-resolution (GSRP): decode the upscaled colour page with the gray page's line detail."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from ..models.fusion import MultiHiddenResNetModel
from ..models.guided_vae import decode_with_features, encode_with_features


def to_unit_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB → [1,3,H,W] in [-1,1] (ToTensor then Normalize(0.5, 0.5), as upstream)."""
    array = np.asarray(image.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1)[None].float().div(255).sub(0.5).div(0.5)


@contextmanager
def batch_statistics(module: torch.nn.Module) -> Iterator[None]:
    """BatchNorms normalise with each call's own statistics (upstream's train mode) without touching running stats."""
    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, m.track_running_stats) for m in norms]
    for m in norms:
        m.train()
        m.track_running_stats = False
    try:
        yield
    finally:
        for m, (training, tracking) in zip(norms, saved):
            m.train(training)
            m.track_running_stats = tracking


class GuidedSuperResolver:
    """VAE + fusion net: colour from the low-res ICP result, lines from the 1.5× gray page."""

    def __init__(self, vae: AutoencoderKL, fusion: MultiHiddenResNetModel):
        self.vae = vae
        self.fusion = fusion

    @torch.no_grad()
    def __call__(
        self,
        lowres: Image.Image,
        guide: Image.Image,
        *,
        generator: torch.Generator | None = None,
        sample_posterior: bool = True,
        batch_stat_norm: bool = True,
    ) -> Image.Image:
        """The colour page at the guide's size. Defaults are upstream's: sampled latent, batch-statistics BN."""
        device, dtype = self.vae.device, self.vae.dtype
        upscaled = lowres.convert("RGB").resize(guide.size)
        color = to_unit_tensor(upscaled).to(device, dtype)
        gray = to_unit_tensor(guide).to(device, dtype)
        posterior, color_features = encode_with_features(self.vae, color)
        _, gray_features = encode_with_features(self.vae, gray)
        features = [torch.cat([c, g], dim=1).to(self.fusion.dtype) for c, g in zip(color_features, gray_features)]
        if batch_stat_norm:
            with batch_statistics(self.fusion):
                additions = self.fusion(features)
        else:
            additions = self.fusion.eval()(features)
        latent = posterior.sample(generator) if sample_posterior else posterior.mode()
        out = decode_with_features(self.vae, latent, [a.to(dtype) for a in additions])
        out = out.float().clamp(-1, 1)[0].permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(((out * 0.5 + 0.5) * 255).astype(np.uint8))
