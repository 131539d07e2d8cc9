"""Image encoders for retrieval: the release's CLIP vision tower, or any open_clip model."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch
from PIL import Image

from ..errors import IncompatibleWeightsError, InvalidInputError, MissingWeightsError

_MIB = 1 << 20
_RELEASE_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_RELEASE_HOW_TO_GET = "download the 'image_encoder' folder of the TencentARC/ColorFlow release"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


@runtime_checkable
class ImageEncoder(Protocol):
    """Maps RGB images to un-normalised embedding vectors."""

    #: Stable identity; changes whenever the model or its weights change (keys the embedding cache).
    name: str
    dim: int

    def encode(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Embed `images` as a [N, dim] float32 CPU tensor."""
        ...


def weight_fingerprint(path: Path) -> str:
    """File size plus sha256 of its first and last MiB: cheap, yet distinct for distinct weight files."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        digest.update(handle.read(_MIB))
        if size > _MIB:
            handle.seek(max(size - _MIB, _MIB))
            digest.update(handle.read())
    return f"{size}-{digest.hexdigest()[:16]}"


def state_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of every tensor of a model's state dict, for models that do not come from one file."""
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return f"state-{digest.hexdigest()[:16]}"


def default_image_processor() -> Any:
    """A default-constructed PIL-backed CLIP processor (upstream's `CLIPImageProcessor()`), torchvision-free."""
    try:
        from transformers import CLIPImageProcessorPil as processor_class
    except ImportError:  # transformers 4.x: the only CLIPImageProcessor is the PIL one
        from transformers import CLIPImageProcessor as processor_class
    return processor_class()


def _encode_batches(
    images: Sequence[Image.Image], batch_size: int, dim: int, embed: Callable[[list[Image.Image]], torch.Tensor]
) -> torch.Tensor:
    """Run `embed` over `images` in batches and stack the float32 CPU results."""
    if not images:
        return torch.empty(0, dim)
    with torch.no_grad():
        chunks = [embed(list(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    return torch.cat([chunk.float().cpu() for chunk in chunks])


def _release_weights(folder: Path) -> Path:
    """The weight file of a release `image_encoder/` folder, or a MissingWeightsError naming it."""
    if not (folder / "config.json").is_file():
        raise MissingWeightsError("config.json", folder, _RELEASE_HOW_TO_GET)
    for name in _RELEASE_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise MissingWeightsError(_RELEASE_WEIGHT_FILES[0], folder, _RELEASE_HOW_TO_GET)


def _from_pretrained_dtype_kw() -> str:
    """transformers 5 renamed `torch_dtype` to `dtype`."""
    import transformers

    return "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"


class ReleaseClipEncoder:
    """The release's `CLIPVisionModelWithProjection` with a default PIL CLIP processor; yields `image_embeds`."""

    def __init__(self, model: torch.nn.Module, name: str | None = None, processor: Any = None, batch_size: int = 32):
        self.model = model.eval()
        self.processor = processor if processor is not None else default_image_processor()
        self.name = name or f"release-clip:{state_fingerprint(model)}"
        self.dim = int(model.config.projection_dim)
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu", batch_size: int = 32) -> "ReleaseClipEncoder":
        """Load `folder` (the release's `image_encoder/`) in float32, eval mode."""
        from transformers import CLIPVisionModelWithProjection

        folder = Path(folder)
        weights = _release_weights(folder)
        try:
            model = CLIPVisionModelWithProjection.from_pretrained(folder, **{_from_pretrained_dtype_kw(): torch.float32})
        except (OSError, ValueError, RuntimeError) as exc:
            raise IncompatibleWeightsError(f"cannot load the CLIP image encoder from '{folder}': {exc}") from exc
        return cls(model.to(device), name=f"release-clip:{weight_fingerprint(weights)}", batch_size=batch_size)

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The processor's [N, 3, 224, 224] float32 input for `images`."""
        return self.processor(images=list(images), return_tensors="pt")["pixel_values"]

    def encode(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Projected CLIP image embeddings, [N, dim] float32 on the CPU."""
        return _encode_batches(images, self.batch_size, self.dim, self._embed)

    def _embed(self, images: list[Image.Image]) -> torch.Tensor:
        parameter = next(self.model.parameters())
        pixels = self.pixel_values(images).to(parameter.device, parameter.dtype)
        return self.model(pixel_values=pixels).image_embeds


def _pretrained_file(pretrained: str | Path | None) -> Path | None:
    """The weight file `pretrained` names, None for an open_clip tag; a missing file is an error."""
    if pretrained is None:
        return None
    path = Path(pretrained)
    if path.is_file():
        return path
    if isinstance(pretrained, Path) or any(sep in str(pretrained) for sep in "/\\") or str(pretrained).endswith(_WEIGHT_SUFFIXES):
        raise MissingWeightsError(path.name, path.parent, "pass an open_clip checkpoint file or a pretrained tag")
    return None


class OpenClipEncoder:
    """Any open_clip_torch model's `encode_image` (open_clip is imported only when one is built)."""

    def __init__(self, model_name: str, pretrained: str | Path | None = None, device: str | torch.device = "cpu", batch_size: int = 32):
        import open_clip

        weights = _pretrained_file(pretrained)
        try:
            model, _, self.preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=str(pretrained) if pretrained is not None else None, device=device
            )
        except RuntimeError as exc:
            raise InvalidInputError(f"cannot build open_clip model '{model_name}': {exc}") from exc
        self.model = model.eval()
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.name = self._identity(model_name, pretrained, weights)
        self.dim = int(model.visual.output_dim)

    def _identity(self, model_name: str, pretrained: str | Path | None, weights: Path | None) -> str:
        if weights is not None:
            return f"open_clip:{model_name}:{weights.name}:{weight_fingerprint(weights)}"
        if pretrained is None:  # random init differs per instance, so the weights themselves are the identity
            return f"open_clip:{model_name}:random:{state_fingerprint(self.model)}"
        return f"open_clip:{model_name}:{pretrained}"

    def encode(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """open_clip image features (not normalised), [N, dim] float32 on the CPU."""
        return _encode_batches(images, self.batch_size, self.dim, self._embed)

    def _embed(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(image.convert("RGB")) for image in images]).to(self.device)
        return self.model.encode_image(pixels)
