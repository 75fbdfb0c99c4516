"""Exact resume of tools/pretrain.py: a run killed with SIGKILL inside an epoch (during training, or
in the middle of writing a checkpoint) and continued with --resume ends with exactly the weights
and AdamW state of the uninterrupted run; resume points are pruned to the newest N; a stale
``last_checkpoint`` is repaired; FastConvMAE (complementary masks, MoR EMA target) resumes exactly.

Toy setup: 12 images of 40 px, 32 px crops, 4 images per step -> 3 iterations per epoch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from convmae_det.engine.pretrain_checkpoint import (
    checkpoint_rank,
    find_last_checkpoint,
    save_pretrain_checkpoint,
)
from convmae_det.engine.pretrain_data import generate_toy_images
from convmae_det.engine.pretrain_demo import toy_pretrain_config
from convmae_det.engine.pretrain_loop import run_pretraining
from convmae_det.engine.trainer import ConvMAETrainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "pretrain.py")
CONFIG = os.path.join(ROOT, "configs", "pretrain", "convmae_toy.py")
OPTS = [
    "model.img_size=32",
    "train.img_size=32",
    "train.batch_size=4",
    "train.epochs=3",
    "train.warmup_epochs=1",
    "train.log_period=1",
    "train.num_workers=2",  # augmentation runs in worker processes
    "train.checkpoint_period=10",  # epoch checkpoint only at the end: checkpoint-0002.pth
    # resume points after global iterations 2, 4, 6, 8: (epoch, iters done) = (0, 2), (1, 1),
    # (1, 3), (2, 2); the newest 2 are kept
    "train.checkpoint_period_iters=2",
    "train.keep_iter_checkpoints=2",
    "train.seed=5",
]
FINAL = "checkpoint-0002.pth"

# Runs the tool in-process with a pause before every optimizer step (so a kill from outside lands
# inside an iteration) or with torch.save patched to die (SIGKILL) halfway through writing the
# checkpoint of (epoch, iteration) KILL_SAVE_AT: the bytes written so far stay on disk.
_WRAPPER = """
import io as _io, os, runpy, signal, sys, time
import torch
from convmae_det.engine.trainer import ConvMAETrainer
pause = float(os.environ.get("STEP_PAUSE", "0"))
if pause:
    _step = ConvMAETrainer.run_step
    def step(self):
        time.sleep(pause)
        return _step(self)
    ConvMAETrainer.run_step = step
kill_at = os.environ.get("KILL_SAVE_AT")
_save = torch.save
def save(obj, f, *args, **kwargs):
    state = obj.get("train_state") if isinstance(obj, dict) else None
    if kill_at and state and f"{obj['epoch']}:{state['epoch_iter']}" == kill_at:
        buf = _io.BytesIO()
        _save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return _save(obj, f, *args, **kwargs)
torch.save = save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("images"))
    generate_toy_images(path, num_images=12, size=40)
    return path


def _cmd(image_dir, out, flags=(), overrides=(), wrapped=False):
    prefix = ["-c", _WRAPPER] if wrapped else []
    args = ["--config-file", CONFIG, "--data-path", image_dir, "--output-dir", out, *flags]
    return [sys.executable, *prefix, TOOL, *args, *OPTS, *overrides]


def _env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **extra}


def _run(image_dir, out, flags=(), overrides=(), wrapped=False, **env):
    cmd = _cmd(image_dir, out, flags, overrides, wrapped)
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env(**env),
                          timeout=600)  # fmt: skip


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"


def _assert_same_training_state(final, reference):
    assert final["epoch"] == reference["epoch"]
    assert final["train_state"] == reference["train_state"]
    _assert_same_tensors(final["model"], reference["model"])
    opt_a, opt_b = final["optimizer"], reference["optimizer"]
    assert opt_a["param_groups"] == opt_b["param_groups"]  # lr at the same schedule position
    assert opt_a["state"].keys() == opt_b["state"].keys() and len(opt_a["state"]) > 0
    for i in opt_a["state"]:
        _assert_same_tensors(opt_a["state"][i], opt_b["state"][i])  # moments and step counts
    assert final["scaler"] == reference["scaler"]


def _checkpoints(out):
    return sorted(n for n in os.listdir(out) if checkpoint_rank(n) is not None)


@pytest.fixture(scope="module")
def uninterrupted(image_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("uninterrupted"))
    proc = _run(image_dir, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_kill9_inside_an_epoch_then_resume_gives_the_uninterrupted_weights_and_optimizer(
    tmp_path, image_dir, uninterrupted
):
    out = str(tmp_path / "killed")
    proc = subprocess.Popen(_cmd(image_dir, out, wrapped=True), cwd=ROOT,
                            env=_env(STEP_PAUSE="0.5"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    first = os.path.join(out, "checkpoint-0000-iter000002.pth")
    deadline = time.time() + 300
    while not os.path.isfile(first) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # in the 3rd iteration of epoch 0 (paused before its step)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert _checkpoints(out) == ["checkpoint-0000-iter000002.pth"], "killed too late"

    # another seed on the command line: the run seed comes back from the checkpoint
    resumed = _run(image_dir, out, ["--resume"], ["train.seed=99"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stderr + resumed.stdout
    assert "continuing at epoch 0 iteration 2" in log
    final, reference = _load(os.path.join(out, FINAL)), _load(os.path.join(uninterrupted, FINAL))
    assert final["train_state"]["seed"] == 5
    _assert_same_training_state(final, reference)


def test_kill_during_checkpoint_save_keeps_the_last_complete_one_and_resume_is_exact(
    tmp_path, image_dir, uninterrupted
):
    out = str(tmp_path / "killed_saving")
    proc = _run(image_dir, out, wrapped=True, KILL_SAVE_AT="1:1")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    files = os.listdir(out)
    assert _checkpoints(out) == ["checkpoint-0000-iter000002.pth"]
    assert any(f.startswith(".tmp-") for f in files), files  # the half-written temporary file
    pointer = open(os.path.join(out, "last_checkpoint")).read().strip()
    assert pointer == "checkpoint-0000-iter000002.pth"

    resumed = _run(image_dir, out, ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "continuing at epoch 0 iteration 2" in resumed.stderr + resumed.stdout
    _assert_same_training_state(
        _load(os.path.join(out, FINAL)), _load(os.path.join(uninterrupted, FINAL))
    )


def test_only_the_newest_resume_points_are_kept_and_epoch_checkpoints_stay(uninterrupted):
    assert _checkpoints(uninterrupted) == [
        "checkpoint-0001-iter000003.pth",
        "checkpoint-0002-iter000002.pth",
        FINAL,
    ]
    assert open(os.path.join(uninterrupted, "last_checkpoint")).read().strip() == FINAL
    assert not [f for f in os.listdir(uninterrupted) if f.startswith(".tmp-")]
    point = _load(os.path.join(uninterrupted, "checkpoint-0002-iter000002.pth"))
    # official keys for other code (epoch = the epoch in progress) plus our resume state
    assert point["epoch"] == 2 and isinstance(point["args"], dict)
    assert point["train_state"]["epoch_iter"] == 2
    assert point["train_state"]["iters_per_epoch"] == 3


def test_stale_or_missing_last_checkpoint_resumes_from_the_newest_complete_file(tmp_path):
    model = torch.nn.Linear(2, 2)
    for name in ("checkpoint-0000-iter000002.pth", "checkpoint-0001.pth"):
        save_pretrain_checkpoint(str(tmp_path / name), model=model, optimizer=None, epoch=0)
    (tmp_path / "last_checkpoint").write_text("checkpoint-0000-iter000002.pth")  # stale:
    os.utime(tmp_path / "last_checkpoint", (1e9, 1e9))  # written before checkpoint-0001.pth
    (tmp_path / "checkpoint-0003-iter000001.pth").write_bytes(b"")  # empty: never a candidate
    (tmp_path / ".tmp-abc.pth").write_bytes(b"half")  # temporary: never a candidate
    assert find_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-0001.pth")
    assert (tmp_path / "last_checkpoint").read_text() == "checkpoint-0000-iter000002.pth"
    find_last_checkpoint(str(tmp_path), repair=True)
    assert (tmp_path / "last_checkpoint").read_text() == "checkpoint-0001.pth"
    os.remove(tmp_path / "last_checkpoint")
    assert find_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-0001.pth")
    assert find_last_checkpoint(str(tmp_path / "missing")) is None


class _Crash(RuntimeError):
    pass


@pytest.mark.parametrize("mor", [None, dict(head_depth=1, ema=dict(momentum=0.5))])
def test_fastconvmae_crash_inside_an_epoch_then_resume_is_exact(
    tmp_path, image_dir, monkeypatch, mor
):
    def cfg(out, **kw):
        c = toy_pretrain_config(image_dir, str(tmp_path / out), model_name="fastconvmae_toy",
                                img_size=32, batch_size=4, epochs=2, warmup_epochs=1,
                                log_period=1, checkpoint_period_iters=2, seed=3, **kw)  # fmt: skip
        if mor is not None:
            c["model"]["mor"] = mor
        return c

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = _load(run_pretraining(cfg("full")))
        step, calls = ConvMAETrainer.run_step, []

        def crashing_step(self):
            calls.append(self.iter)
            if len(calls) == 4:  # epoch 1, iteration 0: two after the resume point (0, 2)
                raise _Crash("simulated crash")
            return step(self)

        monkeypatch.setattr(ConvMAETrainer, "run_step", crashing_step)
        with pytest.raises(_Crash):
            run_pretraining(cfg("crashed"))
        monkeypatch.setattr(ConvMAETrainer, "run_step", step)
        final = run_pretraining(cfg("crashed", resume=True))
    finally:
        torch.set_num_threads(threads)
    assert os.path.basename(final) == "checkpoint-0001.pth"
    _assert_same_training_state(_load(final), reference)
    if mor is not None:  # the EMA target is part of the exact state
        assert any(k.startswith("mor.ema.") for k in reference["model"])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.epochs=many", "'train.epochs' expects int"),
        ("train.epoch=3", "unknown config key 'train.epoch'"),
    ],
)
def test_bad_override_is_one_line_and_exit_code_2_before_anything_runs(
    tmp_path, override, expected
):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, TOOL, "--config-file", CONFIG, f"train.output_dir={out}", override],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert expected in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()  # nothing was written


def test_unreadable_image_is_named_or_skipped_and_counted(tmp_path, caplog):
    images = tmp_path / "images"
    generate_toy_images(str(images), num_images=7, size=40, seed=3)
    good = (images / "toy_00000.png").read_bytes()
    (images / "toy_00003.png").write_bytes(good[: len(good) // 3])  # truncated file
    opts = dict(img_size=32, batch_size=4, epochs=2, warmup_epochs=1, seed=1, log_period=1)
    cfg = toy_pretrain_config(str(images), str(tmp_path / "stop"), model_name="convmae_toy", **opts)
    with pytest.raises(Exception, match="toy_00003.png"):
        run_pretraining(cfg)
    cfg = toy_pretrain_config(
        str(images), str(tmp_path / "skip"), model_name="convmae_toy", skip_bad_samples=True, **opts
    )
    with caplog.at_level("WARNING"):
        path = run_pretraining(cfg)  # 7 images / 4 per step -> 1 iteration per epoch, 2 epochs
    assert os.path.isfile(path) and "toy_00003.png" in caplog.text
    runner_state = torch.load(path, map_location="cpu", weights_only=False)["train_state"]
    assert runner_state["loader"]["num_skipped"] >= 1
