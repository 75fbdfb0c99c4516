"""Benchmarks of ConvViT backbones, detectors and pretraining models: time, memory, FLOPs, MFU.

``tools/benchmark.py`` is the command line; this package is the library it calls.
"""

from .measure import count_flops, measure_matmul_peak, peak_memory, reset_peak_memory
from .memory import checkpoint_sweep, memory_breakdown
from .runner import (
    AB_MARKDOWN_HEADER,
    MARKDOWN_HEADER,
    RESULT_FIELDS,
    BenchmarkConfig,
    build_subject,
    format_summary,
    markdown_ab_row,
    markdown_row,
    run_ab,
    run_benchmark,
)
from .subjects import (
    BACKBONE_PRESETS,
    MODES,
    PRETRAIN_PRESETS,
    BenchmarkSetupError,
    build_preset,
    make_step,
    synthetic_detection_batch,
)

__all__ = [
    "BenchmarkConfig",
    "BenchmarkSetupError",
    "RESULT_FIELDS",
    "MODES",
    "BACKBONE_PRESETS",
    "PRETRAIN_PRESETS",
    "build_preset",
    "build_subject",
    "make_step",
    "synthetic_detection_batch",
    "run_benchmark",
    "run_ab",
    "format_summary",
    "MARKDOWN_HEADER",
    "markdown_row",
    "AB_MARKDOWN_HEADER",
    "markdown_ab_row",
    "count_flops",
    "measure_matmul_peak",
    "peak_memory",
    "reset_peak_memory",
    "memory_breakdown",
    "checkpoint_sweep",
]
