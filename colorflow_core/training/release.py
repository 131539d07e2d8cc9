"""RUN_DIR/release/: the trained files in the release layout, every other file of the starting release linked in."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .models import TrainModels

#: The gray style's folder of the release (the only style training writes).
GRAY = "GraySD"
#: Files a trained target writes into GraySD/ (stems; any older spelling of them is not linked).
TRAINED_STEMS = {
    "icp": ("config", "diffusion_pytorch_model", "unet_lora"),
    "gsrp": ("MultiResNetModel",),
}


def trained_stems(target: str) -> tuple[str, ...]:
    """GraySD file stems written by `target` ('all' = both)."""
    return tuple(s for t in (("icp", "gsrp") if target == "all" else (target,)) for s in TRAINED_STEMS[t])


def _link(source: Path, destination: Path) -> None:
    """A symlink to `source` (absolute), or a copy where the file system refuses links."""
    try:
        os.symlink(source.resolve(), destination, target_is_directory=source.is_dir())
    except OSError:
        if source.is_dir():
            shutil.copytree(source, destination)
        else:
            shutil.copy2(source, destination)


def lora_tensors(models: TrainModels) -> dict[str, torch.Tensor]:
    """The UNet's LoRA tensors under peft's names (what `apply_lora` reads back)."""
    return {k: v.detach().cpu().contiguous() for k, v in models.pipeline.unet.state_dict().items() if ".lora_" in k}


def write_release(models: TrainModels, start: Path, out: Path) -> Path:
    """Write `out` (replacing it only once complete): trained GraySD files from `models`, the rest linked from `start`."""
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    gray = tmp / GRAY
    gray.mkdir(parents=True)
    if models.target in ("icp", "all"):
        models.pipeline.guider.save_pretrained(gray)  # config.json + diffusion_pytorch_model.safetensors
        save_file(lora_tensors(models), str(gray / "unet_lora.safetensors"))
    if models.target in ("gsrp", "all"):
        state = {k: v.detach().cpu().contiguous() for k, v in models.fusion.state_dict().items()}
        save_file(state, str(gray / "MultiResNetModel.safetensors"))
    written = trained_stems(models.target)
    start = Path(start)
    for entry in sorted(start.iterdir()) if start.is_dir() else []:
        if entry.name == GRAY:
            for item in sorted(entry.iterdir()):
                if item.name.split(".")[0] not in written and not (gray / item.name).exists():
                    _link(item, gray / item.name)
        elif not entry.name.startswith("."):
            _link(entry, tmp / entry.name)
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out
