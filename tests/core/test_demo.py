"""`demo`: the whole chapter run on tiny weights, its HTML page, and the cached tiny weights."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from colorflow_core import demo
from colorflow_core.cli import main
from colorflow_core.demo import SHEET_COLUMNS, ensure_tiny_weights


def test_demo_runs_end_to_end_and_its_page_shows_every_output(tiny_release, tmp_path, capsys):
    release, base = tiny_release
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--colorflow", str(release), "--base", str(base), "--device", "cpu",
                 "--width", "64", "--height", "96", "--steps", "1", "--pages", "2", "--references", "2"])
    assert code == 0
    err = capsys.readouterr().err
    assert "TINY RANDOM WEIGHTS" in err and "--colorflow DIR --base DIR" in err  # says what it is and how to do better
    assert "s/step" in err and "warning: one page will take" not in err
    assert f"open {(out / 'index.html').resolve()}" in err

    names = ["page_000", "page_001"]
    for name in names:
        assert Image.open(out / "colored" / f"{name}.png").size == (96, 144)  # GSRP: 1.5× the query
        for path in (out / "patches" / f"{name}.png", out / "canvas" / f"{name}.png",
                     out / "chapter" / "gt" / f"{name}.png", out / "chapter" / "input" / "screentone" / f"{name}.png"):
            assert path.is_file(), path
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size[0] > sheet.size[1]  # five columns, two rows
    metrics = json.loads((out / "metrics.json").read_text())
    assert [p["name"] for p in metrics["pages"]] == names and "consistency" in metrics

    page = (out / "index.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert "contact_sheet.png" in sources
    assert len(sources) == 1 + len(names) * len(SHEET_COLUMNS)
    for source in sources:
        assert (out / source).is_file(), source
    for name in names:
        assert f"colored/{name}.png" in sources and f"chapter/gt/{name}.png" in sources
    assert "TINY RANDOM WEIGHTS" in page and "PSNR" in page


def _fake_writer(calls: list[Path], fail: bool = False):
    def write(folder: Path, seed: int = 0):
        calls.append(folder)
        (folder / "colorflow").mkdir(parents=True)
        (folder / "sd15").mkdir()
        if fail:
            raise KeyboardInterrupt
        return folder / "colorflow", folder / "sd15"
    return write


def test_tiny_weights_are_made_once_and_never_used_half_written(tmp_path, monkeypatch):
    calls: list[Path] = []
    folder = tmp_path / "cache" / "tiny-weights"
    monkeypatch.setattr(demo, "write_tiny_release", _fake_writer(calls, fail=True))
    with pytest.raises(KeyboardInterrupt):
        ensure_tiny_weights(folder)
    assert not folder.exists() and list((tmp_path / "cache").iterdir()) == []  # interrupted: nothing left behind

    folder.mkdir(parents=True)  # e.g. an older, incomplete copy
    monkeypatch.setattr(demo, "write_tiny_release", _fake_writer(calls))
    release, base = ensure_tiny_weights(folder)
    assert (release, base) == (folder / "colorflow", folder / "sd15") and release.is_dir() and base.is_dir()
    assert ensure_tiny_weights(folder) == (release, base)
    assert len(calls) == 2  # the second call found the complete copy


def test_cache_folder_follows_colorflow_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COLORFLOW_CACHE", str(tmp_path))
    assert demo.tiny_weights_dir() == tmp_path / "tiny-weights"


def test_readme_opens_with_the_two_commands_and_ci_runs_its_test_command():
    repo = Path(__file__).resolve().parents[2]
    readme = (repo / "README.md").read_text()
    first_block = re.search(r"```[a-z]*\n(.*?)```", readme, re.S).group(1)
    assert first_block.splitlines() == ["./run demo", "./run test"]
    commands = [line for line in (repo / ".ci" / "run").read_text().splitlines() if line and not line.startswith(("#", " "))]
    assert commands[-1] == "./run test"
    assert readme.index("```") < readme.index("\n    ")  # no indented code block comes before it
