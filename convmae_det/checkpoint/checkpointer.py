"""``ConvMAECheckpointer``: detectron2's checkpointer with safe reading, explicit key mapping
of every supported format, a loading report, and atomic writes."""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Dict, Optional

import torch.nn as nn
from detectron2.checkpoint import DetectionCheckpointer
from fvcore.common.checkpoint import _IncompatibleKeys
from torch.nn.parallel import DistributedDataParallel

from .convert import CheckpointReport, convert_checkpoint
from .io import load_checkpoint_file, save_checkpoint_atomic, write_text_atomic

__all__ = ["ConvMAECheckpointer"]

logger = logging.getLogger(__name__)


class ConvMAECheckpointer(DetectionCheckpointer):
    """A :class:`DetectionCheckpointer` for convmae_det models.

    * ``load(path)`` accepts every format of :func:`convert_checkpoint` (official ConvMAE /
      FastConvMAE pretraining, EasyCV, MAE ViT, ImageNet-finetuned, detectron2 ``.pth``/``.pkl``,
      official fine-tuned detectors / segmenter, our own files), reads it without running pickled
      code (``allow_unsafe=True`` to opt out for trusted legacy files), maps it onto the model
      and logs a :class:`CheckpointReport` (kept in ``self.last_report``). ``strict=True`` raises
      on missing encoder keys, unexpected keys and shape mismatches.
    * ``save(name)`` and ``last_checkpoint`` are written atomically (temporary file + rename).
    * ``upgrade``, if given, rewrites a loaded file's top-level layout before the checkpointables
      are restored (e.g. a resume point written by an older trainer).
    """

    def __init__(
        self,
        model: nn.Module,
        save_dir: str = "",
        *,
        strict: bool = False,
        allow_unsafe: bool = False,
        save_to_disk: Optional[bool] = None,
        upgrade: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None,
        **checkpointables: Any,
    ):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.upgrade = upgrade
        self.strict = strict
        self.allow_unsafe = allow_unsafe
        self.last_report: Optional[CheckpointReport] = None
        self._loading_path = ""

    def _load_file(self, filename: str) -> Dict[str, Any]:
        self._loading_path = filename
        ckpt = load_checkpoint_file(filename, allow_unsafe=self.allow_unsafe)
        if "model" not in ckpt or not isinstance(ckpt["model"], dict):
            ckpt = {"model": ckpt}
        return self.upgrade(ckpt) if self.upgrade is not None else ckpt

    def _load_model(self, checkpoint: Dict[str, Any]) -> _IncompatibleKeys:
        model = self.model.module if isinstance(self.model, DistributedDataParallel) else self.model
        state, report = convert_checkpoint(
            checkpoint["model"], model, strict=self.strict, source=self._loading_path
        )
        self.last_report = report
        logger.info(report.summary())
        model.load_state_dict(state, strict=False)
        checkpoint.pop("model")
        return _IncompatibleKeys(missing_keys=[], unexpected_keys=[], incorrect_shapes=[])

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {path}")
        save_checkpoint_atomic(data, path)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        write_text_atomic(last_filename_basename, os.path.join(self.save_dir, "last_checkpoint"))
