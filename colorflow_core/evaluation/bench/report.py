"""The machine the benchmark ran on, and its result as text tables or JSON."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch
from ..roofline import format_rows


def machine_info(device: str = "cpu") -> dict:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    if hasattr(os, "getloadavg"):
        # Other processes on the machine distort every number: keep the load next to them.
        info["load_average_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
        with open("/proc/meminfo") as handle:
            info["memory_gb"] = round(int(handle.readline().split()[1]) / (1 << 20), 1)
    except OSError:
        info["cpu"] = platform.processor()
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def format_bench(result: dict) -> str:
    """The JSON result as short text tables."""
    lines = []
    machine = result.get("machine", {})
    lines.append(f"machine: {machine.get('cpu', '?')}, {machine.get('cpu_count')} cores, torch {machine.get('torch')}"
                 + (f", {machine['gpu']}" if "gpu" in machine else "")
                 + (f", load average {machine['load_average_1_5_15'][0]}" if "load_average_1_5_15" in machine else ""))
    pipe = result.get("pipeline")
    if pipe:
        c = pipe["config"]
        lines.append(f"pipeline: {pipe['weights']}; {c['width']}x{c['height']} {c['style']}/{c['input_style']} {c['dtype']} "
                     f"{c['device']} steps={c['steps']} guidance={c['guidance']} repeats={c['repeats']}; memory={pipe['memory']}")
        lines.append(f"{'stage':<20}{'median ms':>11}{'min ms':>10}{'peak MiB':>10}{'+MiB':>8}")
        for name, s in pipe["stages"].items():
            peak = "" if s["peak_mb"] is None else f"{s['peak_mb']:.0f}"
            growth = "" if s.get("growth_mb") is None else f"{s['growth_mb']:.0f}"
            lines.append(f"{name:<20}{1e3 * s['median_s']:>11.1f}{1e3 * s['min_s']:>10.1f}{peak:>10}{growth:>8}")
        st = pipe["steps"]
        lines.append(f"sampler step {1e3 * st['median_step_s']:.2f} ms; guider+denoiser forwards in the step "
                     f"{1e3 * st['median_forwards_in_step_s']:.2f} ms (overhead {100 * st['overhead_vs_hooked_forwards']:+.1f}%)"
                     + (f"; bare forwards {1e3 * st['bare_forwards']['median_s']:.2f} ms "
                        f"(overhead {100 * st['overhead_vs_bare_forwards']:+.1f}% median, "
                        f"{100 * st['overhead_vs_bare_forwards_min']:+.1f}% min)" if st["bare_forwards"] else ""))
    presets = result.get("presets")
    if presets:
        lines.extend(format_presets(presets))
    parity = result.get("eager_parity")
    if parity:
        lines.append(f"faithful vs upstream-style eager kernels: final {parity['final_db']:.2f} dB, ICP canvas "
                     f"{parity['icp_canvas_db']:.2f} dB, low-res {parity['lowres_db']:.2f} dB")
    cache = result.get("embedding_cache")
    if cache:
        lines.append(f"embedding cache: first run embedded {cache['first_run_embedded']} images, second run "
                     f"{cache['second_run_embedded']} ({'ok' if cache['ok'] else 'FAILED'})")
    retrieval = result.get("retrieval")
    if retrieval:
        lines.append(f"retrieval (faiss {retrieval['faiss']}, exact IndexFlatIP, top-3; medians, min in brackets):")
        lines.append(f"{'pool':>8}{'dim':>6}{'queries':>9}{'threads':>9}{'ms/search':>11}{'ms/query':>18}"
                     f"{'f32-only ms/q':>15}{'torch ms/q':>12}")
        for row in retrieval["rows"]:
            base = row.get("torch_topk_median_ms_per_query")
            single = row.get("float32_median_ms_per_query")
            per_query = f"{row['median_ms_per_query']:.2f} ({row['min_ms_per_query']:.2f})"
            lines.append(f"{row['pool']:>8}{row['dim']:>6}{row['queries_per_search']:>9}{row['faiss_threads']:>9}"
                         f"{row['median_ms_per_search']:>11.2f}{per_query:>18}"
                         f"{'' if single is None else f'{single:.2f}' + ('' if row['same_as_float32'] else ' DIFFERS'):>15}"
                         f"{'' if base is None else f'{base:>12.2f}'}")
    return "\n".join(lines)


def format_presets(block: dict) -> list[str]:
    """The presets side by side: median ms and peak MiB per stage, time after retrieval, PSNR."""
    c = block["config"]
    order = block["order"]
    lines = [f"presets: {block['weights']}; {c['width']}x{c['height']} {c['style']} {c['dtype']} {c['device']} "
             f"steps={c['steps']} guidance={c['guidance']} repeats={c['repeats']} warmup={c['warmup']}; memory={block['memory']}"]
    header = f"{'stage':<18}" + "".join(f"{name[-32:]:>34}" for name in order)
    lines.append(header)
    lines.append(f"{'':<18}" + "".join(f"{'median ms':>24}{'peak MiB':>10}" for _ in order))
    names: list[str] = []
    for spec in order:
        names += [n for n in block["presets"][spec]["stages"] if n not in names]
    for name in names:
        row = f"{name:<18}"
        for spec in order:
            stage = block["presets"][spec]["stages"].get(name)
            if stage is None:
                row += f"{'-':>24}{'':>10}"
                continue
            peak = "" if stage["peak_mb"] is None else f"{stage['peak_mb']:.0f}"
            row += f"{1e3 * stage['median_s']:>24.1f}{peak:>10}"
        lines.append(row)
    row = f"{'after retrieval':<18}"
    for spec in order:
        entry = block["presets"][spec]
        cell = f"{1e3 * entry['after_retrieval']['median_s']:.1f} ({entry['after_retrieval_ratio']:.2f}x)"
        row += f"{cell:>24}{'':>10}"
    lines.append(row)
    row = f"{'PSNR vs ' + block['reference']:<18}"
    for spec in order:
        value = block["presets"][spec]["psnr_vs_faithful_db"]
        row += f"{('identical' if value is None else f'{value:.2f} dB'):>24}{'':>10}"
    lines.append(row)
    lines.extend(format_gpu_figures(block))
    picked = {s: e["picked"] for s, e in block["presets"].items() if e.get("picked")}
    if picked:
        lines.append("auto picked: " + ", ".join(f"{s} → {p}" for s, p in picked.items()))
    return lines


def format_gpu_figures(block: dict) -> list[str]:
    """Per preset: the first page (compilation, autotuning) against the median, the attention kernel, the stages
    against the FLOP model."""
    lines = []
    for spec in block["order"]:
        entry = block["presets"][spec]
        page = entry["stages"]["page"]["median_s"]
        first = entry.get("first_page_s")
        line = f"{spec}: top-level attention {entry.get('attention', '?')}"
        if first is not None:
            line += f"; first page {first:.2f} s vs median {page:.2f} s (compile/warm-up {first - page:+.2f} s)"
        lines.append(line)
        if entry.get("roofline"):
            lines.extend(format_rows(spec, entry["roofline"]))
    return lines


def write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
