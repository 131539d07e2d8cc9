"""GSRP's fusion net: BN-ResNets that turn [colour, gray] VAE features into decoder additions."""
from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..errors import IncompatibleWeightsError


class ResNetBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a (projected) shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class TwoLayerResNet(nn.Module):
    """Four ResNet blocks; the first changes the width."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.block1 = ResNetBlock(in_channels, out_channels)
        self.block2 = ResNetBlock(out_channels, out_channels)
        self.block3 = ResNetBlock(out_channels, out_channels)
        self.block4 = ResNetBlock(out_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block4(self.block3(self.block2(self.block1(x))))


class MultiHiddenResNetModel(ModelMixin, ConfigMixin):
    """Released `MultiResNetModel.bin` layout: level i maps 2·c[i] channels to c[min(4, i+2)].

    Upstream never calls `.eval()` on it, so its BatchNorms normalise with each call's own batch
    statistics; keep the module in training mode for faithful output (see `GuidedSuperResolver`).
    """

    @register_to_config
    def __init__(self, channels_list: tuple[int, ...] = (128, 128, 256, 512, 512), num_tensors: int = 5):
        super().__init__()
        last = len(channels_list) - 1
        self.two_layer_resnets = nn.ModuleList(
            TwoLayerResNet(2 * channels_list[i], channels_list[min(last, i + 2)]) for i in range(num_tensors)
        )

    @classmethod
    def channels_from_state_dict(cls, state_dict: dict[str, torch.Tensor]) -> list[int]:
        """Recover `channels_list` from the widths stored in a released state dict."""
        channels, i = [], 0
        while f"two_layer_resnets.{i}.block1.conv1.weight" in state_dict:
            in_width = state_dict[f"two_layer_resnets.{i}.block1.conv1.weight"].shape[1]
            if in_width % 2:
                raise IncompatibleWeightsError("fusion net input widths must be even ([colour, gray] features)")
            channels.append(in_width // 2)
            i += 1
        if not channels:
            raise IncompatibleWeightsError("not a MultiHiddenResNetModel state dict (no two_layer_resnets.*)")
        return channels

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """One fused tensor per level, from the per-level concatenated features."""
        return [net(feature) for net, feature in zip(self.two_layer_resnets, features)]
