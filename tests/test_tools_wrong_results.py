"""Tools that gave wrong results without a word: each case now either works or stops with one line
(exit code 2) that names what to change.

1. convert_checkpoint.py: a checkpoint that fills (almost) nothing of the model's encoder;
2. lazyconfig_train_net.py --eval-only: the preflight demanded the training dataset;
3. the segmentation poly schedule with a warm-up longer than the run (lr ~1e-10);
4. UperNet with one image per process through the pyramid pooling's BatchNorm;
5. visualize_pretrain.py on an official checkpoint (``args.model`` of the official scripts);
6. pretraining override ``key=None`` (hydra reads the string 'None');
7. --help of the training tools: project examples, no --eval-only for pretraining;
8. training curves: a single-term loss drawn twice; a folder without metrics.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import subprocess
import sys
from typing import List

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from PIL import Image
from seg_toy_fixtures import ROOT, TOY_CFG, toy_root  # noqa: F401  (fixture)

import convmae_det.data  # noqa: F401  (registers the datasets)
from convmae_det.checkpoint import (
    MIN_ENCODER_COVERAGE,
    CheckpointError,
    convert_checkpoint,
    encoder_coverage,
)
from convmae_det.data.datasets.toy_coco import register_toy_coco
from convmae_det.engine import check_datasets, datasets_to_check, lazy_eval_only, load_lazy_config
from convmae_det.engine.pretrain_checkpoint import official_model_state
from convmae_det.engine.seg_solver import build_seg_lr_scheduler, effective_warmup_iters
from convmae_det.engine.seg_train_loop import check_seg_batch_norm, get_seg_cfg
from convmae_det.modeling import pretrain as pretrain_models
from convmae_det.modeling.pretrain import build_pretrain_model
from convmae_det.visualization.curves import curve_panels, plot_metrics, read_metrics
from convmae_det.visualization.reconstruction import pretrain_model_kwargs

TOOLS = os.path.join(ROOT, "tools")
COCO_CFG = os.path.join(ROOT, "configs", "COCO", "mask_rcnn_convvitdet_b_25ep.py")
PAPER_TOY = os.path.join(ROOT, "configs", "toy", "mask_rcnn_convvitdet_toy.py")


def run_tool(name: str, args: List[str], env=None, timeout: int = 300):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, os.path.join(TOOLS, name)] + list(args),
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout,
    )  # fmt: skip


def error_lines(stderr: str) -> List[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def load_tool(name: str):
    """Import ``tools/<name>`` as a module (its ``main`` / parser helpers, no subprocess)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name[:-3]}", os.path.join(TOOLS, name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------ 1. convert_checkpoint.py
def test_convert_tool_refuses_a_checkpoint_that_matches_nothing_of_the_encoder(tmp_path):
    src, dst = str(tmp_path / "unrelated.pth"), str(tmp_path / "out.pth")
    torch.save({"model": {"foo.weight": torch.randn(3, 3), "bar.bias": torch.randn(3)}}, src)
    proc = run_tool("convert_checkpoint.py", [src, dst, "--config-file", PAPER_TOY])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (line,) = error_lines(proc.stderr)
    assert src in line and "only 0 of the" in line and "backbone.bottom_up" in line
    assert "50%" in line and "--allow-partial" in line
    assert not os.path.exists(dst)
    assert "unexpected: 2" in proc.stdout  # the report still says what was in the file

    args = [src, dst, "--config-file", PAPER_TOY, "--allow-partial"]
    proc = run_tool("convert_checkpoint.py", args)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and os.path.isfile(dst)


def test_encoder_coverage_of_a_real_conversion_is_above_the_threshold():
    from detectron2.config import instantiate

    model = instantiate(load_lazy_config(PAPER_TOY).model)
    src = official_model_state(build_pretrain_model("convmae_toy").state_dict())
    _, report = convert_checkpoint({"model": src}, model)
    loaded, total, scope = encoder_coverage(report, model.state_dict().keys())
    assert scope == "encoder backbone.bottom_up.*"
    assert loaded >= MIN_ENCODER_COVERAGE * total and loaded > 0.9 * total

    _, empty = convert_checkpoint({"model": {"foo.weight": torch.zeros(2)}}, model)
    assert encoder_coverage(empty, model.state_dict().keys())[:2] == (0, total)


# ------------------------------------------------------------------ 2. --eval-only datasets
@pytest.fixture(scope="module")
def coco_mini_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("d2coco"))
    register_toy_coco(["toy_coco_mini"], root=os.path.join(root, "toy_coco"))
    DatasetCatalog.get("toy_coco_mini")
    yield root
    register_toy_coco(["toy_coco_mini"])


def test_eval_only_checks_only_the_test_datasets(tmp_path, coco_mini_root, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the builtin COCO paths are relative: not there
    cfg = load_lazy_config(COCO_CFG, ["dataloader.test.dataset.names=toy_coco_mini"])
    assert datasets_to_check(cfg, eval_only=True) == [
        ("toy_coco_mini", "dataloader.test.dataset.names")
    ]
    assert ("coco_2017_train", "dataloader.train.dataset.names") in datasets_to_check(cfg)
    check_datasets(datasets_to_check(cfg, eval_only=True))
    with pytest.raises(FileNotFoundError, match="coco_2017_train"):
        check_datasets(datasets_to_check(cfg))

    # the library entry point gets past the datasets to the (missing) weights
    missing = str(tmp_path / "missing.pth")
    toy = load_lazy_config(
        PAPER_TOY,
        ["dataloader.train.dataset.names=coco_2017_train",
         "dataloader.test.dataset.names=toy_coco_mini", f"train.init_checkpoint={missing}"],
    )  # fmt: skip
    with pytest.raises((AssertionError, CheckpointError), match="missing.pth"):  # fvcore's
        lazy_eval_only(toy)


def test_eval_only_tool_does_not_ask_for_the_coco_training_set(tmp_path, coco_mini_root):
    missing = str(tmp_path / "weights.pth")
    proc = run_tool(
        "lazyconfig_train_net.py",
        ["--config-file", COCO_CFG, "--eval-only", "dataloader.test.dataset.names=toy_coco_mini",
         f"train.init_checkpoint={missing}", f"train.output_dir={tmp_path / 'out'}"],
        env={"DETECTRON2_DATASETS": coco_mini_root},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "coco_2017_train" not in proc.stderr
    assert error_lines(proc.stderr) == [
        f"error: train.init_checkpoint: no such checkpoint file: {missing}"
    ]


# ------------------------------------------------------------------ 3. warm-up longer than the run
class _Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: List[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _lrs(opts, steps):
    cfg = get_seg_cfg(TOY_CFG, opts)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=cfg.SOLVER.BASE_LR)
    handler = _Messages()
    log = logging.getLogger("convmae_det.engine.seg_solver")
    log.addHandler(handler)
    try:
        scheduler = build_seg_lr_scheduler(cfg, opt)
    finally:
        log.removeHandler(handler)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return cfg, lrs, handler.messages


def test_warmup_longer_than_the_run_is_shortened_to_half_of_it_with_a_warning():
    # toy recipe: WARMUP_ITERS 30, BASE_LR 0.002, poly power 1; a 20-iteration run
    cfg, lrs, messages = _lrs(["SOLVER.MAX_ITER", "20"], 20)
    base = cfg.SOLVER.BASE_LR
    assert effective_warmup_iters(30, 20) == 10
    assert lrs[0] == pytest.approx(base * cfg.SOLVER.WARMUP_FACTOR)
    assert lrs[5] == pytest.approx(0.25 * base, rel=1e-3)  # half way up to 0.5 * base
    assert lrs[10] == pytest.approx(0.5 * base)  # peak: poly at half the run
    assert lrs[15] == pytest.approx(0.25 * base)
    assert max(lrs) == pytest.approx(0.5 * base)
    (message,) = messages
    assert "SOLVER.WARMUP_ITERS=30" in message and "SOLVER.MAX_ITER=20" in message
    assert "10 iterations" in message

    # a warm-up within half of the run is left alone, without a warning
    cfg, lrs, messages = _lrs(["SOLVER.MAX_ITER", "100"], 31)
    assert messages == [] and lrs[30] == pytest.approx(0.7 * base)


# ------------------------------------------------------------------ 4. one image per BatchNorm
def test_one_image_per_process_through_the_pyramid_pooling_batchnorm_is_refused():
    one = get_seg_cfg(TOY_CFG, ["SOLVER.IMS_PER_BATCH", "1"])  # toy head norm: BN
    with pytest.raises(ValueError) as info:
        check_seg_batch_norm(one, world_size=1)
    message = str(info.value)
    for key in ("SOLVER.IMS_PER_BATCH=1", "MODEL.SEM_SEG_HEAD.NORM=BN", "POOL_SCALES", "GN"):
        assert key in message
    check_seg_batch_norm(get_seg_cfg(TOY_CFG, ["SOLVER.IMS_PER_BATCH", "2"]), world_size=1)
    check_seg_batch_norm(
        get_seg_cfg(TOY_CFG, ["SOLVER.IMS_PER_BATCH", "1", "MODEL.SEM_SEG_HEAD.NORM", "GN"]), 1
    )
    two = ["SOLVER.IMS_PER_BATCH", "2"]
    with pytest.raises(ValueError, match="over 2 processes"):
        check_seg_batch_norm(get_seg_cfg(TOY_CFG, two), world_size=2)  # BN: per process
    sync = get_seg_cfg(TOY_CFG, two + ["MODEL.SEM_SEG_HEAD.NORM", "SyncBN"])
    check_seg_batch_norm(sync, world_size=2)  # statistics over both processes
    sync_one = get_seg_cfg(
        TOY_CFG, ["SOLVER.IMS_PER_BATCH", "1", "MODEL.SEM_SEG_HEAD.NORM", "SyncBN"]
    )
    with pytest.raises(ValueError, match="SyncBN over 2 or more processes"):
        check_seg_batch_norm(sync_one, world_size=1)  # one process: plain BatchNorm


def test_segmentation_tool_refuses_one_image_per_process_in_one_line(tmp_path):
    proc = run_tool(
        "plain_train_net.py",
        ["--config-file", TOY_CFG, "SOLVER.IMS_PER_BATCH", "1", "SOLVER.MAX_ITER", "1",
         "OUTPUT_DIR", str(tmp_path)],
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = error_lines(proc.stderr)
    assert line.startswith("error: SOLVER.IMS_PER_BATCH=1 over 1 process puts 1 image")
    assert "MODEL.SEM_SEG_HEAD.NORM" in line and "Traceback" not in proc.stderr


def test_the_raw_batchnorm_error_is_explained_if_it_happens_anyway(
    toy_root, tmp_path, monkeypatch  # noqa: F811
):
    from detectron2.modeling import build_model

    from convmae_det.engine import seg_train_loop

    monkeypatch.setattr(seg_train_loop, "check_seg_batch_norm", lambda cfg, world_size: None)
    cfg = get_seg_cfg(
        TOY_CFG,
        ["SOLVER.IMS_PER_BATCH", "1", "SOLVER.MAX_ITER", "1", "DATALOADER.NUM_WORKERS", "0",
         "OUTPUT_DIR", str(tmp_path), "SOLVER.WARMUP_ITERS", "0"],
    )  # fmt: skip
    with pytest.raises(ValueError) as info:
        seg_train_loop.do_seg_train(cfg, build_model(cfg))
    message = str(info.value)
    assert message.startswith("a BatchNorm got 1 value per channel in training")
    assert "SOLVER.IMS_PER_BATCH=1" in message and "MODEL.SEM_SEG_HEAD.NORM" in message
    assert "Expected more than 1 value per channel" in message  # PyTorch's words kept


# ------------------------------------------------------------------ 5. official pretraining files
def _official_toy_checkpoint(path: str, args) -> str:
    model = build_pretrain_model("convmae_toy")
    state = official_model_state(model.state_dict())
    torch.save({"model": state, "optimizer": {}, "epoch": 0, "scaler": {}, "args": args}, path)
    return path


def test_official_model_names_map_to_our_builders():
    official = argparse.Namespace(
        model="convmae_convvit_base_patch16", norm_pix_loss=True, input_size=224, mask_ratio=0.75
    )
    assert pretrain_model_kwargs("f.pth", official) == dict(
        name="convmae_b", norm_pix_loss=True, img_size=224, mask_ratio=0.75
    )
    fast = {"model": "fastconvmae_convvit_base_patch16", "norm_pix_loss": False, "mask_ratio": 0.75}
    assert pretrain_model_kwargs("f.pth", fast) == dict(name="fastconvmae_b", norm_pix_loss=False)
    ours = {"model": {"_target_": "x.build_pretrain_model", "name": "convmae_toy", "img_size": 64}}
    assert pretrain_model_kwargs("f.pth", ours) == dict(name="convmae_toy", img_size=64)
    assert pretrain_model_kwargs("f.pth", {}, "fastconvmae_toy") == dict(name="fastconvmae_toy")
    with pytest.raises(ValueError, match="official 'convmae_convvit_large_patch16'.*no builder"):
        pretrain_model_kwargs("f.pth", argparse.Namespace(model="convmae_convvit_large_patch16"))
    with pytest.raises(ValueError, match="pass --model NAME"):
        pretrain_model_kwargs("f.pth", argparse.Namespace(model="my_own_mae"))


def test_visualize_pretrain_reads_the_official_model_name(tmp_path, monkeypatch):
    # an official file says convmae_convvit_base_patch16; Base is built as the toy to stay small
    toy = pretrain_models.PRETRAIN_ARCHS["convmae_toy"]
    monkeypatch.setitem(pretrain_models.PRETRAIN_ARCHS, "convmae_b", toy)
    args = argparse.Namespace(
        model="convmae_convvit_base_patch16", norm_pix_loss=True, input_size=64
    )
    ckpt = _official_toy_checkpoint(str(tmp_path / "checkpoint-1599.pth"), args)
    image = str(tmp_path / "img.png")
    Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype(np.uint8)).save(image)
    out = tmp_path / "recon"
    tool = load_tool("visualize_pretrain.py")
    assert tool.main(["--checkpoint", ckpt, "--input", image, "--output", str(out)]) == 0
    assert [p for p in os.listdir(out) if p.endswith(".png")]


def test_visualize_pretrain_names_the_flag_when_the_file_does_not_say(tmp_path):
    ckpt = _official_toy_checkpoint(str(tmp_path / "ckpt.pth"), argparse.Namespace(model="mine"))
    proc = run_tool("visualize_pretrain.py", ["--checkpoint", ckpt, "--input", str(tmp_path)])
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = error_lines(proc.stderr)
    assert ckpt in line and "pass --model NAME" in line and "'mine'" in line
    assert "name=" not in line.split("--model")[0]  # the flag comes first, not an internal name


# ------------------------------------------------------------------ 6. key=None overrides
def test_pretraining_override_none_is_python_none():
    tool = load_tool("pretrain.py")
    config = os.path.join(ROOT, "configs", "pretrain", "convmae_b_1600ep.py")
    args = tool.parse_args(
        ["--config-file", config, "train.data_path=None", "train.output_dir='None'"]
    )
    cfg = tool.load_config(args)
    assert cfg.train.data_path is None
    assert cfg.train.output_dir == "None"  # quoted: the string
    assert tool.python_none_overrides(["a=None", "b= None", "c=None_x", "d='None'", "+e=None"]) == [
        "a=null",
        "b=null",
        "c=None_x",
        "d='None'",
        "+e=null",
    ]


# ------------------------------------------------------------------ 7. --help
def test_training_tools_help_shows_project_examples():
    proc = run_tool("pretrain.py", ["--help"])
    assert proc.returncode == 0, proc.stderr
    assert "--eval-only" not in proc.stdout
    assert "configs/pretrain/fastconvmae_toy.py --num-gpus 2 \\\n" in proc.stdout
    assert "--num-gpus 8 \\\n        --data-path /data/imagenet/train" in proc.stdout
    assert "--resume" in proc.stdout and "train.epochs=2" in proc.stdout

    proc = run_tool("plain_train_net.py", ["--help"])
    assert proc.returncode == 0, proc.stderr
    for example in ("--config-file configs/ADE20K/upernet_convmae_toy.yaml\n", "--num-gpus 2",
                    "SOLVER.MAX_ITER 100", "--eval-only MODEL.WEIGHTS", "CFG --resume",
                    "upernet_convmae_b_512_160k.yaml \\\n        --num-gpus 8"):  # fmt: skip
        assert example in proc.stdout, example
    assert "detectron2/" not in proc.stdout.split("options:")[-1]  # not detectron2's examples

    proc = run_tool("lazyconfig_train_net.py", ["--help"])
    assert proc.returncode == 0, proc.stderr
    for example in ("mask_rcnn_convvitdet_toy.py\n", "--num-gpus 2", "train.max_iter=200",
                    "--eval-only", "--config-file CFG --resume"):  # fmt: skip
        assert example in proc.stdout, example


# ------------------------------------------------------------------ 8. curves
def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_a_single_term_pretraining_loss_is_drawn_once(tmp_path):
    rows = [{"loss": 1.0 / (i + 1), "loss_pixel": 1.0 / (i + 1), "lr": 1e-3, "step": i}
            for i in range(5)]  # fmt: skip
    _jsonl(tmp_path / "metrics.jsonl", rows)
    panels = dict(curve_panels(read_metrics(str(tmp_path))))
    assert panels["losses"] == [("loss", "loss (= loss_pixel)")]
    assert len(plot_metrics(str(tmp_path), str(tmp_path / "plots"))) == 3

    mor = [dict(r, loss=r["loss"] + 0.5, loss_dino=0.5) for r in rows]  # terms differ from it
    _jsonl(tmp_path / "metrics.jsonl", mor)
    panels = dict(curve_panels(read_metrics(str(tmp_path))))
    assert panels["losses"] == [("loss", "loss"), ("loss_dino", "loss_dino"),
                                ("loss_pixel", "loss_pixel")]  # fmt: skip


def test_plot_metrics_tool_names_the_folder_and_the_files_it_looked_for(tmp_path):
    proc = run_tool("plot_metrics.py", [str(tmp_path)])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = error_lines(proc.stderr)
    assert str(tmp_path) in line and "metrics.json" in line and "metrics.jsonl" in line
    proc = run_tool("plot_metrics.py", [str(tmp_path / "absent")])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "absent: no such folder or file" in error_lines(proc.stderr)[0]
