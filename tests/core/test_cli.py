"""The command line: upstream's example reproduced, outputs, errors and make-tiny."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from colorflow_core.cli import main

from ..parity.fixtures import psnr

REPO = Path(__file__).resolve().parents[2]


def test_cli_reproduces_the_upstream_fixture(parity_dir, examples_dir, tmp_path):
    example = examples_dir / "example_3"
    out, inter = tmp_path / "out", tmp_path / "inter"
    code = main([
        "colorize", "--colorflow", str(parity_dir / "colorflow"), "--base", str(parity_dir / "sd15-tiny"),
        "--refs", *(str(example / f"ref{i}.png") for i in (1, 2, 3)), "--out", str(out), "--style", "gray",
        "--preprocess", "gray", "--width", "64", "--height", "96", "--steps", "3", "--seed", "0", "--guidance", "7.5",
        "--device", "cpu", "--dtype", "float32", "--save-intermediates", str(inter), str(example / "input.png"),
    ])
    assert code == 0
    stages = parity_dir / "stages"
    page = inter / "input"
    assert np.array_equal(np.asarray(Image.open(page / "canvas.png")), np.asarray(Image.open(stages / "canvas.png")))
    assert np.array_equal(np.asarray(Image.open(page / "mask.png")), np.asarray(Image.open(stages / "mask_resized.png")))
    assert json.loads((page / "retrieval.json").read_text())["top3"] == [[3, 5, 6], [4, 7, 6], [4, 6, 7], [4, 6, 5]]
    icp = np.asarray(Image.open(page / "icp.png")).astype(int)
    diff = np.abs(icp - np.asarray(Image.open(stages / "icp_output.png")).astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.001
    final = np.asarray(Image.open(out / "input.png"))
    assert np.array_equal(final, np.asarray(Image.open(page / "final.png")))
    assert psnr(final, np.asarray(Image.open(stages / "gsrp_high_res_sample.png"))) >= 40
    assert sorted(p.name for p in page.iterdir()) == ["canvas.png", "final.png", "icp.png", "lowres.png", "mask.png", "retrieval.json"]


def colorize_args(tiny_release, tmp_path, *extra):
    release, base = tiny_release
    ref = tmp_path / "ref.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 64, 3), dtype=np.uint8)).save(ref)
    return ["colorize", "--colorflow", str(release), "--base", str(base), "--refs", str(ref), "--out",
            str(tmp_path / "out"), "--steps", "1", "--device", "cpu", *extra]


@pytest.mark.parametrize("extra, message", [
    (["--width", "100", "--height", "96"], "multiple of 32"),
    (["--width", "64"], "go together"),
    (["--guidance", "0.5"], "guidance"),
])
def test_bad_options_exit_1_with_one_line(tiny_release, tmp_path, capsys, extra, message):
    page = tmp_path / "p.png"
    Image.new("L", (64, 96), 128).save(page)
    assert main(colorize_args(tiny_release, tmp_path, *extra, str(page))) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and message in err[-1]


def test_missing_page_and_missing_weights(tiny_release, tmp_path, capsys):
    assert main(colorize_args(tiny_release, tmp_path, str(tmp_path / "missing.png"))) == 1
    assert "not found" in capsys.readouterr().err
    page = tmp_path / "p.png"
    Image.new("L", (64, 96)).save(page)
    args = colorize_args(tiny_release, tmp_path, str(page))
    args[args.index("--colorflow") + 1] = str(tmp_path / "nowhere")
    assert main(args) == 1
    assert "nowhere" in capsys.readouterr().err


def test_interrupted_run_leaves_no_partial_output(tiny_release, tmp_path, monkeypatch):
    pages = tmp_path / "pages"
    pages.mkdir()
    for i in range(2):
        Image.new("L", (64, 96), 60 * i).save(pages / f"p{i}.png")
    import colorflow_core.pipelines.colorflow_sd as sd

    calls = {"n": 0}
    original = sd.ColorFlowSDPipeline.sample_pages

    def interrupt_second(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(sd.ColorFlowSDPipeline, "sample_pages", interrupt_second)
    assert main(colorize_args(tiny_release, tmp_path, "--width", "64", "--height", "96", str(pages))) == 130
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["p0.png"]


def test_make_tiny_then_colorize_as_a_subprocess(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    made = subprocess.run([sys.executable, "-m", "colorflow_core", "make-tiny", str(tmp_path / "w")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    folders = json.loads(made.stdout.strip().splitlines()[-1])
    assert (Path(folders["colorflow"]) / "GraySD" / "unet_lora.bin").is_file()
    page = tmp_path / "page.png"
    Image.new("L", (64, 96), 90).save(page)
    run = subprocess.run([sys.executable, "-m", "colorflow_core", *colorize_args(
        (Path(folders["colorflow"]), Path(folders["base"])), tmp_path, "--width", "64", "--height", "96", str(page))],
        env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "step 1/1" in run.stderr and "page 1/1 done" in run.stderr
    assert Image.open(tmp_path / "out" / "page.png").size == (96, 144)


def test_open_clip_encoder_option(tiny_release, tmp_path, monkeypatch):
    import open_clip

    config = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 8, "patch_size": 8},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1}}
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "Tiny-ViT-Test.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "cfg")
    page = tmp_path / "p.png"
    Image.new("L", (64, 96), 100).save(page)
    inter = tmp_path / "inter"
    args = colorize_args(tiny_release, tmp_path, "--encoder", "open_clip:Tiny-ViT-Test", "--width", "64", "--height", "96",
                         "--save-intermediates", str(inter), str(page))
    assert main(args) == 0
    assert len(json.loads((inter / "p" / "retrieval.json").read_text())["top3"]) == 4
    assert main(colorize_args(tiny_release, tmp_path, "--encoder", "bogus", str(page))) == 1
