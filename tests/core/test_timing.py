"""The page-time model, the slow-run warning before the first page, and the s/step + ETA progress."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch import nn

from colorflow_core.cli import main
from colorflow_core.demo import TINY_SIZE
from colorflow_core.timing import ProgressMeter, estimate_page_time


def _estimate_args(tiny_release, tmp_path, *extra):
    release, base = tiny_release
    page, ref = tmp_path / "page.png", tmp_path / "ref.png"
    Image.new("L", (400, 600), 200).save(page)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 64, 3), dtype=np.uint8)).save(ref)
    return ["colorize", "--colorflow", str(release), "--base", str(base), "--refs", str(ref), "--out",
            str(tmp_path / "out"), "--device", "cpu", "--estimate", *extra, str(page)]


def test_default_size_cpu_run_warns_with_the_fast_options(tiny_release, tmp_path, capsys):
    assert main(_estimate_args(tiny_release, tmp_path)) == 0  # --size auto, 10 steps, faithful
    err = capsys.readouterr().err
    assert "s/step" in err and "per page" in err
    assert "warning: one page will take" in err
    assert "--preset fast" in err and "--width 320 --height 320" in err
    assert not (tmp_path / "out").exists()  # --estimate stops before the first page


def test_demo_size_cpu_run_does_not_warn(tiny_release, tmp_path, capsys):
    width, height = TINY_SIZE
    assert main(_estimate_args(tiny_release, tmp_path, "--width", str(width), "--height", str(height))) == 0
    err = capsys.readouterr().err
    assert "per page" in err and "warning" not in err


class _Configured(nn.Module):
    def __init__(self, **config):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.zeros(1))


SD15 = {"denoiser": (_Configured(block_out_channels=[320, 640, 1280, 1280]),),
        "vae": (_Configured(block_out_channels=[128, 256, 512, 512], layers_per_block=2),)}


def test_real_width_estimates_match_the_measured_and_counted_figures(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # the rates were measured on two threads
    # docs/benchmarks.md, random SD1.5-width weights on this CPU: a 128×192 CFG fp32 step in 7.8 s, bf16 no-CFG 2.0 s.
    assert 6.0 < estimate_page_time(SD15, "sd", "cpu", (128, 192), 10, True).step_seconds < 10.0
    fast = estimate_page_time(SD15, "sd", "cpu", (128, 192), 10, False, torch.bfloat16, encode_once=True)
    assert 1.5 < fast.step_seconds < 3.0
    # physical-limits §5: a 512×800 page, CFG, fp32, predicted 65 min (step 322 s, the rest ~610 s besides CLIP).
    page = estimate_page_time(SD15, "sd", "cpu", (512, 800), 10, True)
    assert 45 * 60 < page.seconds < 80 * 60
    assert page.seconds == estimate_page_time(SD15, "sd", "cpu", None, 10, True).seconds  # auto: the same area
    # A GPU is far faster, and says its figure is rough.
    gpu = estimate_page_time(SD15, "sd", "cuda", (512, 800), 10, True, torch.bfloat16)
    assert gpu.rough and gpu.seconds < 30


def test_progress_shows_seconds_per_step_and_eta():
    now = [0.0]
    stream = io.StringIO()
    meter = ProgressMeter(pages=2, stream=stream, clock=lambda: now[0])
    for step, at in ((1, 5.0), (2, 7.0), (3, 9.0), (4, 11.0)):  # the first step also paid for the encode
        now[0] = at
        meter("step", step, 4)
    text = stream.getvalue()
    assert "step 2/4  2.00 s/step  ETA 12 s" in text  # 2 steps left here + 4 of the next page, 2 s each
    assert "step 4/4  2.00 s/step  ETA 8.0 s" in text
    now[0] = 12.0
    meter("page", 1, 2)
    now[0] = 17.0
    meter("step", 1, 4)
    assert stream.getvalue().endswith("ETA 7.0 s   ")  # one page took 12 s, 5 s of the second are gone
