"""`python -m colorflow_core bench`: per-stage time and memory of one page, presets side by side, exact retrieval
over large pools, the embedding-cache check. Measured through the library's own measuring points (`observe`)."""
from .meter import AFTER_RETRIEVAL, MB, MemoryMeter, Recorder, TimedEncoder, denoiser_name, forward_timers
from .page import PipelineBench, bare_forwards, bench_inputs, load_model, measure_page, run_pipeline_bench, summarize_pipeline
from .presets import image_psnr, parse_preset_spec, release_memory, run_preset_bench
from .report import format_bench, format_presets, machine_info, write_json
from .retrieval import embedding_cache_check, run_retrieval_bench

__all__ = [
    "AFTER_RETRIEVAL", "MB", "MemoryMeter", "PipelineBench", "Recorder", "TimedEncoder", "bare_forwards", "bench_inputs",
    "denoiser_name", "embedding_cache_check", "forward_timers", "format_bench", "format_presets", "image_psnr",
    "load_model", "machine_info", "measure_page", "parse_preset_spec", "release_memory", "run_pipeline_bench",
    "run_preset_bench", "run_retrieval_bench", "summarize_pipeline", "write_json",
]
