"""Networks of the ColorFlow release, built from stock diffusers blocks."""
from .color_guider import ColorGuiderSDModel, GuiderResiduals
from .color_guider_pixart import ColorGuiderPixArtModel
from .fusion import MultiHiddenResNetModel
from .guided_vae import decode_with_features, encode_with_features
from .pixart_injection import inject_controls
from .unet_injection import inject_guider_residuals

__all__ = [
    "ColorGuiderPixArtModel",
    "ColorGuiderSDModel",
    "GuiderResiduals",
    "MultiHiddenResNetModel",
    "decode_with_features",
    "encode_with_features",
    "inject_controls",
    "inject_guider_residuals",
]
