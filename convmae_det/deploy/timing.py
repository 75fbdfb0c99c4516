"""Interleaved CPU timing of predictors (eager vs exported) on the same image.

Each round runs every predictor once, in turn, so that load from other processes falls on all
of them alike; the median and the minimum over the rounds are reported.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import numpy as np

__all__ = ["Timing", "benchmark_exported", "report_lines", "speed_lines", "time_interleaved"]


@dataclass
class Timing:
    """Milliseconds per image of one predictor over the measured rounds."""

    name: str
    samples_ms: List[float]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def min_ms(self) -> float:
        return min(self.samples_ms)


def time_interleaved(
    predictors: Dict[str, Callable[[np.ndarray], object]],
    image: np.ndarray,
    *,
    rounds: int = 10,
    warmup: int = 2,
) -> Dict[str, Timing]:
    """Time each of ``predictors`` (name -> callable on an RGB image) on ``image``: ``warmup``
    untimed rounds, then ``rounds`` timed rounds, one call of each predictor per round."""
    if rounds < 1:
        raise ValueError(f"rounds={rounds}; expected at least 1")
    for _ in range(warmup):
        for run in predictors.values():
            run(image)
    samples: Dict[str, List[float]] = {name: [] for name in predictors}
    for _ in range(rounds):
        for name, run in predictors.items():
            start = time.perf_counter()
            run(image)
            samples[name].append(1000.0 * (time.perf_counter() - start))
    return {name: Timing(name, ms) for name, ms in samples.items()}


def speed_lines(timings: Dict[str, Timing], reference: str = "eager") -> List[str]:
    """``name: median X ms/image (min Y), Z.ZZx <reference>`` per predictor."""
    ref = timings.get(reference)
    out = []
    for name, t in timings.items():
        line = f"{name}: median {t.median_ms:.1f} ms/image (min {t.min_ms:.1f})"
        if ref is not None and name != reference:
            line += (
                f", {ref.median_ms / t.median_ms:.2f}x {reference} by median, "
                f"{ref.min_ms / t.min_ms:.2f}x by min"
            )
        out.append(line)
    return out


def benchmark_exported(
    folder: str,
    *,
    image: Optional[np.ndarray] = None,
    rounds: int = 10,
    warmup: int = 2,
    threads: Optional[int] = None,
) -> Dict[str, Any]:
    """Time an exported folder against eager PyTorch (the eager
    :class:`~convmae_det.visualization.predictor.Predictor` of the manifest's config, overrides
    and weights, fp32 on the CPU), interleaved, with the same number of CPU threads.

    Args:
        image: (H, W, 3) uint8 RGB (default: a synthetic image of the traced size).
        threads: CPU threads of both (default: ``torch.get_num_threads()``).
    Returns:
        a JSON-able dict: format, config, threads, image size, rounds, per predictor
        ``{"median_ms", "min_ms", "samples_ms"}``, and ``speedup_median`` / ``speedup_min``
        (eager time / exported time).
    """
    import torch

    from ..visualization.predictor import Predictor
    from .export import synthetic_image
    from .runner import ExportedPredictor

    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    exported = ExportedPredictor(folder, num_threads=threads)
    m = exported.manifest
    if not m.config_file:
        raise ValueError(f"{folder}: the manifest names no config to build the eager model from")
    eager = Predictor(
        config_file=m.config_file, opts=list(m.config_opts), weights=m.weights, device="cpu"
    )
    if image is None:
        image = synthetic_image(*m.traced_size)
    timings = time_interleaved(
        {"eager": eager, m.format: exported}, image, rounds=rounds, warmup=warmup
    )
    e, x = timings["eager"], timings[m.format]
    return {
        "format": m.format,
        "config_file": m.config_file,
        "threads": threads,
        "image_size": [int(image.shape[0]), int(image.shape[1])],
        "rounds": rounds,
        "timings": {
            name: {"median_ms": t.median_ms, "min_ms": t.min_ms, "samples_ms": t.samples_ms}
            for name, t in timings.items()
        },
        "speedup_median": e.median_ms / x.median_ms,
        "speedup_min": e.min_ms / x.min_ms,
        "lines": speed_lines(timings),
    }


def report_lines(result: Dict[str, Any], title: str = "benchmark") -> List[str]:
    """The lines a tool prints for a :func:`benchmark_exported` result: a heading (rounds, image,
    threads) and one line per predictor."""
    h, w = result["image_size"]
    head = (
        f"{title}: {result['rounds']} interleaved rounds on a {h}x{w} image, "
        f"{result['threads']} CPU threads, fp32"
    )
    return [head] + ["  " + line for line in result["lines"]]
