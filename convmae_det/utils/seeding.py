"""Seeds derived from integers and scoped reseeding of every global generator: the pieces of
exact resume that the data loader (:mod:`convmae_det.data.resumable_loader`) and the training
loops (:mod:`convmae_det.engine.reproducibility`) share. No model or engine code here."""

from __future__ import annotations

import contextlib
import os
import random
from typing import Iterator, Optional

import numpy as np
import torch
from detectron2.utils import comm

__all__ = [
    "derive_seed",
    "enable_determinism",
    "fork_rng",
    "resolve_run_seed",
    "seed_everything",
]


def derive_seed(*parts: int) -> int:
    """A 31-bit seed determined by the integers ``parts`` (well mixed: neighbouring iterations get
    unrelated seeds)."""
    entropy = [int(p) & 0xFFFFFFFF for p in parts] or [0]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0]) & 0x7FFFFFFF


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, numpy's global generator and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def fork_rng(seed: int) -> Iterator[None]:
    """Run the body with every global generator seeded by ``seed``, then restore their states
    (the caller's random stream is untouched). CPU generators only."""
    py_state, np_state, torch_state = (
        random.getstate(),
        np.random.get_state(),
        torch.get_rng_state(),
    )
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)  # not torch.manual_seed: no (lazy) CUDA seeding
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


def resolve_run_seed(seed: Optional[int]) -> int:
    """``seed`` if >= 0, else a random seed shared by all processes (call it on every rank)."""
    if seed is not None and int(seed) >= 0:
        return int(seed)
    return int(comm.shared_random_seed()) & 0x7FFFFFFF


def enable_determinism(enabled: bool = True) -> None:
    """Deterministic kernels where torch has them (``warn_only``: ops without a deterministic
    version warn instead of failing), no cuDNN autotuning, and the cuBLAS workspace setting that
    deterministic CUDA matmuls need."""
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
