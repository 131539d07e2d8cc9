"""Evaluate folders of predictions against ground truth: metrics report, text table, contact sheet."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..errors import InvalidInputError
from ..imaging import IMAGE_SUFFIXES, list_images, load_image
from . import metrics as M

SHEET_COLUMNS = ("input", "canvas", "output", "ground truth")


def _by_stem(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}


def read_label_table(labels_dir: Path) -> dict | None:
    """The label table next to label maps: `labels.json` in the folder, else `../chapter.json`."""
    for path in (labels_dir / "labels.json", labels_dir.parent / "chapter.json"):
        if path.is_file():
            data = json.loads(path.read_text())
            return data.get("labels", data)
    return None


def evaluate_pages(
    names: Sequence[str],
    preds: Sequence[Image.Image],
    gts: Sequence[Image.Image],
    *,
    labels: Sequence[np.ndarray] | None = None,
    table: dict | None = None,
    fid_extractor: Any = None,
    clip_encoder: Any = None,
    aesthetic: tuple[Any, Any] | None = None,
    min_pixels: int = 16,
    erode: int = 1,
    skipped: dict[str, str] | None = None,
) -> dict:
    """All metrics as one JSON-ready dict. Metrics whose model is None are listed under `skipped`."""
    if not (len(names) == len(preds) == len(gts)) or not names:
        raise InvalidInputError("evaluation needs one prediction per ground-truth page (and at least one page)")
    skipped = dict(skipped or {})
    pages = [{"name": n, "psnr": M.psnr(p, g), "ssim": M.ssim(p, g)} for n, p, g in zip(names, preds, gts)]
    if clip_encoder is not None:
        for row, value in zip(pages, M.clip_image_similarity(preds, gts, clip_encoder)):
            row["clip_is"] = value
    else:
        skipped.setdefault("clip_is", "no CLIP model given (--clip)")
    if aesthetic is not None:
        for row, value in zip(pages, M.aesthetic_scores(preds, *aesthetic)):
            row["aesthetic"] = value
        gt_aesthetic = float(np.mean(M.aesthetic_scores(gts, *aesthetic)))
    else:
        gt_aesthetic = None
        skipped.setdefault("aesthetic", "no aesthetic head given (--aesthetic)")
    report: dict[str, Any] = {"pages": pages, "mean": {}}
    for key in ("psnr", "ssim", "clip_is", "aesthetic"):
        values = [row[key] for row in pages if key in row]
        if values:
            report["mean"][key] = float(np.mean(values))
    if gt_aesthetic is not None:
        report["mean"]["aesthetic_ground_truth"] = gt_aesthetic
    report["fid"] = None
    if fid_extractor is not None and len(preds) >= 2:
        report["fid"] = M.fid(preds, gts, fid_extractor)
        report["fid_backbone"] = getattr(fid_extractor, "backbone", type(fid_extractor).__name__)
    elif fid_extractor is not None:
        skipped["fid"] = "FID needs at least 2 pages"
    else:
        skipped.setdefault("fid", "no Inception-v3 weights (--fid-weights)")
    if labels is not None:
        parts = M.color_consistency(preds, labels, gts, page_names=names, table=table, min_pixels=min_pixels, erode=erode)
        report["consistency"] = {
            "delta_e": "CIEDE2000 on mean CIE Lab (D65) per part and page",
            "summary": M.consistency_summary(parts),
            "parts": [p.to_json() for p in parts],
        }
    else:
        skipped.setdefault("consistency", "no label maps given (--labels)")
    report["skipped"] = skipped
    return _json_safe(report)


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, float):
        return M.finite(value)
    return value


def load_folders(pred: Path, gt: Path, labels: Path | None = None):
    """(names, preds, gts, label maps or None, label table or None), matched by file stem of `gt`."""
    gt_files = list_images(gt)
    pred_files = _by_stem(pred)
    missing = [p.stem for p in gt_files if p.stem not in pred_files]
    if missing:
        raise InvalidInputError(f"{len(missing)} ground-truth page(s) have no prediction in {pred}: {', '.join(missing[:5])}")
    names = [p.stem for p in gt_files]
    preds = [load_image(pred_files[n]).convert("RGB") for n in names]
    gts = [load_image(p).convert("RGB") for p in gt_files]
    label_maps, table = None, None
    if labels is not None:
        label_files = _by_stem(labels)
        absent = [n for n in names if n not in label_files]
        if absent:
            raise InvalidInputError(f"no label map in {labels} for: {', '.join(absent[:5])}")
        label_maps = [np.asarray(load_image(label_files[n]).convert("L")) for n in names]
        for name, label_map, image in zip(names, label_maps, gts):
            if label_map.shape != (image.size[1], image.size[0]):
                raise InvalidInputError(f"label map of {name} is {label_map.shape[::-1]}, its ground truth {image.size}")
        table = read_label_table(labels)
    return names, preds, gts, label_maps, table


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    return f"{value:.{digits}f}"


def format_table(report: dict) -> str:
    """Plain-text tables: per-page metrics with the mean, FID, and the consistency per character part."""
    cols = [("page", None), ("PSNR dB", "psnr"), ("SSIM", "ssim"), ("CLIP-IS", "clip_is"), ("aesthetic", "aesthetic")]
    rows = [[row["name"], *(_fmt(row.get(k), 4 if k in ("ssim", "clip_is") else 2) for _, k in cols[1:])] for row in report["pages"]]
    mean = report["mean"]
    rows.append(["mean", *(_fmt(mean.get(k), 4 if k in ("ssim", "clip_is") else 2) for _, k in cols[1:])])
    lines = _grid([c for c, _ in cols], rows)
    fid = report.get("fid")
    lines.append(f"FID: {_fmt(fid)}" + (f"  ({report.get('fid_backbone')})" if fid is not None else ""))
    if "aesthetic_ground_truth" in mean:
        lines.append(f"aesthetic of the ground truth: {mean['aesthetic_ground_truth']:.2f}")
    if "consistency" in report:
        cons = report["consistency"]
        lines.append("")
        lines.append(f"colour consistency ({cons['delta_e']}):")
        part_rows = [[p["name"], str(len(p["pages"])), _fmt(p["spread_mean"]), _fmt(p["spread_max"]),
                      _fmt(p["error_mean"]), _fmt(p["error_max"]),
                      # A page is only named when it stands out by at least about one just-noticeable difference.
                      p["drift_page"] if p["drift_page"] and p["spread_max"] >= 1.0 else "–"] for p in cons["parts"]]
        s = cons["summary"]
        part_rows.append(["all parts", str(s["parts"]), _fmt(s["spread_mean"]), _fmt(s["spread_max"]), _fmt(s["error_mean"]),
                          _fmt(s["error_max"]), ""])
        lines += _grid(["part", "pages", "spread ΔE", "max ΔE", "error ΔE", "max err", "furthest page"], part_rows)
    for metric, why in report.get("skipped", {}).items():
        lines.append(f"skipped {metric}: {why}")
    return "\n".join(lines)


def _grid(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    out = ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in [header, *rows]]
    out.insert(1, "  ".join("-" * w for w in widths))
    return out


def _cell(image: Image.Image | None, height: int, width: int) -> Image.Image:
    cell = Image.new("RGB", (width, height), (200, 200, 200))
    if image is None:
        ImageDraw.Draw(cell).text((6, height // 2 - 6), "missing", fill=(90, 90, 90))
        return cell
    image = image.convert("RGB")
    scale = min(width / image.size[0], height / image.size[1])
    shown = image.resize((max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale))), Image.BICUBIC)
    cell.paste(shown, ((width - shown.size[0]) // 2, (height - shown.size[1]) // 2))
    return cell


def contact_sheet(rows: Sequence[tuple[str, Sequence[Image.Image | None]]], height: int = 256,
                  columns: Sequence[str] = SHEET_COLUMNS) -> Image.Image:
    """One row per page (name, then one image per column, None = 'missing'), each cell `height` tall."""
    if not rows:
        raise InvalidInputError("a contact sheet needs at least one row")
    aspect = max((im.size[0] / im.size[1] for _, ims in rows for im in ims if im is not None), default=1.0)
    cell_w, label_w, header_h, pad = max(16, round(height * min(aspect, 2.0))), 96, 18, 4
    sheet = Image.new("RGB", (label_w + len(columns) * (cell_w + pad), header_h + len(rows) * (height + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, title in enumerate(columns):
        draw.text((label_w + i * (cell_w + pad) + 4, 3), title, fill=(0, 0, 0))
    for r, (name, images) in enumerate(rows):
        top = header_h + r * (height + pad)
        draw.text((4, top + height // 2 - 6), name[:14], fill=(0, 0, 0))
        for c, image in enumerate(images):
            sheet.paste(_cell(image, height, cell_w), (label_w + c * (cell_w + pad), top))
    return sheet


def sheet_rows(names: Sequence[str], preds, gts, inputs: Path | None = None, intermediates: Path | None = None):
    """Rows for `contact_sheet`: input from `inputs/<stem>.*`, canvas from `intermediates/<stem>/canvas.png`."""
    input_files = _by_stem(inputs) if inputs is not None and inputs.is_dir() else {}
    rows = []
    for name, pred, gt in zip(names, preds, gts):
        source = load_image(input_files[name]) if name in input_files else None
        canvas_path = intermediates / name / "canvas.png" if intermediates is not None else None
        canvas = load_image(canvas_path) if canvas_path is not None and canvas_path.is_file() else None
        rows.append((name, [source, canvas, pred, gt]))
    return rows
