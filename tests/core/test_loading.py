"""Loading: strict, safe, and every failure names the file and where it goes."""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch

from colorflow_core.errors import IncompatibleWeightsError, InvalidInputError, MissingWeightsError
from colorflow_core.loading import load_colorflow, load_fusion, load_guider
from colorflow_core.models.lora import apply_lora, normalize_lora_keys
from colorflow_core.tiny import tiny_unet
from colorflow_core.weights import read_state_dict, resolve_snapshot


@pytest.fixture()
def release_copy(tiny_release, tmp_path) -> tuple[Path, Path]:
    release, base = tiny_release
    shutil.copytree(release, tmp_path / "colorflow")
    return tmp_path / "colorflow", base


def test_tiny_release_loads_and_lora_is_active(tiny_model):
    unet = tiny_model.pipeline.unet
    assert any(".lora_A.default." in k for k in unet.state_dict())
    assert not unet.training and not tiny_model.pipeline.guider.training
    assert tiny_model.pipeline.guider.config.conditioning_channels == 9


@pytest.mark.parametrize("missing", ["GraySD/config.json", "GraySD/diffusion_pytorch_model.safetensors",
                                     "GraySD/unet_lora.bin", "GraySD/MultiResNetModel.bin", "image_encoder/model.safetensors"])
def test_missing_file_names_the_file_and_its_folder(release_copy, missing):
    release, base = release_copy
    (release / missing).unlink()
    with pytest.raises(MissingWeightsError) as info:
        load_colorflow(release, base)
    message = str(info.value)
    assert Path(missing).stem in message and str(release / Path(missing).parent) in message


def test_bin_is_accepted_and_safetensors_preferred(release_copy):
    release, _ = release_copy
    gray = release / "GraySD"
    state = read_state_dict(gray / "diffusion_pytorch_model.safetensors")
    torch.save(state, gray / "diffusion_pytorch_model.bin")
    assert len(load_guider(gray).state_dict()) == 626
    (gray / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(IncompatibleWeightsError, match="diffusion_pytorch_model.safetensors"):
        load_guider(gray)
    (gray / "diffusion_pytorch_model.safetensors").unlink()
    assert len(load_guider(gray).state_dict()) == 626


def test_truncated_and_unsafe_pickles_are_refused(tmp_path):
    good = tmp_path / "w.bin"
    torch.save({"a": torch.ones(1000)}, good)
    truncated = tmp_path / "t.bin"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(IncompatibleWeightsError, match="t.bin"):
        read_state_dict(truncated)

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    unsafe = tmp_path / "evil.pth"
    with unsafe.open("wb") as handle:
        pickle.dump({"a": Payload()}, handle)
    with pytest.raises(IncompatibleWeightsError, match="evil.pth"):
        read_state_dict(unsafe)


def test_guider_with_wrong_shapes_or_keys_fails_loudly(release_copy):
    release, _ = release_copy
    gray = release / "GraySD"
    state = read_state_dict(gray / "diffusion_pytorch_model.safetensors")
    state["conv_in_condition.weight"] = state["conv_in_condition.weight"][:, :9]  # a 5-channel guider
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, gray / "diffusion_pytorch_model.safetensors")
    with pytest.raises(IncompatibleWeightsError, match="conv_in_condition"):
        load_guider(gray)


def test_fusion_widths_must_match_the_vae(tiny_model, release_copy):
    release, _ = release_copy
    from colorflow_core.models import MultiHiddenResNetModel

    torch.save(MultiHiddenResNetModel(channels_list=(4, 4, 8, 16, 16)).state_dict(), release / "GraySD" / "MultiResNetModel.bin")
    with pytest.raises(IncompatibleWeightsError, match="feature widths"):
        load_fusion(release / "GraySD", tiny_model.pipeline.vae)


@pytest.mark.parametrize("spelling", ["{m}.lora_A.weight", "{m}.lora_A.default.weight", "{m}.lora_A.default_0.weight",
                                      "unet.{m}.lora_A.weight"])
def test_lora_key_spellings_all_apply(tiny_release, spelling):
    release, _ = tiny_release
    stored = read_state_dict(release / "GraySD" / "unet_lora.bin")
    renamed = {}
    for key, tensor in stored.items():
        module, ab = key.split(".lora_")[0], key.split(".lora_")[1][0]
        renamed[spelling.format(m=module).replace("lora_A", f"lora_{ab}")] = tensor
    unet = tiny_unet()
    assert apply_lora(unet, renamed) == 160
    own = {k: v for k, v in unet.state_dict().items() if ".lora_" in k}
    assert all(torch.equal(own[k], v) for k, v in normalize_lora_keys(renamed).items())


def test_lora_that_does_not_fit_fails_and_leaves_no_adapter(tiny_release):
    release, _ = tiny_release
    stored = read_state_dict(release / "GraySD" / "unet_lora.bin")
    extra = dict(stored)
    extra["down_blocks.9.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.default.weight"] = torch.zeros(4, 16)
    unet = tiny_unet()
    with pytest.raises(IncompatibleWeightsError, match="match no module"):
        apply_lora(unet, extra)
    assert not any(".lora_" in k for k in unet.state_dict())
    partial = {k: v for i, (k, v) in enumerate(stored.items()) if i >= 2}
    with pytest.raises(IncompatibleWeightsError, match="absent from the file"):
        apply_lora(tiny_unet(), partial)
    with pytest.raises(IncompatibleWeightsError, match="not a LoRA weight"):
        apply_lora(tiny_unet(), {"down_blocks.0.resnets.0.conv1.weight": torch.zeros(1)})


def test_repo_id_offline_gives_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(MissingWeightsError, match="TencentARC/ColorFlow"):
        resolve_snapshot("TencentARC/ColorFlow", ["GraySD/*"], allow_download=True, what="the ColorFlow release")
    with pytest.raises(MissingWeightsError, match="downloads are off"):
        resolve_snapshot("TencentARC/ColorFlow", ["GraySD/*"], allow_download=False, what="the ColorFlow release")


def test_unknown_style_and_dtype(tiny_release):
    release, base = tiny_release
    with pytest.raises(InvalidInputError, match="style"):
        load_colorflow(release, base, style="watercolour")
    with pytest.raises(InvalidInputError, match="dtype"):
        load_colorflow(release, base, dtype="float8")


def test_repo_id_resolves_to_a_models_folder_copy(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    (tmp_path / "models" / "ColorFlow" / "GraySD").mkdir(parents=True)
    found = resolve_snapshot("TencentARC/ColorFlow", ["GraySD/*"], allow_download=True, what="x", download_dir=tmp_path / "models")
    assert found == tmp_path / "models" / "ColorFlow"
    with pytest.raises(MissingWeightsError) as info:
        resolve_snapshot("TencentARC/Other", ["*"], allow_download=False, what="x", download_dir=tmp_path / "models")
    assert str(tmp_path / "models" / "Other") in str(info.value)
