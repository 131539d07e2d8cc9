"""colorize-series: every chapter written, reruns skip finished pages, changed inputs/settings redo only theirs,
and on Ray the same pixels — also when a worker is killed mid-chapter."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from colorflow_core import sequence, series_cli
from colorflow_core.cli import main
from colorflow_core.series import MANIFEST


def _write_series(root: Path, chapters: dict[str, int]) -> Path:
    rng = np.random.default_rng(0)
    for chapter, pages in chapters.items():
        (root / chapter).mkdir(parents=True)
        for i in range(pages):
            Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(root / chapter / f"p{i}.png")
    return root


def _args(tiny_release, series: Path, out: Path, *extra: str) -> list[str]:
    release, base = tiny_release
    ref = series.parent / "ref.png"
    if not ref.exists():
        Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 32, 3), dtype=np.uint8)).save(ref)
    return ["colorize-series", str(series), "--out", str(out), "--colorflow", str(release), "--base", str(base),
            "--refs", str(ref), "--width", "32", "--height", "32", "--steps", "1", "--preprocess", "gray",
            "--device", "cpu", "--dtype", "float32", *extra]


def _pixels(out: Path) -> dict[str, np.ndarray]:
    return {f"{p.parent.name}/{p.name}": np.asarray(Image.open(p)) for p in sorted(out.glob("*/*.png"))}


def _reuse(tiny_model, patch) -> None:
    """The CLI gets the session's tiny model instead of loading the same files again (slow on a loaded CPU)."""
    def load(**arguments):
        assert arguments["device"] == "cpu" and arguments["dtype"] == "float32"
        return tiny_model

    patch.setattr(series_cli, "load_colorflow", load)


@pytest.fixture
def model_calls(monkeypatch, tiny_model) -> list[int]:
    """Pages the page loop denoised (each `colorize_batch` call's page count)."""
    calls: list[int] = []
    real = sequence.colorize_batch

    def counting(model, pages, *args, **kwargs):
        calls.append(len(pages))
        return real(model, pages, *args, **kwargs)

    monkeypatch.setattr(sequence, "colorize_batch", counting)
    _reuse(tiny_model, monkeypatch)
    return calls


def _run(args: list[str], capsys) -> tuple[int, dict]:
    code = main(args)
    out = capsys.readouterr().out  # Ray may print its own notices (a worker died) before the summary
    return code, json.loads(out[out.index("{\n"):])


def test_series_writes_every_page_reports_a_bad_chapter_and_a_rerun_recomputes_none(tiny_release, tmp_path, capsys,
                                                                                      model_calls):
    series = _write_series(tmp_path / "series", {"ch1": 2, "ch2": 1})
    (series / "bad").mkdir()
    (series / "bad" / "x.png").write_text("not an image")
    out = tmp_path / "out"
    code, summary = _run(_args(tiny_release, series, out, "--feed-back"), capsys)
    assert code == 1 and set(summary["failed"]) == {"bad"} and "x.png" in summary["failed"]["bad"]
    assert sorted(_pixels(out)) == ["ch1/p0.png", "ch1/p1.png", "ch2/p0.png"]
    assert sum(model_calls) == 3 and summary["coloured"] == 3
    first = _pixels(out)

    model_calls.clear()
    code, summary = _run(_args(tiny_release, series, out, "--feed-back"), capsys)
    assert code == 1 and model_calls == [] and summary["skipped"] == 3
    assert all(np.array_equal(first[k], v) for k, v in _pixels(out).items())


def test_a_changed_page_or_setting_redoes_only_the_affected_pages(tiny_release, tmp_path, capsys, model_calls):
    series = _write_series(tmp_path / "series", {"ch1": 3, "ch2": 1})
    out = tmp_path / "out"
    assert _run(_args(tiny_release, series, out, "--feed-back"), capsys)[0] == 0
    Image.new("L", (32, 32), 128).save(series / "ch1" / "p1.png")  # a new input page: it and the pages it fed
    (out / "ch2" / "p0.png").unlink()  # a lost output
    model_calls.clear()
    code, summary = _run(_args(tiny_release, series, out, "--feed-back"), capsys)
    assert code == 0 and sum(model_calls) == 3 and summary["skipped"] == 1  # ch1/p0 kept
    model_calls.clear()
    code, summary = _run(_args(tiny_release, series, out, "--feed-back", "--seed", "7"), capsys)  # every page's
    assert code == 0 and sum(model_calls) == 4 and summary["skipped"] == 0


# ----------------------------------------------------------------------------------------------------------- Ray
@pytest.fixture(scope="module")
def ray_cluster():
    """A local two-CPU Ray cluster shared by the Ray tests; skipped where Ray is missing or cannot start."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -r requirements-ray.txt)")
    repo = str(Path(__file__).resolve().parents[2])
    try:
        ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": repo}})
    except Exception as exc:  # noqa: BLE001 - whatever stops Ray from starting here is a reason to skip
        pytest.skip(f"Ray cannot start here: {exc}")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def reference_run(tiny_release, tiny_model, tmp_path_factory):
    """A 2-chapter series with feed-back coloured in one process: the pixels Ray must reproduce."""
    root = tmp_path_factory.mktemp("ray_series")
    series = _write_series(root / "series", {"ch1": 3, "ch2": 2})
    out = root / "single"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a one-CPU Ray worker computes: CPU reductions round by thread count
    try:
        with pytest.MonkeyPatch.context() as patch:
            _reuse(tiny_model, patch)
            assert main(_args(tiny_release, series, out, "--feed-back")) == 0
    finally:
        torch.set_num_threads(threads)
    return series, _pixels(out)


def test_ray_run_equals_the_single_process_run(ray_cluster, reference_run, tiny_release, tmp_path, capsys):
    series, expected = reference_run
    code, summary = _run(_args(tiny_release, series, tmp_path / "ray", "--feed-back", "--ray", "auto",
                               "--workers", "2"), capsys)
    assert code == 0 and summary["workers"] == 2 and summary["coloured"] == 5
    got = _pixels(tmp_path / "ray")
    assert sorted(got) == sorted(expected)
    assert all(np.array_equal(got[k], expected[k]) for k in expected)


def _kill_first_worker_mid_chapter(out: Path, killed: list[int], stop: threading.Event) -> None:
    """SIGKILL the worker of the first chapter that has a finished page and pages still to go."""
    while not stop.is_set() and not killed:
        for manifest in out.glob(f"*/{MANIFEST}"):
            entries = json.loads(manifest.read_text())
            if 0 < len(entries) < len(list((out.parent / "series" / manifest.parent.name).glob("*.png"))):
                pid = int(next(iter(entries.values()))["worker"].rsplit(":", 1)[1])
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
        time.sleep(0.02)


def test_ray_job_finishes_identically_when_a_worker_is_killed_mid_chapter(ray_cluster, reference_run, tiny_release,
                                                                          capsys):
    series, expected = reference_run
    out = series.parent / "killed"
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_first_worker_mid_chapter, args=(out, killed, stop))
    killer.start()
    try:
        code, summary = _run(_args(tiny_release, series, out, "--feed-back", "--ray", "auto", "--workers", "2"), capsys)
    finally:
        stop.set()
        killer.join()
    assert killed, "no chapter was caught between pages"
    assert code == 0 and summary["worker_restarts"] == 1
    got = _pixels(out)
    assert sorted(got) == sorted(expected) and all(np.array_equal(got[k], expected[k]) for k in expected)
    for chapter in ("ch1", "ch2"):  # every page once, nothing half-written
        assert sorted(json.loads((out / chapter / MANIFEST).read_text())) == sorted(p.stem for p in (series / chapter).glob("*.png"))
        assert not list((out / chapter).glob(".*.tmp"))
