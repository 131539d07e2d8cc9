"""The trainer on tiny models: losses fall, only trainables change, resume is exact, the release loads."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from colorflow_core.errors import ColorFlowError, IncompatibleWeightsError, InvalidInputError
from colorflow_core.loading import load_colorflow
from colorflow_core.models.lora import normalize_lora_keys
from colorflow_core.training.models import build_models, guider_from_unet
from colorflow_core.training.objective import sample_timesteps, shift_timesteps
from colorflow_core.training.trainer import METRICS_FILE, TrainConfig, Trainer
from colorflow_core.weights import find_weight_file, read_state_dict


def config(prepared, out, **changes) -> TrainConfig:
    data, release, base, _ = prepared
    values = dict(data=str(data), out=str(out), base=str(base), colorflow=str(release), steps=4, lr=1e-3, warmup=1,
                  device="cpu", checkpoint_every=2)
    values.update(changes)
    return TrainConfig(**values)


def losses(out, target="icp") -> list[float]:
    lines = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    return [line["loss"] for line in lines if line["target"] == target]


def snapshot(models) -> dict[str, torch.Tensor]:
    return {f"{role}.{k}": v.detach().clone() for role, m in models.modules().items() for k, v in m.state_dict().items()}


def test_timestep_shift_matches_the_formula():
    s = torch.linspace(0.001, 1, 50, dtype=torch.float64)
    T = 1000
    written = math.exp(1.5) / (math.exp(1.5) + T / (s * T) - 1)  # the spec's t' = e^µ / (e^µ + T/t - 1) · T, over T
    assert torch.allclose(shift_timesteps(s, 1.5), written)
    assert torch.equal(shift_timesteps(s, 0.0), s)
    generator = torch.Generator().manual_seed(0)
    shifted = (sample_timesteps(generator, 200_000, 1.5) + 1).double() / T
    expected = math.exp(1.5) * 0.5 / (1 + (math.exp(1.5) - 1) * 0.5)  # shift of the uniform median, ≈ 0.8176
    assert abs(shifted.median().item() - expected) < 0.005
    plain = (sample_timesteps(generator, 200_000, 0.0) + 1).double() / T
    assert abs(plain.median().item() - 0.5) < 0.005 and plain.min() >= 1 / T and shifted.max() <= 1


def test_guider_from_base_unet_starts_as_the_base(tiny_release):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_release[1] / "unet")
    guider = guider_from_unet(unet)
    sample, condition = torch.randn(1, 4, 8, 8), torch.randn(1, 9, 8, 8)
    residuals = guider(sample, 10, condition)
    assert all(not r.any() for r in [*residuals.down, residuals.mid, *residuals.up])
    weight = guider.conv_in_condition.weight
    assert torch.equal(weight[:, 9:13], unet.conv_in.weight) and not weight[:, 8].any()
    assert torch.equal(guider.down_blocks[0].resnets[0].conv1.weight, unet.down_blocks[0].resnets[0].conv1.weight)


def test_icp_overfits_only_trainables_change_and_the_release_loads(prepared, tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(config(prepared, out, steps=45, batch_size=2, styles=("gray",), checkpoint_every=100,
                             prompt_dropout=0.0, lr=6e-3, holdout="ch1"))
    start = build_models(trainer.config.colorflow, trainer.config.base, "icp", device=torch.device("cpu"))
    before = snapshot(start)
    release = trainer.run()
    icp = losses(out)  # ch0's two pages, both in every batch: the first batch's loss is the start
    assert len(icp) == 45 and trainer.batch_loss(0)["icp"] < 0.5 * icp[0], (trainer.batch_loss(0), icp)
    assert sum(icp[-5:]) < 0.6 * sum(icp[:5]), icp
    after = snapshot(trainer.models)
    trainable = {f"{k.split('.', 1)[0]}.{k.split('.', 1)[1]}" for k in trainer.models.trainable()}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed <= trainable and len(changed) > 0.9 * len(trainable)

    original = prepared[1] / "GraySD"
    gray = release / "GraySD"
    assert set(load_file(str(gray / "diffusion_pytorch_model.safetensors"))) == set(
        read_state_dict(find_weight_file(original, "diffusion_pytorch_model")))
    assert set(normalize_lora_keys(load_file(str(gray / "unet_lora.safetensors")))) == set(
        normalize_lora_keys(read_state_dict(find_weight_file(original, "unet_lora"))))
    assert (release / "image_encoder").exists() and (release / "sketch").exists()
    model = load_colorflow(release, prepared[2], device="cpu", dtype="float32")
    assert torch.equal(model.pipeline.guider.conv_in_condition.weight, trainer.models.pipeline.guider.conv_in_condition.weight)
    from colorflow_core.canvas import build_canvas
    from colorflow_core.training.data import TrainingData

    data = TrainingData(prepared[0])
    frame = data.frames[0]
    canvas = build_canvas(data.image(frame, "gray").resize(data.size), data.retrieval(frame).patches())
    result = model.pipeline(canvas.image, canvas.mask, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert result.query.size == data.size


def test_gsrp_l1_falls_and_writes_the_fusion_net(prepared, tmp_path):
    out = tmp_path / "run"
    release = Trainer(config(prepared, out, target="gsrp", steps=12, batch_size=2, lr=3e-3, checkpoint_every=100)).run()
    l1 = losses(out, "gsrp")
    assert len(l1) == 12 and sum(l1[-3:]) / 3 < 0.8 * sum(l1[:3]) / 3, l1
    gray = release / "GraySD"
    assert (gray / "MultiResNetModel.safetensors").is_file() and (gray / "unet_lora.bin").is_symlink()
    load_colorflow(release, prepared[2], device="cpu", dtype="float32")


def test_resume_after_ctrl_c_equals_an_uninterrupted_run(prepared, tmp_path):
    whole = Trainer(config(prepared, tmp_path / "whole", steps=4, batch_size=1))
    whole.run()

    def interrupt(step, _):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(config(prepared, tmp_path / "cut", steps=4, batch_size=1), on_step=interrupt).run()
    assert json.loads((tmp_path / "cut" / "checkpoints" / "step-00000003" / "state.json").read_text())["step"] == 3
    with pytest.raises(InvalidInputError, match="--resume"):
        Trainer(config(prepared, tmp_path / "cut", steps=4, batch_size=1)).run()
    resumed = Trainer(config(prepared, tmp_path / "cut", steps=4, batch_size=1, resume=True))
    resumed.run()
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")
    for key, value in whole.models.state().items():
        assert torch.equal(value, resumed.models.state()[key]), key


def test_failed_checkpoint_keeps_the_previous_one(prepared, tmp_path, monkeypatch):
    import colorflow_core.training.checkpoint as checkpoint

    calls = []
    real = checkpoint.save_file

    def full_disk(tensors, path):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        real(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    out = tmp_path / "run"
    with pytest.raises(ColorFlowError, match="step-00000001 is intact"):
        Trainer(config(prepared, out, steps=3, checkpoint_every=1)).run()
    assert checkpoint.latest_checkpoint(out / "checkpoints").name == "step-00000001"
    assert [p.name for p in (out / "checkpoints").iterdir() if p.is_dir()] == ["step-00000001"]


def test_bad_bases_and_settings_are_refused(prepared, tmp_path):
    pixart = prepared[2].parent / "pixart"
    with pytest.raises(IncompatibleWeightsError, match="SD1.5"):
        Trainer(config(prepared, tmp_path / "a", base=str(pixart))).run()
    with pytest.raises(InvalidInputError, match="not prepared"):
        Trainer(config(prepared, tmp_path / "b", styles=("lineart",))).run()
    assert not (tmp_path / "a" / "run.json").exists()


def test_from_base_trains_and_loads(prepared, tmp_path):
    out = tmp_path / "run"
    release = Trainer(config(prepared, out, colorflow=None, steps=1, lora_rank=4, checkpoint_every=100)).run()
    lora = load_file(str(release / "GraySD" / "unet_lora.safetensors"))
    assert {t.shape[0] for k, t in lora.items() if ".lora_A." in k} == {4}
    load_colorflow(release, prepared[2], device="cpu", dtype="float32")
    shutil.rmtree(out)


def test_accumulation_and_checkpointing_train_like_one_batch(prepared, tmp_path):
    whole = Trainer(config(prepared, tmp_path / "whole", steps=2, batch_size=2, checkpoint_every=100))
    whole.run()
    bf16 = Trainer(config(prepared, tmp_path / "bf16", steps=1, batch_size=2, precision="bf16", checkpoint_every=100))
    bf16.run()  # CPU autocast: same batch, loss close to float32's
    assert abs(losses(tmp_path / "bf16")[0] - losses(tmp_path / "whole")[0]) < 0.05
    split = Trainer(config(prepared, tmp_path / "split", steps=2, batch_size=1, grad_accum=2,
                           gradient_checkpointing=True, checkpoint_every=100))
    split.run()
    a, b = losses(tmp_path / "whole"), losses(tmp_path / "split")
    assert len(a) == 2 and all(abs(x - y) < 1e-5 for x, y in zip(a, b)), (a, b)


def test_ema_and_validation_images(prepared, tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(config(prepared, out, steps=2, ema=0.5, holdout="ch1", validate_every=2, val_steps=1,
                             checkpoint_every=100))
    release = trainer.run()
    lines = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    validation = [line for line in lines if line["target"] == "validation"]
    assert len(validation) == 1 and validation[0]["frame"].startswith("ch1/") and math.isfinite(validation[0]["psnr"])
    assert (out / "validation" / "step-00000002.png").is_file()
    assert all(math.isfinite(line["loss"]) for line in lines if line["target"] == "icp")
    ema = load_file(str(out / "checkpoints" / "step-00000002" / "ema.safetensors"))
    shipped = load_file(str(release / "GraySD" / "diffusion_pytorch_model.safetensors"))
    raw = trainer.models.pipeline.guider.state_dict()
    key = "conv_in_condition.weight"
    assert torch.equal(shipped[key], ema[f"guider.{key}"]) and not torch.equal(shipped[key], raw[key])
