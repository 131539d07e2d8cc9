"""The PixArt ColorGuider: 14 self-attention DiT blocks whose zero-linear outputs steer PixArt-α."""
from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.embeddings import PatchEmbed
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormSingle
from torch import nn

from ..errors import IncompatibleWeightsError

#: The release stores the last zero linear a second time under this name (an attribute alias in upstream's class).
ALIAS_PREFIX = "after_proj."


def _zero_linear(dim: int) -> nn.Linear:
    linear = nn.Linear(dim, dim)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


class ColorGuiderPixArtModel(ModelMixin, ConfigMixin):
    """ColorFlow's colour-ID branch for PixArt-α, with the released config names and state-dict keys.

    Input: the noisy latent and the 9 condition channels (13 channels in all); output: one control tensor
    per block (`num_layers // 2` = 14), to be added after transformer blocks 0..13 of PixArt.
    Config keys unused by the computation (out_channels, norm_num_groups, cross_attention_dim, caption_channels)
    are accepted so the released config.json loads unchanged. `cond_channels` defaults to 9, the only value
    the ColorFlow condition (and the released 13-channel patch embedding) fits.
    """

    config_name = "config.json"
    _no_split_modules = ["BasicTransformerBlock", "PatchEmbed"]

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        in_channels: int = 4,
        cond_channels: int = 9,
        out_channels: int | None = 8,
        num_layers: int = 28,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        cross_attention_dim: int | None = 1152,
        attention_bias: bool = True,
        sample_size: int = 128,
        patch_size: int = 2,
        activation_fn: str = "gelu-approximate",
        num_embeds_ada_norm: int | None = 1000,
        upcast_attention: bool = False,
        norm_type: str = "ada_norm_single",
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-6,
        interpolation_scale: int | None = None,
        use_additional_conditions: bool | None = None,
        caption_channels: int | None = None,
        attention_type: str | None = "default",
    ):
        super().__init__()
        if norm_type != "ada_norm_single" or num_embeds_ada_norm is None:
            raise IncompatibleWeightsError(
                f"unsupported PixArt ColorGuider config: norm_type={norm_type!r}, num_embeds_ada_norm={num_embeds_ada_norm}"
            )
        inner = num_attention_heads * attention_head_dim
        if use_additional_conditions is None:
            use_additional_conditions = sample_size == 128
        self.use_additional_conditions = use_additional_conditions
        self.pos_embed = PatchEmbed(
            height=sample_size,
            width=sample_size,
            patch_size=patch_size,
            in_channels=in_channels + cond_channels,
            embed_dim=inner,
            interpolation_scale=interpolation_scale if interpolation_scale is not None else max(sample_size // 64, 1),
        )
        self.transformer_blocks = nn.ModuleList(
            [
                BasicTransformerBlock(
                    inner,
                    num_attention_heads,
                    attention_head_dim,
                    dropout=dropout,
                    cross_attention_dim=None,
                    activation_fn=activation_fn,
                    num_embeds_ada_norm=num_embeds_ada_norm,
                    attention_bias=attention_bias,
                    upcast_attention=upcast_attention,
                    norm_type=norm_type,
                    norm_elementwise_affine=norm_elementwise_affine,
                    norm_eps=norm_eps,
                    attention_type=attention_type,
                )
                for _ in range(num_layers // 2)
            ]
        )
        self.adapter_linear = nn.ModuleList([_zero_linear(inner) for _ in range(num_layers // 2)])
        self.adaln_single = AdaLayerNormSingle(inner, use_additional_conditions=use_additional_conditions)

    @property
    def num_controls(self) -> int:
        """How many control tensors one forward returns (= PixArt blocks it steers)."""
        return len(self.adapter_linear)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        condition: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        conditioning_scale: float = 1.0,
    ) -> list[torch.Tensor]:
        """Control tensors [B, tokens, inner] for `cat[sample, condition]` (channels 4 + 9) at `timestep`.

        `added_cond_kwargs` holds PixArt's micro-conditions ('resolution' [B,2], 'aspect_ratio' [B,1]).
        `conditioning_scale` multiplies every output (upstream adds them unscaled, i.e. 1.0).
        """
        hidden = torch.cat([sample, condition.to(sample.dtype)], dim=1)
        batch = hidden.shape[0]
        hidden = self.pos_embed(hidden)
        timestep_mod, _ = self.adaln_single(timestep, added_cond_kwargs, batch_size=batch, hidden_dtype=hidden.dtype)
        controls = []
        for block, adapter in zip(self.transformer_blocks, self.adapter_linear):
            hidden = block(hidden, timestep=timestep_mod)
            out = adapter(hidden)
            controls.append(out * conditioning_scale if conditioning_scale != 1.0 else out)
        return controls


def drop_alias_keys(state_dict: dict[str, torch.Tensor], num_blocks: int) -> dict[str, torch.Tensor]:
    """The release's state dict without the `after_proj.*` duplicates of the last zero linear.

    Refuses a file whose `after_proj.*` tensors differ from `adapter_linear.<last>.*`: that would be a model
    this class cannot represent.
    """
    aliases = {k: v for k, v in state_dict.items() if k.startswith(ALIAS_PREFIX)}
    kept = {k: v for k, v in state_dict.items() if not k.startswith(ALIAS_PREFIX)}
    last = f"adapter_linear.{num_blocks - 1}."
    for key, tensor in aliases.items():
        twin = last + key[len(ALIAS_PREFIX):]
        if twin not in kept:
            raise IncompatibleWeightsError(f"guider file has '{key}' but no '{twin}'")
        if kept[twin].shape != tensor.shape or not torch.equal(kept[twin], tensor):
            raise IncompatibleWeightsError(f"guider file's '{key}' differs from '{twin}' (expected a duplicate)")
    return kept


def with_alias_keys(state_dict: dict[str, torch.Tensor], num_blocks: int) -> dict[str, torch.Tensor]:
    """`state_dict` plus the release's `after_proj.*` aliases (sharing storage with the last zero linear)."""
    last = f"adapter_linear.{num_blocks - 1}."
    out = dict(state_dict)
    for name in ("weight", "bias"):
        out[ALIAS_PREFIX + name] = state_dict[last + name]
    return out
