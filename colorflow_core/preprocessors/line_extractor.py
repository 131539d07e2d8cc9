"""The manga line extractor ("res_skip", `LE/erika.pth`) and upstream's `extract_lines`.

The network is a residual U-shaped encoder/decoder (4 stride-2 stages, nearest ×2 upsampling,
identity skip additions) over an *unnormalised* 0..255 gray input. Its parameter names follow the
released `erika.pth` exactly (707 tensors), so the file loads with `strict=True`.

`extract_lines` reproduces upstream bit for bit on the arithmetic it controls: OpenCV's integer
RGB→gray, padding to a multiple of 16 with the value 1.0 (not 255), clipping to [0, 255], cropping
and truncation to uint8. Pages larger than `tile` pixels on a side run in overlapping tiles; with a
margin of at least `RECEPTIVE_RADIUS` pixels a tile's core sees exactly the inputs the whole-page run
sees, so tiling changes the result only by float rounding: convolutions over different sizes sum in a
different order (measured: ≤ 4e-6 at a peak of 13 in float32, ~5e-15 in float64), which can flip a
truncated uint8 line value by 1 on rare pixels. Pages that fit one tile (all of upstream's 1.5× page sizes)
run whole, exactly as upstream.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..errors import IncompatibleWeightsError, InvalidInputError
from ..imaging import check_image_size, to_rgb
from ..weights import read_state_dict

#: Output widths of the ten stages and the number of residual blocks in each (the erika layout).
STAGE_WIDTHS = (24, 48, 96, 192, 384, 192, 96, 48, 24, 16)
STAGE_BLOCKS = (2, 3, 5, 7, 12, 7, 5, 3, 2, 2)
#: Inputs are padded to a multiple of this (4 stride-2 stages).
MULTIPLE = 16
#: Value the padding is filled with (upstream: `np.ones`).
PAD_VALUE = 1.0
#: Pixels of input context an output pixel depends on, on either side (495 left, 480 right; see tests): a tile
#: margin at least this wide makes tiled output equal the whole-page output.
RECEPTIVE_RADIUS = 495
#: Default tile edge and margin (multiples of 16). Pages up to `DEFAULT_TILE` on both sides run whole.
DEFAULT_TILE = 2048
DEFAULT_MARGIN = 496

# OpenCV's fixed-point ITU-R 601 coefficients for 8-bit RGB→gray: 15 fractional bits (sum 2**15), rounded.
# Checked against cv2.cvtColor on all 2**24 colours with opencv-python 4.9.0.80 (upstream's pin) and 5.0.
_R2Y, _G2Y, _B2Y, _SHIFT = 9798, 19235, 3735, 15


def opencv_rgb2gray(rgb: np.ndarray) -> np.ndarray:
    """`cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)` for uint8 H×W×3(+alpha) arrays, without OpenCV."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] not in (3, 4):
        raise InvalidInputError(f"expected an H×W×3 uint8 array, got {rgb.dtype} {rgb.shape}")
    r, g, b = (rgb[..., i].astype(np.int32) for i in range(3))
    return ((r * _R2Y + g * _G2Y + b * _B2Y + (1 << (_SHIFT - 1))) >> _SHIFT).astype(np.uint8)


class _NormActConv(nn.Module):
    """BatchNorm(eps 1e-3) → LeakyReLU(0.2) → k×k conv (zero padding k//2) [→ nearest ×2]; keys model.0 / model.2."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, upsample: bool = False):
        super().__init__()
        layers = [nn.BatchNorm2d(cin, eps=1e-3), nn.LeakyReLU(0.2), nn.Conv2d(cin, cout, kernel, stride, kernel // 2)]
        if upsample:
            layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class _Projection(nn.Module):
    """The shortcut branch: identity, or a 1×1 conv (strided, or followed by nearest ×2); key model.0."""

    def __init__(self, cin: int, cout: int, stride: int = 1, upsample: bool = False):
        super().__init__()
        self.model = None
        if cin != cout or stride != 1:
            layers = [nn.Conv2d(cin, cout, 1, stride)]
            if upsample:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
            self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.model is None else self.model(x)


class _ResidualBlock(nn.Module):
    """shortcut(x) + residual(conv1(x)); `upsample` makes conv1 and the shortcut end with nearest ×2."""

    def __init__(self, cin: int, cout: int, stride: int = 1, upsample: bool = False):
        super().__init__()
        self.conv1 = _NormActConv(cin, cout, 3, stride, upsample=upsample)
        self.residual = _NormActConv(cout, cout, 3)
        self.shortcut = _Projection(cin, cout, stride, upsample=upsample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.residual(self.conv1(x))


class _Stage(nn.Module):
    """`count` residual blocks under key `model`. Encoder stages end with a stride-2 block unless `first`;
    decoder stages start with an upsampling block."""

    def __init__(self, cin: int, cout: int, count: int, kind: str):
        super().__init__()
        blocks = []
        for i in range(count):
            source = cin if i == 0 else cout
            if kind == "up":
                blocks.append(_ResidualBlock(source, cout, upsample=(i == 0)))
            else:
                stride = 2 if (kind == "down" and i == count - 1) else 1
                blocks.append(_ResidualBlock(source, cout, stride))
        self.model = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LineNet(nn.Module):
    """res_skip: 1 gray channel (0..255) in, 1 line channel out (roughly 0..255, unclipped)."""

    def __init__(self, widths: tuple[int, ...] = STAGE_WIDTHS, blocks: tuple[int, ...] = STAGE_BLOCKS):
        super().__init__()
        if len(widths) != 10 or len(blocks) != 10:
            raise InvalidInputError("the line extractor has exactly 10 stages")
        for up, skip in zip(range(5, 9), range(3, -1, -1)):
            if widths[up] != widths[skip] or widths[up] == widths[up - 1]:
                raise InvalidInputError(f"line-extractor widths {widths} do not fit its skip connections")
        kinds = ("first", "down", "down", "down", "down", "up", "up", "up", "up", "first")
        source = 1
        for index, (width, count, kind) in enumerate(zip(widths, blocks, kinds)):
            setattr(self, f"block{index}", _Stage(source, width, count, kind))
            source = width
        self.conv15 = _NormActConv(source, 1, 1)
        self.widths, self.blocks = tuple(widths), tuple(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for index in range(5):
            x = getattr(self, f"block{index}")(x)
            skips.append(x)
        for index in range(5, 9):
            x = getattr(self, f"block{index}")(x) + skips[8 - index]
        return self.conv15(self.block9(x))

    @staticmethod
    def layout_from_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(widths, blocks per stage) described by a res_skip state dict."""
        widths, blocks = [], []
        for index in range(10):
            prefix = f"block{index}.model."
            count = len({k[len(prefix):].split(".")[0] for k in state_dict if k.startswith(prefix)})
            key = f"{prefix}0.conv1.model.2.weight"
            if count == 0 or key not in state_dict:
                raise IncompatibleWeightsError(f"not a line-extractor (res_skip) state dict: no '{key}'")
            widths.append(int(state_dict[key].shape[0]))
            blocks.append(count)
        return tuple(widths), tuple(blocks)


class LineExtractor:
    """The line-extraction network plus upstream's pre- and post-processing. Call it on any PIL image.

    fp32 as upstream (`dtype` exists for numerical tests); `device` is where the network runs.
    """

    def __init__(self, net: LineNet, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.device, self.dtype = torch.device(device), dtype
        self.net = net.to(device=self.device, dtype=dtype).eval().requires_grad_(False)

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], device: str | torch.device = "cpu",
                        source: str = "state dict") -> "LineExtractor":
        """Build from tensors named as in `erika.pth`; every key must match (strict).

        A `module.` prefix on every key (a checkpoint saved from nn.DataParallel) is dropped first."""
        if state_dict and all(key.startswith("module.") for key in state_dict):
            state_dict = {key[len("module."):]: value for key, value in state_dict.items()}
        widths, blocks = LineNet.layout_from_state_dict(state_dict)
        net = LineNet(widths, blocks)
        try:
            net.load_state_dict({k: v.contiguous() for k, v in state_dict.items()}, strict=True)
        except RuntimeError as exc:
            raise IncompatibleWeightsError(f"{source} does not fit the line extractor: {str(exc).splitlines()[0][:300]}") from exc
        return cls(net, device)

    @classmethod
    def from_file(cls, path: str | Path, device: str | torch.device = "cpu") -> "LineExtractor":
        """Load `erika.pth` (ColorFlow's `LE/erika.pth`, or the same file from lllyasviel/Annotators)."""
        path = Path(path)
        return cls.from_state_dict(read_state_dict(path), device, source=str(path))

    @torch.no_grad()
    def run(self, gray: np.ndarray, tile: int = DEFAULT_TILE, margin: int = DEFAULT_MARGIN) -> np.ndarray:
        """The raw network output (H×W, unclipped, float32 by default) for a uint8 H×W gray array.

        The input is placed top-left in a buffer of ones sized up to a multiple of 16, as upstream.
        Buffers larger than `tile` on a side are processed in tiles whose cores are `tile - 2*margin`
        pixels, each run with `margin` pixels of real context on every side that has any.
        """
        if gray.ndim != 2:
            raise InvalidInputError(f"expected an H×W gray array, got shape {gray.shape}")
        height, width = gray.shape
        output = self._run_padded(torch.from_numpy(padded_input(gray))[0, 0], tile, margin)
        return output[:height, :width].numpy()

    def _run_padded(self, patch: torch.Tensor, tile: int, margin: int) -> torch.Tensor:
        rows, cols = patch.shape
        if tile % MULTIPLE or margin % MULTIPLE or margin < 0 or tile - 2 * margin < MULTIPLE:
            raise InvalidInputError(f"tile ({tile}) and margin ({margin}) must be multiples of 16 with tile > 2·margin")
        if rows <= tile and cols <= tile:
            return self._forward(patch)
        core = tile - 2 * margin
        out = None
        for top in range(0, rows, core):
            for left in range(0, cols, core):
                bottom, right = min(top + core, rows), min(left + core, cols)
                y0, x0 = max(0, top - margin), max(0, left - margin)
                y1, x1 = min(rows, bottom + margin), min(cols, right + margin)
                result = self._forward(patch[y0:y1, x0:x1])
                out = torch.empty((rows, cols), dtype=result.dtype) if out is None else out
                out[top:bottom, left:right] = result[top - y0:bottom - y0, left - x0:right - x0]
        return out

    def _forward(self, patch: torch.Tensor) -> torch.Tensor:
        x = patch.to(self.device, self.dtype)[None, None]
        return self.net(x)[0, 0].cpu()

    def __call__(self, image: Image.Image, tile: int = DEFAULT_TILE, margin: int = DEFAULT_MARGIN) -> Image.Image:
        """upstream `extract_lines`: any PIL image → mode 'L' line drawing of the same size."""
        check_image_size(image.size, "image")
        gray = opencv_rgb2gray(np.asarray(to_rgb(image)))
        return Image.fromarray(lines_to_uint8(self.run(gray, tile, margin)))


def lines_to_uint8(raw: np.ndarray) -> np.ndarray:
    """Upstream's post-processing: clip to [0, 255], then truncate (not round) to uint8."""
    return np.clip(raw, 0, 255).astype(np.uint8)


def padded_input(gray: np.ndarray) -> np.ndarray:
    """The (1, 1, rows, cols) float32 network input upstream builds: gray top-left in ones, ×16."""
    height, width = gray.shape
    rows, cols = -(-height // MULTIPLE) * MULTIPLE, -(-width // MULTIPLE) * MULTIPLE
    patch = np.full((1, 1, rows, cols), PAD_VALUE, dtype=np.float32)
    patch[0, 0, :height, :width] = gray
    return patch
