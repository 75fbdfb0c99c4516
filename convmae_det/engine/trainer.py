"""Trainers: detectron2's SimpleTrainer, and an AMP trainer that takes bf16 or fp16.

detectron2's ``AMPTrainer`` asserts CUDA and uses the deprecated ``torch.cuda.amp`` entry
points; :class:`MixedPrecisionTrainer` uses ``torch.autocast`` / ``torch.amp.GradScaler`` and
scales the loss only for fp16 (bf16 needs no scaling). :func:`build_trainer` turns AMP off, with a
warning, when the model is on the CPU.
"""

from __future__ import annotations

import logging
import time
from typing import Iterable

import torch
import torch.nn as nn
from detectron2.engine import AMPTrainer, SimpleTrainer
from detectron2.utils.events import get_event_storage

__all__ = [
    "AMP_DTYPES",
    "MixedPrecisionTrainer",
    "build_trainer",
    "count_parameters",
    "resolve_device",
]

logger = logging.getLogger(__name__)

AMP_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
              "fp16": torch.float16, "float16": torch.float16}  # fmt: skip


def resolve_device(device: str) -> str:
    """``device`` if usable, else "cpu" (with a warning) when CUDA was asked for but is absent."""
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        logger.warning(f"train.device={device!r} but CUDA is not available: running on the CPU")
        return "cpu"
    return str(device)


class MixedPrecisionTrainer(AMPTrainer):
    """AMPTrainer on ``torch.autocast(device_type, dtype)``; fp16 uses a GradScaler, bf16 none.

    Args:
        model, data_loader, optimizer: as for :class:`SimpleTrainer`.
        precision: ``torch.float16`` or ``torch.bfloat16``.
        device_type: autocast device type ("cuda").
    """

    def __init__(
        self,
        model: nn.Module,
        data_loader: Iterable,
        optimizer: torch.optim.Optimizer,
        *,
        precision: torch.dtype = torch.bfloat16,
        device_type: str = "cuda",
        **kwargs,
    ):
        scaler = torch.amp.GradScaler(device_type, enabled=precision == torch.float16)
        super().__init__(
            model, data_loader, optimizer, grad_scaler=scaler, precision=precision, **kwargs
        )
        self.device_type = device_type

    def run_step(self) -> None:
        assert self.model.training, "[MixedPrecisionTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start

        if self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        with torch.autocast(device_type=self.device_type, dtype=self.precision):
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                losses, loss_dict = loss_dict, {"total_loss": loss_dict}
            else:
                losses = sum(loss_dict.values())
        if not self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        self.grad_scaler.scale(losses).backward()
        if self.log_grad_scaler and self.grad_scaler.is_enabled():
            get_event_storage().put_scalar("[metric]grad_scaler", self.grad_scaler.get_scale())
        self.after_backward()
        if self.async_write_metrics:
            self.concurrent_executor.submit(
                self._write_metrics, loss_dict, data_time, iter=self.iter
            )
        else:
            self._write_metrics(loss_dict, data_time)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()


def build_trainer(
    model: nn.Module,
    data_loader: Iterable,
    optimizer: torch.optim.Optimizer,
    *,
    device: str,
    amp_enabled: bool = False,
    amp_precision: str = "bf16",
    **kwargs,
) -> SimpleTrainer:
    """SimpleTrainer, or MixedPrecisionTrainer when AMP is enabled and the device is CUDA.

    Args:
        amp_precision: "bf16" or "fp16".
    """
    if not amp_enabled:
        return SimpleTrainer(model, data_loader, optimizer, **kwargs)
    if amp_precision not in AMP_DTYPES:
        raise ValueError(
            f"train.amp.precision={amp_precision!r}; expected one of {sorted(AMP_DTYPES)}"
        )
    if not str(device).startswith("cuda"):
        logger.warning("train.amp.enabled=True ignored: mixed precision needs CUDA (device=cpu)")
        return SimpleTrainer(model, data_loader, optimizer, **kwargs)
    return MixedPrecisionTrainer(
        model, data_loader, optimizer, precision=AMP_DTYPES[amp_precision], **kwargs
    )


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of (trainable) parameters, each shared parameter counted once."""
    params = {id(p): p for p in _unwrap(model).parameters()}
    return sum(p.numel() for p in params.values() if p.requires_grad or not trainable_only)
