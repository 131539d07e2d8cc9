"""Data parallelism: 2 torchrun processes (gloo, CPU) compute what 1 process computes with the same global batch."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from .test_trainer import config, losses
from colorflow_core.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]


def test_two_gloo_processes_equal_one(prepared, tmp_path):
    data, release, base, _ = prepared
    single = Trainer(config(prepared, tmp_path / "one", steps=2, batch_size=2, checkpoint_every=100))
    single.run()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "colorflow_core", "train", str(data), "--out", str(tmp_path / "two"), "--colorflow", str(release),
        "--base", str(base), "--steps", "2", "--batch-size", "2", "--lr", "1e-3", "--warmup", "1",
        "--checkpoint-every", "100", "--device", "cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(two) == 2 and all(abs(a - b) < 1e-5 * max(1, abs(a)) for a, b in zip(one, two)), (one, two)
    for name in ("diffusion_pytorch_model.safetensors", "unet_lora.safetensors"):
        a = load_file(str(tmp_path / "one" / "release" / "GraySD" / name))
        b = load_file(str(tmp_path / "two" / "release" / "GraySD" / name))
        assert a.keys() == b.keys()
        # Adam's first steps are ~lr * sign(gradient): where a gradient is at the level of float noise (batched vs
        # single convolutions round differently), its sign, and so that weight, may differ by up to 2 lr.
        diff = torch.cat([(a[k] - b[k]).abs().reshape(-1) for k in a])
        off = (diff > 1e-5).double().mean().item()
        assert diff.max().item() < 1e-3 and off < 0.01, (name, diff.max().item(), off)
