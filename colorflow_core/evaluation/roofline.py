"""Measured stage times against the FLOP model of `shared/spec/physical-limits.md`: achieved TFLOP/s and the floor.

The model counts the FLOPs of each stage of the SD1.5 path (a multiply-add = 2 FLOPs; flash-style attention
4·B·h·Lq·Lk·d) at the sizes it tabulates, and models an H200 (790 TFLOP/s, 4.8 TB/s) with FA2-class and
FA3-class attention. These functions only divide: they do not know what ran, so a stage that skips work the
model counts (an encode at batch 1) is matched to the row that describes it.
"""
from __future__ import annotations

from typing import Mapping

#: Query W·H → TFLOP with CFG (physical-limits.md §1–§2): VAE encode of the two canvases at batch 2 each, one
#: denoising step (guider + UNet + unmerged LoRA, batch 2), the canvas decode, GSRP.
MODELLED_TFLOP: dict[int, dict[str, float]] = {
    409_600: {"vae_encode": 32.4, "step": 36.49, "decode": 16.8, "gsrp": 37.9},  # 640², 512×800, 800×512
    1_638_400: {"vae_encode": 194.1, "step": 375.63, "decode": 83.5, "gsrp": 167.1},  # 1024×1600
    102_400: {"vae_encode": 7.1, "step": 5.55, "decode": 4.0, "gsrp": 9.2},  # 256×400
    65_536: {"vae_encode": 4.5, "step": 3.27, "decode": 2.5, "gsrp": 5.9},  # 256×256
    24_576: {"vae_encode": 1.6, "step": 1.12, "decode": 0.9, "gsrp": 2.2},  # 128×192
}
#: H200 modelled ms at 409,600 px with CFG (FA2-class, FA3-class attention), physical-limits.md §3.
H200_MODELLED_MS: dict[str, tuple[float, float]] = {
    "vae_encode": (106, 90), "step": (140, 106), "decode": (49, 42), "gsrp": (105, 92),
}
#: The stages that run at batch 1 without CFG (and the encode also with `encode_once`).
_BATCH_STAGES = ("step", "vae_encode")


def modelled_stages(width: int, height: int, cfg: bool, encode_once: bool) -> dict[str, dict[str, float | None]] | None:
    """stage → {"tflop", "h200_fa2_ms", "h200_fa3_ms"} for a W×H page, or None for a size the model does not tabulate.

    Without CFG the step and the encode run at batch 1; `encode_once` encodes each half at batch 1 under CFG too."""
    flops = MODELLED_TFLOP.get(width * height)
    if flops is None:
        return None
    out: dict[str, dict[str, float | None]] = {}
    for stage, tflop in flops.items():
        halved = stage in _BATCH_STAGES and (not cfg or (stage == "vae_encode" and encode_once))
        scale = 0.5 if halved else 1.0
        times = H200_MODELLED_MS.get(stage) if width * height == 409_600 else None
        out[stage] = {
            "tflop": tflop * scale,
            "h200_fa2_ms": None if times is None else times[0] * scale,
            "h200_fa3_ms": None if times is None else times[1] * scale,
        }
    return out


def achieved(measured_s: Mapping[str, float], model: Mapping[str, Mapping[str, float | None]]) -> dict[str, dict]:
    """stage → measured ms, modelled TFLOP, achieved TFLOP/s and the modelled H200 ms, for the stages in both."""
    rows = {}
    for stage, seconds in measured_s.items():
        if stage not in model or not seconds:
            continue
        row = dict(model[stage])
        row["ms"] = 1e3 * seconds
        row["tflop_per_s"] = row["tflop"] / seconds
        rows[stage] = row
    return rows


def page_roofline(width: int, height: int, cfg: bool, encode_once: bool, stages: Mapping[str, Mapping],
                  median_step_s: float) -> dict[str, dict]:
    """`achieved` for a bench entry: its stage medians ("vae_encode", "decode", "gsrp") and its median step."""
    model = modelled_stages(width, height, cfg, encode_once)
    if model is None:
        return {}
    measured = {name: stages[name]["median_s"] for name in ("vae_encode", "decode", "gsrp") if name in stages}
    return achieved({**measured, "step": median_step_s}, model)


def format_rows(name: str, rows: Mapping[str, Mapping[str, float | None]]) -> list[str]:
    """One line per stage: measured ms, achieved TFLOP/s, modelled H200 floor (FA2 / FA3 class)."""
    lines = [f"{name}: stage vs the FLOP model (physical-limits.md)"]
    for stage, row in rows.items():
        floor = "" if row["h200_fa2_ms"] is None else f"; H200 modelled {row['h200_fa2_ms']:.0f} / {row['h200_fa3_ms']:.0f} ms"
        lines.append(f"  {stage:<11}{row['ms']:>9.1f} ms {row['tflop']:>7.2f} TFLOP {row['tflop_per_s']:>7.1f} TFLOP/s{floor}")
    return lines
