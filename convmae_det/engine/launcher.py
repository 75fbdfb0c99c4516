"""Starting a training tool: refuse bad input with one line before any process starts, then run
``main`` in the processes detectron2's ``launch`` starts (``--num-gpus``, ``--num-machines``,
``--machine-rank``, ``--dist-url``; gloo on the CPU), or in the one torchrun started.

    launch_tool(main, args, preflight=check_config_and_datasets)
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from detectron2.engine import launch
from detectron2.utils import comm

__all__ = [
    "USER_ERRORS",
    "exit_on_user_error",
    "join_torchrun_process_group",
    "launch_tool",
    "share_cpu_threads",
]

# what the config / dataset / checkpoint checks raise for input a user can fix
USER_ERRORS = (KeyError, FileNotFoundError, ValueError, TypeError)


def exit_on_user_error(check: Callable[[], Any]) -> Any:
    """Run ``check()``; on a :data:`USER_ERRORS` exception print ``error: <message>`` to stderr
    and exit with code 2 (no traceback: the message names the key / file / value)."""
    try:
        return check()
    except USER_ERRORS as exc:
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
    share_cpu_threads(comm.get_local_size())
    return main(args)


def launch_tool(
    main: Callable[[Any], Any], args: Any, *, preflight: Optional[Callable[[Any], Any]] = None
) -> None:
    """``preflight(args)`` (bad input -> one line, exit 2), then ``main(args)`` on every process.

    Args:
        main: the tool's per-process entry point.
        args: parsed detectron2 ``default_argument_parser`` arguments.
        preflight: checks that need no process group (config keys and types, datasets).
    """
    if preflight is not None:
        exit_on_user_error(lambda: preflight(args))
    if join_torchrun_process_group():
        main(args)  # torchrun started the processes (it also sets OMP_NUM_THREADS=1)
        return
    launch(
        functools.partial(_run_process, main),
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
