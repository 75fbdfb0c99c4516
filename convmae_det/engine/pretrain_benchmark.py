"""Throughput of pretraining steps (forward + backward + AdamW step) on synthetic batches.

Used by ``tools/benchmark_pretrain.py`` to compare a ConvMAE step with a FastConvMAE step (which
computes stages 1-2 once for its 4 views). Reports images/s, seconds/step, FLOPs per image
(``torch.utils.flop_counter``, forward + backward), achieved TFLOP/s and, on CUDA, peak memory.
"""

from __future__ import annotations

import time
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_step_flops", "benchmark_pretrain_step"]


def _step(model: nn.Module, imgs: torch.Tensor, optimizer, amp_dtype) -> None:
    with torch.autocast(imgs.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss = model(imgs)["loss"]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def count_step_flops(model: nn.Module, imgs: torch.Tensor) -> float:
    """FLOPs (2 x multiply-accumulates) of one forward + backward pass on ``imgs``."""
    counter = FlopCounterMode(display=False)
    with counter:
        model(imgs)["loss"].backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def benchmark_pretrain_step(
    model: nn.Module,
    *,
    batch_size: int,
    img_size: int = 224,
    steps: int = 5,
    warmup: int = 2,
    device: str = "cpu",
    amp_dtype: Optional[torch.dtype] = None,
    count_flops: bool = True,
) -> Dict[str, Any]:
    """Time ``steps`` training steps after ``warmup`` ones on a random (B, 3, S, S) batch."""
    dev = torch.device(device)
    model = model.to(dev).train()
    imgs = torch.randn(batch_size, 3, img_size, img_size, device=dev)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95))
    flops = count_step_flops(model, imgs) if count_flops else float("nan")
    for _ in range(warmup):
        _step(model, imgs, optimizer, amp_dtype)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    tic = time.perf_counter()
    for _ in range(steps):
        _step(model, imgs, optimizer, amp_dtype)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = (time.perf_counter() - tic) / steps
    result = {
        "batch_size": batch_size,
        "img_size": img_size,
        "s_per_step": seconds,
        "img_per_s": batch_size / seconds,
        "gflops_per_img": flops / batch_size / 1e9,
        "tflops_per_s": flops / seconds / 1e12,
    }
    if dev.type == "cuda":
        result["peak_mem_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
    return result
