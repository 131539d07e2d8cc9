"""Run inside ComfyUI's environment: one UNet call of the native path (ComfyUI's own openaimodel, our patch, the
LoRA as ComfyUI weight patches) against the core path (diffusers UNet + peft LoRA + hooks) on the same x_t,
timestep, text states and condition. Prints a JSON line with the largest differences.

Usage: python unet_call_parity.py COMFYUI_CHECKOUT MODELS_DIR
"""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main(checkout: str, models: str) -> None:
    sys.path.insert(0, checkout)
    sys.path.insert(0, str(ROOT))
    from comfy.cli_args import args

    args.cpu = True
    import comfy.model_management
    import comfy.sd
    import torch

    from tests.pack import load_pack

    pack = load_pack()
    native = importlib.import_module(f"{pack.__name__}.nodes.native")
    bridge = importlib.import_module(f"{pack.__name__}.nodes.native_bridge")
    loading = importlib.import_module(f"{pack.__name__}.colorflow_core.loading")
    sites = importlib.import_module(f"{pack.__name__}.colorflow_core.models.residual_sites")
    injection = importlib.import_module(f"{pack.__name__}.colorflow_core.models.unet_injection")

    models = Path(models)
    release = models / "colorflow" / "ColorFlow"
    model, _clip, vae = comfy.sd.load_checkpoint_guess_config(
        str(models / "checkpoints" / "v1-5-pruned-emaonly.safetensors"), output_vae=True, output_clip=False,
    )[:3]
    patcher = bridge.managed(loading.load_guider(release / "GraySD", release))
    guider = patcher.model.module
    patch = native.ColorFlowPatch(guider, patcher, sites.guider_layout(guider), release / "GraySD")
    lora = bridge.load_file(release / "GraySD" / "unet_lora.bin")
    with torch.inference_mode():
        lora_model = bridge.lora_on(model, lora, 1.0)
        generator = torch.Generator().manual_seed(0)
        canvas = torch.rand(1, 192, 128, 3, generator=generator)
        mask = torch.zeros(1, 192, 128)
        mask[:, 48:144, 32:96] = 1
        patched, latent = native.ColorFlowApply().apply(lora_model, patch, vae, canvas, mask, 1.0, 0.0, 1.0)
        comfy.model_management.load_models_gpu([patched])
        guidance = patched.model_options["transformer_options"]["patches"]["input_block_patch"][-1].guidance
        x = torch.randn(2, *latent["samples"].shape[1:], generator=generator)
        context = torch.randn(2, 77, 768, generator=generator)
        t = torch.tensor([599.0, 599.0])
        options = {**patched.model_options["transformer_options"], "wrappers": patched.wrappers, "cond_or_uncond": [1, 0]}
        native_out = patched.model.diffusion_model(x, t, context, transformer_options=options)
        plain_options = {**lora_model.model_options["transformer_options"], "cond_or_uncond": [1, 0]}
        comfy.model_management.load_models_gpu([lora_model])
        plain_out = lora_model.model.diffusion_model(x, t, context, transformer_options=plain_options)

        flow = loading.load_colorflow(release, models / "diffusers" / "stable-diffusion-v1-5", device="cpu", dtype="float32")
        pipe = flow.pipeline
        residuals = pipe.guider(x, t[:1], guidance.condition[:, 0], conditioning_scale=1.0)
        with injection.inject_guider_residuals(pipe.unet, residuals):
            core_out = pipe.unet(x, t[:1], encoder_hidden_states=context).sample
        plain_core = pipe.unet(x, t[:1], encoder_hidden_states=context).sample
    print(json.dumps({
        "native_vs_core": float((native_out - core_out).abs().max()),
        "plain_vs_plain": float((plain_out - plain_core).abs().max()),
        "residual_effect": float((core_out - plain_core).abs().max()),
        "scale": float(core_out.abs().max()),
    }))


if __name__ == "__main__":
    main(*sys.argv[1:3])
