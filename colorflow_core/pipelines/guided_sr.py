"""Guided super-resolution (GSRP): decode the upscaled colour page with the gray page's line detail."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from .. import runtime
from ..errors import InvalidInputError
from ..gpu_kernels import fast_kernels
from ..models.fusion import MultiHiddenResNetModel
from ..models.guided_vae import decode_with_features, encode_with_features
from ..validation import check_finite_tensor


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


@contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """The module in eval mode for the block, its training flags restored after."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.train(training)


class GuidedSuperResolver:
    """VAE + fusion net: colour from the low-res ICP result, lines from the 1.5× gray page."""

    def __init__(self, vae: AutoencoderKL, fusion: MultiHiddenResNetModel):
        self.vae = vae
        self.fusion = fusion

    def run_modules(self) -> dict[str, tuple[torch.nn.Module, ...]]:
        """stage → the modules a preset stages."""
        return {"vae": (self.vae,), "fusion": (self.fusion,)}

    @torch.no_grad()
    def __call__(
        self,
        lowres: Image.Image,
        guide: Image.Image,
        *,
        generator: torch.Generator | None = None,
        sample_posterior: bool = True,
        batch_stat_norm: bool = True,
        run: runtime.Run | None = None,
    ) -> Image.Image:
        """The colour page at the guide's size. Defaults are upstream's: sampled latent, batch-statistics BN.

        Runs in stages (VAE encode → fusion → VAE decode), each model on the device only for its stage under an
        offloading `run`, and frees every feature map as soon as it is fused (upstream's numbers, less memory)."""
        width, height = guide.size
        if width % 8 or height % 8 or min(width, height) < 16:
            raise InvalidInputError(
                f"guided upscale works at {width}x{height} (1.5x the colour page {lowres.width}x{lowres.height}), which "
                "must be a multiple of 8 and at least 16 both ways: use a page size that is a multiple of 16"
            )
        with fast_kernels(run.placement.device_for("vae") if run is not None else self.vae.device, self.vae):
            upscaled = lowres.convert("RGB").resize(guide.size)
            with runtime.stage(run, "vae", self.vae):
                device, dtype = self.vae.device, self.vae.dtype
                posterior, color_features = encode_with_features(self.vae, to_unit_tensor(upscaled).to(device, dtype))
                _, gray_features = encode_with_features(self.vae, to_unit_tensor(guide).to(device, dtype))
                latent = posterior.sample(generator) if sample_posterior else posterior.mode()
                del posterior
            with runtime.stage(run, "fusion", self.fusion):
                fusion_device, fusion_dtype = self.fusion.device, self.fusion.dtype
                additions = []
                with batch_statistics(self.fusion) if batch_stat_norm else eval_mode(self.fusion):
                    for level, net in enumerate(self.fusion.two_layer_resnets[: len(color_features)]):
                        feature = torch.cat([color_features[level], gray_features[level]], dim=1).to(fusion_device, fusion_dtype)
                        color_features[level] = gray_features[level] = None
                        additions.append(net(feature))
                        del feature
                del color_features, gray_features
            with runtime.stage(run, "vae", self.vae):
                device, dtype = self.vae.device, self.vae.dtype
                out = decode_with_features(self.vae, latent.to(device, dtype), [a.to(device, dtype) for a in additions])
            del additions
            out = check_finite_tensor(out, "GSRP guided upscale (VAE + fusion net)").float().clamp(-1, 1)
            out = out[0].permute(1, 2, 0).cpu().numpy()
            return Image.fromarray(((out * 0.5 + 0.5) * 255).astype(np.uint8))
