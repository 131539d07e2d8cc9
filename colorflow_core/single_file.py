"""Load an SD1.5 base from one original-layout checkpoint (e.g. ComfyUI's `models/checkpoints/v1-5-pruned-emaonly.safetensors`).

Offline by construction: the diffusers configs ship in `configs/sd15/`, the weights are converted with diffusers' own
LDM→diffusers key mapping and loaded strictly (every model tensor must come from the file), and the CLIP tokenizer is
rebuilt from the BPE table bundled with open_clip. Nothing here touches the Hugging Face hub.
"""
from __future__ import annotations

import gzip
import json
import tempfile
from importlib.util import find_spec
from pathlib import Path
from typing import Callable

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel, UniPCMultistepScheduler
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .errors import IncompatibleWeightsError, MissingWeightsError
from .weights import read_state_dict

#: The shipped SD1.5 diffusers configs (unet/, vae/, text_encoder/, tokenizer/, scheduler/).
SD15_CONFIGS = Path(__file__).parent / "configs" / "sd15"
#: File endings treated as a single-file checkpoint rather than a diffusers folder.
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
CLIP_VOCAB_SIZE = 49408
#: Token ids of the OpenAI CLIP BPE for a fixed prompt; checks the rebuilt vocabulary.
CLIP_PROBE = ("a girl with red hair", [49406, 320, 1611, 593, 736, 2225, 49407])
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"

#: Keys that give away a checkpoint family ColorFlow cannot use as its SD1.5 base.
_FOREIGN = (
    ("conditioner.embedders.", "an SDXL checkpoint"),
    ("cond_stage_model.model.", "an SD 2.x checkpoint (OpenCLIP text encoder)"),
    ("model.diffusion_model.joint_blocks.", "an SD3 checkpoint"),
    ("joint_blocks.", "an SD3 checkpoint"),
    ("model.diffusion_model.double_blocks.", "a Flux checkpoint"),
    ("double_blocks.", "a Flux checkpoint"),
    ("control_model.", "a ControlNet"),
    ("lora_unet_", "a LoRA"),
    ("lora_te_", "a LoRA"),
)
_IN_CHANNELS_NAMES = {9: "an inpainting checkpoint", 8: "an InstructPix2Pix checkpoint"}


def is_single_file(location: str | Path) -> bool:
    """True if `location` names a checkpoint file (existing, or not a folder and with a weight-file ending)."""
    path = Path(location).expanduser()
    return path.is_file() or (not path.is_dir() and path.suffix.lower() in SINGLE_FILE_SUFFIXES)


# --------------------------------------------------------------------------------------------------- reading


def _open_checkpoint(path: Path) -> tuple[list[str], Callable[[str], tuple[int, ...]], Callable[[str], torch.Tensor]]:
    """(keys, shape_of, get) of a checkpoint; .safetensors are read lazily so unused tensors are never loaded."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
            keys = list(handle.keys())
        except (SafetensorError, OSError, ValueError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise IncompatibleWeightsError(f"cannot read checkpoint {path}: {reason} (corrupt or truncated?)") from exc
        return keys, lambda key: tuple(handle.get_slice(key).get_shape()), lambda key: _owned_fp32(handle.get_tensor(key))
    state = read_state_dict(path)  # .ckpt/.pt/.pth/.bin: weights_only unpickling, errors name the file
    if not isinstance(state, dict):
        raise IncompatibleWeightsError(f"{path} is not a tensor checkpoint")
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return list(state), lambda key: tuple(state[key].shape), lambda key: _owned_fp32(state[key])


def _owned_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """A float32 copy in fresh (aligned) memory; tensors viewed from a file map are unaligned and slow CPU matmuls down."""
    if tensor.is_floating_point() and tensor.dtype != torch.float32:
        return tensor.to(torch.float32)
    return tensor.clone()


def _check_family(path: Path, keys: list[str], shape_of: Callable[[str], tuple[int, ...]], unet_config: dict) -> None:
    """Raise, naming what the file is, unless it is an original-layout SD1.5-family checkpoint with all three parts."""
    for marker, what in _FOREIGN:
        if any(k.startswith(marker) for k in keys):
            raise IncompatibleWeightsError(f"{path.name} is {what}; ColorFlow needs a Stable Diffusion 1.5 checkpoint")
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        if any(k.startswith(("down_blocks.", "conv_in.", "encoder.down_blocks.", "text_model.")) for k in keys):
            raise IncompatibleWeightsError(
                f"{path.name} is a single diffusers-format component, not a full checkpoint: pass an original SD1.5 "
                "checkpoint (e.g. v1-5-pruned-emaonly.safetensors) or a diffusers folder holding unet/, vae/, text_encoder/"
            )
        raise IncompatibleWeightsError(f"{path.name} is not a Stable Diffusion 1.5 checkpoint (no '{UNET_PREFIX}*' UNet weights)")
    first = UNET_PREFIX + "input_blocks.0.0.weight"
    if first in keys:
        channels = shape_of(first)[1]
        if channels != unet_config["in_channels"]:
            what = _IN_CHANNELS_NAMES.get(channels, f"a {channels}-channel UNet")
            raise IncompatibleWeightsError(f"{path.name} is {what}; ColorFlow needs a plain (4-channel) SD1.5 checkpoint")
    context = UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    if context in keys and shape_of(context)[-1] != unet_config["cross_attention_dim"]:
        raise IncompatibleWeightsError(
            f"{path.name} has text-conditioning width {shape_of(context)[-1]}, SD1.5 has "
            f"{unet_config['cross_attention_dim']}: not an SD1.5 checkpoint"
        )
    for prefix, part in ((VAE_PREFIX, "VAE"), (CLIP_PREFIX, "CLIP text encoder")):
        if not any(k.startswith(prefix) for k in keys):
            raise IncompatibleWeightsError(
                f"{path.name} holds no {part} weights ('{prefix}*'): ColorFlow needs a full SD1.5 checkpoint "
                "(UNet + VAE + text encoder), not a UNet-only file"
            )


# --------------------------------------------------------------------------------------------------- models


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise MissingWeightsError(path.name, path.parent, "a diffusers-format SD1.5 config")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise IncompatibleWeightsError(f"{path} is not valid JSON: {exc}") from exc


def _load_converted(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str, path: Path) -> torch.nn.Module:
    """Strict, assigning load into a meta-built model (tensors already fp32); every parameter must come from the file."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = [f"{len(missing)} weights missing (e.g. {missing[:2]})"] if missing else []
        parts += [f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"] if unexpected else []
        raise IncompatibleWeightsError(f"the {what} in {path.name} does not fit SD1.5: {'; '.join(parts)}")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise IncompatibleWeightsError(
                f"the {what} in {path.name} does not fit SD1.5: '{key}' has shape {tuple(tensor.shape)}, "
                f"the model wants {tuple(own[key].shape)}"
            )
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _restore_position_ids(model: torch.nn.Module) -> None:
    """Non-persistent `position_ids` buffers are not in any file; rebuild them after a meta-device build."""
    for module in model.modules():
        buffer = module._buffers.get("position_ids")
        if buffer is not None and buffer.is_meta:
            module.register_buffer("position_ids", torch.arange(buffer.shape[-1]).expand((1, -1)), persistent=False)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise IncompatibleWeightsError(f"text encoder tensors were not loaded: {left[:3]}")


def _unet(path, keys, get, config: dict) -> UNet2DConditionModel:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    names = [k for k in keys if k.startswith(UNET_PREFIX)]
    # A full (non-pruned) file also holds EMA weights under flattened names; use them, as diffusers' SD1.5 repo does.
    ema = {k: EMA_PREFIX + "".join(k.split(".")[1:]) for k in names}
    use_ema = set(ema.values()) <= set(keys)
    checkpoint = {k: get(ema[k] if use_ema else k) for k in names}
    state = convert_ldm_unet_checkpoint(checkpoint, config)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    return _load_converted(unet, state, "UNet", path)


def _vae(path, keys, get, config: dict) -> AutoencoderKL:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    checkpoint = {k: get(k) for k in keys if k.startswith(VAE_PREFIX) and not k.startswith(VAE_PREFIX + "loss.")}
    state = convert_ldm_vae_checkpoint(checkpoint, config)
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(config)
    return _load_converted(vae, state, "VAE", path)


def _text_encoder(path, keys, get, config_dir: Path) -> CLIPTextModel:
    config_file = config_dir / "text_encoder" / "config.json"
    _read_json(config_file)  # a clear error if it is missing or broken
    config = CLIPTextConfig.from_json_file(str(config_file))
    with torch.device("meta"):
        model = CLIPTextModel(config)
    # transformers >= 5.6 flattened CLIPTextModel (no `text_model.` prefix); follow whichever this version uses.
    prefix = "text_model." if any(k.startswith("text_model.") for k in model.state_dict()) else ""
    state = {}
    for key in keys:
        if not key.startswith(CLIP_PREFIX) or key.endswith("position_ids"):
            continue  # position_ids: a derived buffer, sometimes stored corrupted in old checkpoints
        name = key[len(CLIP_PREFIX):].removeprefix("text_model.")
        state[prefix + name] = get(key)
    model = _load_converted(model, state, "CLIP text encoder", path)
    _restore_position_ids(model)
    return model


# --------------------------------------------------------------------------------------------------- tokenizer


def _bytes_to_unicode() -> list[str]:
    """CLIP/GPT-2 byte symbols in vocabulary order: printable bytes first, then the remapped rest."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(rest))]


def clip_bpe_file() -> Path:
    """open_clip's bundled `bpe_simple_vocab_16e6.txt.gz`, located without importing open_clip."""
    spec = find_spec("open_clip")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        candidate = Path(folder) / BPE_FILE
        if candidate.is_file():
            return candidate
    raise MissingWeightsError(
        BPE_FILE, folders[0] if folders else "the open_clip package",
        "the SD1.5 CLIP tokenizer is rebuilt from open_clip's bundled BPE table: pip install open_clip_torch, "
        "or put vocab.json + merges.txt in <config_dir>/tokenizer/",
    )


def write_clip_vocab(folder: Path, bpe_file: Path | None = None) -> Path:
    """Write the OpenAI CLIP `vocab.json` + `merges.txt` (49408 tokens) rebuilt from the open_clip BPE table."""
    lines = gzip.open(bpe_file or clip_bpe_file(), "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


def load_clip_tokenizer(config_dir: Path | None = None) -> CLIPTokenizer:
    """The SD1.5 CLIP tokenizer: from `<config_dir>/tokenizer/` if it holds vocab.json + merges.txt, else the real
    49408-token vocabulary rebuilt (in a temporary folder, nothing cached) from open_clip's BPE table and checked."""
    folder = (config_dir or SD15_CONFIGS) / "tokenizer"
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        tokenizer = CLIPTokenizer.from_pretrained(str(folder))
        if len(tokenizer) < 3 or tokenizer.model_max_length > 100_000:
            raise IncompatibleWeightsError(f"tokenizer in {folder} is broken (vocab.json/merges.txt)")
        return tokenizer
    with tempfile.TemporaryDirectory(prefix="colorflow-clip-") as tmp:
        write_clip_vocab(Path(tmp))
        settings = folder / "tokenizer_config.json"
        config = json.loads(settings.read_text()) if settings.is_file() else {"model_max_length": 77}
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(config))
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    text, ids = CLIP_PROBE
    if len(tokenizer) != CLIP_VOCAB_SIZE or tokenizer(text).input_ids != ids:
        raise IncompatibleWeightsError(
            f"the CLIP vocabulary rebuilt from {BPE_FILE} is wrong ({len(tokenizer)} tokens); "
            "put vocab.json + merges.txt in <config_dir>/tokenizer/ instead"
        )
    return tokenizer


# --------------------------------------------------------------------------------------------------- entry point


def load_sd15_single_file(path: Path, config_dir: Path | None = None) -> dict:
    """`unet`, `vae`, `text_encoder`, `tokenizer`, `scheduler` (UniPC) of one original-layout SD1.5 checkpoint, fp32.

    `config_dir` is a diffusers-format config folder (unet/config.json, vae/config.json, text_encoder/config.json,
    scheduler/scheduler_config.json, optional tokenizer/); default: the shipped SD1.5 configs. Tests pass tiny ones.
    Full (non-pruned) checkpoints with `model_ema.*` weights load the EMA UNet. Raises MissingWeightsError for a
    missing file, IncompatibleWeightsError (naming the family when it can: SDXL, SD 2.x, inpainting, …) otherwise.
    """
    path = Path(path).expanduser()
    config_dir = Path(config_dir) if config_dir is not None else SD15_CONFIGS
    if not path.is_file():
        raise MissingWeightsError(path.name, path.parent, "an SD1.5 single-file checkpoint such as v1-5-pruned-emaonly.safetensors")
    unet_config = _read_json(config_dir / "unet" / "config.json")
    vae_config = _read_json(config_dir / "vae" / "config.json")
    scheduler_config = _read_json(config_dir / "scheduler" / "scheduler_config.json")

    keys, shape_of, get = _open_checkpoint(path)
    _check_family(path, keys, shape_of, unet_config)
    text_encoder = _text_encoder(path, keys, get, config_dir)
    tokenizer = load_clip_tokenizer(config_dir)
    if len(tokenizer) != text_encoder.config.vocab_size:
        raise IncompatibleWeightsError(
            f"tokenizer has {len(tokenizer)} tokens but the text encoder of {path.name} has {text_encoder.config.vocab_size}"
        )
    return dict(
        unet=_unet(path, keys, get, unet_config),
        vae=_vae(path, keys, get, vae_config),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=UniPCMultistepScheduler.from_config(scheduler_config),
    )


def sd15_vae_from_ldm(state: dict[str, torch.Tensor], source: str = "the VAE", config_dir: Path | None = None) -> AutoencoderKL:
    """A diffusers SD1.5 VAE sharing the tensors of an original-layout (`first_stage_model.*`) state dict, e.g. the
    weights of a VAE another program already holds."""
    config = _read_json((Path(config_dir) if config_dir is not None else SD15_CONFIGS) / "vae" / "config.json")
    return _vae(Path(source), list(state), state.__getitem__, config)
