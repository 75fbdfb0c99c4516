"""Which checkpoint ``--resume`` continues from, and what a crash leaves in the output folder.

The newest *readable* checkpoint of the output folder. Checkpoints are renamed into place only
once fully written, and ``last_checkpoint`` is updated right after. A kill between those two steps
leaves a newer complete ``model_XXXXXXX.pth`` than the one ``last_checkpoint`` names (or no
``last_checkpoint`` at all); a folder copied without that file has the same problem.
:func:`repair_last_checkpoint` points ``last_checkpoint`` at the newest readable checkpoint before
resuming (:func:`resume_newest` does both for the trainers). Temporary files (``.tmp-*``) are
never candidates.

* A checkpoint damaged outside our atomic save (a filesystem crash: empty, truncated, garbage,
  zeroed blocks) is skipped with one warning naming it and the reason, for the next older
  readable one (:func:`checkpoint_problem`: torch's zip archive is checked entry by entry,
  checksums included, without unpickling anything).
* A ``last_checkpoint`` written *after* the newest checkpoint (newer modification time) that names
  an older one is a deliberate roll-back (edited by hand to restart from there) and is kept.
* A ``last_checkpoint`` naming a file outside the output folder (an absolute path, ``../x.pth``,
  a link pointing out) is refused with :class:`CheckpointError`: our trainers only ever write a
  name of their own folder, so it was edited by hand, and resuming restores a whole training
  state (optimizer, iteration, seeds) that must come from this run; silently resuming from
  another file of the folder instead would ignore what the user asked for. Weights from
  elsewhere are loaded with ``train.init_checkpoint`` / ``MODEL.WEIGHTS`` /
  ``train.resume_from``. A link pointing out that the folder scan finds is skipped (warning).

At the start of a run the main process also removes the ``.tmp-*`` files of saves that were
killed (:func:`remove_leftover_temp_files`; the run lock keeps a second run out of the folder), and
a resumed run drops the metrics rows logged after the checkpoint it resumes from
(:func:`drop_metrics_after`), so every iteration appears once in ``metrics.json``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import zipfile
import zlib
from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar

from detectron2.utils import comm

from ..checkpoint.io import CheckpointError, load_checkpoint_file, write_text_atomic

__all__ = [
    "checkpoint_problem",
    "decide_on_main_process",
    "drop_metrics_after",
    "newest_checkpoint",
    "remove_leftover_temp_files",
    "repair_last_checkpoint",
    "resume_newest",
]

logger = logging.getLogger(__name__)

_NUMBERED = re.compile(r"^model_(\d+)\.pth$")
# what convmae_det.checkpoint.io's atomic writes name their temporary files (mkstemp: ".tmp-",
# random letters, digits and "_", then the destination's extension)
_TEMP_FILE = re.compile(r"^\.tmp-[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?$")
_ZIP_MAGIC = b"PK\x03\x04"
_CHUNK = 1 << 22
T = TypeVar("T")


def _rank(name: str) -> Optional[float]:
    if name == "model_final.pth":
        return float("inf")
    match = _NUMBERED.match(name)
    return float(match.group(1)) if match else None


def _inside(folder: str, path: str) -> bool:
    """Whether ``path`` (links resolved) lies inside ``folder`` (links resolved)."""
    root = os.path.realpath(folder)
    target = os.path.realpath(path)
    return os.path.commonpath([root, target]) == root and target != root


def _check_zip_entries(path: str) -> Optional[str]:
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        if not any(i.filename == "data.pkl" or i.filename.endswith("/data.pkl") for i in infos):
            return "a zip archive without data.pkl: not a torch.save() file"
        for info in infos:
            try:
                with archive.open(info) as entry:  # reads every byte; checks the CRC-32 at the end
                    while entry.read(_CHUNK):
                        pass
            except zipfile.BadZipFile as exc:
                if info.CRC == 0 and "CRC" in str(exc):
                    continue  # torch may write entries without a checksum (compute_crc32=False)
                raise
    return None


def checkpoint_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot be resumed from (one line), or None when it reads.

    A torch ``zip`` checkpoint (what ``torch.save`` writes) is checked without unpickling:
    the archive's index at the end of the file must be there (a truncated file loses it), it must
    hold ``data.pkl``, and every entry must be complete with a matching CRC-32 (a block of zeros
    or garbage inside). It costs one read of the file. Any other file (legacy ``torch.save``
    pickles) is read by :func:`convmae_det.checkpoint.load_checkpoint_file`."""
    try:
        info = os.stat(path)
    except OSError:
        return "no such file"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_size == 0:
        return "the file is empty"
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        if head == _ZIP_MAGIC:
            if not zipfile.is_zipfile(path):
                return (
                    f"truncated: the zip index at the end of the file is missing "
                    f"({info.st_size} bytes)"
                )
            return _check_zip_entries(path)
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError) as exc:
        return f"truncated or corrupt ({type(exc).__name__}: {exc})"
    if not head.startswith(b"\x80"):  # neither a zip archive nor a pickle (protocol 2+)
        return "not a torch.save() file: neither a zip archive nor a pickle (garbage?)"
    try:
        load_checkpoint_file(path)
    except CheckpointError as exc:
        if "refused" in str(exc):
            return "refused: unpickling this legacy file would run code (nothing was run)"
        return "truncated or corrupt: a legacy torch.save() pickle that cannot be read"
    return None


class _Checks:
    """:func:`checkpoint_problem` with each file checked and reported once."""

    def __init__(self, save_dir: str):
        self.save_dir = save_dir
        self._done: Dict[str, Optional[str]] = {}

    def problem(self, name: str) -> Optional[str]:
        if name not in self._done:
            path = os.path.join(self.save_dir, name)
            problem = checkpoint_problem(path)
            if problem is None and not _inside(self.save_dir, path):
                problem = f"a link to {os.path.realpath(path)}, outside {self.save_dir}"
            if problem is not None:
                logger.warning(f"Not resuming from {path}: {problem}")
            self._done[name] = problem
        return self._done[name]

    def newest(self, rank: Callable[[str], Optional[Any]]) -> str:
        if not os.path.isdir(self.save_dir):
            return ""
        ranked = sorted(
            ((r, n) for n in os.listdir(self.save_dir) if (r := rank(n)) is not None),
            reverse=True,
        )
        return next((n for _, n in ranked if self.problem(n) is None), "")


def newest_checkpoint(save_dir: str, rank: Callable[[str], Optional[Any]] = _rank) -> str:
    """Basename of the newest readable ``model_final.pth`` / ``model_<iter>.pth`` in
    ``save_dir``, or "". Unreadable files are skipped with a warning naming them.

    ``rank`` maps a file name to a sortable progress value (None: not a checkpoint); the default
    knows detectron2's names, other trainers pass their own."""
    return _Checks(save_dir).newest(rank)


def _pointer_target(checkpointer) -> str:
    """The path ``last_checkpoint`` names ("" when none); :class:`CheckpointError` when it lies
    outside the checkpointer's folder (see the module docstring)."""
    save_dir = checkpointer.save_dir
    target = checkpointer.get_checkpoint_file()
    if not target or os.path.realpath(target) == os.path.realpath(save_dir):
        return ""  # no pointer, or an empty one
    if not _inside(save_dir, target):
        pointer = os.path.join(save_dir, "last_checkpoint")
        raise CheckpointError(
            f"{pointer} names {target} ({os.path.realpath(target)}), outside the output folder "
            f"{save_dir}: refusing to resume from it (a resume only continues a run from the "
            "checkpoints of its own folder). Write the name of a checkpoint of this folder into "
            "it or delete it; to start from that file, give it as the initial weights "
            "(train.init_checkpoint / MODEL.WEIGHTS / train.resume_from)."
        )
    return target


def repair_last_checkpoint(checkpointer, rank: Callable[[str], Optional[Any]] = _rank) -> str:
    """Make ``checkpointer``'s ``last_checkpoint`` name the newest readable checkpoint of its
    ``save_dir`` when it is missing, names a missing or unreadable file, or names an older
    checkpoint and was written before the newest one (an interrupted save; see the module
    docstring). Returns the basename it names afterwards ("" when there is no readable
    checkpoint; the pointer is then left as it is).

    Raises:
        CheckpointError: ``last_checkpoint`` names a file outside ``save_dir``.

    ``checkpointer`` needs ``save_dir``, ``get_checkpoint_file()`` and
    ``tag_last_checkpoint(name)`` (detectron2's ``Checkpointer`` has them); ``rank`` as in
    :func:`newest_checkpoint`."""
    save_dir = checkpointer.save_dir
    checks = _Checks(save_dir)
    tagged_path = _pointer_target(checkpointer)
    tagged = os.path.relpath(tagged_path, save_dir) if tagged_path else ""
    tagged_ok = bool(tagged) and os.path.isfile(tagged_path) and checks.problem(tagged) is None
    newest = checks.newest(rank)
    if not newest:
        return tagged if tagged_ok else ""
    tagged_rank = rank(os.path.basename(tagged)) if tagged else None
    if tagged_ok and (tagged_rank is None or tagged_rank >= rank(newest)):
        return tagged
    pointer = os.path.join(save_dir, "last_checkpoint")
    if tagged_ok and os.path.getmtime(pointer) > os.path.getmtime(os.path.join(save_dir, newest)):
        logger.info(
            f"{pointer} names {tagged!r} and was written after {newest!r}: resuming from "
            f"{tagged!r} as it says (a roll-back)"
        )
        return tagged
    unreadable = bool(tagged) and os.path.isfile(tagged_path) and not tagged_ok
    why = "it cannot be read" if unreadable else "interrupted save?"
    logger.warning(
        f"{pointer} names {tagged or 'nothing'!r} but {newest!r} is the newest readable "
        f"checkpoint ({why}): resuming from it"
    )
    checkpointer.tag_last_checkpoint(newest)
    return newest


def decide_on_main_process(decide: Callable[[], T]) -> T:
    """Run ``decide()`` on the main process only and return its result on every process (so
    that all processes resume from the same file); an exception it raises is raised on every
    process (the original one on the main process). Call on every process."""
    outcome: Tuple[str, Any] = ("", None)
    error: Optional[BaseException] = None
    if comm.is_main_process():
        try:
            outcome = ("ok", decide())
        except Exception as exc:  # noqa: BLE001  (re-raised below, on every process)
            error = exc
            outcome = ("checkpoint" if isinstance(exc, CheckpointError) else "error", str(exc))
    kind, value = comm.all_gather(outcome)[0]
    if error is not None:
        raise error
    if kind == "checkpoint":
        raise CheckpointError(value)
    if kind == "error":
        raise RuntimeError(f"the main process failed to choose the checkpoint: {value}")
    return value


def resume_newest(checkpointer) -> Optional[Dict[str, Any]]:
    """``--resume`` for a detectron2-style ``checkpointer``: repair ``last_checkpoint`` (main
    process), then load the newest readable checkpoint with everything registered on the
    checkpointer (optimizer, scheduler, seeds...). Returns what the file held besides those
    (e.g. ``iteration``), or None when there is nothing to resume from. Call on every process.

    Raises:
        CheckpointError: ``last_checkpoint`` names a file outside the output folder, or the
            chosen file cannot be read (e.g. refused: it would run code)."""
    name = decide_on_main_process(lambda: repair_last_checkpoint(checkpointer))
    if not name:
        return None
    path = os.path.join(checkpointer.save_dir, name)
    state = checkpointer.load(path)
    start = state.get("iteration", -1) + 1  # the file holds the last finished iteration
    logger.info(f"Resuming from {path} at iteration {start}")
    return state


def remove_leftover_temp_files(folder: str) -> Tuple[int, int]:
    """Delete the temporary files (``.tmp-*``, regular files only, links and folders are left
    alone) that saves killed mid-way left in ``folder`` (not its subfolders); log their number,
    size and names. Returns ``(count, bytes)``.

    Call at the start of a run, on the main process only: a file being written by a live process
    would be removed too (the run lock keeps a second run out of the folder)."""
    if not folder or not os.path.isdir(folder):
        return 0, 0
    removed: List[str] = []
    size = 0
    for name in sorted(os.listdir(folder)):
        if not _TEMP_FILE.match(name):
            continue
        path = os.path.join(folder, name)
        try:
            info = os.lstat(path)
            if not stat.S_ISREG(info.st_mode):
                continue
            os.remove(path)
        except FileNotFoundError:
            continue
        removed.append(name)
        size += info.st_size
    if removed:
        logger.warning(
            f"Removed {len(removed)} leftover temporary file(s) of interrupted saves from "
            f"{folder} ({size / 2**20:.1f} MiB): {', '.join(removed)}"
        )
    return len(removed), size


def drop_metrics_after(path: str, last: float, key: str = "iteration") -> int:
    """Remove from the JSON-lines metrics file ``path`` the rows whose ``key`` is past ``last``
    (written before a crash, after the checkpoint the run resumes from: the resumed run logs
    them again), and lines that are not JSON (the line being written at the crash). Rows
    without ``key`` are kept. The file is rewritten atomically, only when something is dropped.
    Returns the number of rows dropped (unreadable lines included).

    Every job (detectron2's ``JSONWriter``, ``metrics.json``): ``key`` is ``"iteration"`` and
    ``last`` the iteration the checkpoint holds (the ``metrics.jsonl`` of pretraining runs of
    earlier versions used ``"step"``, iterations done). Call on the main process, before a writer
    opens the file."""
    if not os.path.isfile(path):
        return 0
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    kept: List[str] = []
    past = broken = 0
    for raw in lines:
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
            row = json.loads(text)
        except ValueError:  # UnicodeDecodeError and JSONDecodeError included
            broken += 1
            continue
        value = row.get(key) if isinstance(row, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > last:
            past += 1
            continue
        kept.append(text.rstrip("\r"))
    if past or broken:
        write_text_atomic("".join(line + "\n" for line in kept), path)
        partial = f" and {broken} unreadable line(s) (cut by the crash)" if broken else ""
        logger.info(
            f"{path}: dropped {past} row(s) with {key} > {last:g} (logged before the crash, "
            f"logged again by the resumed run){partial}"
        )
    return past + broken
