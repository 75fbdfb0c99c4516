"""Pretraining checkpoints in the official ConvMAE / MAE format, written atomically.

A checkpoint is ``{"model", "optimizer", "epoch", "scaler", "args"}`` (``args`` a plain dict, so
the file loads with ``torch.load(weights_only=True)`` without allow-listing anything). ``epoch``
is the last epoch the file covers; the official code resumes at ``epoch + 1``. The ``model``
entry holds the official 313 keys (plus ``mor.*`` when the Mixture of Reconstructors is on), so
the file loads into the official code, into our pretraining models and into our downstream
backbones.

Our files add ``train_state`` (plain types) for an exact resume, possibly inside an epoch:
``epoch_iter`` (iterations of ``epoch`` done; ``iters_per_epoch`` when it is complete),
``iters_per_epoch``, ``seed`` (the run seed of the per-iteration reseeding), ``loader`` (the data
loader's seed and skip count) and ``nonfinite`` (consecutive skipped steps). Names:

* ``checkpoint-0007.pth``: the end of epoch 7 (official name; written every
  ``checkpoint_period`` epochs and at the last one; never deleted);
* ``checkpoint-0007-iter000120.pth``: 120 iterations into epoch 7 (``checkpoint_period_iters``
  and time-budget stops; only the newest few are kept).

``last_checkpoint`` names the newest; :func:`find_last_checkpoint` also finds a newer complete
file the pointer missed (a kill between the rename and the pointer update), never a ``.tmp-*``,
skips files a filesystem crash left unreadable and refuses a pointer naming a file outside the
folder (:mod:`convmae_det.engine.resume`). Every file is read by
:func:`convmae_det.checkpoint.load_checkpoint_file`: nothing pickled runs, and a refused or
unreadable file is a :class:`~convmae_det.checkpoint.CheckpointError` naming it.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from ..checkpoint.io import (
    CheckpointError,
    load_checkpoint_file,
    save_checkpoint_atomic,
    write_text_atomic,
)
from .resume import repair_last_checkpoint

__all__ = [
    "plain_args",
    "save_pretrain_checkpoint",
    "load_pretrain_checkpoint",
    "resume_pretraining",
    "restore_pretraining",
    "ResumePoint",
    "find_last_checkpoint",
    "checkpoint_name",
    "checkpoint_rank",
    "prune_iteration_checkpoints",
    "official_model_state",
    "LAST_CHECKPOINT_FILE",
]

logger = logging.getLogger(__name__)

LAST_CHECKPOINT_FILE = "last_checkpoint"
OFFICIAL_KEYS = ("model", "optimizer", "epoch", "scaler", "args")
_NAME = re.compile(r"^checkpoint-(\d+)(?:-iter(\d+))?\.pth$")


def checkpoint_name(epoch: int, epoch_iter: Optional[int] = None) -> str:
    """``checkpoint-EEEE.pth`` (epoch done) or ``checkpoint-EEEE-iterIIIIII.pth`` (inside it)."""
    if epoch_iter is None:
        return f"checkpoint-{epoch:04d}.pth"
    return f"checkpoint-{epoch:04d}-iter{epoch_iter:06d}.pth"


def checkpoint_rank(name: str) -> Optional[Tuple[int, float]]:
    """Training progress ``(epoch, iterations in it)`` encoded in a checkpoint name (``inf`` for
    a whole epoch), or None for other files (``.tmp-*``, ``last_checkpoint``, ...)."""
    match = _NAME.match(name)
    if match is None:
        return None
    epoch, it = match.groups()
    return int(epoch), float("inf") if it is None else float(it)


def plain_args(obj: Any) -> Any:
    """Recursively turn a config (DictConfig, LazyCall dict, dataclass-like) into plain Python:
    dicts, lists, str, int, float, bool, None. Callables become ``"module.qualname"``."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            obj = OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a detectron2 dependency
        pass
    if isinstance(obj, Mapping):
        return {str(k): plain_args(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain_args(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if callable(obj) and hasattr(obj, "__qualname__"):
        return f"{getattr(obj, '__module__', '')}.{obj.__qualname__}"
    if hasattr(obj, "__dict__"):  # argparse.Namespace and similar
        return plain_args(vars(obj))
    return str(obj)


def official_model_state(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The official keys of a pretraining state_dict: everything but the ``mor.*`` entries
    (what the official ConvMAE / FastConvMAE code loads strictly)."""
    return {k: v for k, v in state.items() if not k.startswith("mor.")}


def save_pretrain_checkpoint(
    path: str,
    *,
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer],
    epoch: int,
    scaler: Optional[Any] = None,
    args: Any = None,
    extra: Optional[Mapping[str, Any]] = None,
) -> str:
    """Write an official-format checkpoint atomically and point ``last_checkpoint`` at it.
    ``extra``: more top-level entries (e.g. ``train_state``), plain types or tensors."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else {},
        "epoch": int(epoch),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "args": plain_args(args) if args is not None else {},
    }
    clash = sorted(set(extra or {}) & set(OFFICIAL_KEYS))
    if clash:
        raise KeyError(f"{path}: extra entries {clash} would replace official checkpoint keys")
    state.update(extra or {})
    save_checkpoint_atomic(state, path)
    folder = os.path.dirname(os.path.abspath(path))
    write_text_atomic(os.path.basename(path), os.path.join(folder, LAST_CHECKPOINT_FILE))
    return path


class _PointerFile:
    """``output_dir/last_checkpoint`` seen through the three members that
    :func:`convmae_det.engine.resume.repair_last_checkpoint` uses."""

    def __init__(self, save_dir: str, write: bool):
        self.save_dir, self.write = save_dir, write

    def get_checkpoint_file(self) -> str:
        pointer = os.path.join(self.save_dir, LAST_CHECKPOINT_FILE)
        if not os.path.isfile(pointer):
            return ""
        with open(pointer) as f:
            name = f.read().strip()
        return os.path.join(self.save_dir, name) if name else ""

    def tag_last_checkpoint(self, name: str) -> None:
        if self.write:
            write_text_atomic(name, os.path.join(self.save_dir, LAST_CHECKPOINT_FILE))


def find_last_checkpoint(output_dir: str, *, repair: bool = False) -> Optional[str]:
    """The checkpoint to resume from: the file ``output_dir/last_checkpoint`` names, or a newer
    readable ``checkpoint-*.pth`` when the pointer is stale, missing or names an unreadable file
    (temporary files are never candidates; empty, truncated or corrupt ones are skipped with a
    warning naming them). ``repair``: also rewrite the pointer. None when there is none.

    Raises:
        CheckpointError: ``last_checkpoint`` names a file outside ``output_dir``.
    """
    if not os.path.isdir(output_dir):
        return None
    name = repair_last_checkpoint(_PointerFile(output_dir, repair), rank=checkpoint_rank)
    path = os.path.join(output_dir, name) if name else ""
    return path if path and os.path.isfile(path) else None


def prune_iteration_checkpoints(output_dir: str, keep: Optional[int]) -> List[str]:
    """Delete all but the newest ``keep`` inside-an-epoch checkpoints (``-iterNNNNNN``) of
    ``output_dir``; epoch checkpoints are never deleted. ``keep=None``: delete nothing.
    Returns the deleted paths."""
    if keep is None:
        return []
    if int(keep) < 1:
        raise ValueError(f"train.keep_iter_checkpoints={keep}: expected None or >= 1")
    ranked = sorted(
        (rank, name)
        for name in os.listdir(output_dir)
        if (rank := checkpoint_rank(name)) is not None and rank[1] != float("inf")
    )
    removed = []
    for _, name in ranked[: max(len(ranked) - int(keep), 0)]:
        path = os.path.join(output_dir, name)
        try:
            os.remove(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def load_pretrain_checkpoint(path: str) -> Dict[str, Any]:
    """Read a pretraining checkpoint with :func:`convmae_det.checkpoint.load_checkpoint_file`
    (``weights_only``; official files carry an allow-listed ``argparse.Namespace``, registered by
    importing ``convmae_det``).

    Raises:
        CheckpointError: missing, empty, truncated or corrupt file, a file whose unpickling
            would run code (refused, nothing of it runs), or one without a ``model`` entry; the
            message names the file.
    """
    ckpt = load_checkpoint_file(path)
    if not isinstance(ckpt.get("model"), Mapping):
        raise CheckpointError(
            f"{path}: expected a pretraining checkpoint, a dict with a 'model' entry of "
            f"weights; found the keys {list(ckpt)[:5]}"
        )
    return ckpt


@dataclass
class ResumePoint:
    """Where a restored run continues: iteration ``epoch_iter`` of ``epoch``."""

    path: str
    epoch: int
    epoch_iter: int
    train_state: Dict[str, Any] = field(default_factory=dict)  # {} for official files


def restore_pretraining(
    path: str,
    *,
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scaler: Optional[Any] = None,
) -> ResumePoint:
    """Restore model (strictly), optimizer and scaler from ``path``.

    Returns:
        the next iteration: inside the saved epoch when ``train_state`` says it was not finished,
        else the start of ``epoch + 1`` (official files, epoch checkpoints).
    """
    ckpt = load_pretrain_checkpoint(path)
    model.load_state_dict(ckpt["model"], strict=True)
    if optimizer is not None and ckpt.get("optimizer"):
        optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    epoch = int(ckpt.get("epoch", -1))
    state = dict(ckpt.get("train_state") or {})
    done = int(state.get("epoch_iter", 0))
    if state and done < int(state.get("iters_per_epoch", 0)):
        point = ResumePoint(path, epoch, done, state)
    else:
        point = ResumePoint(path, epoch + 1, 0, state)
    logger.info(
        "Resumed from %s: continuing at epoch %d iteration %d", path, point.epoch, point.epoch_iter
    )
    return point


def resume_pretraining(
    path: str,
    *,
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scaler: Optional[Any] = None,
) -> int:
    """Restore model (strictly), optimizer and scaler from ``path``; returns the next epoch
    (the one in progress for a checkpoint taken inside an epoch, see
    :func:`restore_pretraining` for the iteration)."""
    return restore_pretraining(path, model=model, optimizer=optimizer, scaler=scaler).epoch
