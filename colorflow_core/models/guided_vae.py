"""VAE walks over a stock AutoencoderKL that expose encoder features and accept decoder additions."""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution


def encode_with_features(vae: AutoencoderKL, x: torch.Tensor) -> tuple[DiagonalGaussianDistribution, list[torch.Tensor]]:
    """Posterior of `x` and the encoder features [conv_in, down block 0..N-1] that GSRP fuses."""
    encoder = vae.encoder
    hidden = encoder.conv_in(x)
    features = [hidden]
    for block in encoder.down_blocks:
        hidden = block(hidden)
        features.append(hidden)
    hidden = encoder.mid_block(hidden)
    hidden = encoder.conv_out(encoder.conv_act(encoder.conv_norm_out(hidden)))
    if vae.quant_conv is not None:
        hidden = vae.quant_conv(hidden)
    return DiagonalGaussianDistribution(hidden), features


def decode_with_features(vae: AutoencoderKL, z: torch.Tensor, additions: list[torch.Tensor]) -> torch.Tensor:
    """Decode a raw (unscaled) latent, adding the fused features deepest-first around the decoder blocks."""
    decoder = vae.decoder
    if vae.post_quant_conv is not None:
        z = vae.post_quant_conv(z)
    deepest_first = additions[::-1]
    hidden = decoder.conv_in(z) + deepest_first[0]
    hidden = decoder.mid_block(hidden, None)
    hidden = hidden.to(next(iter(decoder.up_blocks.parameters())).dtype)
    for block, addition in zip(decoder.up_blocks, deepest_first[1:]):
        hidden = block(hidden + addition, None)
    return decoder.conv_out(decoder.conv_act(decoder.conv_norm_out(hidden)))
