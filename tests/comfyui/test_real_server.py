"""The native path on a real ComfyUI server (CPU, tiny SD1.5-width weights): the shipped workflows run, the page is
within 35 dB of `colorize`, Cancel is honoured, ComfyUI loads and unloads the guider, bad input fails clearly."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from colorflow_core.canvas import center_crop

from ..pack import ROOT, load_pack
from ..workflows.core_nodes import core_nodes
from ..workflows.executor import to_prompt
from .conftest import CHECKOUT, PAGE, REFS

W, H = 64, 96
TINY = {
    "ColorFlowStitchCanvas": {"size": "custom", "width": W, "height": H},
    "ColorFlowEncoderLoader": {"device": "cpu"},
    "ColorFlowLineExtract": {"device": "cpu"},
    "KSampler": {"steps": 2},
}
GUIDER_LOADS = "Requested to load ColorFlowGuider"
#: Sampling steps of the comparison with `colorize` (CPU time on shared machines; the samplers differ more with fewer).
STEPS = 4


def shipped_prompt(server, name: str, **changes) -> dict:
    """The shipped workflow as the frontend queues it, set small (`changes`: class_type → inputs)."""
    classes = {**load_pack().NODE_CLASS_MAPPINGS, **core_nodes(server.base / "input", None, [])}
    prompt = to_prompt(json.loads((ROOT / "workflows" / f"{name}.json").read_text()), classes)
    for entry in prompt.values():
        entry["inputs"].update(TINY.get(entry["class_type"], {}))
        entry["inputs"].update(changes.get(entry["class_type"], {}))
    return prompt


def node(prompt: dict, class_type: str) -> str:
    return next(key for key, entry in prompt.items() if entry["class_type"] == class_type)


def with_saved(prompt: dict, class_type: str, prefix: str) -> str:
    """Add a SaveImage of `class_type`'s first output; return its node id."""
    key = str(max(int(k) for k in prompt) + 1)
    prompt[key] = {"class_type": "SaveImage", "inputs": {"images": [node(prompt, class_type), 0], "filename_prefix": prefix}}
    return key


def psnr(a: Path, b: Path) -> float:
    x = np.asarray(Image.open(a).convert("RGB"), dtype=np.float64)
    y = np.asarray(Image.open(b).convert("RGB"), dtype=np.float64)
    assert x.shape == y.shape, (x.shape, y.shape)
    mse = ((x - y) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_native_workflow_runs(server):
    before = server.log().count(GUIDER_LOADS)
    entry = server.run(shipped_prompt(server, "colorflow_native_ksampler"))
    (final,) = server.outputs(entry, node(shipped_prompt(server, "colorflow_native_ksampler"), "SaveImage"))
    assert Image.open(final).size == (int(1.5 * W), int(1.5 * H))
    assert server.log().count(GUIDER_LOADS) > before, "the guider was not loaded through ComfyUI's model manager"


def test_controlnet_variant_runs(server):
    prompt = shipped_prompt(server, "colorflow_native_controlnet")
    entry = server.run(prompt)
    assert server.outputs(entry, node(prompt, "SaveImage"))
    assert "Requested to load ControlNet" in server.log()


@pytest.fixture(scope="module")
def cli_page(server, comfy_models, tmp_path_factory) -> Path:
    """`colorize` on the same page, references, size, seed and steps, with the diffusers copy of the checkpoint."""
    out = tmp_path_factory.mktemp("cli")
    command = [
        sys.executable, "-m", "colorflow_core", "colorize", "--colorflow", str(comfy_models / "colorflow" / "ColorFlow"),
        "--base", str(comfy_models / "diffusers" / "stable-diffusion-v1-5"), "--refs", str(server.base / "input" / REFS),
        "--out", str(out / "final"), "--width", str(W), "--height", str(H), "--steps", str(STEPS), "--seed", "0",
        "--preprocess", "gray", "--device", "cpu", "--dtype", "float32", "--save-intermediates", str(out / "stages"),
        str(server.base / "input" / PAGE),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def native_pages(server, sampler: str, scheduler: str) -> tuple[Path, Path]:
    prompt = shipped_prompt(server, "colorflow_native_ksampler", KSampler={"steps": STEPS, "sampler_name": sampler, "scheduler": scheduler})
    crop = with_saved(prompt, "ColorFlowCropPage", f"native-{sampler}-{scheduler}-lowres")
    entry = server.run(prompt)
    return server.outputs(entry, crop)[0], server.outputs(entry, node(prompt, "SaveImage"))[0]


def cli_icp_page(cli_page: Path) -> Path:
    """The centre of the CLI's sampled canvas (its `lowres` is already resized to the guide's size)."""
    page = cli_page / "icp-page.png"
    if not page.exists():
        center_crop(Image.open(next((cli_page / "stages").rglob("icp.png")))).save(page)
    return page


@pytest.mark.parametrize("sampler, scheduler", [("uni_pc", "normal"), ("uni_pc", "simple"), ("uni_pc_bh2", "simple"), ("uni_pc_bh2", "normal")])
def test_native_page_against_colorize(server, cli_page, sampler, scheduler, record_property):
    """Measured for each scheduler choice (see the README's table); the shipped choice must be within 35 dB."""
    lowres, final = native_pages(server, sampler, scheduler)
    page_db, final_db = psnr(lowres, cli_icp_page(cli_page)), psnr(final, next((cli_page / "final").glob("*.png")))
    record_property("psnr_lowres_db", page_db)
    record_property("psnr_final_db", final_db)
    print(f"\n{sampler}/{scheduler}: ICP page {page_db:.2f} dB, after guided upscale {final_db:.2f} dB")
    shipped = json.loads((ROOT / "workflows" / "colorflow_native_ksampler.json").read_text())
    ksampler = next(n for n in shipped["nodes"] if n["type"] == "KSampler")["widgets_values"]
    if (sampler, scheduler) == (ksampler[4], ksampler[5]):
        assert final_db >= 35.0 and page_db >= 35.0


def test_unet_call_matches_the_core_path_in_real_comfyui(comfy_models):
    """One model call through ComfyUI's own openaimodel + our patch vs the diffusers UNet + hooks."""
    script = Path(__file__).with_name("unet_call_parity.py")
    python = os.environ.get("COLORFLOW_COMFYUI_PYTHON", sys.executable)
    done = subprocess.run([python, str(script), CHECKOUT, str(comfy_models)], cwd=CHECKOUT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["residual_effect"] > 0.05
    assert found["native_vs_core"] < 1e-4 * found["scale"], found


def test_cancel_between_steps(server):
    prompt = shipped_prompt(server, "colorflow_native_ksampler", KSampler={"steps": 400})
    prompt_id = server.queue(prompt)
    for _ in range(600):
        if re.search(r"\n\s*\d+%\|.*\| [1-9]\d*/400", server.log()):  # KSampler's progress bar has moved
            break
        time.sleep(0.5)
    server.request("/interrupt", {})
    entry = server.wait(prompt_id)
    kinds = [message[0] for message in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds and "execution_success" not in kinds


def test_runs_after_free_and_after_another_checkpoint(server, comfy_models):
    server.run(shipped_prompt(server, "colorflow_native_ksampler"))
    server.request("/free", {"unload_models": True, "free_memory": True})
    loads = server.log().count(GUIDER_LOADS)
    server.run(shipped_prompt(server, "colorflow_native_ksampler"))
    log = server.log()
    assert "Unloading ColorFlowGuider" in log, "ComfyUI never unloaded the guider"
    assert log.count(GUIDER_LOADS) > loads
    other = comfy_models / "checkpoints" / "other-sd15.safetensors"
    other.symlink_to(comfy_models / "checkpoints" / "v1-5-pruned-emaonly.safetensors")
    try:
        txt2img = {
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": other.name}},
            "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "x"}},
            "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "4": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0], "latent_image": ["3", 0],
                                                       "seed": 0, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
            "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
            "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}},
        }
        server.run(txt2img)
        server.run(shipped_prompt(server, "colorflow_native_ksampler", KSampler={"seed": 1}))
    finally:
        other.unlink()


def test_core_lora_loader_drops_the_attention_tensors(server, comfy_models):
    """Why the workflow uses ColorFlow LoRA Loader: core LoraLoaderModelOnly maps only the feed-forward tensors."""
    loras = comfy_models / "loras"
    loras.mkdir(exist_ok=True)
    link = loras / f"colorflow-release-lora-{os.getpid()}.bin"  # a name no user file has
    link.symlink_to(comfy_models / "colorflow" / "ColorFlow" / "GraySD" / "unet_lora.bin")
    try:
        prompt = shipped_prompt(server, "colorflow_native_ksampler")
        lora = node(prompt, "ColorFlowLoRALoader")
        prompt[lora] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": prompt[lora]["inputs"]["model"], "lora_name": link.name, "strength_model": 1.0}}
        server.run(prompt)
        dropped = re.findall(r"lora key not loaded: (\S+)", server.log())
        assert dropped and all(re.search(r"\.(attn[12]\.to_(q|k|v|out\.0))\.lora_[AB]", key) for key in dropped)
    finally:
        link.unlink()


def test_mask_of_another_size_is_refused(server):
    prompt = shipped_prompt(server, "colorflow_native_ksampler")
    apply = node(prompt, "ColorFlowApply")
    prompt[apply]["inputs"]["mask"] = [node(prompt, "LoadImage"), 1]  # LoadImage's 64×64 mask
    entry = server.wait(server.queue(prompt))
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and errors[0]["node_type"] == "ColorFlowApply"
    assert "the mask is 64x64 but the canvas is 128x192" in errors[0]["exception_message"]
