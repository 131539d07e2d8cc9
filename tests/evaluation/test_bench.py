"""The benchmark: memory meter, instrumentation that changes nothing, retrieval bench, cache check, CLI."""
from __future__ import annotations

import json
import mmap

import numpy as np
import pytest
import torch
from PIL import Image

from colorflow_core import sequence
from colorflow_core.cli import main
from colorflow_core.evaluation import bench as B
from colorflow_core.options import ColorizeOptions
from colorflow_core.retrieval import ReferencePool

MIB = 1 << 20


def touch(mib: int) -> mmap.mmap:
    """Fresh pages (an anonymous mapping): RSS grows by `mib` even when the allocator holds freed memory."""
    buffer = mmap.mmap(-1, mib * MIB)
    np.frombuffer(buffer, dtype=np.uint8)[:] = 1
    return buffer


def test_memory_meter_nested_peaks():
    meter = B.MemoryMeter(torch.device("cpu"))
    if not meter.resettable:
        pytest.skip("this OS has no resettable RSS high-water mark")
    start = meter.begin()
    base = meter.current()
    assert abs(start - base) < 8 * MIB  # right after a reset the peak is the memory in use
    big = touch(96)
    del big
    meter.begin()  # the inner stage must not see the outer stage's 96 MiB peak…
    small = touch(16)
    inner = meter.end()
    del small
    outer = meter.end()  # …but the outer one must keep it
    assert inner < base + 64 * MIB
    assert outer >= base + 90 * MIB


def test_recorder_sums_stages_per_run_and_takes_medians():
    recorder = B.Recorder(torch.device("cpu"), memory=False)
    for _ in range(3):
        with recorder.run():
            for _ in range(2):
                with recorder.stage("work"):
                    sum(range(1000))
    with recorder.stage("work"):  # outside a run nothing is recorded
        pass
    summary = recorder.summary()
    assert list(summary) == ["work"] and len(summary["work"]["runs_s"]) == 3 and summary["work"]["peak_mb"] is None


class CountingEncoder:
    def __init__(self, name="stub"):
        self.name, self.dim = name, 8

    def encode(self, images):
        return torch.stack([torch.tensor(np.asarray(im.convert("RGB").resize((2, 2)), np.float32).ravel()[:8]) + 1
                            for im in images])


def _refs(n=3):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (96, 64, 3), dtype=np.uint8)) for _ in range(n)]


def test_embedding_cache_check_passes_and_can_fail(tmp_path, monkeypatch):
    page = Image.new("L", (64, 96), 100)
    ok = B.embedding_cache_check(CountingEncoder(), _refs(), page, (64, 96), tmp_path / "store")
    assert ok["first_run_embedded"] == 15 and ok["second_run_embedded"] == 0 and ok["ok"]

    # A store that never hits (neither embeddings nor index) must be reported.
    monkeypatch.setattr(ReferencePool, "_cached", lambda self, ref, size: False)
    monkeypatch.setattr(ReferencePool, "_load_index", lambda self, size, signature: None)
    failed = B.embedding_cache_check(CountingEncoder(), _refs(), page, (64, 96), tmp_path / "other")
    assert failed["second_run_embedded"] == 15 and not failed["ok"]


def test_proc_fields_are_read_in_bytes_and_missing_ones_are_none(tmp_path):
    from colorflow_core.memory import proc_bytes

    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n")
    assert proc_bytes(str(status), "VmRSS") == 1024 * 1024 and proc_bytes(str(status), "VmHWM") == 2048 * 1024
    assert proc_bytes(str(status), "VmSwap") is None and proc_bytes(str(tmp_path / "absent"), "VmRSS") is None


def test_retrieval_bench_rows():
    result = B.run_retrieval_bench([50, 400], dim=16, batches=[4, 8], repeats=2, torch_baseline=True)
    assert [(r["pool"], r["queries_per_search"]) for r in result["rows"]] == [(50, 4), (50, 8), (400, 4), (400, 8)]
    for row in result["rows"]:
        assert row["median_ms_per_query"] == pytest.approx(row["median_ms_per_search"] / row["queries_per_search"])
        assert row["median_ms_per_search"] > 0 and row["torch_topk_median_ms_per_query"] > 0
    assert result["blas_threshold"] == 1
    threads = B.run_retrieval_bench([50], dim=8, batches=[4], repeats=1, torch_baseline=False, faiss_threads=[1, 2])
    assert [r["faiss_threads"] for r in threads["rows"]] == [1, 2]


def test_retrieval_bench_times_the_two_pass_search_against_float32(monkeypatch):
    from colorflow_core.retrieval import search as search_module

    monkeypatch.setattr(search_module, "PREFILTER_MIN_VECTORS", 100)
    monkeypatch.setattr(search_module, "cpu_has_native_bf16", lambda: True)
    rows = B.run_retrieval_bench([50, 400], dim=16, batches=[4], repeats=1, torch_baseline=False)["rows"]
    assert [r["two_pass"] for r in rows] == [False, True]
    assert rows[1]["same_as_float32"] and rows[1]["float32_median_ms_per_query"] > 0
    assert "float32_median_ms_per_query" not in rows[0]
    assert "f32-only ms/q" in B.format_bench({"retrieval": {"faiss": "x", "rows": rows}})


def test_observing_a_page_changes_nothing_and_leaves_no_hooks(tiny_model):
    refs, page = _refs(2), Image.new("L", (32, 32), 90)
    options = ColorizeOptions(size=(32, 32), steps=1, seed=3)
    plain_pool = ReferencePool(tiny_model.encoder)
    plain_pool.add(refs)
    plain = sequence.colorize_page(tiny_model, page, plain_pool, options)
    recorder = B.Recorder(tiny_model.device)
    timed = B.measure_page(tiny_model, refs, page, options, recorder)
    assert np.array_equal(np.asarray(timed.final), np.asarray(plain.final))
    pipe = tiny_model.pipeline
    assert not pipe.unet._forward_hooks and not pipe.unet._forward_pre_hooks and not pipe.guider._forward_pre_hooks
    stages = recorder.runs[0]
    for name in ("page", "embed_references", "preprocess", "retrieval", "embed_query", "canvas", "text_encode",
                 "vae_encode", "denoise", "step_01", "decode", "gsrp", "guider_forward", "unet_forward"):
        assert stages[name][0] > 0, name
    assert "step_02" not in stages and stages["step_01"][0] <= stages["denoise"][0]
    assert stages["embed_query"][0] <= stages["retrieval"][0]


def test_bench_cli_end_to_end_on_tiny_weights(tiny_release, tmp_path, capsys):
    release, base = tiny_release
    out = tmp_path / "bench.json"
    code = main(["bench", "--colorflow", str(release), "--base", str(base), "--width", "32", "--height", "32",
                 "--steps", "2", "--guidance", "1.0", "--repeats", "1", "--warmup", "0", "--references", "2",
                 "--pool-sizes", "200", "--dim", "16", "--query-batches", "4", "--search-repeats", "2", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "step_02" in text and "embedding cache" in text and "retrieval" in text
    result = json.loads(out.read_text())
    stages = result["pipeline"]["stages"]
    for name in ("preprocess", "embed_references", "embed_query", "retrieval", "canvas", "text_encode", "vae_encode",
                 "step_01", "step_02", "denoise", "decode", "gsrp", "page"):
        assert stages[name]["median_s"] > 0, name
    assert stages["page"]["peak_mb"] >= stages["gsrp"]["peak_mb"] > 0 and stages["gsrp"]["growth_mb"] >= 0
    steps = result["pipeline"]["steps"]
    assert steps["names"] == ["step_01", "step_02"] and steps["bare_forwards"]["samples"] == 2
    assert -0.5 < steps["overhead_vs_hooked_forwards"] < 5
    assert result["embedding_cache"]["ok"] and result["embedding_cache"]["second_run_embedded"] == 0
    assert result["retrieval"]["rows"][0]["pool"] == 200
    assert result["machine"]["cpu_count"] >= 1


def test_preset_specs_parse_with_field_changes():
    preset = B.parse_preset_spec("fast:compute_dtype=float32:merge_lora=false:guidance_scale=none")
    assert (preset.name, preset.compute_dtype, preset.merge_lora, preset.guidance_scale) == ("fast", "float32", False, None)
    assert B.parse_preset_spec("low-vram").offload == "stage"
    with pytest.raises(Exception, match="unknown preset"):
        B.parse_preset_spec("turbo")


def test_bench_presets_side_by_side_on_tiny_weights(tiny_release, tmp_path, capsys):
    release, base = tiny_release
    out = tmp_path / "presets.json"
    code = main(["bench", "--colorflow", str(release), "--base", str(base), "--width", "32", "--height", "32",
                 "--steps", "1", "--repeats", "1", "--warmup", "0", "--references", "2", "--pool-sizes", "",
                 "--presets", "fast", "faithful", "low-vram:vae_tiling=never", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "after retrieval" in text and "PSNR vs faithful" in text and "identical" in text
    block = json.loads(out.read_text())["presets"]
    assert block["order"] == ["faithful", "fast", "low-vram:vae_tiling=never"] and block["reference"] == "faithful"
    runs = block["presets"]
    assert runs["faithful"]["identical_to_reference"] and runs["faithful"]["after_retrieval_ratio"] == 1.0
    assert not runs["fast"]["identical_to_reference"] and 0 < runs["fast"]["psnr_vs_faithful_db"] < 100
    assert runs["fast"]["preset"]["guidance_scale"] == 1.0 and runs["low-vram:vae_tiling=never"]["preset"]["offload"] == "stage"
    for entry in runs.values():
        assert entry["after_retrieval"]["median_s"] > 0 and entry["page_peak_mb"] > 0
        assert entry["stages"]["vae_encode"]["median_s"] > 0 and entry["stages"]["gsrp"]["median_s"] > 0
