"""Exact resume of tools/lazyconfig_train_net.py: a run killed with SIGKILL (during training, or
in the middle of writing a checkpoint) and resumed with --resume ends with exactly the weights of
the uninterrupted run; the loader's batch at iteration k does not depend on where the run began."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog

import convmae_det.data  # noqa: F401
from convmae_det.data.datasets.toy_coco import register_toy_coco
from convmae_det.data.resumable_loader import ResumableTrainLoader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools/lazyconfig_train_net.py")
CONFIG = os.path.join(ROOT, "configs/toy/mask_rcnn_convvitdet_toy.py")
MAX_ITER = 6
OPTS = [
    "--config-file", CONFIG,
    "dataloader.train.dataset.names=toy_coco_mini",
    "dataloader.test.dataset.names=toy_coco_mini",
    "dataloader.train.total_batch_size=2",
    "dataloader.train.num_workers=0",
    "train.log_period=1",
    f"train.max_iter={MAX_ITER}",
    "train.checkpointer.period=2",  # model_0000001, model_0000003, model_0000005, model_final
    "train.seed=3",
    "dataloader.train.seed=-1",  # random: must come back from the checkpoint
]  # fmt: skip

# Runs the tool in-process with torch.save patched to die (SIGKILL) halfway through writing the
# checkpoint of iteration KILL_SAVE_ITER: the bytes written so far stay on disk.
_KILL_DURING_SAVE = """
import os, runpy, signal, sys, io as _io
import torch
_save = torch.save
def save(obj, f, *args, **kwargs):
    if isinstance(obj, dict) and obj.get("iteration") == int(os.environ["KILL_SAVE_ITER"]):
        buf = _io.BytesIO()
        _save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return _save(obj, f, *args, **kwargs)
torch.save = save
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("d2data"))
    register_toy_coco(["toy_coco_mini"], root=os.path.join(root, "toy_coco"))
    DatasetCatalog.get("toy_coco_mini")  # generate the images once
    yield root
    register_toy_coco(["toy_coco_mini"])


def _env(data_root):
    return {**os.environ, "DETECTRON2_DATASETS": data_root, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": ROOT}  # fmt: skip


def _run(args, data_root, out, prefix=(TOOL,), env_extra=None):
    env = {**_env(data_root), **(env_extra or {})}
    cmd = [sys.executable, *prefix] + list(args) + OPTS + [f"train.output_dir={out}"]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def _final_state(out):
    ckpt = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=True)
    return ckpt


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"


@pytest.fixture(scope="module")
def uninterrupted(data_root, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("uninterrupted"))
    proc = _run([], data_root, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _final_state(out)


def test_kill9_during_training_then_resume_gives_the_uninterrupted_weights(
    tmp_path, data_root, uninterrupted
):
    out = str(tmp_path / "killed")
    cmd = [sys.executable, TOOL] + OPTS + [f"train.output_dir={out}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(data_root), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    first = os.path.join(out, "model_0000001.pth")
    deadline = time.time() + 300
    while not os.path.isfile(first) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.isfile(os.path.join(out, "model_final.pth")), "killed too late"

    resumed = _run(["--resume"], data_root, out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stderr + resumed.stdout
    final = _final_state(out)
    assert final["iteration"] == uninterrupted["iteration"] == MAX_ITER - 1
    _assert_same_weights(final["model"], uninterrupted["model"])
    opt_a = final["trainer"]["optimizer"]["state"]
    opt_b = uninterrupted["trainer"]["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys() and len(opt_a) > 0
    for i in opt_a:
        _assert_same_weights(opt_a[i], opt_b[i])  # Adam moments and step counts


def test_kill_during_checkpoint_save_keeps_last_complete_one_and_resume_is_exact(
    tmp_path, data_root, uninterrupted
):
    out = str(tmp_path / "killed_saving")
    proc = _run([], data_root, out, prefix=("-c", _KILL_DURING_SAVE, TOOL),
                env_extra={"KILL_SAVE_ITER": "3"})  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    files = sorted(os.listdir(out))
    assert "model_0000003.pth" not in files and "model_0000001.pth" in files
    assert any(f.startswith(".tmp-") for f in files), files  # the half-written temporary file
    assert open(os.path.join(out, "last_checkpoint")).read().strip() == "model_0000001.pth"

    resumed = _run(["--resume"], data_root, out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stderr + resumed.stdout
    assert "model_0000001.pth at iteration 2" in log
    _assert_same_weights(_final_state(out)["model"], uninterrupted["model"])


class _Images:
    """A fake dataset of 7 records; the mapper draws augmentation numbers from numpy."""

    def __len__(self):
        return 7

    def __getitem__(self, i):
        return {"file_name": f"img{i}.jpg", "i": i}


def _augment(record):
    return (record["i"], float(np.random.rand()), int(torch.randint(1000, (1,))))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_batch_at_iteration_k_is_the_same_when_starting_at_k(num_workers):
    def batches(start, n):
        loader = ResumableTrainLoader(_Images(), mapper=_augment, total_batch_size=3, seed=11,
                                      num_workers=num_workers)  # fmt: skip
        loader.set_start_iter(start)
        it = iter(loader)
        return [next(it) for _ in range(n)]

    full = batches(0, 6)
    assert batches(4, 2) == full[4:6]
    # every image once per epoch (7 images, 18 positions: epochs 0, 1 complete)
    indices = [s[0] for b in full for s in b]
    assert sorted(indices[:7]) == list(range(7)) and sorted(indices[7:14]) == list(range(7))
    assert len({s[1] for b in full for s in b}) == 18  # augmentation differs per position


def test_loader_seed_travels_with_its_state_dict():
    a = ResumableTrainLoader(_Images(), mapper=_augment, total_batch_size=2, seed=-1)
    b = ResumableTrainLoader(_Images(), mapper=_augment, total_batch_size=2, seed=-1)
    b.load_state_dict(a.state_dict())
    assert next(iter(a)) == next(iter(b))


def test_loader_does_not_disturb_the_global_random_stream():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    next(iter(ResumableTrainLoader(_Images(), mapper=_augment, total_batch_size=2, seed=1)))
    assert torch.equal(torch.rand(3), expected)
