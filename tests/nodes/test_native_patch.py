"""The native path's residual mapping: ComfyUI's patch points (a stand-in of openaimodel) must give the UNet output
of the core path (diffusers UNet + forward hooks) to float tolerance."""
from __future__ import annotations

import copy
import importlib
from types import SimpleNamespace

import pytest
import torch

from colorflow_core.models.residual_sites import ResidualSite, guider_layout, guider_residuals, residual_layout
from colorflow_core.models.unet_injection import inject_guider_residuals

from .comfy_stand_in import LdmUNet, StandInPatcher

LATENT = (16, 24)


@pytest.fixture(scope="module")
def native(pack):
    return importlib.import_module(f"{pack.__name__}.nodes.native_patch")


@pytest.fixture(scope="module")
def call(tiny_model):
    """One model call's inputs: x_t and text states for [uncond, cond] rows, the condition rows, a timestep."""
    generator = torch.Generator().manual_seed(3)
    unet = tiny_model.pipeline.unet
    x = torch.randn(2, 4, *LATENT, generator=generator)
    condition = torch.randn(2, 9, *LATENT, generator=generator)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    return SimpleNamespace(x=x, condition=condition, context=context, t=torch.tensor([599.0]))


def _core(tiny_model, call, strength=1.0):
    pipe = tiny_model.pipeline
    residuals = pipe.guider(call.x, call.t, call.condition, conditioning_scale=strength)
    with torch.no_grad(), inject_guider_residuals(pipe.unet, residuals):
        return pipe.unet(call.x, call.t, encoder_hidden_states=call.context).sample


def _patched(native, tiny_model, call, strength=1.0, sigma_range=None):
    guider = tiny_model.pipeline.guider
    patcher = StandInPatcher(LdmUNet(tiny_model.pipeline.unet))
    rows = call.condition[:, None]  # [uncond, cond] × one page
    guidance = native.ColorFlowGuidance(guider, SimpleNamespace(model=guider), rows, guider_layout(guider), strength, sigma_range)
    return native.patch_model(patcher, guidance), guidance


def test_layout_is_the_releases():
    layout = residual_layout(4, 2)
    assert (len(layout.down), len(layout.up)) == (12, 15)
    assert layout.down[0] == ResidualSite("input", 0, "after_skip")
    assert [s.block for s in layout.down[1:]] == list(range(1, 12))
    assert [s for s in layout.up if s.moment == "before_upsample"] == [ResidualSite("output", b, "before_upsample") for b in (2, 5, 8)]
    assert layout.up[-1] == ResidualSite("output", 11, "end")


def test_stand_in_runs_the_unet_unchanged(tiny_model, call):
    unet = tiny_model.pipeline.unet
    with torch.no_grad():
        expected = unet(call.x, call.t, encoder_hidden_states=call.context).sample
        got = StandInPatcher(LdmUNet(unet)).apply_model(call.x, call.t, call.context, [1, 0])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_patch_points_reproduce_the_core_path(native, tiny_model, call, strength):
    expected = _core(tiny_model, call, strength)
    patcher, _ = _patched(native, tiny_model, call, strength)
    with torch.no_grad():
        got = patcher.apply_model(call.x, call.t, call.context, [1, 0])  # rows [uncond, cond], like the core
        plain = tiny_model.pipeline.unet(call.x, call.t, encoder_hidden_states=call.context).sample
    assert (got - plain).abs().max() > 1e-2  # the residuals matter at this scale
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_cond_uncond_order_and_chunks_follow_comfyui(native, tiny_model, call):
    """ComfyUI may batch [cond, uncond] or run each half alone: each row still meets its own condition row."""
    expected = _core(tiny_model, call)
    patcher, _ = _patched(native, tiny_model, call)
    with torch.no_grad():
        swapped = patcher.apply_model(call.x.flip(0), call.t, call.context.flip(0), [0, 1])
        cond_only = patcher.apply_model(call.x[1:], call.t, call.context[1:], [0])
    torch.testing.assert_close(swapped, expected.flip(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cond_only, expected[1:], rtol=1e-5, atol=1e-5)


def test_outside_the_sigma_range_the_unet_runs_plain(native, tiny_model, call):
    patcher, _ = _patched(native, tiny_model, call, sigma_range=(5.0, 1.0))
    unet = tiny_model.pipeline.unet
    with torch.no_grad():
        outside = patcher.apply_model(call.x, call.t, call.context, [1, 0], sigmas=torch.tensor([7.0, 7.0]))
        inside = patcher.apply_model(call.x, call.t, call.context, [1, 0], sigmas=torch.tensor([2.0, 2.0]))
        plain = unet(call.x, call.t, encoder_hidden_states=call.context).sample
    torch.testing.assert_close(outside, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inside, _core(tiny_model, call), rtol=1e-5, atol=1e-5)


def test_cloning_the_model_shares_the_guider(native, tiny_model, call):
    """ModelPatcher.clone deep-copies model_options: the patches must not copy the guider or the condition."""
    patcher, guidance = _patched(native, tiny_model, call)
    copied = copy.deepcopy(patcher.transformer_options["patches"])
    assert all(p.guidance is guidance for p in copied["input_block_patch"])
    assert patcher.model_patches_models() == [guidance.guider_patcher] * 3


def test_a_latent_of_another_size_is_refused(tiny_model, call):
    guider = tiny_model.pipeline.guider
    with pytest.raises(Exception, match="sample the LATENT of the canvas size"):
        guider_residuals(guider, call.condition, call.x[..., :8], call.t)


def test_two_guidances_stack(native, tiny_model, call):
    """Two ColorFlow Apply on one MODEL add both residual sets (the last site's handler serves both)."""
    pipe = tiny_model.pipeline
    patcher, _ = _patched(native, tiny_model, call)
    other = call.condition.flip(-1)
    native.patch_model(patcher, native.ColorFlowGuidance(pipe.guider, SimpleNamespace(model=pipe.guider), other[:, None], guider_layout(pipe.guider), 0.5))
    assert len(patcher.transformer_options["patches"]["forward_timestep_embed_patch"]) == 1
    first = pipe.guider(call.x, call.t, call.condition)
    second = pipe.guider(call.x, call.t, other, conditioning_scale=0.5)
    both = type(first)([a + b for a, b in zip(first.down, second.down)], first.mid + second.mid, [a + b for a, b in zip(first.up, second.up)])
    with torch.no_grad(), inject_guider_residuals(pipe.unet, both):
        expected = pipe.unet(call.x, call.t, encoder_hidden_states=call.context).sample
    with torch.no_grad():
        got = patcher.apply_model(call.x, call.t, call.context, [1, 0])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
