"""The one trainer of every training job: detectron2's ``SimpleTrainer`` with mixed precision,
the non-finite loss policy and gradient clipping in its step.

Detection (LazyConfig) and segmentation (yacs) runs build their model, data, optimizer, schedule
and evaluator, then hand them to :func:`build_trainer` with their :class:`RunSettings`; the
hooks (seeding, timing, lr schedule, checkpoints, evaluation, writers) are detectron2's own plus
ours in :mod:`.hooks`, registered by :func:`.training.register_training_hooks`.

One step of :class:`ConvMAETrainer` (``run_step``):

1. read the batch; with the "skip" policy, remember the BatchNorm running statistics;
2. forward under ``torch.autocast`` when ``precision`` is bf16 / fp16 (fp32: no autocast);
3. average the loss terms over all processes and let :class:`FiniteLossGuard` decide: a finite
   loss goes on; a NaN / Inf one raises :class:`NonFiniteLossError` ("stop") or is skipped
   ("skip": no backward, no optimizer step, BatchNorm statistics restored, counted);
4. backward (scaled by a ``GradScaler`` for fp16 only), metrics, optional gradient clipping (on
   unscaled gradients), optimizer step (skipped by the scaler on fp16 overflow).

In fp32 the step is detectron2's ``SimpleTrainer.run_step`` operation for operation (same
weights after every step), and the checkpoint layout is detectron2's (``trainer`` with
``iteration``, ``optimizer``, the hooks' states, and ``grad_scaler`` for fp16 / bf16 runs).
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterable, List, Optional

import torch
import torch.nn as nn
from detectron2.engine import SimpleTrainer
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

from .hooks import FiniteLossGuard, mean_over_processes
from .settings import RunSettings, resolve_device

__all__ = ["ConvMAETrainer", "build_trainer", "count_parameters", "resolve_device"]

GradClip = Callable[[List[torch.Tensor]], None]


def _norm_statistics(model: nn.Module) -> List[torch.Tensor]:
    """The buffers of the BatchNorm layers (running mean / var, batches tracked): what a forward
    pass in training mode changes."""
    return [
        b
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase)
        for b in m.buffers(recurse=False)
    ]


class ConvMAETrainer(SimpleTrainer):
    """``SimpleTrainer`` with precision, non-finite loss policy and gradient clipping.

    Args:
        model, data_loader, optimizer: as for ``SimpleTrainer``.
        precision: autocast dtype (``torch.bfloat16`` / ``torch.float16``), None for fp32. fp16
            scales the loss with a ``torch.amp.GradScaler`` (its state is in the checkpoint).
        device_type: autocast device type ("cuda"; "cpu" works for tests).
        guard: the non-finite loss policy (default: stop at the first NaN / Inf).
        grad_clip: called with the trainable parameters after backward (gradients unscaled),
            e.g. ``partial(torch.nn.utils.clip_grad_norm_, max_norm=1.0)``.
        accumulation: iterations (micro-batches) per optimizer step: gradients of
            ``loss / accumulation`` add up (DDP synchronises only the last one), the optimizer
            steps after the last (pretraining's ``accum_iter``).
        loss_key: the model returns its total loss under this key and its terms under other
            ``loss*`` keys (pretraining models); None: the loss is the sum of the returned dict
            (detectron2 models). The non-finite check and the metrics see the ``loss*`` terms;
            ``total_loss`` is the total.
        grad_scaler: the fp16 ``GradScaler`` to use (e.g. one restored from a checkpoint);
            default a new one for fp16, a disabled one otherwise.
        **kwargs: ``SimpleTrainer``'s (``gather_metric_period``, ``zero_grad_before_forward``,
            ``async_write_metrics``).
    """

    def __init__(
        self,
        model: nn.Module,
        data_loader: Iterable,
        optimizer: torch.optim.Optimizer,
        *,
        precision: Optional[torch.dtype] = None,
        device_type: str = "cuda",
        guard: Optional[FiniteLossGuard] = None,
        grad_clip: Optional[GradClip] = None,
        accumulation: int = 1,
        loss_key: Optional[str] = None,
        grad_scaler: Optional["torch.amp.GradScaler"] = None,
        **kwargs,
    ):
        super().__init__(model, data_loader, optimizer, **kwargs)
        if accumulation < 1:
            raise ValueError(f"accumulation={accumulation}; expected >= 1")
        self.precision = precision
        self.device_type = device_type
        if grad_scaler is None:
            grad_scaler = torch.amp.GradScaler(device_type, enabled=precision == torch.float16)
        self.grad_scaler = grad_scaler
        self.guard = guard if guard is not None else FiniteLossGuard(mode="stop")
        self.grad_clip = grad_clip
        self.accumulation = int(accumulation)
        self.loss_key = loss_key
        self.optimizer_stepped = False  # whether the last iteration stepped the optimizer
        self._norm_stats: Optional[List[torch.Tensor]] = None

    def _forward(self, data):
        context = (
            torch.autocast(self.device_type, dtype=self.precision)
            if self.precision is not None
            else contextlib.nullcontext()
        )
        with context:
            out = self.model(data)
            if isinstance(out, torch.Tensor):
                return out, {"total_loss": out}
            if self.loss_key is not None:
                return out[self.loss_key], {k: v for k, v in out.items() if k.startswith("loss")}
            return sum(out.values()), out

    def run_step(self) -> None:
        assert self.model.training, "[ConvMAETrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        first = self.iter % self.accumulation == 0  # of the micro-batches of one step
        last = (self.iter + 1) % self.accumulation == 0
        self.optimizer_stepped = False

        saved = None
        if self.guard.mode == "skip":
            if self._norm_stats is None:
                self._norm_stats = _norm_statistics(self.model)
            saved = [b.clone() for b in self._norm_stats]
        if self.zero_grad_before_forward and first:
            self.optimizer.zero_grad()
        no_sync = not last and isinstance(self.model, DistributedDataParallel)
        with self.model.no_sync() if no_sync else contextlib.nullcontext():
            losses, loss_dict = self._forward(data)
            # every process sees the same averaged terms, so all take the same decision
            if self.guard.check(mean_over_processes(loss_dict), self.iter):  # raises on "stop"
                for buffer, value in zip(self._norm_stats or [], saved or []):
                    buffer.copy_(value)
                self.optimizer.zero_grad(set_to_none=True)  # also what this step accumulated
                return
            if not self.zero_grad_before_forward and first:
                self.optimizer.zero_grad()
            if self.accumulation > 1:
                losses = losses / self.accumulation
            self.grad_scaler.scale(losses).backward()
        self.after_backward()
        if self.loss_key is not None:
            self._write_total_and_terms(loss_dict, data_time)
        elif self.async_write_metrics:
            self.concurrent_executor.submit(
                self._write_metrics, loss_dict, data_time, iter=self.iter
            )
        else:
            self._write_metrics(loss_dict, data_time)
        if not last:
            return
        if self.grad_clip is not None:
            self.grad_scaler.unscale_(self.optimizer)
            self.grad_clip([p for g in self.optimizer.param_groups for p in g["params"]])
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
        self.optimizer_stepped = True

    def _write_total_and_terms(self, loss_dict: dict, data_time: float) -> None:
        """Metrics of a model with a ``loss_key``: ``total_loss`` is that entry (not the sum of
        the terms, which may be weighted), every ``loss*`` term besides; averaged over the
        processes, ``data_time`` their maximum."""
        values = {k: float(v.detach().float().item()) for k, v in loss_dict.items()}
        gathered = comm.gather(dict(values, data_time=data_time))
        if not comm.is_main_process():
            return
        storage = self.storage
        storage.put_scalar("data_time", max(g.pop("data_time") for g in gathered))
        mean = {k: sum(g[k] for g in gathered) / len(gathered) for k in gathered[0]}
        storage.put_scalar("total_loss", mean.pop(self.loss_key))
        if mean:
            storage.put_scalars(**mean)

    def state_dict(self) -> dict:
        ret = super().state_dict()
        if self.grad_scaler.is_enabled():
            ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        if self.grad_scaler.is_enabled() and state_dict.get("grad_scaler"):
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])


def build_trainer(
    model: nn.Module,
    data_loader: Iterable,
    optimizer: torch.optim.Optimizer,
    settings: RunSettings,
    *,
    last_checkpoint: Optional[Callable[[], str]] = None,
    grad_clip: Optional[GradClip] = None,
    **kwargs,
) -> ConvMAETrainer:
    """The trainer of every run: ``settings`` give the precision (already None off CUDA) and the
    non-finite loss policy; ``last_checkpoint`` returns the newest checkpoint's path (named when
    a non-finite loss stops the run); ``kwargs`` go to :class:`ConvMAETrainer` (pretraining:
    ``accumulation``, ``loss_key``, ``grad_scaler``)."""
    guard = FiniteLossGuard(
        mode=settings.nonfinite_loss,
        max_skips=settings.nonfinite_max_skips,
        max_consecutive=settings.nonfinite_max_in_a_row,
        last_checkpoint=last_checkpoint,
        config_key=settings.key("nonfinite_loss"),
        advice=settings.nonfinite_advice,
    )
    return ConvMAETrainer(
        model,
        data_loader,
        optimizer,
        precision=settings.precision,
        device_type=torch.device(settings.device).type,
        guard=guard,
        grad_clip=grad_clip,
        **kwargs,
    )


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of (trainable) parameters, each shared parameter counted once."""
    params = {id(p): p for p in _unwrap(model).parameters()}
    return sum(p.numel() for p in params.values() if p.requires_grad or not trainable_only)
