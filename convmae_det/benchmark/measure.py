"""Measuring one step: synchronised wall time (and process CPU time), peak memory, FLOPs and the
device's own matmul peak.

* time: ``torch.cuda.synchronize()`` around every iteration on CUDA; ``time.perf_counter`` for
  wall time and ``time.process_time`` for the CPU time of this process (less sensitive to other
  processes on a shared machine);
* memory: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the peak resident set size of the
  process (``VmHWM``, reset through ``/proc/self/clear_refs`` where the kernel allows it);
* FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` (2 x multiply-accumulates of matmuls,
  convolutions and attention; element-wise work is not counted), with formulas for the CPU SDPA
  kernels, which PyTorch does not count, and for grouped-convolution backward, which it overcounts;
* peak: the best rate of a large square matmul in the run's dtype, or a given number.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch.utils import flop_counter

__all__ = [
    "synchronize",
    "time_steps",
    "summarize_times",
    "reset_peak_memory",
    "peak_memory",
    "count_flops",
    "measure_matmul_peak",
    "device_name",
]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    step: Callable[[], Any], *, warmup: int, iters: int, device: torch.device
) -> Tuple[List[float], List[float]]:
    """Run ``warmup`` untimed then ``iters`` timed steps. Returns (wall seconds, CPU seconds) per
    iteration."""
    for _ in range(warmup):
        step()
    synchronize(device)
    wall, cpu = [], []
    for _ in range(iters):
        synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        synchronize(device)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


def summarize_times(seconds: List[float], per: int) -> Dict[str, float]:
    """Statistics of per-iteration times in ms per item (``per`` items an iteration): median,
    mean, std, min, max, p10, p90 and ``spread`` = (p90 - p10) / median."""
    ms = sorted(1000.0 * s / per for s in seconds)
    n = len(ms)

    def _q(q: float) -> float:
        pos = q * (n - 1)
        lo, hi = int(pos), min(int(pos) + 1, n - 1)
        return ms[lo] + (ms[hi] - ms[lo]) * (pos - lo)

    med = statistics.median(ms)
    return {
        "median": med,
        "mean": statistics.fmean(ms),
        "std": statistics.pstdev(ms) if n > 1 else 0.0,
        "min": ms[0],
        "max": ms[-1],
        "p10": _q(0.1),
        "p90": _q(0.9),
        "spread": (_q(0.9) - _q(0.1)) / med if med > 0 else 0.0,
    }


# ------------------------------------------------------------------------------------- memory
def _proc_status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_memory(device: torch.device) -> Dict[str, Any]:
    """Start a new peak-memory window. Returns the baseline: bytes in use now and whether the peak
    could actually be reset (the CPU fallback ``ru_maxrss`` is the lifetime peak)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return {"baseline_bytes": torch.cuda.memory_allocated(device), "peak_reset": True}
    reset = False
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        reset = True
    except OSError:
        pass
    rss = _proc_status_kb("VmRSS")
    return {"baseline_bytes": rss * 1024 if rss is not None else None, "peak_reset": reset}


def peak_memory(device: torch.device) -> Tuple[int, str]:
    """(peak bytes since :func:`reset_peak_memory`, what was measured)."""
    if device.type == "cuda":
        synchronize(device)
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    hwm = _proc_status_kb("VmHWM")
    if hwm is not None:
        return hwm * 1024, "cpu_peak_rss"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_max_rss_lifetime"


# -------------------------------------------------------------------------------------- FLOPs
def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flop(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    return flop_counter.sdpa_backward_flop_count(
        grad_out_shape, query_shape, key_shape, value_shape
    )


def _conv_backward_flop(
    grad_out_shape,
    x_shape,
    w_shape,
    _bias,
    _stride,
    _padding,
    _dilation,
    transposed,
    _output_padding,
    _groups,
    output_mask,
    out_shape=None,
    **kwargs,
) -> int:
    """Both halves of a convolution's backward cost what its forward costs. (PyTorch's own formula
    counts the weight gradient of a grouped convolution ``groups`` times too often, which for the
    5x5 depthwise convolutions of ConvViT is a factor of 256 / 384.)"""
    forward = flop_counter.conv_flop_count(x_shape, w_shape, grad_out_shape, transposed=transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def _custom_formulas() -> Dict[Any, Callable[..., int]]:
    aten = torch.ops.aten
    out: Dict[Any, Callable[..., int]] = {aten.convolution_backward: _conv_backward_flop}
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None:
        out[fwd] = _cpu_sdpa_flop
    if bwd is not None:
        out[bwd] = _cpu_sdpa_backward_flop
    return out


def count_flops(step: Callable[[], Any]) -> Tuple[int, Dict[str, int]]:
    """FLOPs of one call of ``step`` (total, and per operator), with the corrections above: the
    fused CPU attention kernels are counted like the CUDA ones, grouped-conv backward correctly."""
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping=_custom_formulas())
    with counter:
        step()
    per_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), per_op


# --------------------------------------------------------------------------------------- peak
def measure_matmul_peak(
    device: torch.device,
    dtype: torch.dtype,
    *,
    size: Optional[int] = None,
    iters: int = 30,
    budget_s: float = 2.0,
) -> float:
    """Best TFLOP/s of ``size`` x ``size`` matmuls in ``dtype`` on ``device`` (size 8192 on CUDA,
    2048 on CPU by default), over ``iters`` timed products or ``budget_s`` seconds (at least 3)."""
    if size is None:
        size = 8192 if device.type == "cuda" else 2048
    if device.type == "cpu" and dtype == torch.float16:
        dtype = torch.bfloat16
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best, start = float("inf"), time.perf_counter()
    for i in range(iters):
        synchronize(device)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
        if i >= 2 and time.perf_counter() - start > budget_s:
            break
    return 2.0 * size**3 / best / 1e12


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    return f"{name} ({os.cpu_count()} logical cores)"
    except OSError:
        pass
    return f"CPU ({os.cpu_count()} logical cores)"
