"""The models a run trains: from the release (fine-tune) or from the SD1.5 base (guider copied from the UNet, zero
outputs, fresh LoRA); which parameters train and a fingerprint proving the frozen ones did not change."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import IncompatibleWeightsError, InvalidInputError
from ..loading import load_base_components, load_colorflow
from ..models.color_guider import ColorGuiderSDModel
from ..models.fusion import MultiHiddenResNetModel
from ..models.lora import SD_LORA_TARGETS, add_lora_adapter
from ..pipelines.colorflow_sd import ColorFlowSDPipeline

TARGETS = ("icp", "gsrp", "all")
#: SD1.5's UNet layout: a base of another family (SDXL, SD2 at 1024-d text, PixArt) is refused before loading.
_SD15_BLOCKS = (["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)


@dataclass
class TrainModels:
    """The pipeline (VAE, text encoder, LoRA UNet, guider), the fusion net and what of them trains."""

    pipeline: ColorFlowSDPipeline
    fusion: MultiHiddenResNetModel
    target: str
    noise_scheduler: DDPMScheduler = field(init=False)
    checkpointing: bool = False

    def __post_init__(self):
        self.noise_scheduler = DDPMScheduler.from_config(self.pipeline.scheduler.config)
        for module in self.modules().values():
            module.requires_grad_(False)
        for name, param in self.trainable().items():
            param.requires_grad_(True)

    def modules(self) -> dict[str, nn.Module]:
        """Every network of the run by role."""
        p = self.pipeline
        return {"unet": p.unet, "guider": p.guider, "vae": p.vae, "text_encoder": p.text_encoder, "fusion": self.fusion}

    def trainable(self) -> dict[str, nn.Parameter]:
        """name -> parameter of everything this target trains (guider fully, the UNet's LoRA; or the fusion net)."""
        params: dict[str, nn.Parameter] = {}
        if self.target in ("icp", "all"):
            params.update({f"guider.{k}": v for k, v in self.pipeline.guider.named_parameters()})
            params.update({f"unet.{k}": v for k, v in self.pipeline.unet.named_parameters() if ".lora_" in k})
        if self.target in ("gsrp", "all"):
            params.update({f"fusion.{k}": v for k, v in self.fusion.named_parameters()})
        return params

    def state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores: the trainable tensors and the fusion net's BatchNorm statistics."""
        state = {k: v.detach() for k, v in self.trainable().items()}
        if self.target in ("gsrp", "all"):
            state.update({f"fusion.{k}": v for k, v in self.fusion.named_buffers()})
        return state

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Put a checkpoint's tensors back (every one must have its place)."""
        own = self.state()
        if set(own) != set(state):
            raise IncompatibleWeightsError(f"checkpoint does not fit this run ({len(set(own) ^ set(state))} keys differ)")
        with torch.no_grad():
            for key, tensor in state.items():
                own[key].copy_(tensor)

    def frozen_fingerprint(self) -> str:
        """sha256 of every frozen parameter and buffer (must be identical before and after training)."""
        trainable = {id(p) for p in self.trainable().values()}
        digest = hashlib.sha256()
        for role, module in self.modules().items():
            for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
                if id(tensor) in trainable or (role == "fusion" and self.target in ("gsrp", "all")):
                    continue
                digest.update(f"{role}.{name}".encode())
                digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def train_mode(self, training: bool) -> None:
        """Trained networks in train mode (the frozen ones stay in eval mode: no dropout in the teacher)."""
        for module in self.modules().values():
            module.eval()
        if training and self.target in ("icp", "all"):
            self.pipeline.guider.train()
            self.pipeline.unet.train()
        if training and self.target in ("gsrp", "all"):
            self.fusion.train()

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in the backward pass: the UNet per block (diffusers), the guider as a whole."""
        self.pipeline.unet.enable_gradient_checkpointing()
        self.checkpointing = True

    def run_guider(self, sample: torch.Tensor, timestep: torch.Tensor, condition: torch.Tensor):
        """The guider's residuals (recomputed in the backward pass under gradient checkpointing)."""
        guider = self.pipeline.guider
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(guider, sample, timestep, condition, use_reentrant=False)
        return guider(sample, timestep, condition)


def check_sd15_base(base: Path) -> None:
    """Refuse a base that is not an SD1.5-family diffusers folder, naming what it looks like instead."""
    base = Path(base)
    if (base / "transformer" / "config.json").is_file():
        raise IncompatibleWeightsError(
            f"{base} is a PixArt/transformer base; training supports the SD1.5 family (the gray style) only"
        )
    config_path = base / "unet" / "config.json"
    if not config_path.is_file():
        if base.suffix in (".safetensors", ".ckpt"):
            return  # a single-file SD1.5 checkpoint: loading checks its layout
        raise InvalidInputError(f"{base} is not an SD1.5 diffusers folder (no unet/config.json)")
    config = json.loads(config_path.read_text())
    blocks = (list(config.get("down_block_types", [])), list(config.get("up_block_types", [])))
    if config.get("addition_embed_type") or blocks != _SD15_BLOCKS or config.get("in_channels") != 4:
        raise IncompatibleWeightsError(
            f"{base} is not an SD1.5-family UNet (blocks {blocks[0]}, addition_embed_type "
            f"{config.get('addition_embed_type')}, in_channels {config.get('in_channels')}); SDXL/SD2-inpaint bases "
            "do not fit the released guider"
        )


def guider_from_unet(unet: UNet2DConditionModel) -> ColorGuiderSDModel:
    """The paper's initialisation: a guider at the UNet's widths with its time embedding and blocks copied from the UNet
    (where names and shapes match: no cross-attention), the UNet's conv_in weights on each of the three latent inputs
    (noisy latent, references latent, page latent), zero on the mask channel, and zero output convolutions."""
    config = unet.config
    guider = ColorGuiderSDModel(
        block_out_channels=tuple(config.block_out_channels), layers_per_block=config.layers_per_block,
        norm_num_groups=config.norm_num_groups, cross_attention_dim=config.cross_attention_dim,
        attention_head_dim=config.attention_head_dim,
    )
    own = guider.state_dict()
    copied = {k: v for k, v in unet.state_dict().items() if k in own and own[k].shape == v.shape and ".lora_" not in k}
    copied = {k: v for k, v in copied.items() if not k.startswith("conv_in")}
    guider.load_state_dict(copied, strict=False)
    with torch.no_grad():
        weight = guider.conv_in_condition.weight
        weight.zero_()
        latent = unet.conv_in.weight
        for start in (0, 4, 9):  # [noisy latent 0:4, references 4:8, mask 8, page 9:13]
            weight[:, start : start + 4] = latent
        guider.conv_in_condition.bias.copy_(unet.conv_in.bias)
    return guider


def build_models(
    colorflow: str | Path | None,
    base: str | Path,
    target: str,
    *,
    device: torch.device,
    lora_rank: int = 64,
    lora_alpha: float | None = None,
    lora_targets: tuple[str, ...] = SD_LORA_TARGETS,
) -> TrainModels:
    """The run's models: the release's gray style (fine-tune), or the base with a fresh guider, LoRA and fusion net."""
    if target not in TARGETS:
        raise InvalidInputError(f"unknown --target '{target}' (choose {', '.join(TARGETS)})")
    check_sd15_base(Path(base))
    if colorflow is not None:
        model = load_colorflow(colorflow, base, style="gray", device=device, dtype="float32")
        return TrainModels(model.pipeline, model.upscaler.fusion, target)
    components = load_base_components(Path(base))
    unet = components.pop("unet", None)
    if unet is None:
        unet = UNet2DConditionModel.from_pretrained(Path(base) / "unet", torch_dtype=torch.float32)
    guider = guider_from_unet(unet)
    # peft's "gaussian" init draws A and zeroes B: the adapted UNet starts as the base UNet.
    config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha or lora_rank, init_lora_weights="gaussian",
                        target_modules=list(lora_targets))
    add_lora_adapter(unet, config)
    widths = components["vae"].config.block_out_channels
    fusion = MultiHiddenResNetModel(channels_list=(widths[0], *widths), num_tensors=len(widths) + 1)
    pipeline = ColorFlowSDPipeline(unet=unet, guider=guider, **components)
    pipeline.to(device)
    fusion.to(device)
    return TrainModels(pipeline, fusion, target)
