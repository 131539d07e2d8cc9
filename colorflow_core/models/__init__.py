"""Networks of the ColorFlow release, built from stock diffusers blocks."""
from .color_guider import ColorGuiderSDModel, GuiderResiduals
from .fusion import MultiHiddenResNetModel
from .guided_vae import decode_with_features, encode_with_features
from .unet_injection import inject_guider_residuals

__all__ = [
    "ColorGuiderSDModel",
    "GuiderResiduals",
    "MultiHiddenResNetModel",
    "decode_with_features",
    "encode_with_features",
    "inject_guider_residuals",
]
