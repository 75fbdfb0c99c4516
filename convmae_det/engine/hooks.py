"""Training-loop safeguards: a non-finite loss check that names the iteration and the loss terms,
and a counter of the fp16 steps the gradient scaler skipped.

detectron2's ``SimpleTrainer`` writes the metrics (``_write_metrics``) after ``backward`` and
before ``optimizer.step``; :func:`install_finite_loss_check` checks the loss terms there, on every
process, so a NaN / Inf never reaches the weights:

* ``mode="stop"``: raise :class:`NonFiniteLossError` (iteration, offending terms, all terms, the
  last good checkpoint). The periodic checkpointer saved nothing at that iteration, so
  ``--resume`` continues from the last good checkpoint.
* ``mode="skip"``: log a warning, count it (``nonfinite_skipped`` in the metrics) and drop the
  gradients of that batch (no parameter changes; with an fp16 scaler, the scaler skips the
  step). After ``max_skips`` skipped batches the run stops as in "stop".
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Dict, Mapping, Optional

import torch
from detectron2.engine import HookBase, SimpleTrainer
from detectron2.utils.events import get_event_storage

__all__ = [
    "AMPOverflowCounter",
    "NonFiniteLossError",
    "install_finite_loss_check",
    "nonfinite_terms",
]

logger = logging.getLogger(__name__)

NONFINITE_MODES = ("stop", "skip")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the iteration and the loss terms."""


def _value(v) -> float:
    return float(v.detach().float().item()) if isinstance(v, torch.Tensor) else float(v)


def nonfinite_terms(loss_dict: Mapping[str, object]) -> Dict[str, float]:
    """The loss terms of ``loss_dict`` that are NaN or infinite, with their values."""
    values = {k: _value(v) for k, v in loss_dict.items()}
    return {k: v for k, v in values.items() if not math.isfinite(v)}


def install_finite_loss_check(
    trainer: SimpleTrainer,
    *,
    mode: str = "stop",
    max_skips: int = 10,
    last_checkpoint: Optional[Callable[[], str]] = None,
) -> None:
    """Check every iteration's loss terms before the optimizer step (see the module docstring).

    Args:
        trainer: a detectron2 ``SimpleTrainer`` (or subclass, e.g. the AMP trainers).
        mode: "stop" or "skip".
        max_skips: "skip" mode stops after this many skipped batches.
        last_checkpoint: returns the path of the last saved checkpoint (for the message).
    """
    if mode not in NONFINITE_MODES:
        raise ValueError(f"train.nonfinite_loss={mode!r}; expected one of {NONFINITE_MODES}")
    write_metrics = trainer._write_metrics  # bound method of the trainer's class
    state = {"skipped": 0}

    def checked_write_metrics(loss_dict, data_time, prefix="", iter=None):
        iteration = trainer.iter if iter is None else iter
        bad = nonfinite_terms(loss_dict)
        if bad:
            terms = ", ".join(f"{k}={v}" for k, v in bad.items())
            every = ", ".join(f"{k}={_value(v):.4g}" for k, v in loss_dict.items())
            if mode == "skip" and state["skipped"] < max_skips:
                state["skipped"] += 1
                logger.warning(
                    f"Non-finite loss at iteration {iteration} ({terms}); batch skipped "
                    f"({state['skipped']}/{max_skips}), weights unchanged"
                )
                scaler = getattr(trainer, "grad_scaler", None)
                if scaler is None or not scaler.is_enabled():
                    trainer.optimizer.zero_grad(set_to_none=True)
                get_event_storage().put_scalar("nonfinite_skipped", state["skipped"])
                return None
            ckpt = last_checkpoint() if last_checkpoint is not None else ""
            where = f"last good checkpoint: {ckpt}" if ckpt else "no checkpoint saved yet"
            raise NonFiniteLossError(
                f"Non-finite loss at iteration {iteration}: {terms} (all terms: {every}). "
                f"The weights were not updated with it; {where}. Resume with --resume, lower "
                f"the learning rate, or set train.nonfinite_loss=skip to skip such batches."
            )
        return write_metrics(loss_dict, data_time, prefix=prefix, iter=iter)

    trainer._write_metrics = checked_write_metrics


class AMPOverflowCounter(HookBase):
    """Count the iterations whose fp16 step the gradient scaler skipped (inf/NaN gradients, the
    scale is then lowered) and log the total as ``amp_overflow_steps``."""

    def __init__(self):
        self.overflows = 0
        self._scale: Optional[float] = None

    def _scaler(self):
        scaler = getattr(self.trainer, "grad_scaler", None)
        return scaler if scaler is not None and scaler.is_enabled() else None

    def before_step(self) -> None:
        scaler = self._scaler()
        self._scale = float(scaler.get_scale()) if scaler is not None else None

    def after_step(self) -> None:
        scaler = self._scaler()
        if scaler is None or self._scale is None:
            return
        if float(scaler.get_scale()) < self._scale:
            self.overflows += 1
            logger.info(f"fp16 overflow at iteration {self.trainer.iter}: step skipped by scaler")
        self.trainer.storage.put_scalar("amp_overflow_steps", self.overflows)

    def state_dict(self) -> dict:
        return {"overflows": self.overflows}

    def load_state_dict(self, state: dict) -> None:
        self.overflows = int(state.get("overflows", 0))
