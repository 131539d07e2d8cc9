"""A stand-in of the parts of ComfyUI the native ColorFlow patch touches, for CI (ComfyUI itself is not installable).

`LdmUNet` regroups a diffusers SD UNet's own modules into ComfyUI's `openaimodel.UNetModel` layout (input_blocks,
middle_block, output_blocks of TimestepEmbedSequential-like containers) and runs them the way ComfyUI 0.3.64's
`UNetModel._forward` does: the DIFFUSION_MODEL wrappers around it, `input_block_patch` then the skip then
`input_block_patch_after_skip` after every input block, `output_block_patch(h, hsp)` before every output block's
concat, and `forward_timestep_embed_patch` handlers for layers of no known kind. `StandInPatcher` records what a
ModelPatcher clone records (patches, wrappers, object patches) and applies the object patches while it runs.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel


class Upsample(torch.nn.Module):
    """ComfyUI's Upsample call convention (`output_shape` is a full tensor shape) over diffusers' Upsample2D."""

    def __init__(self, inner: Upsample2D):
        super().__init__()
        self.inner = inner

    def forward(self, x, output_shape=None):
        return self.inner(x, output_size=None if output_shape is None else tuple(output_shape[2:]))


class TimestepEmbedSequential(torch.nn.Sequential):
    """ComfyUI's container: each layer gets what its kind needs."""

    def forward(self, x, emb, context, transformer_options, output_shape=None):
        for layer in self:
            if isinstance(layer, ResnetBlock2D):
                x = layer(x, emb)
            elif isinstance(layer, Transformer2DModel):
                x = layer(x, encoder_hidden_states=context, return_dict=False)[0]
            elif isinstance(layer, Upsample):
                x = layer(x, output_shape=output_shape)
            else:
                handled = False
                for class_type, handler in transformer_options.get("patches", {}).get("forward_timestep_embed_patch", []):
                    if isinstance(layer, class_type):
                        x = handler(layer, x, emb, context, transformer_options, output_shape, None, None, None)
                        handled = True
                        break
                if not handled:
                    x = layer(x)
        return x


class _Executor:
    """ComfyUI's WrapperExecutor: calls the next wrapper (or the original) and exposes the wrapped instance."""

    def __init__(self, original, class_obj, wrappers, index=0):
        self.original, self.class_obj, self.wrappers, self.index = original, class_obj, wrappers, index

    def __call__(self, *args, **kwargs):
        if self.index >= len(self.wrappers):
            return self.original(*args, **kwargs)
        return self.wrappers[self.index](_Executor(self.original, self.class_obj, self.wrappers, self.index + 1), *args, **kwargs)


class LdmUNet(torch.nn.Module):
    """A diffusers SD UNet's modules in ComfyUI's block layout, run like ComfyUI runs them."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.input_blocks = torch.nn.ModuleList([TimestepEmbedSequential(unet.conv_in)])
        for block in unet.down_blocks:
            attentions = getattr(block, "attentions", None)
            for j, resnet in enumerate(block.resnets):
                self.input_blocks.append(TimestepEmbedSequential(resnet, *([attentions[j]] if attentions else [])))
            if block.downsamplers:
                self.input_blocks.append(TimestepEmbedSequential(block.downsamplers[0]))
        mid = unet.mid_block
        self.middle_block = TimestepEmbedSequential(mid.resnets[0], mid.attentions[0], mid.resnets[1])
        self.output_blocks = torch.nn.ModuleList()
        for block in unet.up_blocks:
            attentions = getattr(block, "attentions", None)
            for j, resnet in enumerate(block.resnets):
                layers = [resnet, *([attentions[j]] if attentions else [])]
                if j == len(block.resnets) - 1 and block.upsamplers:
                    layers.append(Upsample(block.upsamplers[0]))
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        assert all(isinstance(b[0], (torch.nn.Conv2d, ResnetBlock2D, Downsample2D)) for b in self.input_blocks)

    def forward(self, x, timesteps, context, y=None, control=None, transformer_options=None, **kwargs):
        transformer_options = transformer_options or {}
        wrappers = [w for ws in transformer_options.get("wrappers", {}).get("diffusion_model", {}).values() for w in ws]
        return _Executor(self._forward, self, wrappers)(x, timesteps, context, y, control, transformer_options, **kwargs)

    def _forward(self, x, timesteps, context, y, control, transformer_options, **kwargs):
        patches = transformer_options.get("patches", {})
        emb = self.unet.time_embedding(self.unet.time_proj(timesteps.expand(x.shape[0])).to(x.dtype))
        hs = []
        h = x
        for index, module in enumerate(self.input_blocks):
            transformer_options["block"] = ("input", index)
            h = module(h, emb, context, transformer_options)
            for patch in patches.get("input_block_patch", []):
                h = patch(h, transformer_options)
            hs.append(h)
            for patch in patches.get("input_block_patch_after_skip", []):
                h = patch(h, transformer_options)
        transformer_options["block"] = ("middle", 0)
        h = self.middle_block(h, emb, context, transformer_options)
        for index, module in enumerate(self.output_blocks):
            transformer_options["block"] = ("output", index)
            hsp = hs.pop()
            for patch in patches.get("output_block_patch", []):
                h, hsp = patch(h, hsp, transformer_options)
            h = torch.cat([h, hsp], dim=1)
            output_shape = hs[-1].shape if hs else None
            h = module(h, emb, context, transformer_options, output_shape)
        return self.unet.conv_out(self.unet.conv_act(self.unet.conv_norm_out(h)))


class _Model(torch.nn.Module):
    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = diffusion_model


class StandInPatcher:
    """What ComfyUI's ModelPatcher records for the native patch, and its object patches applied while running."""

    def __init__(self, diffusion_model: LdmUNet):
        self.model = _Model(diffusion_model)
        self.transformer_options: dict = {"patches": {}, "wrappers": {}}
        self.object_patches: dict = {}

    def set_model_patch(self, patch, name):
        self.transformer_options["patches"][name] = self.transformer_options["patches"].get(name, []) + [patch]

    def set_model_input_block_patch(self, patch):
        self.set_model_patch(patch, "input_block_patch")

    def set_model_input_block_patch_after_skip(self, patch):
        self.set_model_patch(patch, "input_block_patch_after_skip")

    def set_model_output_block_patch(self, patch):
        self.set_model_patch(patch, "output_block_patch")

    def set_model_forward_timestep_embed_patch(self, patch):
        self.set_model_patch(patch, "forward_timestep_embed_patch")

    def add_wrapper_with_key(self, wrapper_type, key, wrapper):
        self.transformer_options["wrappers"].setdefault(wrapper_type, {}).setdefault(key, []).append(wrapper)

    def add_object_patch(self, name, obj):
        self.object_patches[name] = obj

    def get_model_object(self, name):
        if name in self.object_patches:
            return self.object_patches[name]
        return self.model.get_submodule(name)

    def model_patches_models(self) -> list:
        return [m for ps in self.transformer_options["patches"].values() for p in ps if hasattr(p, "models") for m in p.models()]

    @contextmanager
    def patched(self):
        """The object patches set on the model (ModelPatcher.patch_model), restored after."""
        saved = {}
        for name, obj in self.object_patches.items():
            parent, _, child = name.rpartition(".")
            saved[name] = self.model.get_submodule(name)
            setattr(self.model.get_submodule(parent), child, obj)
        try:
            yield self.model.diffusion_model
        finally:
            for name, obj in saved.items():
                parent, _, child = name.rpartition(".")
                setattr(self.model.get_submodule(parent), child, obj)

    def apply_model(self, x, timesteps, context, cond_or_uncond, sigmas=None):
        """One UNet call the way ComfyUI's sampler makes it (cond_or_uncond and sigmas in transformer_options)."""
        options = {**self.transformer_options, "cond_or_uncond": cond_or_uncond}
        if sigmas is not None:
            options["sigmas"] = sigmas
        with self.patched() as unet:
            return unet(x, timesteps, context, transformer_options=options)
