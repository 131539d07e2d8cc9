"""ScreenStyle ("GrayImage(ScreenStyle)" input): upstream's `to_screen_image` and the 50/50 blend.

Two networks from the release, both fp32:

* `G_RGB2INTSCR` (`ScreenStyle/color2manga/color2manga_cycle_ganstft/latest_net_G_RGB2INTSCR.pth`): a
  4→4-channel U-Net ("unet_256", 8 stride-2 levels) with spectrally normalised convolutions (old
  `torch.nn.utils.spectral_norm` keys `weight_orig/weight_u/weight_v`), replicate padding, parameter-free
  LayerNorm over (C, H, W), bilinear (align_corners) ×2 + 1×1 upsampling, *added* skips and a tanh.
  Upstream runs it in eval mode, so the normalised weight is `weight_orig / (u · W v)` with the stored
  u and v (no power iteration).
* the ScreenVAE decoder (`ScreenStyle/ScreenVAE/latest_net_dec.pth`): a 4→1-channel U-Net ("unet_128_G",
  7 levels) with plain convolutions, *concatenated* skips, transposed-conv upsampling in the three outer
  levels, two Dropout(0.5) layers and three noise injections. Upstream never puts it in eval mode.

Widths are read from the files (the release has ngf 48; the tiny test weights are narrower).

Two upstream details are kept on purpose: every non-outermost U-Net block applies its LeakyReLU *in
place* to its input, so the skip carries the activated input; and the RGB input is padded to a
multiple of 256 with Pillow's `fill=255` on an RGB image, which is **red** (255, 0, 0), while the gray
input is padded with white.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn

from ..errors import IncompatibleWeightsError, InvalidInputError
from ..imaging import check_image_size, to_rgb
from ..weights import read_state_dict, require_file

GENERATOR_FILE = "ScreenStyle/color2manga/color2manga_cycle_ganstft/latest_net_G_RGB2INTSCR.pth"
DECODER_FILE = "ScreenStyle/ScreenVAE/latest_net_dec.pth"
#: Generator input padding (upstream `__make_power_2`, base 2**8) and decoder padding (`npad`, 128).
GENERATOR_MULTIPLE = 256
DECODER_MULTIPLE = 128
#: Largest page side accepted (the networks normalise over the whole page, so they cannot be tiled).
MAX_SIDE = 4096
#: What Pillow's `ImageOps.expand(rgb_image, fill=255)` paints: a packed int, i.e. red.
RGB_PAD = (255, 0, 0)
GRAY_PAD = 255
_SLOPE = 0.2


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    """Upstream's LayerNormWarpper: LayerNorm over (C, H, W) without affine parameters, eps 1e-5."""
    return F.layer_norm(x, x.shape[1:])


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, _SLOPE)


class _Fn(nn.Module):
    """A parameter-free layer (keeps the checkpoint's Sequential indices in place)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _pad(size: int) -> _Fn:
    return _Fn(lambda x: F.pad(x, (size,) * 4, mode="replicate"))


def _up2() -> _Fn:
    return _Fn(lambda x: F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True))


class SNConv2d(nn.Module):
    """Conv2d whose weight is spectrally normalised as `torch.nn.utils.spectral_norm` does in eval mode."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1):
        super().__init__()
        self.stride = stride
        self.weight_orig = nn.Parameter(torch.empty(cout, cin, kernel, kernel))
        self.bias = nn.Parameter(torch.empty(cout))
        self.register_buffer("weight_u", torch.empty(cout))
        self.register_buffer("weight_v", torch.empty(cin * kernel * kernel))

    def normalized_weight(self) -> torch.Tensor:
        matrix = self.weight_orig.reshape(self.weight_orig.shape[0], -1)
        sigma = torch.dot(self.weight_u, torch.mv(matrix, self.weight_v))
        return self.weight_orig / sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.normalized_weight(), self.bias, self.stride)


class _NoiseParams(nn.Module):
    """Upstream's ApplyNoise parameters (`weight`, `bias` per channel; only the first half is used)."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels))
        self.bias = nn.Parameter(torch.empty(channels))

    def scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        half = self.weight.shape[0] // 2
        zeros = torch.zeros_like(self.weight[half:])
        weight = torch.cat([self.weight[:half], zeros]).view(1, -1, 1, 1)
        bias = torch.cat([self.bias[:half], zeros]).view(1, -1, 1, 1)
        return weight, bias


class Randomness:
    """Where the decoder's dropout masks and noise come from.

    `Randomness(generator)` draws them on the CPU from that generator (then moves them to the
    network's device), so a seed gives the same result on any device and leaves global RNG state
    alone. `Randomness(None)` draws from torch's global RNG with the same calls upstream makes
    (`F.dropout`, `torch.randn_like`); on CPU, seeding the global RNG with s and using
    `Randomness(None)` equals `Randomness(torch.Generator().manual_seed(s))`.
    """

    def __init__(self, generator: torch.Generator | None):
        self.generator = generator

    def normal(self, like: torch.Tensor) -> torch.Tensor:
        if self.generator is None:
            return torch.randn_like(like)
        return torch.randn(like.shape, generator=self.generator, dtype=like.dtype).to(like.device)

    def dropout(self, x: torch.Tensor, p: float = 0.5) -> torch.Tensor:
        if self.generator is None:
            return F.dropout(x, p, training=True)
        keep = torch.empty(x.shape, dtype=x.dtype).bernoulli_(1 - p, generator=self.generator)
        return x * keep.div_(1 - p).to(x.device)


class _GeneratorBlock(nn.Module):
    """One level of G_RGB2INTSCR (upstream UnetBlock_A). kind: 'outer', 'middle' or 'inner'."""

    def __init__(self, cin: int, outer: int, inner: int, sub: nn.Module | None, kind: str):
        super().__init__()
        self.kind = kind
        self.noiseblock = _NoiseParams(outer)
        up = [_Fn(_lrelu), _up2(), nn.Conv2d(inner, outer, 1)]
        if kind == "outer":
            layers = [_pad(1), SNConv2d(cin, inner, 3, 2), sub, *up, _Fn(_layer_norm), _Fn(_lrelu), _pad(1),
                      SNConv2d(outer, outer, 3)]
        elif kind == "inner":
            layers = [_Fn(_lrelu), _pad(1), SNConv2d(cin, inner, 3, 2), *up, _Fn(_layer_norm), _Fn(_lrelu),
                      _pad(1), SNConv2d(outer, outer, 3), _Fn(_layer_norm)]
        else:
            layers = [_Fn(_lrelu), _pad(1), SNConv2d(cin, inner, 3, 2), _Fn(_layer_norm), sub, *up,
                      _Fn(_layer_norm), _Fn(_lrelu), _pad(1), SNConv2d(outer, outer, 3), _Fn(_layer_norm)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "outer":
            return self.model(x)
        x = _lrelu(x)  # upstream's in-place LeakyReLU: the skip below adds the activated input
        y = self.model[1:](x)
        if y.shape[-2:] != x.shape[-2:]:
            y = F.interpolate(y, size=x.shape[-2:])
        return y + x


class ScreenGenerator(nn.Module):
    """G_RGB2INTSCR: cat[L, RGB] in [-1, 1] → 4 screen channels in [-1, 1] (tanh)."""

    def __init__(self, cin: int = 4, cout: int = 4, ngf: int = 48, levels: int = 8):
        super().__init__()
        if levels < 5:
            raise InvalidInputError("the ScreenStyle generator needs at least 5 levels")
        top = ngf * 8
        block = _GeneratorBlock(top, top, top, None, "inner")
        for _ in range(levels - 5):
            block = _GeneratorBlock(top, top, top, block, "middle")
        for width, inner in ((ngf * 4, top), (ngf * 2, ngf * 4), (ngf, ngf * 2)):
            block = _GeneratorBlock(width, width, inner, block, "middle")
        self.model = _GeneratorBlock(cin, cout, ngf, block, "outer")
        self.levels = levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.model(x))

    @staticmethod
    def layout_from_state_dict(state_dict: dict[str, torch.Tensor]) -> dict:
        first = state_dict.get("model.model.1.weight_orig")
        if first is None:
            raise IncompatibleWeightsError("not a G_RGB2INTSCR state dict: no 'model.model.1.weight_orig'")
        last = state_dict.get("model.model.9.weight_orig")
        if last is None:
            raise IncompatibleWeightsError("not a G_RGB2INTSCR state dict: no 'model.model.9.weight_orig'")
        return dict(cin=int(first.shape[1]), cout=int(last.shape[0]), ngf=int(first.shape[0]), levels=_levels(state_dict))


class _DecoderBlock(nn.Module):
    """One level of the ScreenVAE decoder (upstream UnetBlock_G).

    kind: 'outer', 'middle' or 'inner'; `bilinear` picks bilinear ×2 + 1×1 (else a 4×4 stride-2
    transposed conv); `dropout` and `noise` mark the levels upstream builds them into.
    """

    def __init__(self, cin: int, outer: int, inner: int, sub: nn.Module | None, kind: str,
                 bilinear: bool, dropout: bool = False, noise: bool = False):
        super().__init__()
        self.kind, self.use_dropout, self.use_noise = kind, dropout, noise
        self.noiseblock = _NoiseParams(outer)
        down = [_pad(1), nn.Conv2d(cin, inner, 3, 2)]
        source = inner if kind == "inner" else inner * 2
        target = inner if kind == "outer" else outer

        if bilinear:
            up = [_Fn(_lrelu), _up2(), nn.Conv2d(source, target, 1)]
        else:
            up = [_Fn(_lrelu), nn.ConvTranspose2d(source, target, 4, 2, 1)]
        if kind == "outer":
            layers = [*down, sub, *up, _Fn(_layer_norm), _Fn(_lrelu), _pad(3), nn.Conv2d(inner, outer, 7)]
        elif kind == "inner":
            layers = [_Fn(_lrelu), *down, *up, _Fn(_layer_norm), _Fn(_lrelu), _pad(1), nn.Conv2d(outer, outer, 3),
                      _Fn(_layer_norm)]
        else:
            layers = [_Fn(_lrelu), *down, _Fn(_layer_norm), sub, *up, _Fn(_layer_norm), _Fn(_lrelu), _pad(1),
                      nn.Conv2d(outer, outer, 3), _Fn(_layer_norm)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, randomness: Randomness | None) -> torch.Tensor:
        layers = list(self.model)
        if self.kind != "outer":
            x = _lrelu(x)  # upstream's in-place LeakyReLU: the concatenated skip is the activated input
            layers = layers[1:]
        y = x
        for layer in layers:
            y = layer(y, randomness) if isinstance(layer, _DecoderBlock) else layer(y)
        if self.kind == "outer":
            return y
        if self.use_dropout and randomness is not None:
            y = randomness.dropout(y)
        if self.use_noise:
            weight, bias = self.noiseblock.scales()
            if randomness is not None:
                y = y + (weight * randomness.normal(y) + bias).type_as(y)
            else:
                y = y + bias.type_as(y)
        return torch.cat([y, x], 1)


class ScreenDecoder(nn.Module):
    """The ScreenVAE decoder: 4 screen channels → 1 gray channel (pre-`rec` arithmetic)."""

    def __init__(self, cin: int = 4, cout: int = 1, ngf: int = 48, levels: int = 7):
        super().__init__()
        if levels < 5:
            raise InvalidInputError("the ScreenVAE decoder needs at least 5 levels")
        top = ngf * 8
        block = _DecoderBlock(top, top, top, None, "inner", bilinear=True)
        for _ in range(levels - 5):
            block = _DecoderBlock(top, top, top, block, "middle", bilinear=True, dropout=True)
        for width, inner in ((ngf * 4, top), (ngf * 2, ngf * 4), (ngf, ngf * 2)):
            block = _DecoderBlock(width, width, inner, block, "middle", bilinear=False, noise=True)
        self.model = _DecoderBlock(cin, cout, ngf, block, "outer", bilinear=False)
        self.levels = levels

    def forward(self, x: torch.Tensor, randomness: Randomness | None = None) -> torch.Tensor:
        """`randomness=None` is the deterministic mode: no dropout, noise replaced by its mean (the bias)."""
        return self.model(x, randomness)

    @staticmethod
    def layout_from_state_dict(state_dict: dict[str, torch.Tensor]) -> dict:
        first = state_dict.get("model.model.1.weight")
        last = state_dict.get("model.model.8.weight")
        if first is None or last is None:
            raise IncompatibleWeightsError("not a ScreenVAE decoder state dict: no 'model.model.1.weight'")
        return dict(cin=int(first.shape[1]), cout=int(last.shape[0]), ngf=int(first.shape[0]), levels=_levels(state_dict))


def _levels(state_dict: dict[str, torch.Tensor]) -> int:
    """U-Net depth: each level nests one more `model` Sequential under the network's own `model`."""
    return max(key.split(".").count("model") for key in state_dict) - 1


def _load(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> nn.Module:
    try:
        module.load_state_dict({k: v.contiguous() for k, v in state_dict.items()}, strict=True)
    except RuntimeError as exc:
        raise IncompatibleWeightsError(f"{source} does not fit its network: {str(exc).splitlines()[0][:300]}") from exc
    return module


def _to_unit(array: np.ndarray) -> torch.Tensor:
    """torchvision ToTensor + Normalize(0.5, 0.5): uint8 H×W(×C) → float32 C×H×W in [-1, 1]."""
    tensor = torch.from_numpy(np.array(array, dtype=np.uint8, copy=True))
    if tensor.ndim == 2:
        tensor = tensor[:, :, None]
    return tensor.permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)


class ScreenStyle:
    """Upstream's ScreenVAE path (`to_screen_image`) and the GrayImage(ScreenStyle) blend.

    Upstream's decoder draws fresh dropout masks and noise from the unseeded global CUDA RNG on every
    call, so its output is never the same twice. Here they come from a CPU `torch.Generator` seeded
    with `seed`: the same seed gives the same image (on any device, up to convolution rounding), and
    the draws are the ones upstream's own calls would make after `torch.manual_seed(seed)` on CPU.
    `deterministic=True` instead removes the randomness: dropout is the identity (its expectation
    in train mode) and each noise injection adds only its bias (the noise's mean), so the output no
    longer depends on the seed; it is smoother than any one upstream sample.
    """

    def __init__(self, generator: ScreenGenerator, decoder: ScreenDecoder, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.generator = generator.to(device=self.device, dtype=torch.float32).eval().requires_grad_(False)
        self.decoder = decoder.to(device=self.device, dtype=torch.float32).eval().requires_grad_(False)

    @classmethod
    def from_state_dicts(cls, generator: dict[str, torch.Tensor], decoder: dict[str, torch.Tensor],
                         device: str | torch.device = "cpu", sources: tuple[str, str] = ("G_RGB2INTSCR", "decoder")):
        """Build both networks with the widths the tensors describe; every key must match (strict)."""
        net_g = _load(ScreenGenerator(**ScreenGenerator.layout_from_state_dict(generator)), generator, sources[0])
        net_d = _load(ScreenDecoder(**ScreenDecoder.layout_from_state_dict(decoder)), decoder, sources[1])
        return cls(net_g, net_d, device)

    @classmethod
    def from_release(cls, root: str | Path, device: str | torch.device = "cpu") -> "ScreenStyle":
        """Load both networks from a ColorFlow release folder."""
        root = Path(root)
        paths = [require_file(root / name, root) for name in (GENERATOR_FILE, DECODER_FILE)]
        return cls.from_state_dicts(*(read_state_dict(p) for p in paths), device=device,
                                    sources=tuple(str(p) for p in paths))

    @torch.no_grad()
    def screen(self, image: Image.Image, seed: int = 0, deterministic: bool = False) -> Image.Image:
        """Upstream `to_screen_image`: any PIL image → the screentone rendering (gray, as RGB), same size."""
        rgb = to_rgb(image)
        width, height = rgb.size
        check_image_size(rgb.size, "image")
        if max(width, height) > MAX_SIDE:
            raise InvalidInputError(
                f"ScreenStyle works on the whole page at once; {width}x{height} is over {MAX_SIDE} px on a side, downscale it first"
            )
        pad_w, pad_h = (-width) % GENERATOR_MULTIPLE, (-height) % GENERATOR_MULTIPLE
        color = ImageOps.expand(rgb, (0, 0, pad_w, pad_h), fill=RGB_PAD) if pad_w or pad_h else rgb
        gray = rgb.convert("L")
        gray = ImageOps.expand(gray, (0, 0, pad_w, pad_h), fill=GRAY_PAD) if pad_w or pad_h else gray
        lines = _to_unit(np.asarray(gray))[None].to(self.device)
        screen = self.generator(torch.cat([lines, _to_unit(np.asarray(color))[None].to(self.device)], 1))

        rows, cols = screen.shape[-2:]
        big_rows = rows // DECODER_MULTIPLE * DECODER_MULTIPLE + DECODER_MULTIPLE
        big_cols = cols // DECODER_MULTIPLE * DECODER_MULTIPLE + DECODER_MULTIPLE
        padded = F.pad(screen, (0, big_cols - cols, 0, big_rows - rows), mode="replicate")
        randomness = None if deterministic else Randomness(torch.Generator().manual_seed(int(seed)))
        rec = self.decoder(padded, randomness)[:, :, :rows, :cols]
        rec = torch.clamp((rec + 1) * (lines + 1) / 2 - 1, -1, 1)
        shaded = torch.mul((rec + 1) / 2.0, (lines + 1) / 2.0) * 2.0 - 1
        values = shaded[0, 0, :height, :width].float().cpu().numpy()
        gray_u8 = ((values + 1) / 2.0 * 255.0).astype(np.uint8)
        return Image.fromarray(np.repeat(gray_u8[:, :, None], 3, axis=2))

    def __call__(self, image: Image.Image, seed: int = 0, deterministic: bool = False) -> Image.Image:
        """The GrayImage(ScreenStyle) input: `Image.blend(screen, gray page, 0.5)` (RGB, same size)."""
        return screen_blend(self.screen(image, seed, deterministic), image)


def screen_blend(screen: Image.Image, page: Image.Image, ratio: float = 0.5) -> Image.Image:
    """Upstream's blend of the screentone image with the gray page (Pillow: floor of the mean); `ratio` is the gray
    page's share (upstream 0.5; training draws it at random, the paper's ScreenStyle augmentation)."""
    return Image.blend(screen.convert("L").convert("RGB"), to_rgb(page).convert("L").convert("RGB"), ratio)
