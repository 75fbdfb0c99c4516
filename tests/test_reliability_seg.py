"""Reliability of the segmentation trainer (tools/plain_train_net.py): a run killed with SIGKILL
(mid-training or while writing a checkpoint) resumes to exactly the uninterrupted weights; a
non-finite loss stops naming the iteration, the terms and the last good checkpoint, or is
skipped without touching the model; bad images and labels are named or skipped reproducibly;
grayscale / RGBA images become RGB; a wrong-type override is one line and exit code 2."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from PIL import Image
from seg_toy_fixtures import ROOT, TOY_CFG, toy_root  # noqa: F401  (fixture)

from convmae_det.data.resumable_loader import BadSampleError
from convmae_det.data.sem_seg_mapper import SemSegDatasetMapper
from convmae_det.data.toy_ade20k import TOY_ADE20K_CLASSES
from convmae_det.engine.hooks import NonFiniteLossError
from convmae_det.engine.reproducibility import seed_everything
from convmae_det.engine.seg_train_loop import build_seg_train_loader, do_seg_train, get_seg_cfg
from convmae_det.engine.yacs_overrides import ConfigOverrideError

TOOL = os.path.join(ROOT, "tools", "plain_train_net.py")
MAX_ITER = 10
# periodic checkpoints after iterations 2, 5, 8 (only the newest kept) and model_final
OPTS = [
    "--config-file", TOY_CFG,
    "SOLVER.MAX_ITER", str(MAX_ITER), "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1",
    "SOLVER.CHECKPOINT_PERIOD", "3", "SOLVER.CHECKPOINT_MAX_TO_KEEP", "1",
    "SOLVER.LOG_PERIOD", "1", "DATALOADER.NUM_WORKERS", "1", "DATASETS.TEST", "()", "SEED", "7",
]  # fmt: skip

# Runs the tool with torch.save replaced: the save of iteration $SEG_KILL_AT_SAVE writes the
# first third of the checkpoint's bytes, syncs them to disk and SIGKILLs the process.
_DIE_WHILE_SAVING = """
import io, os, runpy, signal, sys
import torch
real_save, target = torch.save, int(os.environ["SEG_KILL_AT_SAVE"])
def dying_save(obj, f, *args, **kwargs):
    if not (isinstance(obj, dict) and obj.get("iteration") == target):
        return real_save(obj, f, *args, **kwargs)
    data = io.BytesIO()
    real_save(obj, data)
    f.write(data.getbuffer()[: data.tell() // 3])
    f.flush()
    os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = dying_save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


# ------------------------------------------------------------------------------------ helpers
def _env(root):
    return {**os.environ, "DETECTRON2_DATASETS": root, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def _tool_cmd(out, *flags, prefix=(TOOL,)):
    return [sys.executable, *prefix, *flags, *OPTS, "OUTPUT_DIR", str(out)]


def _run_tool(root, out, *flags, prefix=(TOOL,), env=None):
    cmd = _tool_cmd(out, *flags, prefix=prefix)
    return subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env={**_env(root), **(env or {})},
        timeout=600,
    )  # fmt: skip


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_equal_tensors(a, b, what):
    assert a.keys() == b.keys(), what
    different = [k for k in a if not torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k]))]
    assert not different, f"{what}: {len(different)} entries differ, e.g. {different[:5]}"


def _assert_same_run_state(a, b):
    """Weights, AdamW moments and step counts, scheduler, seeds and iteration are identical."""
    assert a["iteration"] == b["iteration"] == MAX_ITER - 1
    assert a["trainer"]["iteration"] == b["trainer"]["iteration"] == MAX_ITER - 1
    _assert_equal_tensors(a["model"], b["model"], "model")
    a, b = dict(a, **a["trainer"]), dict(b, **b["trainer"])  # optimizer and hooks: the trainer's
    opt_a, opt_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys() and len(opt_a) > 0
    for i in opt_a:
        _assert_equal_tensors(opt_a[i], opt_b[i], f"optimizer state {i}")
    assert [g["lr"] for g in a["optimizer"]["param_groups"]] == [
        g["lr"] for g in b["optimizer"]["param_groups"]
    ]
    assert a["hooks"]["LRScheduler"] == b["hooks"]["LRScheduler"]
    assert a["hooks"]["IterationSeeder"] == b["hooks"]["IterationSeeder"]
    assert a["data_loader"] == b["data_loader"]


def _metric_rows(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _last_logged_iteration(out):
    """The newest iteration in metrics.json of a running process (-1 when none yet; a line
    being written is ignored)."""
    try:
        lines = open(os.path.join(out, "metrics.json")).read().splitlines()
    except FileNotFoundError:
        return -1
    done = [line for line in lines if line.endswith("}")]
    return json.loads(done[-1])["iteration"] if done else -1


@contextlib.contextmanager
def _captured_warnings(name="convmae_det"):
    """Records of ``name`` and its children (independent of pytest's root-logger capture, which
    detectron2's ``setup_logger`` cuts off with ``propagate=False``)."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """In-process training on one thread, as the subprocesses (OMP_NUM_THREADS=1): the toy model
    gains nothing from more, and threads competing for busy cores slow it down many times."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def data_root(toy_root):  # noqa: F811
    DatasetCatalog.get("toy_ade20k_sem_seg_train")  # generate once, before any subprocess
    return toy_root


@pytest.fixture(scope="module")
def uninterrupted(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    proc = _run_tool(data_root, out)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return _load(out / "model_final.pth"), sorted(os.listdir(out))


# ------------------------------------------------------------------------ exact resume (tool)
def test_kill9_mid_training_then_resume_ends_with_the_uninterrupted_weights_and_optimizer(
    tmp_path, data_root, uninterrupted
):
    out = tmp_path / "killed"
    proc = subprocess.Popen(_tool_cmd(out), cwd=ROOT, env=_env(data_root),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    # kill during iteration 4 or shortly after: iterations 3.. are lost, model_0000002 is not
    while proc.poll() is None and time.time() < deadline:
        if _last_logged_iteration(out) >= 3:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model_final.pth").exists(), "killed too late"

    resumed = _run_tool(data_root, out, "--resume")
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-3000:]
    assert any(f"{ckpt} at iteration" in log for ckpt in ("model_0000002.pth", "model_0000005.pth"))
    _assert_same_run_state(_load(out / "model_final.pth"), uninterrupted[0])


def test_kill9_while_saving_a_checkpoint_keeps_the_last_complete_one_and_resume_is_exact(
    tmp_path, data_root, uninterrupted
):
    out = tmp_path / "killed_saving"
    proc = _run_tool(data_root, out, prefix=("-c", _DIE_WHILE_SAVING, TOOL),
                     env={"SEG_KILL_AT_SAVE": "5"})  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, (proc.stdout + proc.stderr)[-3000:]
    files = sorted(os.listdir(out))
    assert "model_0000002.pth" in files and "model_0000005.pth" not in files
    assert any(f.startswith(".tmp-") for f in files), files  # the partial file stays aside
    assert (out / "last_checkpoint").read_text().strip() == "model_0000002.pth"

    resumed = _run_tool(data_root, out, "--resume")
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-3000:]
    assert "model_0000002.pth at iteration 3" in log
    _assert_same_run_state(_load(out / "model_final.pth"), uninterrupted[0])


def test_only_the_newest_periodic_checkpoints_are_kept(uninterrupted):
    files = uninterrupted[1]
    assert [f for f in files if f.endswith(".pth")] == ["model_0000008.pth", "model_final.pth"]
    assert not any(f.startswith(".tmp-") for f in files)


def _cfg(out, *opts):
    base = ["SOLVER.MAX_ITER", "4", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1",
            "SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.LOG_PERIOD", "1", "SEED", "3",
            "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(out)]  # fmt: skip
    return get_seg_cfg(TOY_CFG, base + list(opts))


def test_a_random_run_seed_is_kept_in_the_checkpoint_and_reused_on_resume(tmp_path, data_root):
    cfg = _cfg(tmp_path, "SEED", "-1", "SOLVER.MAX_ITER", "2")
    do_seg_train(cfg, build_model(cfg))
    first = _load(tmp_path / "model_0000001.pth")
    seeder = first["trainer"]["hooks"]["IterationSeeder"]
    assert seeder["seed"] >= 0 and "seed" in first["data_loader"]

    cfg = _cfg(tmp_path, "SEED", "-1")  # would draw a new random seed
    do_seg_train(cfg, build_model(cfg), resume=True)
    final = _load(tmp_path / "model_final.pth")
    assert final["iteration"] == 3
    assert final["trainer"]["hooks"]["IterationSeeder"] == seeder
    assert final["data_loader"] == first["data_loader"]


# --------------------------------------------------------------------------- non-finite loss
def _nan_features_at(model, iteration):
    """Backbone features become NaN in the forward pass of ``iteration`` (so the heads' loss
    terms and BatchNorm statistics would be poisoned)."""
    calls = {"n": 0}

    def hook(module, inputs, output):
        calls["n"] += 1
        if calls["n"] - 1 == iteration:
            return {k: v * float("nan") for k, v in output.items()}
        return output

    model.backbone.register_forward_hook(hook)
    return model


def test_nonfinite_loss_stops_naming_iteration_terms_and_last_good_checkpoint(tmp_path, data_root):
    cfg = _cfg(tmp_path)
    model = _nan_features_at(build_model(cfg), iteration=3)
    with pytest.raises(NonFiniteLossError) as info:
        do_seg_train(cfg, model)
    message = str(info.value)
    assert "iteration 3" in message and "loss_sem_seg=nan" in message and "loss_aux=nan" in message
    assert str(tmp_path / "model_0000001.pth") in message
    assert "SOLVER.NONFINITE_LOSS=skip" in message
    assert not (tmp_path / "model_0000003.pth").exists()
    assert not (tmp_path / "model_final.pth").exists()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_loss_in_skip_mode_drops_that_update_logs_and_counts(tmp_path, data_root):
    cfg = _cfg(tmp_path, "SOLVER.NONFINITE_LOSS", "skip", "SOLVER.CHECKPOINT_PERIOD", "1")
    model = _nan_features_at(build_model(cfg), iteration=2)
    with _captured_warnings() as records:
        do_seg_train(cfg, model)
    before, after = _load(tmp_path / "model_0000001.pth"), _load(tmp_path / "model_0000002.pth")
    # weights, BatchNorm statistics and AdamW state are those of iteration 1
    _assert_equal_tensors(before["model"], after["model"], "model")
    before_opt, after_opt = before["trainer"]["optimizer"], after["trainer"]["optimizer"]
    for i in before_opt["state"]:
        _assert_equal_tensors(before_opt["state"][i], after_opt["state"][i], i)
    final = _load(tmp_path / "model_final.pth")["model"]
    assert any(not torch.equal(final[k], after["model"][k]) for k in final)  # training went on
    assert all(torch.isfinite(v.float()).all() for v in final.values())
    assert any("Non-finite loss at iteration 2" in r.getMessage() for r in records)
    rows = {r["iteration"]: r for r in _metric_rows(tmp_path)}
    assert rows[2]["nonfinite_skipped"] == 1 and "total_loss" not in rows[2]
    assert rows[3]["total_loss"] > 0


def test_unknown_nonfinite_mode_is_refused_naming_the_key(tmp_path, data_root):
    cfg = _cfg(tmp_path, "SOLVER.NONFINITE_LOSS", "ignore")
    with pytest.raises(ValueError, match="SOLVER.NONFINITE_LOSS='ignore'"):
        do_seg_train(cfg, build_model(cfg))


# ---------------------------------------------------------------------------------- bad data
BAD_DATASET = "toy_ade20k_sem_seg_relseg_bad"


@pytest.fixture(scope="module")
def bad_dataset(data_root, tmp_path_factory):
    """4 toy images: #1 truncated, #2 with a label of another size, #0 and #3 fine."""
    folder = tmp_path_factory.mktemp("bad_data")
    records = []
    for i, d in enumerate(DatasetCatalog.get("toy_ade20k_sem_seg_train")[:4]):
        image = str(folder / f"img{i}.jpg")
        label = str(folder / f"label{i}.png")
        shutil.copyfile(d["file_name"], image)
        shutil.copyfile(d["sem_seg_file_name"], label)
        records.append({"file_name": image, "sem_seg_file_name": label})
    data = open(records[1]["file_name"], "rb").read()
    open(records[1]["file_name"], "wb").write(data[: len(data) // 2])
    small = Image.open(records[2]["sem_seg_file_name"])
    small.resize((small.width // 2, small.height), Image.NEAREST).save(
        records[2]["sem_seg_file_name"]
    )
    DatasetCatalog.register(BAD_DATASET, lambda: [dict(r) for r in records])
    MetadataCatalog.get(BAD_DATASET).set(stuff_classes=list(TOY_ADE20K_CLASSES), ignore_label=255)
    yield records
    DatasetCatalog.remove(BAD_DATASET)
    MetadataCatalog.remove(BAD_DATASET)


def _bad_cfg(out, *opts):
    return _cfg(out, "DATASETS.TRAIN", f"('{BAD_DATASET}',)", "SOLVER.IMS_PER_BATCH", "4", *opts)


@pytest.mark.parametrize("is_train", [True, False])
def test_truncated_or_garbage_image_is_an_error_naming_the_file(tmp_path, bad_dataset, is_train):
    mapper = SemSegDatasetMapper(_bad_cfg(tmp_path), is_train)
    with pytest.raises(OSError, match=r"img1\.jpg: cannot read the image.*truncated"):
        mapper(dict(bad_dataset[1]))
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(OSError, match=r"garbage\.jpg: cannot read the image"):
        mapper({**bad_dataset[0], "file_name": str(garbage)})


def test_label_of_another_size_than_its_image_is_an_error_naming_both_files(tmp_path, bad_dataset):
    mapper = SemSegDatasetMapper(_bad_cfg(tmp_path), True)
    with pytest.raises(ValueError, match=r"label2\.png: label size .* differs from image .*img2"):
        mapper(dict(bad_dataset[2]))


def test_bad_training_sample_stops_the_loader_naming_the_file(tmp_path, bad_dataset):
    loader = build_seg_train_loader(_bad_cfg(tmp_path), seed=0)
    with pytest.raises(BadSampleError, match=r"img1\.jpg|label2\.png"):
        next(iter(loader))


def test_skip_bad_samples_logs_counts_and_replaces_reproducibly(tmp_path, bad_dataset):
    cfg = _bad_cfg(tmp_path, "DATALOADER.SKIP_BAD_SAMPLES", "True")

    def first_batch():
        loader = build_seg_train_loader(cfg, seed=0)
        with _captured_warnings() as records:
            batch = next(iter(loader))
        return batch, loader, " ".join(r.getMessage() for r in records)

    batch, loader, log = first_batch()
    assert len(batch) == 4 and loader.num_skipped >= 2
    assert "img1.jpg" in log and "label2.png" in log and "Skipped bad sample #2" in log
    used = {d["file_name"] for d in batch}
    assert not used & {bad_dataset[1]["file_name"], bad_dataset[2]["file_name"]}
    again = first_batch()[0]
    assert [d["file_name"] for d in again] == [d["file_name"] for d in batch]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(again, batch))

    # the training loop reports the count with the metrics
    do_seg_train(cfg, build_model(cfg))
    rows = [r for r in _metric_rows(tmp_path) if "total_loss" in r]  # not the evaluation row
    assert rows[-1]["iteration"] == 3 and rows[-1]["skipped_samples"] >= 2


@pytest.mark.parametrize("mode", ["L", "RGBA"])
@pytest.mark.parametrize("is_train", [True, False])
def test_grayscale_and_rgba_images_become_the_rgb_conversion(tmp_path, data_root, mode, is_train):
    record = DatasetCatalog.get("toy_ade20k_sem_seg_train")[0]
    source = Image.open(record["file_name"]).convert(mode)
    if mode == "RGBA":  # a non-trivial alpha channel, which the conversion drops
        source.putalpha(Image.fromarray(np.full(source.size[::-1], 90, np.uint8)))
    odd, rgb = str(tmp_path / f"img_{mode}.png"), str(tmp_path / "img_rgb.png")
    source.save(odd)
    Image.open(odd).convert("RGB").save(rgb)
    mapper = SemSegDatasetMapper(_cfg(tmp_path), is_train)
    seed_everything(0)
    out = mapper({**record, "file_name": odd})["image"]
    seed_everything(0)
    expected = mapper({**record, "file_name": rgb})["image"]
    assert out.dtype == torch.uint8 and out.shape[0] == 3
    assert torch.equal(out, expected)
    if mode == "L" and not is_train:  # no colour augmentation: the three channels are equal
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


# --------------------------------------------------------------------------- config overrides
def test_wrong_type_override_is_one_line_naming_key_value_and_type_with_exit_code_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, TOOL, "--config-file", TOY_CFG, "SOLVER.MAX_ITER", "abc",
         "OUTPUT_DIR", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, env=_env(str(tmp_path)), timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: config key SOLVER.MAX_ITER expects an int (current value 600); got 'abc' (str)"
    ]
    assert not os.listdir(tmp_path)  # refused before anything was written


def test_override_checks_name_unknown_keys_and_accept_an_int_for_a_float():
    with pytest.raises(ConfigOverrideError, match="SOLVER.MAX_ITR.*did you mean SOLVER.MAX_ITER"):
        get_seg_cfg(TOY_CFG, ["SOLVER.MAX_ITR", "5"])
    with pytest.raises(ConfigOverrideError, match="expects a bool, True or False.*'yes'"):
        get_seg_cfg(TOY_CFG, ["DATALOADER.SKIP_BAD_SAMPLES", "yes"])
    with pytest.raises(ConfigOverrideError, match="expects a list of int.*got '5'"):
        get_seg_cfg(TOY_CFG, ["INPUT.SEM_SEG.SCALE", "5"])
    with pytest.raises(ConfigOverrideError, match="KEY VALUE pairs; 'SEED' has no value"):
        get_seg_cfg(TOY_CFG, ["SEED"])
    cfg = get_seg_cfg(TOY_CFG, ["SOLVER.BASE_LR", "1", "INPUT.SEM_SEG.SCALE", "[256, 64]"])
    assert cfg.SOLVER.BASE_LR == 1.0 and isinstance(cfg.SOLVER.BASE_LR, float)
    assert list(cfg.INPUT.SEM_SEG.SCALE) == [256, 64]
