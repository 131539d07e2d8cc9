"""comfy_bridge: plain fallbacks without ComfyUI, and the ComfyUI calls it makes inside a (fake) ComfyUI."""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

from ..pack import ROOT


class Interrupted(Exception):
    """Stands in for comfy.model_management.InterruptProcessingException."""


@pytest.fixture
def fake_comfy(monkeypatch, tmp_path):
    """A fresh comfy_bridge module imported while fake `comfy.*` and `folder_paths` modules are installed; records calls."""
    calls = []
    management = types.SimpleNamespace(
        get_torch_device=lambda: torch.device("cpu"),
        intermediate_device=lambda: torch.device("cpu"),
        should_use_fp16=lambda device: False,
        should_use_bf16=lambda device: True,
        soft_empty_cache=lambda: calls.append("soft_empty_cache"),
        unet_offload_device=lambda: torch.device("cpu"),
        free_memory=lambda needed, device: calls.append(("free_memory", needed, device)),
        vram_state=types.SimpleNamespace(name="NORMAL_VRAM"),
        throw_exception_if_processing_interrupted=lambda: calls.append("interrupt_check"),
    )

    class ProgressBar:
        def __init__(self, total):
            calls.append(("bar", total))

        def update_absolute(self, value, total=None):
            calls.append(("update", value, total))
            if value == 99:
                raise Interrupted()

    folders = {
        "checkpoints": ([str(tmp_path / "models" / "checkpoints")], {".safetensors"}),
        "custom_nodes": ([str(tmp_path / "custom_nodes")], set()),
    }
    folder_paths = types.SimpleNamespace(
        models_dir=str(tmp_path / "models"),
        folder_names_and_paths=folders,
        add_model_folder_path=lambda name, path: folders.setdefault(name, ([path], set())),
        get_folder_paths=lambda name: list(folders[name][0]),
        get_filename_list=lambda name: ["v1-5.safetensors"],
        get_full_path=lambda name, file: str(Path(folders[name][0][0]) / file),
        get_input_directory=lambda: str(tmp_path / "in"),
        get_user_directory=lambda: str(tmp_path / "user"),
    )
    comfy = types.ModuleType("comfy")
    comfy.model_management = types.ModuleType("comfy.model_management")
    comfy.model_management.__dict__.update(vars(management))
    comfy.utils = types.ModuleType("comfy.utils")
    comfy.utils.ProgressBar = ProgressBar
    for name, module in {"comfy": comfy, "comfy.model_management": comfy.model_management, "comfy.utils": comfy.utils}.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setitem(sys.modules, "folder_paths", folder_paths)
    spec = importlib.util.spec_from_file_location("bridge_in_fake_comfyui", ROOT / "nodes" / "comfy_bridge.py")
    bridge = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bridge)
    return bridge, calls, folders, tmp_path


def test_fallbacks_without_comfyui(pack, comfy_base):
    bridge = pack.nodes.comfy_bridge
    assert not bridge.in_comfyui()
    assert bridge.input_directory() == comfy_base / "input"
    assert bridge.user_directory() == comfy_base / "user"
    assert bridge.model_folders("colorflow") == [comfy_base / "models" / "colorflow"]
    assert bridge.model_file("diffusers", "tiny-sd15/unet/config.json") is not None
    assert "tiny-sd15/unet/config.json" in bridge.model_files("diffusers")
    assert bridge.model_file("checkpoints", "missing.safetensors") is None
    assert bridge.custom_node_folders() == [comfy_base / "custom_nodes"]
    assert bridge.intermediate_device() == torch.device("cpu")
    assert bridge.offload_device() == torch.device("cpu") and not bridge.low_vram_mode()
    bridge.make_room(2**30, torch.device("cuda"))  # no ComfyUI: nothing to unload
    assert bridge.auto_dtype(torch.device("cpu")) == torch.float32
    bridge.progress_bar(3)(1, 3)
    bridge.check_interrupt()
    bridge.register_model_folder()
    bridge.soft_empty_cache()


def test_inside_comfyui_registers_folder_and_uses_its_services(fake_comfy):
    bridge, calls, folders, root = fake_comfy
    assert bridge.in_comfyui()
    bridge.register_model_folder()
    assert folders["colorflow"][0] == [str(root / "models" / "colorflow")]
    assert bridge.model_folders("colorflow") == [root / "models" / "colorflow"]
    assert bridge.model_folders("unknown") == []
    assert bridge.custom_node_folders() == [root / "custom_nodes"]
    del folders["custom_nodes"]
    assert bridge.custom_node_folders() == []
    assert bridge.model_files("checkpoints") == ["v1-5.safetensors"]
    assert bridge.input_directory() == root / "in" and bridge.user_directory() == root / "user"
    assert bridge.auto_dtype(torch.device("cpu")) == torch.bfloat16
    assert bridge.offload_device() == torch.device("cpu") and not bridge.low_vram_mode()
    bridge.model_management.vram_state = types.SimpleNamespace(name="LOW_VRAM")
    assert bridge.low_vram_mode()
    bridge.make_room(10, torch.device("cpu"))  # system RAM is not ComfyUI's to manage here
    bridge.make_room(2**30, torch.device("cuda", 0))
    assert calls.pop() == ("free_memory", 2**30, torch.device("cuda", 0))
    progress = bridge.progress_bar(4)
    progress(2, 4)
    bridge.check_interrupt()
    bridge.soft_empty_cache()
    assert calls == [("bar", 4), ("update", 2, 4), "interrupt_check", "soft_empty_cache"]


def test_progress_updates_are_interrupt_points(fake_comfy):
    bridge, _calls, _folders, _root = fake_comfy
    with pytest.raises(Interrupted):
        bridge.progress_bar(100)(99, 100)
