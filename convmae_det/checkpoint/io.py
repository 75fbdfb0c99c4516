"""Reading checkpoints without running their code, and writing them atomically.

* ``torch.load(weights_only=True)`` with a small allow-list
  (:data:`convmae_det.compat.SAFE_GLOBALS`); a file whose unpickling needs anything else (a
  function, a class with side effects) is refused with :class:`CheckpointError` and nothing of it
  runs. ``allow_unsafe=True`` is the explicit opt-in for trusted legacy files.
* detectron2 / Detectron1 ``.pkl`` files are plain pickles of numpy arrays: they are read with
  the restricted unpickler of :mod:`convmae_det.checkpoint.safe_pickle`, which only rebuilds
  numpy arrays, scalars and dtypes, dicts, lists, tuples, sets, strings and numbers, from an exact
  ``(module, name)`` allow-list (nothing imported, no dotted names).
* :func:`save_checkpoint_atomic` writes to a temporary file in the same folder, fsyncs it and
  renames it over the destination, so a crash never leaves a half-written checkpoint. A write that
  fails (disk full, I/O error) removes the temporary file and raises :class:`CheckpointWriteError`
  (an ``OSError``) naming the file and the previous checkpoint, which is intact.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import re
import shlex
import tempfile
from typing import IO, Any, Callable, Dict, Optional

import numpy as np
import torch

from .safe_pickle import _Refused, _shown, load_restricted_pickle

__all__ = [
    "CheckpointError",
    "CheckpointWriteError",
    "load_checkpoint_file",
    "save_checkpoint_atomic",
    "write_text_atomic",
    "to_tensor_dict",
]

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot (or must not) be read or mapped; the message names the file."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (``errno`` tells why, e.g. ``ENOSPC``); the message names the
    file and says which earlier checkpoint is intact. ``str()`` is that one-line message."""

    def __str__(self) -> str:
        return str(self.strerror)


def _refusal(path: str, what: str) -> CheckpointError:
    converted = os.path.splitext(os.path.basename(path))[0] + "-converted.pth"
    return CheckpointError(
        f"{path}: refused to load: unpickling it would {what}; only tensors, numpy arrays and "
        "plain containers are rebuilt, since anything else could run code. Nothing from the file "
        "was executed. If you trust this file, convert it once with "
        "`python tools/convert_checkpoint.py "
        f"{shlex.quote(path)} {shlex.quote(converted)} --unsafe-load` and use "
        f"{shlex.quote(converted)} (in Python: load_checkpoint_file(path, allow_unsafe=True))."
    )


def _unreadable(path: str, exc: BaseException) -> CheckpointError:
    return CheckpointError(
        f"{path}: cannot read this checkpoint ({type(exc).__name__}: {_shown(str(exc), 200)}). "
        "The file is truncated, corrupt or not a PyTorch / detectron2 checkpoint; expected a "
        "torch.save() file (.pth/.pt/.bin) or a detectron2 .pkl."
    )


def _load_pkl(path: str, allow_unsafe: bool) -> Any:
    with open(path, "rb") as f:
        data = f.read()
    if allow_unsafe:
        try:
            return pickle.loads(data, encoding="latin1")
        except Exception as exc:
            raise _unreadable(path, exc) from None
    try:
        return load_restricted_pickle(data)
    except _Refused as exc:
        raise _refusal(path, exc.what) from None
    except Exception as exc:  # whatever a malformed stream makes pickle or numpy raise
        raise _unreadable(path, exc) from None


# ----------------------------------------------------------------------------------------------
# torch.load(weights_only=True)
# ----------------------------------------------------------------------------------------------

# What torch's weights-only unpickler says when a file asks for something it does not allow.
_TORCH_POLICY = re.compile(
    r"Unsupported global|Trying to call reduce|Can only (build|create new object|append|SETITEM)|"
    r"persistent_load|is blocked|refused argparse\.Namespace"
)


def _torch_refusal(path: str, text: str) -> Optional[CheckpointError]:
    match = re.search(r"GLOBAL ([\w.]+)", text)
    if match:
        return _refusal(path, f"import '{match.group(1)}'")
    match = re.search(r"refused argparse\.Namespace state: ([^\n]*)", text)
    if match:
        detail = _shown(match.group(1), 120)
        return _refusal(path, f"rebuild an argparse.Namespace whose pickled state {detail}")
    if _TORCH_POLICY.search(text):
        return _refusal(path, "build a Python object other than tensors and plain containers")
    return None


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
            refusal = None if allow_unsafe else _torch_refusal(path, str(exc))
            if refusal is not None:
                raise refusal from None
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


# ----------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------


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


def _free_bytes(folder: str) -> Optional[int]:
    """Bytes an unprivileged process may still write in ``folder`` (None: unknown)."""
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


# torch's zip writer reports a failed write as a RuntimeError from inline_container.cc
_TORCH_WRITE_FAILURE = re.compile(r"inline_container|PytorchStreamWriter|file write failed")


def _write_errno(exc: BaseException, folder: str) -> Optional[int]:
    """The errno behind a failed write (walking ``__cause__`` / ``__context__``: torch turns the
    file object's ``OSError`` into a RuntimeError), or None when it was no I/O failure."""
    seen = set()
    cur: Optional[BaseException] = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno:
            return cur.errno
        cur = cur.__cause__ or cur.__context__
    if isinstance(exc, RuntimeError) and _TORCH_WRITE_FAILURE.search(str(exc)):
        free = _free_bytes(folder)
        return errno.ENOSPC if free is not None and free < (1 << 20) else errno.EIO
    if isinstance(exc, OSError):
        return errno.EIO
    return None


def _intact_checkpoint(path: str, folder: str) -> str:
    """What the failed write left untouched, for the error message."""
    tag = os.path.join(folder, "last_checkpoint")
    try:
        with open(tag) as f:
            name = f.read().strip()
    except (OSError, UnicodeDecodeError):
        name = ""
    if name:
        last = name if os.path.isabs(name) else os.path.join(folder, name)
        if os.path.isfile(last):
            return f"the previous checkpoint {last} is intact"
    if os.path.isfile(path):
        return f"the previous file {path} is intact"
    return "no earlier checkpoint was touched"


def _write_failure(path: str, folder: str, code: int) -> CheckpointWriteError:
    reason = "no space left on device" if code == errno.ENOSPC else os.strerror(code).lower()
    message = f"{reason} while writing {path}; {_intact_checkpoint(path, folder)}"
    return CheckpointWriteError(code, message)


def _write_atomic(path: str, write: Callable[[IO], None], mode: str) -> None:
    """Write ``path`` through a temporary file in the same folder, fsync it, and rename it over
    ``path``: a reader (or a resume after a crash) sees the old file or the new one, never a
    partial one. The file gets the usual permissions, like a plain ``open()``.

    Raises:
        CheckpointWriteError: the write failed (disk full: ``errno.ENOSPC``); the temporary file
            is removed and the message names the earlier checkpoint, which is intact.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = ""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
        os.fchmod(fd, _default_file_mode())
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp and os.path.exists(tmp):
            try:
                os.remove(tmp)
            except OSError:
                pass
        code = _write_errno(exc, folder) if isinstance(exc, (OSError, RuntimeError)) else None
        if code is None:
            raise
        raise _write_failure(path, folder, code) from exc
    _fsync_dir(folder)


def save_checkpoint_atomic(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` through a temporary file and an atomic rename.

    Raises:
        CheckpointWriteError: the write failed (see :func:`_write_atomic`).
    """
    _write_atomic(path, lambda f: torch.save(obj, f), "wb")


def write_text_atomic(text: str, path: str) -> None:
    """Write a small text file (e.g. ``last_checkpoint``) atomically."""
    _write_atomic(path, lambda f: f.write(text), "w")


def to_tensor_dict(state: Dict[str, Any]) -> Dict[str, Any]:
    """numpy arrays (from .pkl files) -> tensors; other values untouched."""
    return {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
            for k, v in state.items()}  # fmt: skip
