"""Process hygiene of the training tools: ``kill -9`` of a run's parent (detectron2's launch with
``--num-gpus 2``, or torchrun) takes its rank processes, DataLoader workers and the
multiprocessing resource tracker with it, and no checkpoint is written afterwards; one output
folder takes one live run (``<output_dir>/.run.lock``): a second run there is refused with one line
and exit code 2, a stale lock is replaced, and the lock goes away when the run ends (normally,
with an exception, on SIGTERM)."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import runpy
import signal
import socket
import subprocess
import sys
import time
import uuid
from typing import Any, Dict, List

import pytest
from detectron2.data import DatasetCatalog

import convmae_det.data  # noqa: F401
from convmae_det.data.datasets.toy_coco import register_toy_coco
from convmae_det.engine import launcher, run_lock
from convmae_det.engine.launcher import die_with_parent, launch_tool
from convmae_det.engine.run_lock import (
    LOCK_NAME,
    OutputDirInUse,
    acquire_run_lock,
    process_start_ticks,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools/lazyconfig_train_net.py")
CONFIG = os.path.join(ROOT, "configs/toy/mask_rcnn_convvitdet_toy.py")
OPTS = [
    "--config-file", CONFIG,
    "dataloader.train.dataset.names=toy_coco_mini",
    "dataloader.test.dataset.names=toy_coco_mini",
    "dataloader.train.total_batch_size=2",
    "dataloader.train.num_workers=1",  # a DataLoader worker in each rank
    "train.log_period=1",
    "train.eval_period=0",
]  # fmt: skip
# long enough to be still training when killed; a checkpoint every 2 iterations, all kept
LONG = [
    "train.max_iter=100000",
    "train.checkpointer.period=2",
    "train.checkpointer.max_to_keep=1000",
]
MARKER = "CONVMAE_PROCESS_TEST_RUN"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("d2data"))
    register_toy_coco(["toy_coco_mini"], root=os.path.join(root, "toy_coco"))
    DatasetCatalog.get("toy_coco_mini")  # generate the images once, before any subprocess
    yield root
    register_toy_coco(["toy_coco_mini"])


def _env(data_root: str, marker: str = "") -> Dict[str, str]:
    env = {**os.environ, "DETECTRON2_DATASETS": data_root, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": ROOT, MARKER: marker}  # fmt: skip
    env.pop("TORCHELASTIC_RUN_ID", None)
    return env


def _tool_cmd(out: str, *extra: str) -> List[str]:
    return [sys.executable, TOOL, *extra, *OPTS, f"train.output_dir={out}"]


def _marked_processes(marker: str) -> Dict[int, str]:
    """Live processes (not zombies) whose environment carries ``MARKER=marker``: every process a
    run started inherits it (rank processes, DataLoader workers, the resource tracker)."""
    found = {}
    needle = f"{MARKER}={marker}".encode()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                environ = f.read().split(b"\0")
            with open(f"/proc/{name}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or not ours
            continue
        if needle in environ and state not in ("Z", "X"):
            found[int(name)] = cmdline
    return found


def _kill_marked(marker: str) -> Dict[int, str]:
    """SIGKILL what is left of a run (so a failing test leaves nothing running); returns it."""
    alive = _marked_processes(marker)
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return alive


def _checkpoints(out: str) -> Dict[str, float]:
    try:
        names = [n for n in os.listdir(out) if n.startswith("model_") and n.endswith(".pth")]
    except FileNotFoundError:
        return {}
    return {n: os.stat(os.path.join(out, n)).st_mtime for n in names}


def _popen(cmd: List[str], env: Dict[str, str], log: str) -> subprocess.Popen:
    with open(log, "w") as f:  # a file, not a pipe nobody reads while the run goes on
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=f)


def _fail(proc: subprocess.Popen, log: str, what: str) -> None:
    proc.kill()
    proc.wait()
    pytest.fail(f"{what} (exit {proc.returncode}):\n{open(log).read()[-3000:]}")


def _wait_for_checkpoint(proc: subprocess.Popen, out: str, log: str, timeout: float = 300):
    deadline = time.time() + timeout
    while not _checkpoints(out):
        if proc.poll() is not None or time.time() > deadline:
            _fail(proc, log, "no checkpoint written")
        time.sleep(0.1)


def _kill_parent_and_check_everything_stops(proc: subprocess.Popen, out: str, marker: str):
    """SIGKILL the run's parent; within a few seconds no process of the run may be alive, and no
    checkpoint may be written (or rewritten) in the 3 s after that."""
    before_kill = _marked_processes(marker)
    assert len(before_kill) >= 3, before_kill  # parent + 2 ranks (+ resource tracker, workers)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 8
    while _marked_processes(marker) and time.time() < deadline:
        time.sleep(0.2)
    alive = _kill_marked(marker)
    assert not alive, f"still running after the parent was killed: {alive} (of {before_kill})"
    files = _checkpoints(out)
    time.sleep(3)
    assert _checkpoints(out) == files, "a checkpoint was written after the kill"


def _in_use_line(out: str, pid: int) -> str:
    return (
        f"error: {out} is in use by another run (pid {pid} on host {socket.gethostname()}, "
        f"started {json.load(open(os.path.join(out, LOCK_NAME)))['started']}); stop it or choose "
        "another OUTPUT_DIR / train.output_dir"
    )


# A tool in miniature: launch_tool with a main that, on every rank, writes a heartbeat file every
# 0.2 s, like a run writing checkpoints.
_MINI_TOOL = """
import os, sys, time
from convmae_det.engine.launcher import launch_tool
from detectron2.engine import default_argument_parser
from detectron2.utils import comm

def main(args):
    while True:
        with open(os.path.join(os.environ["OUT"], f"beat{comm.get_rank()}"), "w") as f:
            f.write(str(time.time()))
        time.sleep(0.2)

if __name__ == "__main__":
    launch_tool(main, default_argument_parser().parse_args(), output_dir=lambda a: os.environ["OUT"])
"""


def _start_mini_tool(tmp_path, marker: str, torchrun: bool = False, processes: int = 2):
    out = str(tmp_path / "out")
    script = tmp_path / "mini_tool.py"
    script.write_text(_MINI_TOOL)
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               "2", str(script)]  # fmt: skip
    else:
        cmd = [sys.executable, str(script), "--num-gpus", str(processes), "--dist-url", "auto"]
    log = str(tmp_path / "stderr.txt")
    return _popen(cmd, {**_env("", marker), "OUT": out}, log), out, log


def _beats(out: str, ranks: int = 2) -> Dict[int, float]:
    found = {}
    for rank in range(ranks):
        try:
            found[rank] = os.stat(os.path.join(out, f"beat{rank}")).st_mtime
        except FileNotFoundError:
            pass
    return found


def _wait_for_beats(proc: subprocess.Popen, out: str, log: str, ranks: int = 2) -> None:
    deadline = time.time() + 180
    while len(_beats(out, ranks)) < ranks:
        if proc.poll() is not None or time.time() > deadline:
            _fail(proc, log, "the ranks never started")
        time.sleep(0.1)


def _stop(proc: subprocess.Popen, marker: str) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    _kill_marked(marker)


# --------------------------------------------------------------- kill -9 of the parent: all stop
def test_kill9_of_launch_parent_stops_ranks_loader_workers_and_tracker_and_holds_the_folder(
    tmp_path, data_root
):
    out = str(tmp_path / "launch")
    marker = uuid.uuid4().hex
    cmd = _tool_cmd(out, "--num-gpus", "2", "--dist-url", "auto") + LONG
    log = str(tmp_path / "stderr.txt")
    proc = _popen(cmd, _env(data_root, marker), log)
    try:
        _wait_for_checkpoint(proc, out, log)
        assert json.load(open(os.path.join(out, LOCK_NAME)))["pid"] == proc.pid
        processes = _marked_processes(marker).values()
        assert sum("resource_tracker" in c for c in processes) == 1, processes
        assert sum("spawn_main" in c for c in processes) == 4, processes  # 2 ranks, 2 workers
        _kill_parent_and_check_everything_stops(proc, out, marker)
    finally:
        _stop(proc, marker)
    # the lock left behind by the killed run is stale: the next run takes it over
    acquire_run_lock(out).release()


def test_kill9_of_launch_parent_while_ranks_start_leaves_no_orphan(tmp_path):
    """The parent killed while its rank processes still import (before torch, or we, set their
    parent-death signal): they end as soon as they run the launcher's code, before any work."""
    marker = uuid.uuid4().hex
    proc, out, _ = _start_mini_tool(tmp_path, marker)
    try:
        deadline = time.time() + 120
        ranks: List[str] = []
        while time.time() < deadline and proc.poll() is None and len(ranks) < 2:
            ranks = [c for c in _marked_processes(marker).values() if "spawn_main" in c]
            time.sleep(0.02)
        assert proc.poll() is None and len(ranks) == 2, "the rank processes never started"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 90  # their imports are slow on busy cores
        while _marked_processes(marker) and time.time() < deadline:
            time.sleep(0.2)
        assert not _kill_marked(marker), "orphaned rank processes"
        assert not _beats(out), "an orphaned rank went to work"
    finally:
        _stop(proc, marker)


def test_kill9_of_torchrun_stops_its_workers(tmp_path):
    marker = uuid.uuid4().hex
    proc, out, log = _start_mini_tool(tmp_path, marker, torchrun=True)
    try:
        _wait_for_beats(proc, out, log)
        holder = json.load(open(os.path.join(out, LOCK_NAME)))
        assert holder["pid"] != proc.pid  # under torchrun rank 0 holds the folder
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 10
        while _marked_processes(marker) and time.time() < deadline:
            time.sleep(0.1)
        assert not _kill_marked(marker), "torchrun's workers outlived it"
        beats = _beats(out)
        time.sleep(1)
        assert _beats(out) == beats
    finally:
        _stop(proc, marker)


def test_sigterm_ends_a_run_by_sigterm_without_leaving_its_lock(tmp_path):
    """One process (cheap; the launcher's ranks are stopped by ``_stop_processes``, tested
    below): the handler unwinds the run, the lock goes, the process still dies by SIGTERM."""
    marker = uuid.uuid4().hex
    proc, out, log = _start_mini_tool(tmp_path, marker, processes=1)
    try:
        _wait_for_beats(proc, out, log, ranks=1)
        assert json.load(open(os.path.join(out, LOCK_NAME)))["pid"] == proc.pid
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGTERM, open(log).read()[-3000:]
        assert not os.path.exists(os.path.join(out, LOCK_NAME))
    finally:
        _stop(proc, marker)


def _ignore_sigterm_and_sleep() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(60)


def test_launcher_stops_its_processes_sigterm_first_then_sigkill():
    fork = multiprocessing.get_context("fork")  # cheap children of this process
    polite = fork.Process(target=time.sleep, args=(60,))
    stubborn = fork.Process(target=_ignore_sigterm_and_sleep)
    done = fork.Process(target=time.sleep, args=(0,))
    for p in (polite, stubborn, done):
        p.start()
    done.join()
    time.sleep(0.5)  # the stubborn one ignores SIGTERM by now
    start = time.time()
    launcher._stop_processes([polite, stubborn, done], grace_s=1.0)
    assert time.time() - start < 10
    assert polite.exitcode == -signal.SIGTERM and stubborn.exitcode == -signal.SIGKILL
    assert done.exitcode == 0


# ------------------------------------------------------------- the lock: refused, stale, released
@pytest.mark.parametrize(
    "tool, args",
    [
        ("lazyconfig_train_net.py", ["--config-file", CONFIG, "train.output_dir={out}"]),
        ("plain_train_net.py", ["--config-file", "configs/ADE20K/upernet_convmae_toy.yaml",
                                "OUTPUT_DIR", "{out}"]),
        ("pretrain.py", ["--config-file", "configs/pretrain/fastconvmae_toy.py",
                         "--output-dir", "{out}"]),
    ],
    ids=["lazyconfig", "plain", "pretrain"],
)  # fmt: skip
def test_every_tool_refuses_a_folder_another_run_holds_with_one_line(
    tmp_path, data_root, monkeypatch, capsys, tool, args
):
    """The tool run in this process (cheap: nothing to import) while this process holds the
    folder through another descriptor, as another run would."""
    out = str(tmp_path / "held")
    path = os.path.join(ROOT, "tools", tool)
    monkeypatch.setattr(sys, "argv", [path] + [a.replace("{out}", out) for a in args])
    monkeypatch.chdir(ROOT)
    with acquire_run_lock(out):
        with pytest.raises(SystemExit) as info:
            runpy.run_path(path, run_name="__main__")
        assert info.value.code == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert errors == [_in_use_line(out, os.getpid())] and "Traceback" not in err
    assert os.listdir(out) == []  # nothing written


def _args(**overrides: Any) -> argparse.Namespace:
    base = dict(num_gpus=1, num_machines=1, machine_rank=0, dist_url=None, eval_only=False)
    return argparse.Namespace(**{**base, **overrides})


@pytest.fixture
def in_process(monkeypatch):
    """launch_tool in this process (one process, no children) without leaving its DataLoader
    wrapper behind."""
    import torch.utils.data._utils.worker as loader_worker

    monkeypatch.setattr(loader_worker, "_worker_loop", loader_worker._worker_loop)
    monkeypatch.setattr(launcher, "_ORIGINAL_WORKER_LOOP", None)
    monkeypatch.setenv("CONVMAE_DET_LOADER_PARENT_PID", "")  # restored (unset) afterwards


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _write_lock(folder, **record) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(str(folder), LOCK_NAME)
    base = {"pid": _dead_pid(), "host": socket.gethostname(), "started": "2024-01-02T03:04:05+00:00",
            "command": "python tools/lazyconfig_train_net.py", "boot_id": run_lock._boot_id(),
            "proc_start_ticks": 1}  # fmt: skip
    with open(path, "w") as f:
        json.dump({**base, **record}, f)
    return path


def test_stale_lock_is_replaced_the_run_proceeds_and_removes_it_at_the_end(
    tmp_path, in_process, caplog
):
    out = str(tmp_path / "stale")
    path = _write_lock(out)
    pid = json.load(open(path))["pid"]
    seen = []

    def main(args):
        seen.append(json.load(open(path)))
        return "done"

    with caplog.at_level("WARNING"):
        launch_tool(main, _args(), output_dir=lambda args: out)
    assert seen and seen[0]["pid"] == os.getpid()  # held while main ran
    stale = [r.getMessage() for r in caplog.records if "stale lock" in r.getMessage()]
    assert len(stale) == 1 and f"pid {pid} " in stale[0] and "no longer running" in stale[0]
    assert not os.path.exists(path)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt], ids=["exception", "ctrl-c"])
def test_lock_is_removed_after_a_run_that_failed_with_an_exception(tmp_path, in_process, error):
    out = str(tmp_path / "failed")

    def main(args):
        assert os.path.isfile(os.path.join(out, LOCK_NAME))
        raise error("failing on purpose")

    with pytest.raises(error, match="failing on purpose"):
        launch_tool(main, _args(), output_dir=lambda args: out)
    assert os.path.isdir(out) and not os.path.exists(os.path.join(out, LOCK_NAME))


def test_sigterm_unwinds_the_run_and_removes_the_lock(tmp_path, in_process):
    out = str(tmp_path / "term")
    with pytest.raises(launcher._Stopped):
        with launcher.hold_output_dir(out):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises in this thread at once
    assert not os.path.exists(os.path.join(out, LOCK_NAME))
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_eval_only_runs_take_no_lock(tmp_path, in_process):
    out = str(tmp_path / "eval")
    with acquire_run_lock(out):  # a training holds the folder: evaluating its checkpoints is fine
        launch_tool(lambda args: None, _args(eval_only=True), output_dir=lambda args: out)


# ---------------------------------------------------------------- the lock itself, in-process
def test_a_held_lock_refuses_a_second_taker_naming_the_holder(tmp_path):
    with acquire_run_lock(str(tmp_path)) as lock:
        with pytest.raises(OutputDirInUse) as info:
            acquire_run_lock(str(tmp_path))
        host, started = socket.gethostname(), lock.record["started"]
        assert str(info.value) == (
            f"{tmp_path} is in use by another run (pid {os.getpid()} on host {host}, started "
            f"{started}); stop it or choose another OUTPUT_DIR / train.output_dir"
        )
        assert json.load(open(lock.path))["command"]
    assert not os.path.exists(tmp_path / LOCK_NAME)
    acquire_run_lock(str(tmp_path)).release()  # free again


def test_lock_of_a_reused_pid_is_stale_and_of_a_running_holder_is_not(tmp_path, caplog):
    ticks = process_start_ticks(os.getpid())
    assert ticks is not None
    _write_lock(tmp_path, pid=os.getpid(), proc_start_ticks=ticks + 1)  # pid reused since
    with caplog.at_level("WARNING"):
        acquire_run_lock(str(tmp_path)).release()
    assert "now belongs to another process" in caplog.text
    # a record of a process that runs (same start time) without the file lock: refused
    _write_lock(tmp_path, pid=os.getppid(), proc_start_ticks=process_start_ticks(os.getppid()))
    with pytest.raises(OutputDirInUse, match=f"pid {os.getppid()} on host"):
        acquire_run_lock(str(tmp_path))
    # written before the machine restarted: stale whatever the pid is now
    _write_lock(tmp_path, pid=os.getppid(), boot_id="another-boot")
    acquire_run_lock(str(tmp_path)).release()
    # an unreadable leftover (nobody holds the file lock): stale
    (tmp_path / LOCK_NAME).write_text('{"pid": 12')
    with caplog.at_level("WARNING"):
        acquire_run_lock(str(tmp_path)).release()
    assert "Replacing unreadable stale lock" in caplog.text


def test_lock_from_another_host_is_refused_with_how_to_remove_it(tmp_path):
    path = _write_lock(tmp_path, host="elsewhere", pid=1234)
    with pytest.raises(OutputDirInUse) as info:
        acquire_run_lock(str(tmp_path))
    message = str(info.value)
    assert "pid 1234 on host elsewhere" in message and f"delete {path}" in message
    assert os.path.isfile(path)


def test_process_start_ticks_tell_processes_apart():
    assert process_start_ticks(os.getpid()) == process_start_ticks(os.getpid())
    assert process_start_ticks(_dead_pid()) is None
    assert process_start_ticks(os.getppid()) <= process_start_ticks(os.getpid())


def _forked(target) -> int:
    pid = os.fork()
    if pid == 0:  # the child: never back into pytest
        try:
            target()
        finally:
            os._exit(0)
    return pid


def _running(pid: int, start_ticks: int) -> bool:
    """Process ``pid`` (started at ``start_ticks``) still runs: not gone, not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X") and process_start_ticks(pid) == start_ticks


@pytest.mark.parametrize("use_prctl", [True, False], ids=["prctl", "watchdog"])
def test_die_with_parent(use_prctl):
    """A process that called ``die_with_parent`` goes when its parent is killed (by the parent
    death signal, or by the thread that watches the parent where prctl is not used); one whose
    parent is already gone goes in the call."""
    read, write = os.pipe()

    def grandchild():
        how = die_with_parent(os.getppid(), use_prctl=use_prctl, interval_s=0.05)
        os.write(write, f"{os.getpid()} {how}".encode())
        time.sleep(60)

    def middle():
        _forked(grandchild)
        time.sleep(60)

    middle_pid = _forked(middle)
    os.close(write)
    pid, how = os.read(read, 100).decode().split()
    os.close(read)
    pid, start = int(pid), process_start_ticks(int(pid))
    assert how == ("prctl" if use_prctl else "watchdog")
    os.kill(middle_pid, signal.SIGKILL)
    os.waitpid(middle_pid, 0)
    deadline = time.time() + 5
    while _running(pid, start) and time.time() < deadline:
        time.sleep(0.02)
    if _running(pid, start):
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the process outlived its parent")

    def orphan():  # its "parent" is not its parent: as if the parent died before the call
        die_with_parent(os.getppid() + 1, use_prctl=use_prctl)
        time.sleep(60)

    child = _forked(orphan)
    _, status = os.waitpid(child, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
