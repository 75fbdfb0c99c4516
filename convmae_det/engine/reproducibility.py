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

import logging
from typing import Optional

from detectron2.engine import HookBase
from detectron2.utils import comm

# the seed helpers live with the data loader's dependencies (utils); re-exported for the loops
from ..utils.seeding import (
    derive_seed,
    enable_determinism,
    fork_rng,
    resolve_run_seed,
    seed_everything,
)

__all__ = [
    "IterationSeeder",
    "derive_seed",
    "enable_determinism",
    "fork_rng",
    "resolve_run_seed",
    "seed_everything",
]

logger = logging.getLogger(__name__)


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
