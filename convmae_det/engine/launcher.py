"""Starting a training tool: refuse bad input with one line before any process starts, then run
``main`` in the processes detectron2's ``launch`` starts (``--num-gpus``, ``--num-machines``,
``--machine-rank``, ``--dist-url``; gloo on the CPU), or in the one torchrun started.

    launch_tool(main, args, preflight=check_config_and_datasets, output_dir=folder_of_the_run)

Process hygiene: every process the launcher starts, and every process torchrun starts for a tool,
dies with its parent (Linux ``PR_SET_PDEATHSIG`` = SIGKILL, set first thing in the process, then a
check that the parent did not die before; elsewhere a thread polls the parent), so ``kill -9`` of
the parent stops the whole run: no rank trains on, no checkpoint is written afterwards. Their
DataLoader workers go with them within a second (a thread in each polls its training process),
and then the multiprocessing resource tracker (it ends when the last process using it has).

One output folder takes one live run: the process that outlives the run (the launcher's parent;
rank 0 under torchrun; the first machine's parent with several machines) holds
``<output_dir>/.run.lock`` (:mod:`convmae_det.engine.run_lock`) from before the processes start
until they have ended (normally, with an exception, on SIGTERM / SIGINT); a second run there is
refused with one line (exit code 2). ``--eval-only`` runs take no lock: they write only their
results, and evaluating a checkpoint of a run that is still training, in its folder, is a normal
thing to do.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine.launch import DEFAULT_TIMEOUT, _distributed_worker
from detectron2.utils import comm

from ..checkpoint.io import CheckpointError, CheckpointWriteError
from .preflight import debug_mode
from .run_lock import LOCK_NAME, OutputDirInUse, RunLock, acquire_run_lock

__all__ = [
    "DataFileError",
    "USER_ERRORS",
    "die_with_parent",
    "exit_on_user_error",
    "hold_output_dir",
    "join_torchrun_process_group",
    "launch_tool",
    "loader_workers_die_with_this_process",
    "share_cpu_threads",
]

# what the config / dataset / checkpoint checks raise for input a user can fix
USER_ERRORS = (KeyError, FileNotFoundError, ValueError, TypeError)

logger = logging.getLogger(__name__)

# the parent as early as this process can tell (the tools import this module before their work):
# under torchrun the worker checks against it that torchrun did not die before it could watch it
_PARENT_AT_START = os.getppid()
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# how long the launcher's children get to end after SIGTERM (launcher stopped) before SIGKILL
CHILD_STOP_GRACE_S = 10.0
# DataLoader workers: the pid of the training process they belong to (see _loader_worker_loop)
_LOADER_PARENT_ENV = "CONVMAE_DET_LOADER_PARENT_PID"
_ORIGINAL_WORKER_LOOP: Optional[Callable[..., Any]] = None


class DataFileError(RuntimeError):
    """Raised while a tool runs for a data file a user can fix (the message names it): the
    process prints ``error: <message>`` and the tool exits with code 2, without a traceback."""


def exit_on_user_error(check: Callable[[], Any]) -> Any:
    """Run ``check()``; on a :data:`USER_ERRORS` exception print ``error: <message>`` to stderr
    and exit with code 2 (no traceback: the message names the key / file / value). With
    ``CONVMAE_DET_DEBUG=1`` the exception propagates with its traceback."""
    try:
        return check()
    except USER_ERRORS as exc:
        if debug_mode():
            raise
        message = exc.args[0] if exc.args else str(exc)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def join_torchrun_process_group() -> bool:
    """Join the process group described by torchrun's environment variables (``WORLD_SIZE``,
    ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``...). Returns False when not started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False
    if not dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        comm.create_local_process_group(int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    return True


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def share_cpu_threads(processes_on_this_machine: int) -> Optional[int]:
    """Give each of ``processes_on_this_machine`` CPU training processes its share of the cores
    (``torch.set_num_threads``), unless ``OMP_NUM_THREADS`` says otherwise or CUDA is used. Every
    process otherwise starts as many threads as there are cores: with 2 processes on 2 cores the
    toy detectors ran 12x slower. Returns the number of threads set (None: left alone)."""
    if processes_on_this_machine <= 1 or torch.cuda.is_available():
        return None
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    threads = max(1, _available_cores() // processes_on_this_machine)
    torch.set_num_threads(threads)
    return threads


def _run_process(main: Callable[[Any], Any], args: Any) -> Any:
    """One process of a tool: CPU threads shared with the other processes, then ``main``."""
    loader_workers_die_with_this_process()
    share_cpu_threads(comm.get_local_size())
    try:
        return main(args)
    except CheckpointWriteError as exc:  # disk full / I/O error while saving: not a user mistake
        if debug_mode():
            raise
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    except (DataFileError, CheckpointError) as exc:  # the message names the file
        if debug_mode():
            raise
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)


def _die() -> None:
    if hasattr(signal, "SIGKILL"):
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(1)


def _set_parent_death_signal(signum: int) -> bool:
    """Linux ``prctl(PR_SET_PDEATHSIG, signum)``: the kernel sends ``signum`` to this process when
    the thread that started it exits. False where unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    prctl.restype = ctypes.c_int
    zero = ctypes.c_ulong(0)
    return prctl(ctypes.c_int(PR_SET_PDEATHSIG), ctypes.c_ulong(signum), zero, zero, zero) == 0


def _watch_parent(parent_pid: int, interval_s: float) -> None:
    while os.getppid() == parent_pid:
        time.sleep(interval_s)
    _die()


def die_with_parent(parent_pid: int, *, use_prctl: bool = True, interval_s: float = 1.0) -> str:
    """Make this process die (SIGKILL) when its parent ``parent_pid`` dies; if it already has (this
    process was re-parented), die now. Call it first thing in a child process.

    ``PR_SET_PDEATHSIG`` fires when the parent *thread* that started this process exits: pass
    ``use_prctl=False`` when that was not the parent's main thread, and a thread polls the parent
    instead (as on systems without ``prctl``). Returns ``"prctl"`` or ``"watchdog"``.
    """
    if use_prctl and _set_parent_death_signal(int(signal.SIGKILL)):
        how = "prctl"
    else:
        how = "watchdog"
        threading.Thread(
            target=_watch_parent, args=(parent_pid, interval_s), name="parent-watchdog", daemon=True
        ).start()
    if os.getppid() != parent_pid:  # the parent died before the death signal was set
        _die()
    return how


def _worker(
    local_rank: int, parent_pid: int, use_prctl: bool, main_func: Callable[..., Any], *rest: Any
) -> None:
    """A process the launcher started: die with the parent, then detectron2's worker (process
    group, local group, ``main_func(*args)``). torch's own parent-death signal (SIGINT, set just
    before) can be caught, comes too late for a parent that died while this process started, and
    does not stop a process blocked in a collective."""
    die_with_parent(parent_pid, use_prctl=use_prctl)
    _distributed_worker(local_rank, main_func, *rest)


def _pid_exists(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, not ours
        return True
    return True


def _torch_worker_module() -> Any:
    import torch.utils.data._utils.worker as module

    return module


def _loader_worker_loop(*args: Any, **kwargs: Any) -> Any:
    """torch's DataLoader worker loop, in a worker that dies with its training process."""
    parent = int(os.environ.get(_LOADER_PARENT_ENV) or 0)
    if parent:
        if os.getppid() != parent and _pid_exists(parent):
            parent = os.getppid()  # started by another process of the run: go with that one
        # a thread, not prctl: the loader may have been started by a thread that ends before it
        die_with_parent(parent, use_prctl=False)
    loop = _ORIGINAL_WORKER_LOOP or _torch_worker_module()._worker_loop
    if loop is _loader_worker_loop:
        raise RuntimeError("torch's DataLoader worker loop was not kept")
    return loop(*args, **kwargs)


def loader_workers_die_with_this_process() -> bool:
    """Make the DataLoader workers this process starts from now on die with it (within a second)
    instead of when torch's watchdog notices (after their current batch and a 5 s poll; never
    when this process died while the worker still started: it then takes its new parent for its
    manager). Wraps torch's private ``_worker_loop``; False (nothing done) where it is missing."""
    global _ORIGINAL_WORKER_LOOP
    module = _torch_worker_module()
    loop = getattr(module, "_worker_loop", None)
    if loop is None:
        return False
    if loop is not _loader_worker_loop:
        _ORIGINAL_WORKER_LOOP = loop
        module._worker_loop = _loader_worker_loop
    os.environ[_LOADER_PARENT_ENV] = str(os.getpid())
    return True


def _find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _stop_processes(processes: Sequence[Any], grace_s: float = CHILD_STOP_GRACE_S) -> None:
    """SIGTERM the processes still alive, SIGKILL those still alive ``grace_s`` later; wait."""
    alive = [p for p in processes if p.is_alive()]
    for p in alive:
        p.terminate()
    deadline = time.monotonic() + grace_s
    for p in alive:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in alive:
        if p.is_alive():
            p.kill()
            p.join()


def _launch(
    main_func: Callable[..., Any],
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: Optional[str] = None,
    args: tuple = (),
    timeout: Any = DEFAULT_TIMEOUT,
) -> None:
    """detectron2's ``launch`` (same arguments), with processes that die with this one and are
    stopped when it leaves early (exception, SIGTERM, Ctrl-C)."""
    world_size = num_machines * num_gpus_per_machine
    if world_size <= 1:
        main_func(*args)
        return
    if dist_url == "auto":
        assert num_machines == 1, "dist_url=auto not supported in multi-machine jobs."
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    if num_machines > 1 and str(dist_url).startswith("file://"):
        logger.warning("file:// is not a reliable init_method in multi-machine jobs. Prefer tcp://")
    use_prctl = threading.current_thread() is threading.main_thread()
    context = mp.start_processes(
        _worker,
        nprocs=num_gpus_per_machine,
        args=(os.getpid(), use_prctl, main_func, world_size, num_gpus_per_machine, machine_rank,
              dist_url, args, timeout),
        daemon=False,
        join=False,
    )  # fmt: skip
    try:
        while not context.join():
            pass
    finally:
        _stop_processes(context.processes)


class _Stopped(BaseException):
    """SIGTERM arrived: unwind (stop the children, release the lock), then die by it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum: int, frame: Any) -> None:
    signal.signal(signum, signal.SIG_DFL)  # a second one ends the process at once
    raise _Stopped(signum)


@contextlib.contextmanager
def _unwind_on_sigterm() -> Iterator[None]:
    """While inside: SIGTERM raises :class:`_Stopped` in the main thread (if SIGTERM had its
    default action; a handler someone installed is left alone)."""
    installed = False
    if threading.current_thread() is threading.main_thread():
        if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _raise_stopped)
            installed = True
    try:
        yield
    finally:
        if installed and signal.getsignal(signal.SIGTERM) == _raise_stopped:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _die_by(signum: int) -> None:
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    time.sleep(1.0)
    sys.exit(128 + signum)


def _refuse(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


@contextlib.contextmanager
def hold_output_dir(
    folder: Optional[str], *, torchrun: bool = False
) -> Iterator[Optional[RunLock]]:
    """Hold ``<folder>/.run.lock`` while inside (None: no folder to hold). A folder another live run
    holds ends the process with one line ``error: <dir> is in use by another run (...)`` and exit
    code 2. With ``torchrun=True`` every process of the group calls it, rank 0 takes the lock and
    all processes exit 2 when it is refused."""
    lock, refusal = None, None
    if folder and (not torchrun or dist.get_rank() == 0):
        try:
            lock = acquire_run_lock(folder)
        except OutputDirInUse as exc:
            refusal = str(exc)
        except OSError as exc:  # e.g. a folder that can't be written
            refusal = f"cannot take {os.path.join(folder, LOCK_NAME)}: {exc}"
    if folder and torchrun:
        shared = [refusal]
        dist.broadcast_object_list(shared, src=0)
        refusal = shared[0]
        if refusal and dist.get_rank() != 0:
            sys.exit(2)
    if refusal:
        _refuse(refusal)
    try:
        with _unwind_on_sigterm():
            yield lock
    finally:
        if lock is not None:
            lock.release()


def _folder_to_hold(args: Any, output_dir: Optional[Callable[[Any], Any]]) -> Optional[str]:
    if output_dir is None or getattr(args, "eval_only", False):
        return None
    folder = exit_on_user_error(lambda: output_dir(args))
    return str(folder) if folder else None


def launch_tool(
    main: Callable[[Any], Any],
    args: Any,
    *,
    preflight: Optional[Callable[[Any], Any]] = None,
    output_dir: Optional[Callable[[Any], Any]] = None,
) -> None:
    """``preflight(args)`` (bad input -> one line, exit 2), then ``main(args)`` on every process,
    holding the run's output folder.

    Args:
        main: the tool's per-process entry point.
        args: parsed detectron2 ``default_argument_parser`` arguments.
        preflight: checks that need no process group (config keys and types, datasets).
        output_dir: ``output_dir(args)`` -> the folder the run writes, held (``.run.lock``) by
            one live run at a time; not with ``--eval-only``. None / "": nothing held.
    """
    if os.environ.get("TORCHELASTIC_RUN_ID"):  # a torchrun worker: go when torchrun goes
        die_with_parent(_PARENT_AT_START)
    if preflight is not None:
        exit_on_user_error(lambda: preflight(args))
    folder = _folder_to_hold(args, output_dir)
    try:
        _launch_tool(main, args, folder)
    except _Stopped as stop:
        _die_by(stop.signum)


def _launch_tool(main: Callable[[Any], Any], args: Any, folder: Optional[str]) -> None:
    if join_torchrun_process_group():
        with hold_output_dir(folder, torchrun=True):
            _run_process(main, args)  # torchrun started the processes and set OMP_NUM_THREADS
        return
    if args.machine_rank != 0:  # the folder is held on the first machine
        folder = None
    with hold_output_dir(folder):
        try:
            _launch(
                functools.partial(_run_process, main),
                args.num_gpus,
                num_machines=args.num_machines,
                machine_rank=args.machine_rank,
                dist_url=args.dist_url,
                args=(args,),
            )
        except torch.multiprocessing.ProcessExitedException as exc:
            if exc.exit_code != 2:  # 2: a process printed its DataFileError
                raise
            sys.exit(2)
