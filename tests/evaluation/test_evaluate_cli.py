"""`python -m colorflow_core evaluate` end to end on a synthetic chapter, and the report API."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from colorflow_core.cli import main
from colorflow_core.evaluation import synthetic as S
from colorflow_core.evaluation.report import contact_sheet, evaluate_pages

from .test_metrics import MeanColour, MeanColourEncoder


@pytest.fixture(scope="module")
def chapter_dir(tmp_path_factory):
    chapter = S.make_chapter(5, n_references=1, n_pages=3, n_characters=2, size=(128, 192))
    return chapter, S.write_chapter(chapter, tmp_path_factory.mktemp("chapter"))


def test_evaluate_cli_writes_table_json_and_contact_sheet(chapter_dir, tmp_path, capsys):
    chapter, folder = chapter_dir
    pred = tmp_path / "pred"
    shutil.copytree(folder / "gt", pred)
    # Plant a drift: the hair of the first character present on page_001 turns green there (at 1.5x size, as GSRP outputs).
    page = chapter.pages[1]
    hair = next(S.part_label(c, "hair") for c in page.characters if (page.labels == S.part_label(c, "hair")).sum() > 40)
    array = np.asarray(page.color).copy()
    array[page.labels == hair] = (20, 220, 40)
    Image.fromarray(array).resize((192, 288), Image.NEAREST).save(pred / "page_001.png")
    inter = tmp_path / "inter" / "page_000"
    inter.mkdir(parents=True)
    Image.new("RGB", (256, 384), (250, 0, 0)).save(inter / "canvas.png")
    out = tmp_path / "eval"
    code = main(["evaluate", "--pred", str(pred), "--gt", str(folder / "gt"), "--labels", str(folder / "labels"),
                 "--inputs", str(folder / "input" / "screentone"), "--intermediates", str(tmp_path / "inter"),
                 "--out", str(out), "--no-fid", "--sheet-height", "96"])
    assert code == 0
    text = capsys.readouterr().out
    assert "PSNR dB" in text and "page_001" in text and "colour consistency" in text and "skipped fid: --no-fid" in text
    report = json.loads((out / "metrics.json").read_text())
    psnr = {row["name"]: row["psnr"] for row in report["pages"]}
    assert psnr["page_000"] == "inf" and psnr["page_002"] == "inf" and 10 < psnr["page_001"] < 60
    parts = {p["label"]: p for p in report["consistency"]["parts"]}
    assert parts[hair]["drift_page"] == "page_001" and parts[hair]["spread_max"] > 10
    name = chapter.label_table()[hair]
    assert parts[hair]["name"] == f"{name['name']} hair"
    assert report["consistency"]["summary"]["error_max"] == pytest.approx(max(p["error_max"] for p in parts.values()))
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size[1] == 18 + 3 * (96 + 4)
    # Row 1's canvas cell shows the red canvas; the others show the 'missing' placeholder.
    row0 = np.asarray(sheet)[18 + 48]
    assert (row0 == (250, 0, 0)).all(axis=1).any()


def test_evaluate_cli_reports_a_missing_prediction(chapter_dir, tmp_path, capsys):
    _, folder = chapter_dir
    pred = tmp_path / "pred"
    pred.mkdir()
    shutil.copy(folder / "gt" / "page_000.png", pred)
    assert main(["evaluate", "--pred", str(pred), "--gt", str(folder / "gt"), "--no-fid", "--out", str(tmp_path / "e")]) == 1
    assert "page_001" in capsys.readouterr().err


def test_evaluate_pages_with_injected_models(chapter_dir):
    chapter, _ = chapter_dir
    gts = [p.color for p in chapter.pages]
    preds = [Image.fromarray(np.clip(np.asarray(g).astype(int) + 8, 0, 255).astype(np.uint8)) for g in gts]
    head = __import__("torch").nn.Linear(3, 1)
    report = evaluate_pages([p.name for p in chapter.pages], preds, gts, fid_extractor=MeanColour(),
                            clip_encoder=MeanColourEncoder(), aesthetic=(MeanColourEncoder(), head))
    assert report["fid"] is not None and report["fid"] > 0
    assert all(0.99 < row["clip_is"] <= 1.0 + 1e-6 for row in report["pages"])
    assert {"psnr", "ssim", "clip_is", "aesthetic", "aesthetic_ground_truth"} <= set(report["mean"])
    assert set(report["skipped"]) == {"consistency"}
    same = evaluate_pages([p.name for p in chapter.pages], gts, gts, fid_extractor=MeanColour())
    assert same["fid"] == pytest.approx(0, abs=1e-6) and same["mean"]["ssim"] == pytest.approx(1.0)


def test_contact_sheet_layout():
    rows = [("a", [None, Image.new("RGB", (20, 30), (0, 0, 255)), None, None])]
    sheet = contact_sheet(rows, height=60)
    assert sheet.size == (96 + 4 * (40 + 4), 18 + 64)
