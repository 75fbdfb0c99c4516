"""Reading checkpoints without running their code, and writing them atomically.

* ``torch.load(weights_only=True)`` with a small allow-list (:data:`convmae_det.compat.SAFE_GLOBALS`);
  a file whose unpickling needs anything else (a function, a class with side effects) is refused
  with :class:`CheckpointError` and nothing of it runs. ``allow_unsafe=True`` is the explicit
  opt-in for trusted legacy files.
* detectron2 / Detectron1 ``.pkl`` files are plain pickles of numpy arrays: they are read with a
  restricted unpickler that only rebuilds arrays, dtypes and dicts.
* :func:`save_checkpoint_atomic` writes to a temporary file in the same folder, fsyncs it and
  renames it over the destination, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import re
import tempfile
from typing import IO, Any, Callable, Dict

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "load_checkpoint_file",
    "save_checkpoint_atomic",
    "write_text_atomic",
    "to_tensor_dict",
]

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot (or must not) be read or mapped; the message names the file."""


# Globals a detectron2 .pkl may need to rebuild numpy arrays, and nothing else.
_PKL_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PKL_ALLOWED or (module == "numpy" and name.startswith("dtypes")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")


def _refusal(path: str, detail: str) -> CheckpointError:
    match = re.search(r"GLOBAL ([\w.]+)", detail)
    what = f"'{match.group(1)}'" if match else "a non-tensor Python object"
    return CheckpointError(
        f"{path}: refused to load: unpickling it would import {what}, which is not a tensor or a "
        "plain container, so it could run code. Nothing from the file was executed. If you trust "
        "this file, load it with allow_unsafe=True (command line: --unsafe-load)."
    )


def _unreadable(path: str, exc: BaseException) -> CheckpointError:
    return CheckpointError(
        f"{path}: cannot read this checkpoint ({type(exc).__name__}: {exc}). The file is "
        "truncated, corrupt or not a PyTorch / detectron2 checkpoint; expected a torch.save() file "
        "(.pth/.pt/.bin) or a detectron2 .pkl."
    )


def _load_pkl(path: str, allow_unsafe: bool) -> Any:
    with open(path, "rb") as f:
        data = f.read()
    try:
        if allow_unsafe:
            return pickle.loads(data, encoding="latin1")
        return _ArrayOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc):
            raise _refusal(path, str(exc)) from None
        raise _unreadable(path, exc) from None
    except (EOFError, ValueError, TypeError, AttributeError, ImportError) as exc:
        raise _unreadable(path, exc) from None


def load_checkpoint_file(path: str, *, allow_unsafe: bool = False) -> Dict[str, Any]:
    """Read a checkpoint file into a dict, never running code from it unless ``allow_unsafe``.

    Raises:
        CheckpointError: missing, truncated or non-checkpoint file; or a file that would need
            arbitrary code to unpickle (unless ``allow_unsafe``).
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: the file is empty (an interrupted download or save?)")
    if path.endswith(".pkl"):
        obj = _load_pkl(path, allow_unsafe)
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=not allow_unsafe)
        except pickle.UnpicklingError as exc:
            text = str(exc)
            if "GLOBAL" in text or "Unsupported global" in text:
                raise _refusal(path, text) from None
            raise _unreadable(path, exc) from None
        except (RuntimeError, EOFError, ValueError, OSError, AttributeError, TypeError) as exc:
            raise _unreadable(path, exc) from None
    if allow_unsafe:
        logger.warning("Loaded %s with unrestricted unpickling (allow_unsafe=True).", path)
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path}: expected a dict of weights (optionally under 'model' or 'state_dict'), "
            f"found a {type(obj).__name__}"
        )
    return obj


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _default_file_mode() -> int:
    """The mode ``open()`` gives a new file (0o666 minus the umask); ``mkstemp`` uses 0o600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _write_atomic(path: str, write: Callable[[IO], None], mode: str) -> None:
    """Write ``path`` through a temporary file in the same folder, fsync it, and rename it over
    ``path``: a reader (or a resume after a crash) sees the old file or the new one, never a
    partial one. The file gets the usual permissions, like a plain ``open()``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    try:
        os.fchmod(fd, _default_file_mode())
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(folder)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_checkpoint_atomic(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` through a temporary file and an atomic rename."""
    _write_atomic(path, lambda f: torch.save(obj, f), "wb")


def write_text_atomic(text: str, path: str) -> None:
    """Write a small text file (e.g. ``last_checkpoint``) atomically."""
    _write_atomic(path, lambda f: f.write(text), "w")


def to_tensor_dict(state: Dict[str, Any]) -> Dict[str, Any]:
    """numpy arrays (from .pkl files) -> tensors; other values untouched."""
    return {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
            for k, v in state.items()}  # fmt: skip
