"""Small random weights for the preprocessors, with the release's exact file names and key names.

* `LE/erika.pth`: the real res_skip widths (they are fixed), 707 keys, 43 M elements — but every conv
  weight is a strided view into one of a few small shared random storages, so the file stays about
  1 MB; BatchNorm statistics are calibrated on a sample page so activations stay in range.
* ScreenStyle: the two networks used at inference at a narrow width (ngf 4); the loader reads widths
  from the files.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .line_extractor import LineNet
from .screen_style import DECODER_FILE, GENERATOR_FILE, ScreenDecoder, ScreenGenerator, SNConv2d

SCREEN_NGF = 4
_STORAGES = 6
_STORAGE_SIZE = 20_000


def _strided_view(storage: torch.Tensor, shape: tuple[int, ...], offset: int) -> torch.Tensor:
    """A (cout, cin, k, k) view whose entries overlap inside `storage`, like the shared fixture's."""
    cout, cin, kh, kw = shape
    stride = (37, 9, kw, 1) if kh > 1 else (37, 9, 1, 1)
    span = (cout - 1) * stride[0] + (cin - 1) * stride[1] + (kh - 1) * stride[2] + kw
    offset = offset % max(1, storage.numel() - span)
    return storage.as_strided(shape, stride, offset)


def _sample_page(size: int = 32, seed: int = 0) -> torch.Tensor:
    """A gray page with flat areas, dark strokes and a gradient (0..255), for BN calibration."""
    rng = np.random.default_rng(seed)
    page = np.full((size, size), 235.0, dtype=np.float32)
    page += np.linspace(-40, 10, size, dtype=np.float32)[None, :]
    for _ in range(12):
        y, x = rng.integers(0, size, 2)
        page[y:y + rng.integers(2, size // 3), x:x + 2] = rng.integers(0, 60)
        page[y:y + 2, x:x + rng.integers(2, size // 3)] = rng.integers(0, 60)
    return torch.from_numpy(np.clip(page, 0, 255))[None, None]


def tiny_erika_state_dict(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A res_skip state dict in the erika layout whose file is small and whose output is a usable line map."""
    storages = [torch.randn(_STORAGE_SIZE, generator=generator) * 0.15 for _ in range(_STORAGES)]
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LineNet().state_dict().items()}
    views: dict[str, torch.Tensor] = {}
    for index, (key, shape) in enumerate(shapes.items()):
        if len(shape) == 4:
            views[key] = _strided_view(storages[index % _STORAGES], shape, index * 101)
    with torch.device("meta"):
        net = LineNet()
    net = net.to_empty(device="cpu")
    with torch.no_grad():
        for key, param in net.state_dict().items():
            if key in views:
                param.copy_(views[key])
            elif key.endswith(".bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
            elif key.endswith(".weight"):
                param.copy_(1.0 + torch.randn(param.shape, generator=generator) * 0.1)
            elif key.endswith("running_var"):
                param.fill_(1.0)
            elif key.endswith("running_mean"):
                param.zero_()
            elif key.endswith("num_batches_tracked"):
                param.zero_()
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = None  # cumulative average: one batch → its own statistics
        net.train()(_sample_page())
        net.eval()
        raw = net(_sample_page(seed=1))
        # Map the output to a line map: mostly white paper, darker where the page has strokes.
        scale = 60.0 / max(float(raw.std()), 1e-6)
        net.conv15.model[2].weight.mul_(scale)
        net.conv15.model[2].bias.mul_(scale).add_(200.0 - float(raw.mean()) * scale)
    state = {}
    for key, value in net.state_dict().items():
        state[key] = views[key] if key in views else value.detach().clone()
    return state


def _power_iterate_(conv: SNConv2d, steps: int = 30) -> None:
    """Set u, v to the leading singular vectors (as training with spectral_norm would have left them)."""
    matrix = conv.weight_orig.reshape(conv.weight_orig.shape[0], -1)
    u, v = conv.weight_u, conv.weight_v
    for _ in range(steps):
        v.copy_(torch.nn.functional.normalize(torch.mv(matrix.t(), u), dim=0, eps=1e-12))
        u.copy_(torch.nn.functional.normalize(torch.mv(matrix, v), dim=0, eps=1e-12))


def tiny_screen_state_dicts(generator: torch.Generator, ngf: int = SCREEN_NGF) -> tuple[dict, dict]:
    """(G_RGB2INTSCR, ScreenVAE decoder) state dicts at width `ngf`, random but well-conditioned."""
    with torch.device("meta"):  # every tensor is set below from `generator`; global RNG untouched
        nets = ScreenGenerator(ngf=ngf), ScreenDecoder(ngf=ngf)
    nets = tuple(net.to_empty(device="cpu") for net in nets)
    with torch.no_grad():
        for net in nets:
            for name, param in net.named_parameters():
                fan_in = param[0].numel() if param.ndim > 1 else 1
                if name.endswith("noiseblock.weight"):
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
                elif param.ndim == 1:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
                else:
                    param.copy_(torch.randn(param.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
            for module in net.modules():
                if isinstance(module, SNConv2d):
                    module.weight_u.copy_(torch.randn(module.weight_u.shape, generator=generator))
                    _power_iterate_(module)
    return tuple({k: v.detach().clone() for k, v in net.state_dict().items()} for net in nets)


def write_tiny_preprocessors(release: Path, generator: torch.Generator) -> None:
    """Write `LE/erika.pth` and the two ScreenStyle files under `release` (release names and keys)."""
    release = Path(release)
    (release / "LE").mkdir(parents=True, exist_ok=True)
    torch.save(tiny_erika_state_dict(generator), release / "LE" / "erika.pth")
    screen_g, screen_d = tiny_screen_state_dicts(generator)
    for name, state in ((GENERATOR_FILE, screen_g), (DECODER_FILE, screen_d)):
        (release / name).parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, release / name)
