"""Seeds that are a function of (run seed, rank, iteration), so a resumed run repeats the
uninterrupted one exactly.

A training step consumes random numbers (drop-path, RPN / ROI sampling, augmentation). Instead of
saving and restoring every generator's state, :class:`IterationSeeder` reseeds Python, numpy and
torch (CPU and CUDA) before each iteration from :func:`derive_seed` ``(seed, rank, iteration)``.
Iteration ``k`` then draws the same numbers whether the run started at 0 or resumed at ``k``, no
matter how many numbers an evaluation or a checkpoint consumed in between. The run seed is part
of the trainer's checkpoint (the hook's ``state_dict``), so ``train.seed=-1`` (random) resumes
exactly too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from typing import Iterator, Optional

import numpy as np
import torch
from detectron2.engine import HookBase
from detectron2.utils import comm

__all__ = [
    "IterationSeeder",
    "derive_seed",
    "enable_determinism",
    "fork_rng",
    "resolve_run_seed",
    "seed_everything",
]

logger = logging.getLogger(__name__)


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


class IterationSeeder(HookBase):
    """Reseed all generators before every iteration from ``(seed, rank, iteration)``.

    Args:
        seed: the run seed (>= 0); restored from the checkpoint on resume.
        data_loader: optional loader with ``set_start_iter(int)`` (see
            :func:`convmae_det.data.resumable_loader.build_resumable_train_loader`); it is told
            the first iteration before training, so a resumed run reads the batches the
            uninterrupted run would have read (the loader keeps its own seed in the checkpoint).
    """

    def __init__(self, seed: int, data_loader: Optional[object] = None):
        self.seed = int(seed)
        self._loader = data_loader

    def before_train(self) -> None:
        if self._loader is not None and hasattr(self._loader, "set_start_iter"):
            self._loader.set_start_iter(self.trainer.start_iter)
        logger.info(f"Per-iteration seeding from run seed {self.seed}")

    def seed_iteration(self, iteration: int) -> None:
        """Seed every generator for ``iteration`` of this process (also for loops without a
        detectron2 trainer, e.g. the segmentation loop)."""
        seed_everything(derive_seed(self.seed, comm.get_rank(), iteration))

    def before_step(self) -> None:
        self.seed_iteration(self.trainer.iter)

    def state_dict(self) -> dict:
        return {"seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
