"""Pretraining checkpoints in the official ConvMAE / MAE format, written atomically.

A checkpoint is ``{"model", "optimizer", "epoch", "scaler", "args"}`` (``args`` a plain dict, so
the file loads with ``torch.load(weights_only=True)`` without allow-listing anything). ``epoch``
is the last epoch the file covers; resuming starts at ``epoch + 1``. The ``model`` entry holds
the official 313 keys (plus ``mor.*`` when the Mixture of Reconstructors is on), so the file
loads into the official code, into our pretraining models and into our downstream backbones.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn as nn

from ..checkpoint.io import save_checkpoint_atomic, write_text_atomic

__all__ = [
    "plain_args",
    "save_pretrain_checkpoint",
    "load_pretrain_checkpoint",
    "resume_pretraining",
    "find_last_checkpoint",
    "official_model_state",
    "LAST_CHECKPOINT_FILE",
]

logger = logging.getLogger(__name__)

LAST_CHECKPOINT_FILE = "last_checkpoint"


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
) -> str:
    """Write an official-format checkpoint atomically and point ``last_checkpoint`` at it."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else {},
        "epoch": int(epoch),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "args": plain_args(args) if args is not None else {},
    }
    save_checkpoint_atomic(state, path)
    folder = os.path.dirname(os.path.abspath(path))
    write_text_atomic(os.path.basename(path), os.path.join(folder, LAST_CHECKPOINT_FILE))
    return path


def find_last_checkpoint(output_dir: str) -> Optional[str]:
    """The file named in ``output_dir/last_checkpoint``, or None."""
    pointer = os.path.join(output_dir, LAST_CHECKPOINT_FILE)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        name = f.read().strip()
    path = os.path.join(output_dir, name)
    return path if os.path.isfile(path) else None


def load_pretrain_checkpoint(path: str) -> Dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (official files carry an allow-listed
    ``argparse.Namespace``; importing ``convmae_det`` registers it)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretraining checkpoint {path!r} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, Mapping) or "model" not in ckpt:
        keys = list(ckpt)[:5] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise ValueError(f"{path}: expected a dict with a 'model' entry, found {keys}")
    return ckpt


def resume_pretraining(
    path: str,
    *,
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scaler: Optional[Any] = None,
) -> int:
    """Restore model (strictly), optimizer and scaler from ``path``; returns the next epoch."""
    ckpt = load_pretrain_checkpoint(path)
    model.load_state_dict(ckpt["model"], strict=True)
    if optimizer is not None and ckpt.get("optimizer"):
        optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    epoch = int(ckpt.get("epoch", -1))
    logger.info("Resumed from %s (epoch %d done)", path, epoch)
    return epoch + 1
