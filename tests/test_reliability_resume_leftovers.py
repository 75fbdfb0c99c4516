"""What a crash leaves behind, and ``--resume`` of the three tools: an unreadable newest checkpoint
is skipped (named, with the reason) for the newest readable one, a ``last_checkpoint`` naming a
file outside the output folder is refused, leftover ``.tmp-*`` files of interrupted saves are
removed at the start of a run, metrics rows logged after the resumed checkpoint are dropped, and
pretraining checkpoints are read by the safe reader (a refused file is one line naming it)."""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from detectron2.data import DatasetCatalog
from seg_toy_fixtures import ROOT, TOY_CFG, toy_root  # noqa: F401  (fixture)

import convmae_det.data  # noqa: F401
from convmae_det.checkpoint import CheckpointError, ConvMAECheckpointer
from convmae_det.data.datasets.toy_coco import register_toy_coco
from convmae_det.engine.pretrain_checkpoint import (
    find_last_checkpoint,
    load_pretrain_checkpoint,
    restore_pretraining,
    save_pretrain_checkpoint,
)
from convmae_det.engine.pretrain_data import generate_toy_images
from convmae_det.engine.pretrain_demo import toy_pretrain_config
from convmae_det.engine.pretrain_loop import PretrainRunner, run_pretraining
from convmae_det.engine.resume import (
    checkpoint_problem,
    drop_metrics_after,
    remove_leftover_temp_files,
    resume_newest,
)

DET_TOOL = os.path.join(ROOT, "tools", "lazyconfig_train_net.py")
SEG_TOOL = os.path.join(ROOT, "tools", "plain_train_net.py")
PRETRAIN_TOOL = os.path.join(ROOT, "tools", "pretrain.py")
DET_OPTS = [
    "--config-file", os.path.join(ROOT, "configs/toy/mask_rcnn_convvitdet_toy.py"),
    "dataloader.train.dataset.names=toy_coco_mini",
    "dataloader.test.dataset.names=toy_coco_mini",
    "dataloader.train.total_batch_size=2",
    "dataloader.train.num_workers=0",
    "train.log_period=1",
    "train.max_iter=6",
    "train.checkpointer.period=2",  # model_0000001, model_0000003, model_0000005, model_final
    "train.checkpointer.max_to_keep=10",
    "train.seed=3",
]  # fmt: skip


# ------------------------------------------------------------------------------------ helpers
@contextlib.contextmanager
def _records(name="convmae_det"):
    """Log records (INFO and up) of ``name`` and its children, whatever their propagation."""
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger(name)
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def _warnings(records):
    return [r.getMessage() for r in records if r.levelno >= logging.WARNING]


def _spoil(path, how):
    """What a filesystem crash may leave of a checkpoint file."""
    data = open(path, "rb").read()
    if how == "empty":
        data = b""
    elif how == "truncated":
        data = data[: len(data) // 2]
    elif how == "garbage":
        data = os.urandom(len(data))
    elif how == "zeroed":  # a block of zeros in the middle (the ends, and so the zip index, intact)
        mid = len(data) // 2
        data = data[: mid - 64] + bytes(128) + data[mid + 64 :]
    with open(path, "wb") as f:
        f.write(data)


def _det_checkpointer(out, **kwargs):
    torch.manual_seed(0)
    return ConvMAECheckpointer(nn.Linear(3, 2), str(out), **kwargs)


def _metric_rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _assert_each_iteration_once(path, key, expected):
    values = [row[key] for row in _metric_rows(path) if key in row]
    counts = collections.Counter(values)
    assert sorted(counts) == list(expected), counts
    repeated = {k: n for k, n in counts.items() if n > 1}
    assert not repeated, f"{path}: {key}s logged more than once: {repeated}"


def _temp_files(out):
    return [n for n in os.listdir(out) if n.startswith(".tmp-")]


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ------------------------------------------------- 1. unreadable newest checkpoint (library)
@pytest.mark.parametrize("how", ["empty", "truncated", "garbage", "zeroed"])
def test_resume_skips_an_unreadable_newest_checkpoint_naming_it_and_the_reason(tmp_path, how):
    checkpointer = _det_checkpointer(tmp_path)
    checkpointer.save("model_0000004", iteration=4)
    checkpointer.save("model_0000009", iteration=9)  # last_checkpoint names it
    _spoil(str(tmp_path / "model_0000009.pth"), how)

    fresh = _det_checkpointer(tmp_path)
    with _records() as records:
        state = resume_newest(fresh)
    assert state is not None and state["iteration"] == 4
    skipped = [m for m in _warnings(records) if "model_0000009.pth" in m and "\n" not in m]
    assert len(skipped) >= 1, _warnings(records)
    reason = {"empty": "empty", "truncated": "truncated", "garbage": "not", "zeroed": "corrupt"}
    assert reason[how] in skipped[0], skipped[0]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000004.pth"


def test_resume_with_no_readable_checkpoint_starts_over(tmp_path):
    checkpointer = _det_checkpointer(tmp_path)
    checkpointer.save("model_0000009", iteration=9)
    _spoil(str(tmp_path / "model_0000009.pth"), "truncated")
    with _records() as records:
        assert resume_newest(_det_checkpointer(tmp_path)) is None
    assert any("model_0000009.pth" in m for m in _warnings(records))


def test_readability_check_accepts_torch_files_without_checksums_and_refuses_other_zips(tmp_path):
    from torch.utils.serialization import config

    good = str(tmp_path / "good.pth")
    torch.save({"model": {"w": torch.ones(3)}, "iteration": 1}, good)
    assert checkpoint_problem(good) is None
    previous = config.save.compute_crc32
    config.save.compute_crc32 = False  # torch can write zip entries without a CRC-32
    try:
        torch.save({"model": {"w": torch.ones(3)}}, str(tmp_path / "no_crc.pth"))
    finally:
        config.save.compute_crc32 = previous
    assert checkpoint_problem(str(tmp_path / "no_crc.pth")) is None
    import zipfile

    with zipfile.ZipFile(str(tmp_path / "other.pth"), "w") as z:
        z.writestr("readme.txt", "not a checkpoint")
    assert "not a torch.save" in checkpoint_problem(str(tmp_path / "other.pth"))
    assert "no such file" in checkpoint_problem(str(tmp_path / "missing.pth"))


def test_pretraining_resume_skips_an_unreadable_newest_checkpoint(tmp_path):
    model = nn.Linear(2, 2)
    for name in ("checkpoint-0000-iter000002.pth", "checkpoint-0001.pth"):
        save_pretrain_checkpoint(str(tmp_path / name), model=model, optimizer=None, epoch=0)
    _spoil(str(tmp_path / "checkpoint-0001.pth"), "truncated")
    with _records() as records:
        found = find_last_checkpoint(str(tmp_path), repair=True)
    assert found == str(tmp_path / "checkpoint-0000-iter000002.pth")
    assert any("checkpoint-0001.pth" in m and "truncated" in m for m in _warnings(records))
    assert (tmp_path / "last_checkpoint").read_text() == "checkpoint-0000-iter000002.pth"


# ------------------------------------------------- 2. last_checkpoint outside the output folder
@pytest.mark.parametrize("where", ["absolute", "parent", "symlink"])
def test_last_checkpoint_naming_a_file_outside_the_folder_is_refused_and_not_loaded(
    tmp_path, where
):
    out = tmp_path / "run"
    outside = tmp_path / "elsewhere.pth"
    stranger = nn.Linear(3, 2)
    nn.init.constant_(stranger.weight, 7.0)
    torch.save({"model": stranger.state_dict(), "iteration": 99}, str(outside))
    checkpointer = _det_checkpointer(out)
    checkpointer.save("model_0000004", iteration=4)
    name = {"absolute": str(outside), "parent": "../elsewhere.pth", "symlink": "model_0000099.pth"}
    if where == "symlink":
        os.symlink(str(outside), str(out / "model_0000099.pth"))
    (out / "last_checkpoint").write_text(name[where])

    fresh = _det_checkpointer(out)
    before = fresh.model.weight.detach().clone()
    with pytest.raises(CheckpointError, match="outside") as info:
        resume_newest(fresh)
    assert "\n" not in str(info.value) and "last_checkpoint" in str(info.value)
    assert torch.equal(fresh.model.weight, before)  # nothing loaded
    pretrain_out = tmp_path / "pretrain"
    pretrain_out.mkdir()
    if where == "symlink":
        os.symlink(str(outside), str(pretrain_out / "checkpoint-0099.pth"))
    name["symlink"] = "checkpoint-0099.pth"
    (pretrain_out / "last_checkpoint").write_text(name[where])
    with pytest.raises(CheckpointError, match="outside"):
        find_last_checkpoint(str(pretrain_out))


def test_a_link_out_of_the_folder_found_by_the_scan_is_skipped(tmp_path):
    out = tmp_path / "run"
    checkpointer = _det_checkpointer(out)
    checkpointer.save("model_0000004", iteration=4)
    torch.save({"model": {}, "iteration": 99}, str(tmp_path / "elsewhere.pth"))
    os.symlink(str(tmp_path / "elsewhere.pth"), str(out / "model_0000099.pth"))
    os.remove(out / "last_checkpoint")
    with _records() as records:
        state = resume_newest(_det_checkpointer(out))
    assert state["iteration"] == 4
    assert any("model_0000099.pth" in m and "outside" in m for m in _warnings(records))


# ----------------------------------------------------------- 3. leftover temporary files
def test_leftover_temporary_files_are_removed_counted_and_sized(tmp_path):
    (tmp_path / ".tmp-abcd_123.pth").write_bytes(b"x" * 1000)  # a killed checkpoint save
    (tmp_path / ".tmp-k2j4h5g6").write_bytes(b"model_0000003.pth")  # a killed pointer update
    (tmp_path / ".tmp-dir").mkdir()  # not a file of ours
    (tmp_path / "notes.tmp-1").write_bytes(b"keep")
    (tmp_path / "model_0000001.pth").write_bytes(b"keep")
    (tmp_path / "target").write_bytes(b"keep")
    os.symlink(str(tmp_path / "target"), str(tmp_path / ".tmp-link0000"))
    with _records() as records:
        count, size = remove_leftover_temp_files(str(tmp_path))
    assert (count, size) == (2, 1017)
    assert sorted(os.listdir(tmp_path)) == sorted(
        [".tmp-dir", "notes.tmp-1", "model_0000001.pth", "target", ".tmp-link0000"]
    )
    message = " ".join(r.getMessage() for r in records)
    assert "2" in message and ".tmp-abcd_123.pth" in message
    assert remove_leftover_temp_files(str(tmp_path / "missing")) == (0, 0)


# ---------------------------------------------------------------- 4. metrics after a resume
def test_metrics_rows_past_the_resumed_iteration_are_dropped_atomically(tmp_path):
    path = tmp_path / "metrics.json"
    rows = [{"iteration": i, "loss": 1.0 / (i + 1)} for i in range(8)]
    rows.insert(3, {"note": "no iteration key"})
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"iteration": 8, "lo'  # killed here
    path.write_text(text)
    with _records() as records:
        assert drop_metrics_after(str(path), 4) == 4  # 3 rows past 4 + the cut line
    kept = _metric_rows(str(path))
    assert [r.get("iteration") for r in kept] == [0, 1, 2, None, 3, 4]
    assert any("metrics.json" in r.getMessage() for r in records)
    assert not _temp_files(tmp_path)
    assert drop_metrics_after(str(path), 4) == 0  # nothing more to drop: file untouched
    assert drop_metrics_after(str(tmp_path / "missing.json"), 4) == 0
    steps = tmp_path / "metrics.jsonl"
    steps.write_text("".join(json.dumps({"step": s, "epoch": 0}) + "\n" for s in (2, 4, 6)))
    assert drop_metrics_after(str(steps), 4, key="step") == 1
    assert [r["step"] for r in _metric_rows(str(steps))] == [2, 4]


# ---------------------------------------------------------- 5. pretraining checkpoint reading
def test_pretraining_loads_go_through_the_safe_reader_and_name_the_refused_file(tmp_path):
    from convmae_det.visualization.reconstruction import load_pretrain_model

    marker = tmp_path / "pwned"
    path = str(tmp_path / "evil.pth")
    torch.save({"model": {}, "epoch": 0, "payload": _Evil(marker)}, path)
    for load in (
        load_pretrain_checkpoint,
        lambda p: restore_pretraining(p, model=nn.Linear(2, 2)),
        load_pretrain_model,
    ):
        with pytest.raises(CheckpointError, match="refused") as info:
            load(path)
        assert path in str(info.value) and "weights_only=False" not in str(info.value)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="truncated|cannot read"):
        (tmp_path / "half.pth").write_bytes(open(path, "rb").read()[:100])
        load_pretrain_checkpoint(str(tmp_path / "half.pth"))


# ------------------------------------------------------------------- detection (the tool)
@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("d2data"))
    register_toy_coco(["toy_coco_mini"], root=os.path.join(root, "toy_coco"))
    DatasetCatalog.get("toy_coco_mini")  # generate the images once
    yield root
    register_toy_coco(["toy_coco_mini"])


def _env(root):
    return {**os.environ, "DETECTRON2_DATASETS": root, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def _run(cmd, root):
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env(root),
                          timeout=600)  # fmt: skip


def _assert_one_line_error(proc, *words):
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), last
    for word in words:
        assert word in last, last
    assert "weights_only=False" not in proc.stderr


def test_detection_resume_skips_the_corrupt_newest_checkpoint_cleans_up_and_logs_once(
    tmp_path, coco_root
):
    out = tmp_path / "run"
    cmd = [sys.executable, DET_TOOL, *DET_OPTS, f"train.output_dir={out}"]
    proc = _run(cmd, coco_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = torch.load(str(out / "model_final.pth"), map_location="cpu", weights_only=True)
    logged = sorted({row["iteration"] for row in _metric_rows(str(out / "metrics.json"))})
    assert logged[:6] == list(range(6))  # (the final evaluation is logged one iteration later)
    # a crash at iteration 5 that also damaged model_0000005.pth (filesystem, not our save)
    os.remove(out / "model_final.pth")
    (out / "last_checkpoint").write_text("model_0000005.pth")
    _spoil(str(out / "model_0000005.pth"), "truncated")
    (out / ".tmp-a1b2c3d4.pth").write_bytes(b"x" * 4096)  # a save killed mid-way
    with open(out / "metrics.json", "a") as f:
        f.write('{"iteration": 6, "total_loss": 1.')  # the line being written at the crash

    resumed = _run(cmd[:2] + ["--resume"] + cmd[2:], coco_root)
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-3000:]
    assert "Traceback" not in log
    assert "model_0000003.pth at iteration 4" in log
    skipped = [line for line in log.splitlines() if "model_0000005.pth" in line and "WARN" in line]
    assert skipped and "truncated" in skipped[0], log[-3000:]
    assert not _temp_files(out)
    assert "leftover" in log and ".tmp-a1b2c3d4.pth" in log
    _assert_each_iteration_once(str(out / "metrics.json"), "iteration", logged)
    final = torch.load(str(out / "model_final.pth"), map_location="cpu", weights_only=True)
    assert final["iteration"] == reference["iteration"] == 5
    different = [k for k in final["model"] if not torch.equal(final["model"][k],
                                                              reference["model"][k])]  # fmt: skip
    assert not different, different[:5]


def test_detection_tool_refuses_a_last_checkpoint_outside_the_folder_in_one_line(
    tmp_path, coco_root
):
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"model": {}, "iteration": 3}, str(tmp_path / "other_run.pth"))
    (out / "last_checkpoint").write_text("../other_run.pth")
    cmd = [sys.executable, DET_TOOL, "--resume", *DET_OPTS, f"train.output_dir={out}"]
    _assert_one_line_error(_run(cmd, coco_root), "last_checkpoint", "outside")


# ---------------------------------------------------------------- segmentation (the loop)
@pytest.fixture(scope="module")
def seg_root(toy_root):  # noqa: F811
    DatasetCatalog.get("toy_ade20k_sem_seg_train")  # generate once, before any subprocess
    return toy_root


def _seg_cfg(out, *opts):
    from convmae_det.engine.seg_train_loop import get_seg_cfg

    base = ["SOLVER.MAX_ITER", "4", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1",
            "SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.LOG_PERIOD", "1", "SEED", "3",
            "DATALOADER.NUM_WORKERS", "0", "DATASETS.TEST", "()",
            "OUTPUT_DIR", str(out)]  # fmt: skip
    return get_seg_cfg(TOY_CFG, base + list(opts))


def test_segmentation_resume_skips_the_damaged_checkpoint_cleans_up_and_logs_once(
    tmp_path, seg_root
):
    from detectron2.modeling import build_model

    from convmae_det.engine.seg_train_loop import do_seg_train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = _seg_cfg(tmp_path)
        do_seg_train(cfg, build_model(cfg))  # model_0000001, model_0000003, model_final
        os.remove(tmp_path / "model_final.pth")
        _spoil(str(tmp_path / "model_0000003.pth"), "garbage")
        (tmp_path / ".tmp-zz99yy88.pth").write_bytes(b"x" * 10)
        with open(tmp_path / "metrics.json", "a") as f:
            f.write('{"iteration": 4, "total_lo')
        with _records() as records:
            do_seg_train(cfg, build_model(cfg), resume=True)
    finally:
        torch.set_num_threads(threads)
    messages = [r.getMessage() for r in records]
    assert any("model_0000003.pth" in m for m in _warnings(records)), messages
    assert any("model_0000001.pth at iteration 2" in m for m in messages), messages
    assert not _temp_files(tmp_path)
    _assert_each_iteration_once(str(tmp_path / "metrics.json"), "iteration", range(4))
    assert torch.load(str(tmp_path / "model_final.pth"), weights_only=True)["iteration"] == 3


def test_segmentation_tool_refuses_a_last_checkpoint_outside_the_folder_in_one_line(
    tmp_path, seg_root
):
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"model": {}, "iteration": 3}, str(tmp_path / "other_run.pth"))
    (out / "last_checkpoint").write_text(str(tmp_path / "other_run.pth"))
    cmd = [sys.executable, SEG_TOOL, "--resume", "--config-file", TOY_CFG, "SOLVER.MAX_ITER", "2",
           "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(out)]  # fmt: skip
    _assert_one_line_error(_run(cmd, seg_root), "last_checkpoint", "outside")


# ------------------------------------------------------------------------------- pretraining
@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("images"))
    generate_toy_images(path, num_images=12, size=40)
    return path


def _pretrain_cfg(image_dir, out, **kw):
    return toy_pretrain_config(image_dir, str(out), model_name="convmae_toy", img_size=32,
                               batch_size=4, epochs=2, warmup_epochs=1, log_period=1,
                               checkpoint_period_iters=2, keep_iter_checkpoints=None, seed=3,
                               **kw)  # fmt: skip


def test_pretraining_resume_skips_the_damaged_checkpoint_cleans_up_and_logs_once(
    tmp_path, image_dir
):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # 3 iterations per epoch; resume points after global iterations 2 and 4, then the end
        final = run_pretraining(_pretrain_cfg(image_dir, tmp_path))
        assert os.path.basename(final) == "checkpoint-0001.pth"
        reference = torch.load(final, weights_only=True)
        os.remove(final)
        _spoil(str(tmp_path / "checkpoint-0001-iter000001.pth"), "zeroed")  # global iteration 4
        (tmp_path / ".tmp-q1w2e3r4.pth").write_bytes(b"x" * 10)
        with open(tmp_path / "metrics.json", "a") as f:
            f.write('{"total_loss": 0.5, "it')
        with _records() as records:
            runner = PretrainRunner(_pretrain_cfg(image_dir, tmp_path, resume=True))
        assert runner.resumed_from == str(tmp_path / "checkpoint-0000-iter000002.pth")
        assert any("checkpoint-0001-iter000001.pth" in m for m in _warnings(records))
        assert not _temp_files(tmp_path)
        assert [r["iteration"] for r in _metric_rows(str(tmp_path / "metrics.json"))] == [0, 1]
        runner.run()
    finally:
        torch.set_num_threads(threads)
    _assert_each_iteration_once(str(tmp_path / "metrics.json"), "iteration", range(0, 6))
    again = torch.load(final, weights_only=True)
    assert again["train_state"] == reference["train_state"]
    for key in reference["model"]:
        assert torch.equal(again["model"][key], reference["model"][key]), key


def test_pretraining_tool_names_a_refused_init_checkpoint_in_one_line(tmp_path, image_dir):
    marker = tmp_path / "pwned"
    evil = str(tmp_path / "evil.pth")
    torch.save({"model": {}, "payload": _Evil(marker)}, evil)
    cmd = [sys.executable, PRETRAIN_TOOL, "--config-file",
           os.path.join(ROOT, "configs", "pretrain", "convmae_toy.py"), "--data-path", image_dir,
           "--output-dir", str(tmp_path / "out"), "model.img_size=32", "train.img_size=32",
           "train.batch_size=4", "train.num_workers=0",
           f"train.init_checkpoint={evil}"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT},
                          timeout=600)  # fmt: skip
    _assert_one_line_error(proc, evil, "refused")
    assert not marker.exists()
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
