"""Fixes for the pinned detectron2 snapshot (a59f0563) on current libraries, applied on import.

Each fix is small, idempotent and covered by a test that fails without it:

* ``pkg_resources``: setuptools >= 82 removed it, and ``detectron2.model_zoo`` imports it. When it
  is missing we register a minimal module whose ``resource_filename`` uses ``importlib``.
* numpy 2: ``SemSegEvaluator``'s default label loader calls ``np.array(..., copy=False)``, which
  numpy 2 rejects. The loader is bound as a keyword default, so we replace that default.
* CPU DDP: ``create_ddp_model`` passes ``device_ids=[local_rank]``, which DDP rejects for CPU
  modules; we pass ``device_ids=None`` when the model's parameters live on the CPU.
* safe loading: torch >= 2.6 loads with ``weights_only=True``; official MAE / ConvMAE
  checkpoints store an ``argparse.Namespace`` under ``args``. That one name is allow-listed, and
  rebuilt as :class:`SafeNamespace`, which only accepts plain attribute values (see there).
* COCO evaluation: without ``_C`` the snapshot's ``COCOEvaluator`` runs pycocotools' pure-Python
  ``COCOeval``; it now uses faster-coco-eval's C++ one when installed (same numbers, see
  ``convmae_det/evaluation/coco_backend.py``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import pickle
import sys
import types
import warnings
from typing import Any

import numpy as np
import torch

__all__ = ["apply_all", "load_sem_seg_label", "SafeNamespace", "SAFE_GLOBALS"]


class SafeNamespace(argparse.Namespace):
    """What ``argparse.Namespace`` in a checkpoint becomes under ``torch.load(weights_only=True)``.

    Allow-listing ``argparse.Namespace`` itself would let a file (through torch's ``BUILD``) put
    any key in the instance ``__dict__``, ``__setstate__`` included, which torch then calls on
    the next ``BUILD`` of that object, and ``setattr`` anything, ``__class__`` included (a
    ``(state, slotstate)`` state). This subclass accepts only a dict of plain names, so a file can
    do no more than set attributes to the tensors and containers it may already hold. It pickles
    as a plain ``argparse.Namespace``.
    """

    def __setstate__(self, state: Any) -> None:
        if type(state) is not dict:
            raise pickle.UnpicklingError(
                f"refused argparse.Namespace state: is a {type(state).__name__}, not a dict"
            )
        for key in state:
            if type(key) is not str or key.startswith("__"):
                shown = key if type(key) is str else f"a {type(key).__name__} key"
                raise pickle.UnpicklingError(
                    f"refused argparse.Namespace state: sets attribute {shown[:60]!r}"
                )
        self.__dict__.update(state)

    def __reduce__(self) -> Any:
        return (argparse.Namespace, (), dict(vars(self)))


# extra globals for torch.load(weights_only=True), as (object, "module.name") pairs
SAFE_GLOBALS = [(SafeNamespace, "argparse.Namespace")]
_applied = False


def _install_pkg_resources_shim() -> None:
    try:
        importlib.import_module("pkg_resources")
        return
    except ImportError:
        pass
    shim = types.ModuleType("pkg_resources")

    def resource_filename(package: str, resource: str) -> str:
        module = importlib.import_module(package)
        return os.path.join(os.path.dirname(module.__file__), resource)

    shim.resource_filename = resource_filename
    shim.__convmae_det_shim__ = True
    sys.modules["pkg_resources"] = shim


def load_sem_seg_label(filename: str, copy: bool = False, dtype=None) -> np.ndarray:
    """numpy-2-safe replacement of detectron2's ``load_image_into_numpy_array`` (same signature)."""
    from detectron2.utils.file_io import PathManager
    from PIL import Image

    with PathManager.open(filename, "rb") as f:
        array = np.asarray(Image.open(f), dtype=dtype)
    return array.copy() if copy else array


def _fix_sem_seg_evaluator() -> None:
    from detectron2.evaluation import sem_seg_evaluation as sse

    init = sse.SemSegEvaluator.__init__
    kwdefaults = dict(init.__kwdefaults__ or {})
    if kwdefaults.get("sem_seg_loading_fn") is not load_sem_seg_label:
        kwdefaults["sem_seg_loading_fn"] = load_sem_seg_label
        init.__kwdefaults__ = kwdefaults
    sse.load_image_into_numpy_array = load_sem_seg_label


def _fix_cpu_ddp() -> None:
    import detectron2.engine as engine
    from detectron2.engine import defaults

    original = defaults.create_ddp_model
    if getattr(original, "__convmae_det_fixed__", False):
        return

    def create_ddp_model(model, *, fp16_compression=False, **kwargs):
        params = list(model.parameters())
        if params and params[0].device.type == "cpu":
            kwargs.setdefault("device_ids", None)
        return original(model, fp16_compression=fp16_compression, **kwargs)

    create_ddp_model.__convmae_det_fixed__ = True
    create_ddp_model.__doc__ = original.__doc__
    defaults.create_ddp_model = create_ddp_model
    engine.create_ddp_model = create_ddp_model


def _fast_coco_eval() -> None:
    from .evaluation.coco_backend import use_fast_cocoeval

    use_fast_cocoeval()


def _allow_safe_globals() -> None:
    torch.serialization.add_safe_globals(SAFE_GLOBALS)


def _silence_dependency_noise() -> None:
    # Printed on every run by the pinned snapshot's own imports; nothing a user can act on.
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
    warnings.filterwarnings(
        "ignore", message=".*torch.jit.script.* is deprecated", category=FutureWarning
    )


def apply_all() -> None:
    """Apply every fix once (called when ``convmae_det`` is imported)."""
    global _applied
    if _applied:
        return
    _silence_dependency_noise()
    _install_pkg_resources_shim()
    _allow_safe_globals()
    _fix_sem_seg_evaluator()
    _fix_cpu_ddp()
    _fast_coco_eval()
    _applied = True
