"""The ICP sampler and GSRP on tiny weights: options, determinism, caching and modes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from colorflow_core.errors import InvalidInputError
from colorflow_core.options import ColorizeOptions, gsrp_generator, make_generators

from .sampling import run, sample_canvas


def test_same_seed_same_result_other_seed_other_result(tiny_model):
    canvas = sample_canvas()
    a, b, c = run(tiny_model, canvas, 3), run(tiny_model, canvas, 3), run(tiny_model, canvas, 4)
    assert torch.equal(a.latents, b.latents)
    assert not torch.equal(a.latents, c.latents)
    assert a.canvas.size == (128, 192) and a.query.size == (64, 96)


def test_cfg_free_mode_runs_single_batch_and_differs(tiny_model):
    canvas = sample_canvas()
    batches = []
    hook = tiny_model.pipeline.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        fast = run(tiny_model, canvas, guidance_scale=1.0)
    finally:
        hook.remove()
    assert batches == [1, 1]
    assert torch.isfinite(fast.latents).all()
    assert not torch.equal(fast.latents, run(tiny_model, canvas).latents)


def test_text_is_encoded_once_per_model(tiny_model):
    calls = []
    hook = tiny_model.pipeline.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        tiny_model.pipeline.encode_prompt("a prompt seen once", "", True)
        tiny_model.pipeline.encode_prompt("a prompt seen once", "", True)
    finally:
        hook.remove()
    assert len(calls) == 2  # negative + positive, once


def test_guider_scale_zero_removes_the_guider(tiny_model):
    canvas = sample_canvas()
    off = run(tiny_model, canvas, guider_scale=0.0)
    on = run(tiny_model, canvas, guider_scale=1.0)
    assert not torch.equal(off.latents, on.latents)


def test_progress_is_reported_and_an_exception_interrupts(tiny_model):
    seen = []
    run(tiny_model, sample_canvas(), num_inference_steps=3, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]

    def interrupt(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tiny_model, sample_canvas(), progress=interrupt)


@pytest.mark.parametrize("bad", [dict(num_inference_steps=0), dict(guidance_scale=0.5)])
def test_bad_sampler_options(tiny_model, bad):
    with pytest.raises(InvalidInputError):
        run(tiny_model, sample_canvas(), **bad)


def test_bfloat16_runs_on_cpu(tiny_release):
    from colorflow_core.loading import load_colorflow

    model = load_colorflow(*tiny_release, dtype="bfloat16")
    result = run(model, sample_canvas(), num_inference_steps=1)
    assert result.latents.dtype == torch.bfloat16 and torch.isfinite(result.latents.float()).all()
    final = model.upscaler(result.query, result.query.resize((96, 144)), generator=torch.Generator().manual_seed(0))
    assert final.size == (96, 144)


def test_gsrp_generator_reproduces_the_one_call_draws(tiny_model):
    canvas = sample_canvas()
    _, posterior = make_generators(5, "cpu")
    run_result = tiny_model.pipeline(canvas.image, canvas.mask, num_inference_steps=1,
                                     generator=torch.Generator().manual_seed(5), posterior_generator=posterior)
    guide = run_result.query.resize((96, 144))
    one_call = tiny_model.upscaler(run_result.query, guide, generator=posterior)
    separate = tiny_model.upscaler(run_result.query, guide, generator=gsrp_generator(5, "cpu", canvas.image.size, cfg=True))
    assert np.array_equal(np.asarray(one_call), np.asarray(separate))
    other = tiny_model.upscaler(run_result.query, guide, generator=gsrp_generator(6, "cpu", canvas.image.size, cfg=True))
    assert not np.array_equal(np.asarray(one_call), np.asarray(other))


def test_options_validate():
    with pytest.raises(InvalidInputError, match="multiple of 32"):
        ColorizeOptions(size=(100, 96))
    with pytest.raises(InvalidInputError):
        ColorizeOptions(preprocess="magic")
    assert ColorizeOptions().size is None  # auto by default
