"""GPU paths that can be checked on the CPU: the default dtype, the scoped kernels (GroupNorm, SDPA order), the roofline."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from colorflow_core import gpu_kernels
from colorflow_core.cli import main
from colorflow_core.evaluation.eager_parity import contiguous_weights, eager_parity
from colorflow_core.evaluation.roofline import achieved, modelled_stages
from colorflow_core.gpu_kernels import (
    fast_group_norm, fast_kernels, group_norm, top_level_backend, upstream_kernels,
)
from colorflow_core.presets import PRESETS, get_preset
from colorflow_core.runtime import default_dtype

from .test_cli import colorize_args


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_defaults_to_float16_on_cuda_and_float32_on_the_cpu(name):
    preset = get_preset(name)
    assert default_dtype(torch.device("cuda"), preset) == torch.float16  # upstream's dtype, also for faithful
    assert default_dtype(torch.device("cuda", 1), preset) == torch.float16
    assert default_dtype(torch.device("cpu"), preset) == torch.float32
    half_on_mps = name != "faithful"
    assert default_dtype(torch.device("mps"), preset) == (torch.float16 if half_on_mps else torch.float32)


@pytest.mark.parametrize("device, shown", [("cpu", "float32 on cpu")])  # CUDA's float16: default_dtype's test
def test_colorize_names_the_dtype_it_loads_in(tiny_release, tmp_path, capsys, device, shown):
    page = tmp_path / "p.png"
    Image.new("L", (64, 96)).save(page)
    args = colorize_args(tiny_release, tmp_path, str(page))
    args[args.index("--device") + 1] = device
    args[args.index("--colorflow") + 1] = str(tmp_path / "nowhere")  # stops right after the line, before any loading
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"loading models (preset faithful, {shown})" in err
    assert main([*args, "--dtype", "bfloat16"]) == 1
    assert "bfloat16 on" in capsys.readouterr().err


def _layouts(x: torch.Tensor):
    yield "contiguous", x
    if x.dim() == 4:
        yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    yield "transposed", x.movedim(1, -1).contiguous().movedim(-1, 1)


@pytest.mark.parametrize("shape, groups", [((2, 64, 12, 10), 32), ((1, 96, 7, 9), 32), ((2, 40, 30), 8)])
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_is_torchs_group_norm_in_the_input_layout(shape, groups, affine, monkeypatch):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * 3 + 1.5  # an offset mean: no cancellation
    weight, bias = (torch.randn(shape[1], generator=generator, dtype=torch.float64) for _ in range(2))
    if not affine:
        weight = bias = None
    reference = F.group_norm(x, groups, weight, bias, 1e-6)
    monkeypatch.setattr(gpu_kernels, "STATS_CHUNK", 500)  # several chunks of groups per call
    for dtype, tolerance in ((torch.float32, 2e-7), (torch.bfloat16, 1e-2)):
        cast = (lambda t: None if t is None else t.to(dtype))
        for layout, data in _layouts(x.to(dtype)):
            out = group_norm(data, groups, cast(weight), cast(bias), 1e-6)
            assert out.dtype == dtype and out.stride() == data.stride(), layout
            torch_error = (F.group_norm(data, groups, cast(weight), cast(bias), 1e-6).double() - reference).norm()
            error = (out.double() - reference).norm()
            assert error / reference.norm() < tolerance and error <= 1.5 * torch_error + 1e-12, (layout, dtype)


def test_fast_group_norm_covers_every_group_norm_and_restores_the_modules():
    net = nn.Sequential(nn.Conv2d(3, 32, 3), nn.GroupNorm(8, 32), nn.Sequential(nn.GroupNorm(4, 32, affine=False)))
    norms = [net[1], net[2][0]]
    x = torch.randn(1, 3, 9, 9)
    expected = net(x)
    with fast_group_norm(net) as count:
        assert count == 2 and all("forward" in vars(n) for n in norms)
        with fast_group_norm(net) as nested:
            assert nested == 0  # the outer block keeps its patch
        assert all("forward" in vars(n) for n in norms)
        assert torch.equal(net(x), expected)  # CPU inputs: torch's own kernel, bit for bit
    assert not any("forward" in vars(n) for n in norms)


def test_fast_kernels_change_nothing_away_from_cuda():
    norm = nn.GroupNorm(2, 4)
    with fast_kernels("cpu", norm):
        assert "forward" not in vars(norm)
    with fast_kernels(torch.device("cuda"), norm):
        assert "forward" in vars(norm)  # a staged or resident CUDA model gets the kernel inside the block
    assert "forward" not in vars(norm)


def test_the_top_level_attention_probe_names_a_kernel():
    assert top_level_backend("cpu", torch.float32, tokens=64) in ("FLASH_ATTENTION", "MATH", "EFFICIENT_ATTENTION")


def test_roofline_halves_the_batch_stages_without_cfg_and_divides():
    cfg = modelled_stages(512, 800, cfg=True, encode_once=False)
    free = modelled_stages(800, 512, cfg=False, encode_once=False)
    once = modelled_stages(640, 640, cfg=True, encode_once=True)
    assert cfg["step"]["tflop"] == 2 * free["step"]["tflop"] and cfg["gsrp"] == free["gsrp"]
    assert once["vae_encode"]["tflop"] == cfg["vae_encode"]["tflop"] / 2 and once["step"] == cfg["step"]
    assert cfg["step"]["h200_fa3_ms"] == 106 and modelled_stages(128, 192, True, False)["step"]["h200_fa3_ms"] is None
    assert modelled_stages(300, 300, True, False) is None
    rows = achieved({"step": 0.1, "canvas": 0.05, "decode": 0.0}, cfg)
    assert list(rows) == ["step"] and rows["step"]["tflop_per_s"] == pytest.approx(364.9) and rows["step"]["ms"] == 100


def test_upstream_kernels_switch_the_fast_kernels_off():
    norm = nn.GroupNorm(2, 4)
    with upstream_kernels():
        with fast_kernels("cuda", norm):
            assert "forward" not in vars(norm)
    with fast_kernels("cuda", norm):
        assert "forward" in vars(norm)


def test_contiguous_weights_makes_channels_last_nets_nchw_for_the_block():
    last = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)).to(memory_format=torch.channels_last)
    plain = nn.Conv2d(3, 8, 3)
    with contiguous_weights([last, plain]) as count:
        assert count == 1 and all(p.is_contiguous() for p in last.parameters())
    assert last[1].weight.is_contiguous(memory_format=torch.channels_last) and not last[1].weight.is_contiguous()
    assert plain.weight.is_contiguous()


def test_eager_parity_on_the_cpu_compares_identical_pages(tiny_model):
    from colorflow_core.evaluation.bench import PipelineBench, bench_inputs

    result = eager_parity(tiny_model, *bench_inputs(PipelineBench(width=64, height=96, steps=1)))
    assert result == {"final_db": float("inf"), "icp_canvas_db": float("inf"), "lowres_db": float("inf"),
                      "nets_made_nchw": 0}
