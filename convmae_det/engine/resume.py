"""Which checkpoint ``--resume`` continues from: the newest complete one in the output folder.

Checkpoints are renamed into place only once fully written, and ``last_checkpoint`` is updated
right after. A kill between those two steps leaves a newer complete ``model_XXXXXXX.pth`` than
the one ``last_checkpoint`` names (or no ``last_checkpoint`` at all); a folder copied without
that file has the same problem. :func:`repair_last_checkpoint` points ``last_checkpoint`` at the
newest complete checkpoint before resuming (:func:`resume_newest` does both for the trainers).
Temporary files (``.tmp-*``) are never candidates.

A ``last_checkpoint`` written *after* the newest checkpoint (newer modification time) that names
an older one is a deliberate roll-back (edited by hand to restart from there) and is kept.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Callable, Dict, Optional

from detectron2.utils import comm

__all__ = ["newest_checkpoint", "repair_last_checkpoint", "resume_newest"]

logger = logging.getLogger(__name__)

_NUMBERED = re.compile(r"^model_(\d+)\.pth$")


def _rank(name: str) -> Optional[float]:
    if name == "model_final.pth":
        return float("inf")
    match = _NUMBERED.match(name)
    return float(match.group(1)) if match else None


def newest_checkpoint(save_dir: str, rank: Callable[[str], Optional[Any]] = _rank) -> str:
    """Basename of the newest ``model_final.pth`` / ``model_<iter>.pth`` in ``save_dir``, or "".

    ``rank`` maps a file name to a sortable progress value (None: not a checkpoint); the default
    knows detectron2's names, other trainers pass their own."""
    if not os.path.isdir(save_dir):
        return ""
    ranked = [(r, n) for n in os.listdir(save_dir) if (r := rank(n)) is not None]
    ranked = [(r, n) for r, n in ranked if os.path.getsize(os.path.join(save_dir, n)) > 0]
    return max(ranked)[1] if ranked else ""


def repair_last_checkpoint(checkpointer, rank: Callable[[str], Optional[Any]] = _rank) -> str:
    """Make ``checkpointer``'s ``last_checkpoint`` name the newest complete checkpoint of its
    ``save_dir`` when it is missing, names a missing file, or names an older checkpoint and was
    written before the newest one (an interrupted save; see the module docstring).
    Returns the basename it names afterwards ("" when there is no checkpoint).

    ``checkpointer`` needs ``save_dir``, ``get_checkpoint_file()`` and
    ``tag_last_checkpoint(name)`` (detectron2's ``Checkpointer`` has them); ``rank`` as in
    :func:`newest_checkpoint`."""
    save_dir = checkpointer.save_dir
    tagged_path = checkpointer.get_checkpoint_file()
    tagged = os.path.basename(tagged_path) if tagged_path else ""
    newest = newest_checkpoint(save_dir, rank)
    if not newest:
        return tagged if tagged and os.path.isfile(tagged_path) else ""
    tagged_ok = bool(tagged) and os.path.isfile(tagged_path)
    if tagged_ok and (rank(tagged) is None or rank(tagged) >= rank(newest)):
        return tagged
    pointer = os.path.join(save_dir, "last_checkpoint")
    if tagged_ok and os.path.getmtime(pointer) > os.path.getmtime(os.path.join(save_dir, newest)):
        logger.info(
            f"{pointer} names {tagged!r} and was written after {newest!r}: resuming from "
            f"{tagged!r} as it says (a roll-back)"
        )
        return tagged
    logger.warning(
        f"{os.path.join(save_dir, 'last_checkpoint')} names {tagged or 'nothing'!r} but "
        f"{newest!r} is the newest complete checkpoint (interrupted save?): resuming from it"
    )
    checkpointer.tag_last_checkpoint(newest)
    return newest


def resume_newest(checkpointer) -> Optional[Dict[str, Any]]:
    """``--resume`` for a detectron2-style ``checkpointer``: repair ``last_checkpoint`` (main
    process), then load the newest complete checkpoint with everything registered on the
    checkpointer (optimizer, scheduler, seeds...). Returns what the file held besides those
    (e.g. ``iteration``), or None when there is nothing to resume from. Call on every process."""
    if comm.is_main_process():
        repair_last_checkpoint(checkpointer)
    comm.synchronize()
    if not checkpointer.has_checkpoint():
        return None
    state = checkpointer.resume_or_load("", resume=True)
    start = state.get("iteration", -1) + 1  # the file holds the last finished iteration
    logger.info(f"Resuming from {checkpointer.get_checkpoint_file()} at iteration {start}")
    return state
