"""One live run per output folder: ``<output_dir>/.run.lock``.

A training run takes the lock before it starts (:func:`acquire_run_lock`) and removes it when it
ends (:meth:`RunLock.release`). The file holds JSON naming the holder::

    {"pid": 4242, "host": "node7", "started": "2024-05-01T12:00:00+02:00",
     "command": "python tools/lazyconfig_train_net.py ...", "boot_id": "...",
     "proc_start_ticks": 123456}

Taking it is race-free: the holder keeps an exclusive ``fcntl.flock`` on the file for as long as it
lives, and the kernel drops that lock when the process dies, however it dies (``kill -9``
included). A file that is present but not locked is the leftover of a run that ended without
removing it; its record is checked before it is replaced:

* same host (and boot), pid not running, or running but started at another time (the pid was
  reused by another process): stale, replaced with one warning line;
* same host, the recorded process still running: refused (the file lock could not be relied on);
* another host: it cannot be checked from here, refused with a message saying how to remove it.

A folder another run holds raises :class:`OutputDirInUse` with the one line the tools print.
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import shlex
import socket
import sys
import time
from typing import Any, Dict, Optional, Set

try:
    import fcntl
except ImportError:  # not on POSIX: the record alone decides
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "LOCK_NAME",
    "OutputDirInUse",
    "RunLock",
    "acquire_run_lock",
    "holder_state",
    "process_start_ticks",
    "read_lock_record",
]

LOCK_NAME = ".run.lock"
logger = logging.getLogger(__name__)

# the lock descriptors this process holds: closed in forked children (DataLoader workers), so the
# lock lives exactly as long as the process that took it
_HELD_FDS: Set[int] = set()


def _close_held_fds_in_child() -> None:
    for fd in list(_HELD_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_fds_in_child)


class OutputDirInUse(RuntimeError):
    """Another run holds the output folder (or may: a lock from another host). ``str()`` is the
    line to print after ``error: ``."""


def process_start_ticks(pid: int) -> Optional[int]:
    """Start time of process ``pid`` in clock ticks since boot (``/proc/<pid>/stat`` field 22);
    None when there is no such process or no ``/proc``. Tells a reused pid from the original."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name (field 2) may contain spaces and parentheses: split after the last ")"
    fields = stat.rsplit(")", 1)[-1].split()
    try:
        return int(fields[19])  # field 22 overall; fields[0] is field 3
    except (IndexError, ValueError):
        return None


def _boot_id() -> Optional[str]:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _pid_running(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C there: assume it runs
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    except OSError:
        return False
    return True


def _command() -> str:
    argv = getattr(sys, "orig_argv", None) or [sys.executable] + sys.argv
    return shlex.join(argv)


def _record(pid: int) -> Dict[str, Any]:
    return {
        "pid": pid,
        "host": socket.gethostname(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": _command(),
        "boot_id": _boot_id(),
        "proc_start_ticks": process_start_ticks(pid),
    }


def read_lock_record(path: str) -> Optional[Dict[str, Any]]:
    """The JSON record of the lock file at ``path``; None when missing, empty or unreadable."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    return _parse(text)


def _parse(text: str) -> Optional[Dict[str, Any]]:
    try:
        record = json.loads(text)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def holder_state(record: Dict[str, Any]) -> str:
    """What the recorded holder is now: ``"running"``, ``"dead"`` (not running), ``"reused"`` (its
    pid belongs to a process started later), ``"rebooted"`` (recorded before the last boot) or
    ``"other-host"`` (can't be checked from here)."""
    if record.get("host") != socket.gethostname():
        return "other-host"
    boot = _boot_id()
    if boot and record.get("boot_id") and record["boot_id"] != boot:
        return "rebooted"
    try:
        pid = int(record.get("pid"))
    except (TypeError, ValueError):
        return "dead"
    if not _pid_running(pid):
        return "dead"
    recorded, now = record.get("proc_start_ticks"), process_start_ticks(pid)
    if recorded is not None and now is not None and int(recorded) != now:
        return "reused"
    return "running"


def _describe(record: Optional[Dict[str, Any]]) -> str:
    if not record:
        return "pid ?, host ?, start time unknown"
    return f"pid {record.get('pid', '?')} on host {record.get('host', '?')}, started " + str(
        record.get("started", "?")
    )


def _in_use(output_dir: str, record: Optional[Dict[str, Any]]) -> OutputDirInUse:
    return OutputDirInUse(
        f"{output_dir} is in use by another run ({_describe(record)}); stop it or choose another "
        "OUTPUT_DIR / train.output_dir"
    )


def _other_host(output_dir: str, path: str, record: Dict[str, Any]) -> OutputDirInUse:
    return OutputDirInUse(
        f"{output_dir} is locked by a run on another host ({_describe(record)}) that can't be "
        f"checked from here; if that run is no longer running, delete {path}, or choose another "
        "OUTPUT_DIR / train.output_dir"
    )


def _try_flock(fd: int) -> Optional[bool]:
    """True: locked; False: another process holds it; None: file locking unsupported here."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _read_fd(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")


def _record_of_holder(path: str, wait_s: float = 1.0) -> Optional[Dict[str, Any]]:
    """The record of a lock another process holds; it may be between taking the lock and writing
    the record, so wait a moment for it."""
    deadline = time.monotonic() + wait_s
    while True:
        record = read_lock_record(path)
        if record or time.monotonic() > deadline:
            return record
        time.sleep(0.05)


class RunLock:
    """The lock on one output folder, held by this process until :meth:`release`."""

    def __init__(self, output_dir: str, path: str, fd: int, record: Dict[str, Any]) -> None:
        self.output_dir, self.path, self.record = output_dir, path, record
        self._fd: Optional[int] = fd
        self._owner = os.getpid()
        _HELD_FDS.add(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None and os.getpid() == self._owner

    def release(self) -> None:
        """Remove the lock file (if it is still ours) and drop the lock. Idempotent; does nothing in
        a forked child of the holder."""
        fd, self._fd = self._fd, None
        if fd is None or os.getpid() != self._owner:
            return
        try:
            if _same_file(fd, self.path):  # unlink while locked: a waiter re-checks the inode
                os.unlink(self.path)
        except OSError as exc:
            logger.warning("Could not remove %s: %s", self.path, exc)
        finally:
            _HELD_FDS.discard(fd)
            os.close(fd)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"RunLock({self.path!r}, held={self.held})"


def acquire_run_lock(output_dir: str) -> RunLock:
    """Take ``<output_dir>/.run.lock`` (creating the folder) for this process, which must be the one
    that lives as long as the run: the launcher's parent process, or rank 0 under torchrun.

    Raises:
        OutputDirInUse: another live run holds the folder, or a run on another host left a lock.
    """
    output_dir = os.path.abspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_NAME)
    record = _record(os.getpid())
    for _ in range(100):  # another run removed or replaced the file meanwhile: try again
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            locked = _try_flock(fd)
            if locked is False:
                raise _in_use(output_dir, _record_of_holder(path))
            if not _same_file(fd, path):  # released (unlinked) between our open and flock
                os.close(fd)
                continue
            text = _read_fd(fd)
            if text.strip():
                _check_leftover(output_dir, path, text, locked)
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(record, indent=1) + "\n").encode())
            os.fsync(fd)
            if locked is None:
                logger.warning(
                    "Cannot lock files in %s (no flock here): two runs started at the same moment "
                    "are not told apart",
                    output_dir,
                )
            return RunLock(output_dir, path, fd, record)
        except BaseException:
            try:
                os.close(fd)
            except OSError:
                pass
            raise
    raise OSError(f"could not take {path}: it keeps being replaced")


def _check_leftover(output_dir: str, path: str, text: str, locked: Optional[bool]) -> None:
    """A lock file nobody holds a file lock on: refuse when its holder may still run, else log
    the one line saying why it is stale (it is then overwritten)."""
    record = _parse(text)
    if record is None:
        if locked:  # unreadable and unlocked: the holder died writing it
            logger.warning("Replacing unreadable stale lock %s", path)
            return
        raise _in_use(output_dir, None)
    state = holder_state(record)
    if state == "other-host":
        raise _other_host(output_dir, path, record)
    if state == "running":
        raise _in_use(output_dir, record)
    why = {
        "dead": "is no longer running",
        "reused": "now belongs to another process",
        "rebooted": "ran before the machine restarted",
    }[state]
    logger.warning(
        "Replacing stale lock %s: pid %s (started %s) %s", path, record.get("pid"),
        record.get("started", "?"), why,
    )  # fmt: skip
