"""Training: optimizer groups, schedule, a short toy run, resume, and 2-process gloo training."""

import json
import os
import subprocess
import sys

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.env import seed_all_rng
from seg_toy_fixtures import ROOT, TOY_CFG, toy_root  # noqa: F401  (fixture)

from convmae_det.engine.seg_solver import (
    build_seg_lr_scheduler,
    build_seg_optimizer,
    get_layer_decay_param_groups,
)
from convmae_det.engine.seg_train_loop import do_seg_train, get_seg_cfg


def _groups_by_name(model, **kw):
    out = {}
    for g in get_layer_decay_param_groups(model, **kw):
        for n in g["names"]:
            out[n] = (g["lr_scale"], g["weight_decay"])
    return out


def test_layer_decay_and_no_decay_rules_follow_the_recipe():
    cfg = get_seg_cfg(TOY_CFG)
    model = build_model(cfg)
    g = _groups_by_name(model, base_lr=1e-4, weight_decay=0.05, layer_decay=0.75, num_layers=2)
    top = 3  # 2 stage-3 blocks: ids 0 (stem), 1, 2, and 3 for everything above
    assert g["backbone.patch_embed1.proj.weight"] == (0.75**top, 0.05)
    assert g["backbone.blocks2.0.conv1.weight"] == (0.75**top, 0.05)
    assert g["backbone.pos_embed"] == (0.75**top, 0.0)
    assert g["backbone.blocks3.0.attn.qkv.weight"] == (0.75 ** (top - 1), 0.05)
    assert g["backbone.blocks3.1.attn.relative_position_bias_table"] == (0.75 ** (top - 2), 0.0)
    assert g["backbone.blocks3.1.gamma_2"][1] == 0.0
    assert g["backbone.blocks3.1.norm1.weight"][1] == 0.0
    assert g["backbone.fpn.0.weight"] == (1.0, 0.05)
    assert g["sem_seg_head.conv_seg.weight"] == (1.0, 0.05)
    assert g["sem_seg_head.bottleneck.bn.weight"] == (1.0, 0.0)
    assert g["auxiliary_head.conv_seg.bias"] == (1.0, 0.0)


def test_poly_schedule_warms_up_linearly_then_decays_to_zero():
    cfg = get_seg_cfg(
        TOY_CFG,
        ["SOLVER.MAX_ITER", "100", "SOLVER.WARMUP_ITERS", "10", "SOLVER.LAYER_DECAY", "0.5"],
    )
    model = build_model(cfg)
    opt = build_seg_optimizer(cfg, model)
    assert isinstance(opt, torch.optim.AdamW)
    sched = build_seg_lr_scheduler(cfg, opt)
    top = max(opt.param_groups, key=lambda g: g["lr_scale"])
    lrs = []
    for _ in range(100):
        lrs.append(top["lr"])
        opt.step()
        sched.step()
    base = cfg.SOLVER.BASE_LR
    assert lrs[0] == pytest.approx(base * 1e-6 * 1.0, rel=1e-3, abs=1e-12)
    assert lrs[5] == pytest.approx(base * 0.9 * 0.5, rel=0.02)  # halfway up to poly(0.1)
    assert lrs[10] == pytest.approx(base * 0.9, rel=1e-6)
    assert lrs[55] == pytest.approx(base * 0.45, rel=1e-6)
    assert lrs[99] == pytest.approx(base * 0.01, rel=1e-6)
    low = min(opt.param_groups, key=lambda g: g["lr_scale"])
    assert low["initial_lr"] == pytest.approx(base * 0.5**3)


def test_a_short_toy_training_lowers_the_loss_and_resumes_from_its_checkpoint(
    toy_root, tmp_path
):  # noqa: F811
    opts = ["SOLVER.MAX_ITER", "30", "SOLVER.LOG_PERIOD", "1", "SOLVER.IMS_PER_BATCH", "4",
            "SOLVER.BASE_LR", "0.002", "SOLVER.WARMUP_ITERS", "3", "SOLVER.CHECKPOINT_PERIOD", "15",
            "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(tmp_path)]  # fmt: skip
    cfg = get_seg_cfg(TOY_CFG, opts)
    seed_all_rng(0)
    results = do_seg_train(cfg, build_model(cfg))
    with open(tmp_path / "metrics.json") as f:
        rows = [json.loads(line) for line in f]
    # one row per iteration, then the evaluation after the last one (as every job writes it)
    assert [r["iteration"] for r in rows] == list(range(31))
    final = rows.pop()
    assert "total_loss" not in final
    assert final["sem_seg/mIoU"] == pytest.approx(
        results["toy_ade20k_sem_seg_val"]["sem_seg"]["mIoU"]
    )
    # the last value is a median over the last 20 iterations, the first a single iteration
    assert rows[-1]["total_loss"] < 0.85 * rows[0]["total_loss"]
    assert {"loss_sem_seg", "loss_aux", "lr", "time", "data_time"} <= set(rows[-1])
    assert (tmp_path / "model_0000014.pth").exists() and (tmp_path / "model_final.pth").exists()
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path))

    # resume from the iteration-14 checkpoint: optimizer, scheduler and iteration come back
    # (as after a run stopped there: --resume continues from the newest complete checkpoint)
    for newer in ("model_0000029.pth", "model_final.pth"):
        (tmp_path / newer).unlink()
    (tmp_path / "last_checkpoint").write_text("model_0000014.pth")
    (tmp_path / "metrics.json").write_text("")
    model = build_model(cfg)
    do_seg_train(cfg, model, resume=True)
    with open(tmp_path / "metrics.json") as f:
        resumed = [json.loads(line) for line in f]
    assert [r["iteration"] for r in resumed] == list(range(15, 31))
    assert resumed[0]["lr"] == pytest.approx(rows[15]["lr"])


def test_two_cpu_processes_train_and_evaluate_periodically_over_gloo(
    toy_root, tmp_path
):  # noqa: F811
    cmd = [
        sys.executable, os.path.join(ROOT, "tools", "plain_train_net.py"),
        "--config-file", TOY_CFG, "--num-gpus", "2", "--dist-url", "auto",  # a free port
        "SOLVER.MAX_ITER", "6", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.LOG_PERIOD", "3",
        "TEST.EVAL_PERIOD", "3", "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(tmp_path),
    ]  # fmt: skip
    env = dict(os.environ, DETECTRON2_DATASETS=toy_root, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "Rank of current process: 0. World size: 2" in log
    assert (tmp_path / "log.txt.rank1").exists()
    assert "copypaste: mIoU,fwIoU,mACC,pACC" in log
    assert (tmp_path / "model_final.pth").exists()
    with open(tmp_path / "metrics.json") as f:
        rows = [json.loads(line) for line in f]
    assert [r["iteration"] for r in rows] == [2, 5, 6]
    assert 0.0 <= rows[0]["sem_seg/mIoU"] <= 100.0  # periodic evaluation at iteration 3
    assert 0.0 <= rows[2]["sem_seg/mIoU"] <= 100.0  # and the one after the last iteration


def test_demo_entry_point_returns_miou_and_the_constant_baseline(toy_root, tmp_path):  # noqa: F811
    from convmae_det.engine.seg_demo import run_segmentation_demo

    out = run_segmentation_demo(
        str(tmp_path), opts=["SOLVER.MAX_ITER", "4", "DATALOADER.NUM_WORKERS", "0"]
    )
    assert 0.0 <= out["miou"] <= 100.0 and 0.0 < out["baseline_miou"] < 100.0 / 6
    assert out["baseline_class"] == "sky" and out["iterations"] == 4
    assert os.path.exists(out["example"]) and os.path.exists(tmp_path / "model_final.pth")
