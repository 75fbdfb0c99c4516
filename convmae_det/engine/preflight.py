"""Checks every tool runs on its input before it builds a model or starts a process.

Each check raises an exception of :data:`convmae_det.engine.launcher.USER_ERRORS` whose message
names the config key (or flag), the path and what was expected; the tools turn it into one line
``error: ...`` and exit code 2. With ``CONVMAE_DET_DEBUG=1`` in the environment the tools show the
full traceback instead (:func:`debug_mode`).

    check_weights_file("MODEL.WEIGHTS", cfg.MODEL.WEIGHTS)
    check_output_dir("OUTPUT_DIR", cfg.OUTPUT_DIR)
"""

from __future__ import annotations

import os
from typing import Optional

__all__ = ["DEBUG_ENV", "check_data_dir", "check_output_dir", "check_weights_file", "debug_mode"]

DEBUG_ENV = "CONVMAE_DET_DEBUG"


def debug_mode() -> bool:
    """True when ``CONVMAE_DET_DEBUG`` is set to anything but "", "0", "false" or "no": user
    mistakes then raise with their traceback instead of one line."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _is_remote(path: str) -> bool:
    return "://" in path  # detectron2:// model-zoo names, http(s):// URLs: fetched when loaded


def check_weights_file(key: str, path: Optional[str]) -> None:
    """A local checkpoint named by ``key`` must be a file (empty / None: no weights; URLs and
    ``detectron2://`` names are left to the loader).

    Raises:
        FileNotFoundError: ``<key>: no such checkpoint file: <path>``.
    """
    path = str(path or "")
    if not path or _is_remote(path):
        return
    if os.path.isdir(path):
        raise FileNotFoundError(
            f"{key}: {path} is a folder; expected a checkpoint file (.pth / .pkl / .pt)"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{key}: no such checkpoint file: {path}")


def check_data_dir(key: str, path: Optional[str]) -> None:
    """A data folder named by ``key`` must exist (None / "": the tool's default data).

    Raises:
        FileNotFoundError: ``<key>: no such folder: <path>``.
    """
    path = str(path or "")
    if path and not os.path.isdir(path):
        what = "is a file" if os.path.exists(path) else "does not exist"
        raise FileNotFoundError(f"{key}: {path} {what}; expected a folder of images")


def check_output_dir(key: str, path: Optional[str]) -> None:
    """The folder a run writes must be creatable and writable, checked without creating it:
    the nearest existing ancestor must be a folder we may write into (``os.access``; a
    read-only file system is refused there, even for root), and ``path`` itself, if it exists,
    a writable folder.

    Raises:
        ValueError: ``<key>: cannot write the output folder <path>: <reason>``.
    """
    path = str(path or "")
    if not path:
        return
    absolute = os.path.abspath(path)
    probe = absolute
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        reason = f"{probe} is a file, not a folder"
    elif not os.access(probe, os.W_OK | os.X_OK):
        reason = f"no permission to write in {probe}" + (
            " (read-only file system)" if _read_only_fs(probe) else ""
        )
    else:
        return
    raise ValueError(f"{key}: cannot write the output folder {path}: {reason}")


def _read_only_fs(folder: str) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False
