"""Training across machines, simulated on one host: two launches of one CPU process each (gloo)
that meet at a TCP address, as two nodes do.

* detectron2's flags, shared by the training tools through ``convmae_det.engine.launcher``:
  ``--num-gpus 1 --num-machines 2 --machine-rank R --dist-url tcp://127.0.0.1:PORT``;
* torchrun's static rendezvous: ``--nnodes 2 --node-rank R --master-addr --master-port``.

Both ranks must exit 0, the log of rank 0 (``log.txt``) and of rank 1 (``log.txt.rank1``) must
report a world of 2, and the run must end with a checkpoint written once. The recipe is in
docs/GETTING_STARTED.md ("Training on several machines").
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Dict, List

import pytest

from convmae_det.data.datasets.toy_coco import register_toy_coco

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "lazyconfig_train_net.py")
TOY = os.path.join(ROOT, "configs", "toy", "mask_rcnn_convvitdet_toy.py")
# 2 iterations of 1 image per process on the 16-image toy split; the final evaluation (which
# EvalHook always runs) reads the same 16 images, 8 per process
SHORT = [
    "dataloader.train.dataset.names=toy_coco_mini",
    "dataloader.test.dataset.names=toy_coco_mini",
    "dataloader.train.total_batch_size=2",
    "train.max_iter=2",
    "train.log_period=1",
]
TIMEOUT_S = 600


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """The 16-image toy split, generated once in a temporary ``DETECTRON2_DATASETS``."""
    from detectron2.data import DatasetCatalog

    root = str(tmp_path_factory.mktemp("d2data"))
    register_toy_coco(["toy_coco_mini"], root=os.path.join(root, "toy_coco"))
    DatasetCatalog.get("toy_coco_mini")
    yield root
    register_toy_coco(["toy_coco_mini"])  # back to the default root


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(data_root: str) -> Dict[str, str]:
    env = {**os.environ, "DETECTRON2_DATASETS": data_root, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = ROOT
    return env


def run_nodes(commands: List[List[str]], env: Dict[str, str], logs: str) -> List[int]:
    """Start every command (one per simulated node, in its own process group), wait for all;
    on timeout kill the groups this test started. Returns the exit codes."""
    os.makedirs(logs, exist_ok=True)
    procs = []
    for rank, command in enumerate(commands):
        out = open(os.path.join(logs, f"node{rank}.txt"), "w")
        proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        procs.append((proc, out))
    deadline = time.monotonic() + TIMEOUT_S
    codes = []
    try:
        for proc, _ in procs:
            codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
    finally:
        for proc, out in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            out.close()
    return codes


def _tail(logs: str) -> str:
    text = []
    for name in sorted(os.listdir(logs)):
        with open(os.path.join(logs, name)) as f:
            text.append(f"--- {name}\n" + f.read()[-2500:])
    return "\n".join(text)


@pytest.mark.parametrize("starter", ["launch", "torchrun"])
def test_two_machines_on_one_host_train_together(tmp_path, data_root, starter):
    out = str(tmp_path / "run")
    port = free_port()
    tool_args = ["--config-file", TOY, f"train.output_dir={out}"] + SHORT
    commands = []
    for rank in (0, 1):
        if starter == "launch":
            flags = ["--num-gpus", "1", "--num-machines", "2", "--machine-rank", str(rank)]
            flags += ["--dist-url", f"tcp://127.0.0.1:{port}"]
            commands.append([sys.executable, TOOL] + flags + tool_args)
        else:
            torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
            torchrun += ["--node-rank", str(rank), "--nproc-per-node", "1"]
            torchrun += ["--master-addr", "127.0.0.1", "--master-port", str(port)]
            commands.append(torchrun + [TOOL] + tool_args)
    logs = str(tmp_path / "console")
    codes = run_nodes(commands, _env(data_root), logs)
    assert codes == [0, 0], _tail(logs)

    with open(os.path.join(out, "log.txt")) as f:
        log0 = f.read()
    with open(os.path.join(out, "log.txt.rank1")) as f:
        log1 = f.read()
    assert "Rank of current process: 0. World size: 2" in log0
    assert "Rank of current process: 1. World size: 2" in log1
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = [json.loads(line) for line in f if line.strip()]
    assert [m["iteration"] for m in metrics if "total_loss" in m] == [0, 1]
    assert os.path.isfile(os.path.join(out, "model_final.pth"))
    with open(os.path.join(out, "final_metrics.json")) as f:  # evaluation gathered over 2 ranks
        assert {"bbox", "segm"} <= set(json.load(f))
