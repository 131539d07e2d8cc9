"""Colorization metrics: PSNR, SSIM, FID, CLIP image similarity, LAION aesthetic score, colour consistency.

* PSNR / SSIM: torchmetrics (SSIM: Gaussian window 11, σ 1.5, K1 0.01, K2 0.03), on the RGB page at
  the ground truth's size (the prediction is resized bicubically), data range 255, float64.
* FID: torchmetrics' Fréchet distance over 2048-d Inception-v3 pool features; the extractor is any
  module mapping uint8 [N,3,H,W] to [N,F] (`load_inception` reads local weights, tests pass tiny ones).
* CLIP-IS: cosine similarity of CLIP image embeddings of prediction and ground truth, per page, with
  any `ImageEncoder` (the release's CLIP-H, an open_clip model, or a test stub).
* Aesthetic: the LAION aesthetic predictor head (MLP or linear) on L2-normalised CLIP image embeddings.
* Colour consistency: per character part (a label of a label map), the mean CIE Lab colour of its
  pixels on each page; **spread** = ΔE00 of each page's mean from the chapter centroid (mean and max,
  plus the largest pairwise ΔE00) and **error** = ΔE00 between the predicted and the ground-truth mean
  over the same pixels. ΔE is CIEDE2000 (Sharma, Wu & Dalal 2005); Lab is CIE 1976 L*a*b* of sRGB
  (IEC 61966-2-1) under D65.

Why this module is long: each metric is a few small functions, and all of them share the image preparation (resize
to the ground truth, uint8 ↔ float, Lab conversion); one module keeps one definition of each that `evaluate`, the
benchmark and the tests all read.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import IncompatibleWeightsError, InvalidInputError, MissingWeightsError

#: Label values at or above this are ignored by the consistency metric (shadowed tones, paper, ink).
MAX_PART_LABEL = 128


# --------------------------------------------------------------------------------------------- images
def rgb_array(image: Image.Image | np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """uint8 H×W×3 RGB, resized (bicubic) to `size` = (W, H) when given and different."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = image.convert("RGB")
    if size is not None and image.size != tuple(size):
        image = image.resize(tuple(size), Image.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def _nchw(array: np.ndarray, dtype=torch.float64) -> torch.Tensor:
    return torch.from_numpy(np.array(array, copy=True)).permute(2, 0, 1)[None].to(dtype)


def psnr(pred: Image.Image | np.ndarray, gt: Image.Image | np.ndarray) -> float:
    """PSNR in dB over RGB at the ground truth's size (inf for identical images)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    target = rgb_array(gt)
    output = rgb_array(pred, (target.shape[1], target.shape[0]))
    return float(peak_signal_noise_ratio(_nchw(output), _nchw(target), data_range=255.0))


def ssim(pred: Image.Image | np.ndarray, gt: Image.Image | np.ndarray) -> float:
    """SSIM over RGB at the ground truth's size (torchmetrics' Gaussian-window SSIM, channel mean)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    target = rgb_array(gt)
    if min(target.shape[:2]) < 11:
        raise InvalidInputError("SSIM needs images of at least 11×11 pixels")
    output = rgb_array(pred, (target.shape[1], target.shape[0]))
    return float(structural_similarity_index_measure(_nchw(output), _nchw(target), data_range=255.0))


def uint8_batch(images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
    """[N,3,H,W] uint8 (all images must share a size)."""
    return torch.stack([torch.from_numpy(rgb_array(im).copy()).permute(2, 0, 1) for im in images])


# --------------------------------------------------------------------------------------------- FID
class InceptionPoolFeatures(torch.nn.Module):
    """torchvision Inception-v3 without its classifier: uint8 [N,3,H,W] → 2048-d pool features."""

    num_features = 2048

    def __init__(self, net: torch.nn.Module, backbone: str):
        super().__init__()
        net.fc = torch.nn.Identity()
        self.net = net.eval()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.mean.device, torch.float32) / 255.0
        x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False, antialias=True)
        return self.net((x - self.mean) / self.std)

    def train(self, mode: bool = True) -> "InceptionPoolFeatures":  # never leaves eval mode
        return super().train(False)


class _FidelityInception(torch.nn.Module):
    """torchmetrics' wrapper of torch-fidelity's FID Inception (the TF 2015-12-05 weights)."""

    num_features = 2048
    backbone = "inception-v3-compat (torch-fidelity, standard FID weights)"

    def __init__(self, path: Path):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(path))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.to(torch.uint8)).reshape(images.shape[0], -1)


#: Weight files looked for (in torch's hub cache, `torch.hub.get_dir()/checkpoints`) when none is given.
INCEPTION_FILES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth", "inception_v3_google-0cc3c7bd.pth")


def find_inception_weights() -> Path | None:
    """A local Inception-v3 weight file from torch's hub cache, or None (nothing is downloaded)."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    for name in INCEPTION_FILES:
        if (folder / name).is_file():
            if "2015-12-05" in name:
                try:
                    import torch_fidelity  # noqa: F401
                except ImportError:
                    continue
            return folder / name
    return None


def load_inception(path: str | Path | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The FID feature extractor from a local weight file (default: `find_inception_weights()`).

    torchvision's ImageNet Inception-v3 (`inception_v3_google-*.pth`) works with no extra package; its
    FID values are consistent among themselves but not comparable to published ones. The standard FID
    weights (`pt_inception-2015-12-05-*.pth`, 1008 classes) need torch-fidelity installed.
    """
    path = Path(path) if path is not None else find_inception_weights()
    if path is None:
        raise MissingWeightsError(
            INCEPTION_FILES[-1], Path(torch.hub.get_dir()) / "checkpoints",
            "torchvision's Inception-v3 ImageNet weights, or pass --fid-weights FILE; nothing is downloaded",
        )
    if not path.is_file():
        raise MissingWeightsError(path.name, path.parent, "an Inception-v3 weight file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle/zip errors come in many types
        raise IncompatibleWeightsError(f"cannot read Inception weights {path}: {exc}") from exc
    classes = state.get("fc.weight", torch.empty(0)).shape[0] if isinstance(state, dict) else 0
    if classes == 1008:
        try:
            import torch_fidelity  # noqa: F401
        except ImportError as exc:
            raise IncompatibleWeightsError(f"{path} is the standard FID Inception; it needs `pip install torch-fidelity`") from exc
        return _FidelityInception(path).to(device)
    from torchvision.models import inception_v3

    net = inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=True)
    state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise IncompatibleWeightsError(f"{path} is not a torchvision Inception-v3 state dict: {str(exc)[:300]}") from exc
    return InceptionPoolFeatures(net, f"torchvision inception_v3 ({path.name})").to(device)


def fid(preds: Sequence[Image.Image | np.ndarray], gts: Sequence[Image.Image | np.ndarray], extractor: torch.nn.Module) -> float:
    """Fréchet distance between the feature distributions of predictions and ground truths (≥ 2 each).

    Images go to the extractor one at a time as uint8 [1,3,H,W] (sizes may differ); predictions at
    their ground truth's size when the counts match.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(preds) < 2 or len(gts) < 2:
        raise InvalidInputError("FID needs at least 2 predicted and 2 ground-truth images")
    metric = FrechetInceptionDistance(feature=extractor, normalize=False, reset_real_features=True)
    sizes = [rgb_array(g).shape[1::-1] for g in gts] if len(gts) == len(preds) else [None] * len(preds)
    with torch.no_grad():
        for image in gts:
            metric.update(uint8_batch([image]), real=True)
        for image, size in zip(preds, sizes):
            metric.update(torch.from_numpy(rgb_array(image, size).copy()).permute(2, 0, 1)[None], real=False)
    return float(metric.compute())


# --------------------------------------------------------------------------------------------- CLIP
def _embed(encoder: Any, images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
    pil = [Image.fromarray(rgb_array(im)) for im in images]
    vectors = encoder.encode(pil).float()
    return torch.nn.functional.normalize(vectors, dim=-1)


def clip_image_similarity(
    preds: Sequence[Image.Image | np.ndarray], gts: Sequence[Image.Image | np.ndarray], encoder: Any
) -> list[float]:
    """Per page: cosine similarity of the CLIP image embeddings of prediction and ground truth."""
    if len(preds) != len(gts):
        raise InvalidInputError("CLIP-IS needs as many predictions as ground truths")
    if not preds:
        return []
    sims = (_embed(encoder, preds) * _embed(encoder, gts)).sum(-1)
    return [float(s) for s in sims]


class AestheticHead(torch.nn.Module):
    """LAION's improved aesthetic predictor MLP (768→1024→128→64→16→1; dropouts are no-ops in eval)."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(dim, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def load_aesthetic_head(path: str | Path) -> torch.nn.Module:
    """The LAION aesthetic head from a local file: the MLP (`sac+logos+ava1-l14-linearMSE.pth`, keys
    `layers.N.*`) or the original linear probe (`sa_0_4_vit_l_14_linear.pth`, keys `weight`, `bias`)."""
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(path.name, path.parent, "the LAION aesthetic predictor head")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise IncompatibleWeightsError(f"cannot read aesthetic head {path}: {exc}") from exc
    state = state.get("state_dict", state)
    if "layers.0.weight" in state:
        head: torch.nn.Module = AestheticHead(int(state["layers.0.weight"].shape[1]))
    elif set(state) == {"weight", "bias"}:
        head = torch.nn.Linear(int(state["weight"].shape[1]), 1)
    else:
        raise IncompatibleWeightsError(f"{path} is neither LAION aesthetic head (keys {sorted(state)[:4]}…)")
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise IncompatibleWeightsError(f"{path} does not fit the aesthetic head: {str(exc)[:300]}") from exc
    return head.eval()


def aesthetic_scores(images: Sequence[Image.Image | np.ndarray], encoder: Any, head: torch.nn.Module) -> list[float]:
    """LAION aesthetic score per image: `head` on the L2-normalised CLIP image embedding."""
    if not images:
        return []
    with torch.no_grad():
        embeddings = _embed(encoder, images)
        parameter = next(head.parameters())
        scores = head(embeddings.to(parameter.device, parameter.dtype)).reshape(-1)
    return [float(s) for s in scores]


# --------------------------------------------------------------------------------------------- colour
_D65 = np.array([0.95047, 1.0, 1.08883])
_SRGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]])


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIE L*a*b* (D65) of sRGB values (uint8 0..255 or float 0..1), shape (..., 3) → (..., 3) float64."""
    rgb = np.asarray(rgb)
    c = rgb.astype(np.float64) / 255.0 if rgb.dtype == np.uint8 else rgb.astype(np.float64)
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ _SRGB_TO_XYZ.T / _D65
    eps, kappa = 216 / 24389, 24389 / 27
    f = np.where(xyz > eps, np.cbrt(xyz), (kappa * xyz + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def delta_e_76(lab1: np.ndarray, lab2: np.ndarray) -> np.ndarray:
    """CIE76 ΔE*ab: Euclidean distance in Lab."""
    return np.linalg.norm(np.asarray(lab1, np.float64) - np.asarray(lab2, np.float64), axis=-1)


def delta_e_2000(lab1: np.ndarray, lab2: np.ndarray, kl: float = 1.0, kc: float = 1.0, kh: float = 1.0) -> np.ndarray:
    """CIEDE2000 ΔE00 (Sharma, Wu & Dalal 2005), broadcasting over (..., 3)."""
    lab1, lab2 = np.asarray(lab1, np.float64), np.asarray(lab2, np.float64)
    l1, a1, b1 = lab1[..., 0], lab1[..., 1], lab1[..., 2]
    l2, a2, b2 = lab2[..., 0], lab2[..., 1], lab2[..., 2]
    c_bar = (np.hypot(a1, b1) + np.hypot(a2, b2)) / 2
    g = 0.5 * (1 - np.sqrt(c_bar**7 / (c_bar**7 + 25.0**7)))
    a1p, a2p = (1 + g) * a1, (1 + g) * a2
    c1p, c2p = np.hypot(a1p, b1), np.hypot(a2p, b2)
    h1p = np.where((a1p == 0) & (b1 == 0), 0.0, np.degrees(np.arctan2(b1, a1p)) % 360)
    h2p = np.where((a2p == 0) & (b2 == 0), 0.0, np.degrees(np.arctan2(b2, a2p)) % 360)
    dl = l2 - l1
    dc = c2p - c1p
    dh = h2p - h1p
    dh = np.where(dh > 180, dh - 360, np.where(dh < -180, dh + 360, dh))
    dh = np.where(c1p * c2p == 0, 0.0, dh)
    dH = 2 * np.sqrt(c1p * c2p) * np.sin(np.radians(dh) / 2)
    l_bar = (l1 + l2) / 2
    cp_bar = (c1p + c2p) / 2
    h_sum = h1p + h2p
    hp_bar = np.where(
        c1p * c2p == 0, h_sum,
        np.where(np.abs(h1p - h2p) <= 180, h_sum / 2, np.where(h_sum < 360, (h_sum + 360) / 2, (h_sum - 360) / 2)),
    )
    t = (1 - 0.17 * np.cos(np.radians(hp_bar - 30)) + 0.24 * np.cos(np.radians(2 * hp_bar))
         + 0.32 * np.cos(np.radians(3 * hp_bar + 6)) - 0.20 * np.cos(np.radians(4 * hp_bar - 63)))
    d_theta = 30 * np.exp(-(((hp_bar - 275) / 25) ** 2))
    rc = 2 * np.sqrt(cp_bar**7 / (cp_bar**7 + 25.0**7))
    sl = 1 + 0.015 * (l_bar - 50) ** 2 / np.sqrt(20 + (l_bar - 50) ** 2)
    sc = 1 + 0.045 * cp_bar
    sh = 1 + 0.015 * cp_bar * t
    rt = -np.sin(np.radians(2 * d_theta)) * rc
    terms = (dl / (kl * sl), dc / (kc * sc), dH / (kh * sh))
    return np.sqrt(terms[0] ** 2 + terms[1] ** 2 + terms[2] ** 2 + rt * terms[1] * terms[2])


def _interior(labels: np.ndarray, radius: int) -> np.ndarray:
    """Pixels whose (2r+1)² neighbourhood has their own label (drops part borders blurred by resizing)."""
    if radius <= 0:
        return np.ones(labels.shape, bool)
    height, width = labels.shape
    padded = np.pad(labels, radius, mode="edge")
    keep = np.ones(labels.shape, bool)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            keep &= padded[radius + dy : radius + dy + height, radius + dx : radius + dx + width] == labels
    return keep


@dataclass
class PartConsistency:
    """One character part across the pages where it shows."""

    label: int
    name: str
    pages: list[str]
    means: list[list[float]]  # per-page mean Lab of the prediction
    page_error: list[float | None]  # per-page ΔE00 to the ground-truth mean
    centroid_delta: list[float]  # per-page ΔE00 to the chapter centroid

    @property
    def spread_mean(self) -> float:
        return float(np.mean(self.centroid_delta)) if self.centroid_delta else 0.0

    @property
    def spread_max(self) -> float:
        return float(np.max(self.centroid_delta)) if self.centroid_delta else 0.0

    @property
    def spread_pairwise_max(self) -> float:
        if len(self.means) < 2:
            return 0.0
        means = np.asarray(self.means)
        return float(delta_e_2000(means[:, None], means[None, :]).max())

    @property
    def drift_page(self) -> str | None:
        """The page whose mean is furthest from the centroid (needs 3 pages: with 2 both are equally far)."""
        return self.pages[int(np.argmax(self.centroid_delta))] if len(self.pages) > 2 else None

    @property
    def error_mean(self) -> float | None:
        errors = [e for e in self.page_error if e is not None]
        return float(np.mean(errors)) if errors else None

    @property
    def error_max(self) -> float | None:
        errors = [e for e in self.page_error if e is not None]
        return float(np.max(errors)) if errors else None

    def to_json(self) -> dict:
        return {
            "label": self.label, "name": self.name, "pages": self.pages,
            "mean_lab": [[round(v, 4) for v in mean] for mean in self.means],
            "delta_e_to_centroid": self.centroid_delta, "error_per_page": self.page_error,
            "spread_mean": self.spread_mean, "spread_max": self.spread_max,
            "spread_pairwise_max": self.spread_pairwise_max, "drift_page": self.drift_page,
            "error_mean": self.error_mean, "error_max": self.error_max,
        }


def label_names(table: dict | None) -> dict[int, str]:
    """label → 'Name hair' from a label table (synthetic `labels.json` entries or plain strings)."""
    names = {}
    for key, value in (table or {}).items():
        if isinstance(value, dict):
            names[int(key)] = f"{value.get('name', value.get('character'))} {value.get('part', '')}".strip()
        else:
            names[int(key)] = str(value)
    return names


def color_consistency(
    preds: Sequence[Image.Image | np.ndarray],
    labels: Sequence[np.ndarray],
    gts: Sequence[Image.Image | np.ndarray] | None = None,
    *,
    page_names: Sequence[str] | None = None,
    table: dict | None = None,
    min_pixels: int = 16,
    erode: int = 1,
) -> list[PartConsistency]:
    """Per part label (1..127): its mean Lab on each page where it covers ≥ `min_pixels` interior pixels,
    the ΔE00 spread of those means around their centroid, and their ΔE00 error against the ground truth's
    mean over the same pixels. Predictions are resized to their label map's size."""
    if len(preds) != len(labels) or (gts is not None and len(gts) != len(preds)):
        raise InvalidInputError("consistency needs one label map (and ground truth) per prediction")
    page_names = list(page_names) if page_names is not None else [f"page_{i}" for i in range(len(preds))]
    names = label_names(table)
    per_label: dict[int, list[tuple[str, np.ndarray, float | None]]] = {}
    for index, (pred, label_map) in enumerate(zip(preds, labels)):
        label_map = np.asarray(label_map)
        size = (label_map.shape[1], label_map.shape[0])
        pred_lab = srgb_to_lab(rgb_array(pred, size))
        gt_lab = srgb_to_lab(rgb_array(gts[index], size)) if gts is not None else None
        interior = _interior(label_map, erode)
        for value in np.unique(label_map):
            value = int(value)
            if not 1 <= value < MAX_PART_LABEL:
                continue
            mask = interior & (label_map == value)
            if mask.sum() < min_pixels:
                continue
            mean = pred_lab[mask].mean(axis=0)
            error = float(delta_e_2000(mean, gt_lab[mask].mean(axis=0))) if gt_lab is not None else None
            per_label.setdefault(value, []).append((page_names[index], mean, error))
    parts = []
    for value in sorted(per_label):
        rows = per_label[value]
        means = np.stack([row[1] for row in rows])
        centroid = means.mean(axis=0)
        parts.append(PartConsistency(
            value, names.get(value, f"label_{value}"), [row[0] for row in rows], means.tolist(),
            [row[2] for row in rows], [float(d) for d in delta_e_2000(means, centroid[None])],
        ))
    return parts


def consistency_summary(parts: Sequence[PartConsistency]) -> dict[str, float | None]:
    """Chapter-level numbers: mean and worst spread, mean and worst error over parts seen on ≥ 1 page."""
    if not parts:
        return {"parts": 0, "spread_mean": None, "spread_max": None, "error_mean": None, "error_max": None}
    errors = [p.error_mean for p in parts if p.error_mean is not None]
    worst = [p.error_max for p in parts if p.error_max is not None]
    return {
        "parts": len(parts),
        "spread_mean": float(np.mean([p.spread_mean for p in parts])),
        "spread_max": float(np.max([p.spread_max for p in parts])),
        "error_mean": float(np.mean(errors)) if errors else None,
        "error_max": float(np.max(worst)) if worst else None,
    }


def finite(value: float | None) -> float | str | None:
    """JSON-safe number: inf/nan become strings."""
    if value is None or math.isfinite(value):
        return value
    return str(value)
