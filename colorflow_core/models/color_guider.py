"""The SD1.5 ColorGuider: a BrushNet-style UNet copy whose zero-conv outputs steer the UNet."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_blocks import (
    CrossAttnDownBlock2D,
    CrossAttnUpBlock2D,
    DownBlock2D,
    UNetMidBlock2DCrossAttn,
    UpBlock2D,
)
from torch import nn

from ..errors import IncompatibleWeightsError

# The release names its attention blocks "SelfAttn*": stock cross-attention blocks built with
# cross_attention_dim=None have exactly that structure (attn1/norm1/norm3/ff, no attn2).
_DOWN_BLOCKS = {"SelfAttnDownBlock2D": CrossAttnDownBlock2D, "DownBlock2D": DownBlock2D}
_UP_BLOCKS = {"SelfAttnUpBlock2D": CrossAttnUpBlock2D, "UpBlock2D": UpBlock2D}


@dataclass
class GuiderResiduals:
    """The guider's scaled outputs: 12 down, 1 mid and 15 up residuals for the UNet."""

    down: list[torch.Tensor]
    mid: torch.Tensor
    up: list[torch.Tensor]

    def chunk(self, index: int, chunks: int) -> "GuiderResiduals":
        """The batch slice `index` of `chunks` equal parts of every residual."""
        pick = lambda t: t.chunk(chunks)[index]  # noqa: E731
        return GuiderResiduals([pick(t) for t in self.down], pick(self.mid), [pick(t) for t in self.up])


def _zero_conv(channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, channels, kernel_size=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ColorGuiderSDModel(ModelMixin, ConfigMixin):
    """ColorFlow's colour-ID branch for SD1.5, with the released config and state-dict names."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        conditioning_channels: int = 9,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: tuple[str, ...] = ("SelfAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        mid_block_type: str = "UNetMidBlock2DSelfAttn",
        up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("SelfAttnUpBlock2D",) * 3,
        only_cross_attention: bool = False,
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        act_fn: str = "silu",
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 768,
        transformer_layers_per_block: int = 1,
        encoder_hid_dim: int | None = None,
        encoder_hid_dim_type: str | None = None,
        attention_head_dim: int = 8,
        num_attention_heads: int | None = None,
        use_linear_projection: bool = False,
        class_embed_type: str | None = None,
        addition_embed_type: str | None = None,
        addition_time_embed_dim: int | None = None,
        num_class_embeds: int | None = None,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
        projection_class_embeddings_input_dim: int | None = None,
        brushnet_conditioning_channel_order: str = "rgb",
        conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256),
        global_pool_conditions: bool = False,
        addition_embed_type_num_heads: int = 64,
    ):
        super().__init__()
        unsupported = {
            "class_embed_type": class_embed_type,
            "addition_embed_type": addition_embed_type,
            "encoder_hid_dim_type": encoder_hid_dim_type,
            "num_class_embeds": num_class_embeds,
        }
        if any(value is not None for value in unsupported.values()) or mid_block_type != "UNetMidBlock2DSelfAttn":
            raise IncompatibleWeightsError(f"unsupported ColorGuider config: {unsupported}, mid {mid_block_type}")
        if brushnet_conditioning_channel_order != "rgb" or global_pool_conditions:
            raise IncompatibleWeightsError("only the released 'rgb', non-pooled ColorGuider is supported")
        heads = num_attention_heads or attention_head_dim
        time_dim = block_out_channels[0] * 4
        common = dict(temb_channels=time_dim, resnet_eps=norm_eps, resnet_act_fn=act_fn, resnet_groups=norm_num_groups)
        attention = dict(
            num_attention_heads=heads,
            cross_attention_dim=None,
            use_linear_projection=use_linear_projection,
            upcast_attention=upcast_attention,
            transformer_layers_per_block=transformer_layers_per_block,
        )

        self.conv_in_condition = nn.Conv2d(in_channels + conditioning_channels, block_out_channels[0], 3, padding=1)
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], time_dim, act_fn=act_fn)

        self.down_blocks = nn.ModuleList()
        self.brushnet_down_blocks = nn.ModuleList([_zero_conv(block_out_channels[0])])
        output_channel = block_out_channels[0]
        for i, block_type in enumerate(down_block_types):
            input_channel, output_channel = output_channel, block_out_channels[i]
            is_final = i == len(block_out_channels) - 1
            kwargs = dict(
                in_channels=input_channel,
                out_channels=output_channel,
                num_layers=layers_per_block,
                add_downsample=not is_final,
                downsample_padding=downsample_padding,
                resnet_time_scale_shift=resnet_time_scale_shift,
                **common,
            )
            if block_type == "SelfAttnDownBlock2D":
                kwargs.update(attention)
            elif block_type != "DownBlock2D":
                raise IncompatibleWeightsError(f"unsupported ColorGuider down block {block_type}")
            self.down_blocks.append(_DOWN_BLOCKS[block_type](**kwargs))
            for _ in range(layers_per_block + (0 if is_final else 1)):
                self.brushnet_down_blocks.append(_zero_conv(output_channel))

        self.mid_block = UNetMidBlock2DCrossAttn(
            in_channels=block_out_channels[-1],
            output_scale_factor=mid_block_scale_factor,
            resnet_time_scale_shift=resnet_time_scale_shift,
            **common,
            **attention,
        )
        self.brushnet_mid_block = _zero_conv(block_out_channels[-1])

        self.up_blocks = nn.ModuleList()
        self.brushnet_up_blocks = nn.ModuleList()
        reversed_channels = list(reversed(block_out_channels))
        output_channel = reversed_channels[0]
        for i, block_type in enumerate(up_block_types):
            prev_output_channel, output_channel = output_channel, reversed_channels[i]
            input_channel = reversed_channels[min(i + 1, len(block_out_channels) - 1)]
            is_final = i == len(block_out_channels) - 1
            kwargs = dict(
                in_channels=input_channel,
                out_channels=output_channel,
                prev_output_channel=prev_output_channel,
                num_layers=layers_per_block + 1,
                add_upsample=not is_final,
                resolution_idx=i,
                resnet_time_scale_shift=resnet_time_scale_shift,
                **common,
            )
            if block_type == "SelfAttnUpBlock2D":
                kwargs.update(attention)
            elif block_type != "UpBlock2D":
                raise IncompatibleWeightsError(f"unsupported ColorGuider up block {block_type}")
            self.up_blocks.append(_UP_BLOCKS[block_type](**kwargs))
            for _ in range(layers_per_block + 1 + (0 if is_final else 1)):
                self.brushnet_up_blocks.append(_zero_conv(output_channel))

    def _time_embedding(self, timestep: torch.Tensor | float | int, sample: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], device=sample.device)
        timestep = timestep.reshape(-1).to(sample.device).expand(sample.shape[0])
        return self.time_embedding(self.time_proj(timestep).to(sample.dtype))

    @staticmethod
    def _run_layers(block: nn.Module, hidden: torch.Tensor, temb: torch.Tensor, skips=None) -> list[torch.Tensor]:
        """Run a block layer by layer; return every per-layer state (plus the resampler's output)."""
        states = []
        attentions = getattr(block, "attentions", None)
        for j, resnet in enumerate(block.resnets):
            if skips is not None:
                hidden = torch.cat([hidden, skips.pop()], dim=1)
            hidden = resnet(hidden, temb)
            if attentions is not None:
                hidden = attentions[j](hidden, return_dict=False)[0]
            states.append(hidden)
        return states

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        colorguider_cond: torch.Tensor,
        conditioning_scale: float = 1.0,
    ) -> GuiderResiduals:
        """Residuals for a noisy latent `sample` and the 9-channel condition (no text input: no layer uses it)."""
        temb = self._time_embedding(timestep, sample)
        hidden = self.conv_in_condition(torch.cat([sample, colorguider_cond], dim=1))
        skips = [hidden]
        for block in self.down_blocks:
            states = self._run_layers(block, hidden, temb)
            hidden = states[-1]
            if block.downsamplers is not None:
                hidden = block.downsamplers[0](hidden)
                states.append(hidden)
            skips.extend(states)
        down = [conv(state) for conv, state in zip(self.brushnet_down_blocks, skips)]

        mid_block = self.mid_block
        hidden = mid_block.resnets[0](hidden, temb)
        hidden = mid_block.attentions[0](hidden, return_dict=False)[0]
        hidden = mid_block.resnets[1](hidden, temb)
        mid = self.brushnet_mid_block(hidden)

        up_states = []
        for block in self.up_blocks:
            states = self._run_layers(block, hidden, temb, skips)
            hidden = states[-1]
            if block.upsamplers is not None:
                size = skips[-1].shape[2:] if skips else None
                hidden = block.upsamplers[0](hidden, size)
                states.append(hidden)
            up_states.extend(states)
        up = [conv(state) for conv, state in zip(self.brushnet_up_blocks, up_states)]

        scale = conditioning_scale
        return GuiderResiduals([d * scale for d in down], mid * scale, [u * scale for u in up])
