"""Pretraining loop: schedule, optimizer groups, checkpoints, resume, guards, hand-off."""

import json
import math
import os

import pytest
import torch
import torch.nn as nn

from convmae_det.engine.pretrain_checkpoint import (
    find_last_checkpoint,
    official_model_state,
    resume_pretraining,
    save_pretrain_checkpoint,
)
from convmae_det.engine.pretrain_data import ImageFiles, generate_toy_images
from convmae_det.engine.pretrain_demo import run_pretrain_demo, toy_pretrain_config
from convmae_det.engine.pretrain_loop import lr_at, pretrain_param_groups, run_pretraining
from convmae_det.modeling.convvit import ConvViT
from convmae_det.modeling.pretrain import TOY_ENCODER_KWARGS, build_pretrain_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy")
    generate_toy_images(str(path), num_images=16, size=72)
    return str(path)


def _cfg(toy_dir, out, **train):
    train = dict(dict(batch_size=8, epochs=2, warmup_epochs=1, log_period=1), **train)
    return toy_pretrain_config(toy_dir, str(out), **train)


def test_lr_warms_up_linearly_then_follows_a_half_cosine():
    kw = dict(lr=1.0, min_lr=0.1, warmup_epochs=10, epochs=110)
    assert lr_at(0, **kw) == 0.0
    assert lr_at(5, **kw) == pytest.approx(0.5)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(35, **kw) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.25)))


def test_no_weight_decay_on_1d_params_and_frozen_params_left_out():
    model = build_pretrain_model("convmae_toy")
    no_decay, decay = pretrain_param_groups(model, 0.05)
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    assert all(p.ndim <= 1 for p in no_decay["params"])
    assert all(p.ndim > 1 for p in decay["params"])
    ids = {id(p) for p in no_decay["params"] + decay["params"]}
    assert id(model.pos_embed) not in ids and id(model.decoder_pos_embed) not in ids
    assert id(model.mask_token) in ids and id(model.norm.weight) in ids
    assert len(ids) == sum(p.requires_grad for p in model.parameters())


def test_toy_images_are_an_image_folder(toy_dir):
    data = ImageFiles(toy_dir)
    assert len(data) == 16
    img, label = data[0]
    assert img.size == (72, 72) and label == 0
    assert len(set(tuple(data[i][0].getpixel((5, 5))) for i in range(16))) > 8


def test_training_writes_official_checkpoints_and_metrics(toy_dir, tmp_path):
    path = run_pretraining(_cfg(toy_dir, tmp_path, checkpoint_period=1))
    assert path == str(tmp_path / "checkpoint-0001.pth")
    assert find_last_checkpoint(str(tmp_path)) == path
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert set(ckpt) == {"model", "optimizer", "epoch", "scaler", "args", "train_state"}
    assert ckpt["epoch"] == 1 and isinstance(ckpt["args"], dict)
    state = ckpt["train_state"]  # our resume extras, plain types
    assert state["epoch_iter"] == state["iters_per_epoch"] == 2 and state["seed"] == 0
    assert ckpt["args"]["train"]["batch_size"] == 8
    assert ckpt["args"]["model"]["name"] == "fastconvmae_toy"
    model = build_pretrain_model("fastconvmae_toy")
    model.load_state_dict(ckpt["model"], strict=True)
    lines = [json.loads(x) for x in open(tmp_path / "metrics.json")]  # as every job writes it
    assert [x["iteration"] for x in lines] == [0, 1, 2, 3]
    assert [x["epoch"] for x in lines] == [0.5, 1.0, 1.5, 2.0]  # epochs done
    assert all(math.isfinite(x["total_loss"]) and "loss_pixel" in x for x in lines)
    assert lines[0]["lr"] == 0.0 and lines[1]["lr"] == pytest.approx(0.5 * 8 * 1.6e-2 / 256)


def test_resume_restores_model_optimizer_scaler_and_epoch(tmp_path):
    torch.manual_seed(0)
    model = build_pretrain_model("convmae_toy")
    optimizer = torch.optim.AdamW(pretrain_param_groups(model, 0.05), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=512.0, growth_interval=7)
    scaler.scale(model(torch.randn(2, 3, 64, 64))["loss"]).backward()
    scaler.step(optimizer)
    scaler.update(new_scale=256.0)
    path = save_pretrain_checkpoint(
        str(tmp_path / "checkpoint-0006.pth"),
        model=model,
        optimizer=optimizer,
        epoch=6,
        scaler=scaler,
        args={"note": "test"},
    )
    fresh = build_pretrain_model("convmae_toy")
    fresh_opt = torch.optim.AdamW(pretrain_param_groups(fresh, 0.05), lr=1e-3)
    fresh_scaler = torch.amp.GradScaler("cpu")
    start = resume_pretraining(path, model=fresh, optimizer=fresh_opt, scaler=fresh_scaler)
    assert start == 7
    assert fresh_scaler.get_scale() == 256.0 and fresh_scaler.get_growth_interval() == 7
    a, b = optimizer.state_dict(), fresh_opt.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for k, st in a["state"].items():
        assert torch.equal(st["exp_avg"], b["state"][k]["exp_avg"])
        assert torch.equal(st["exp_avg_sq"], b["state"][k]["exp_avg_sq"])
    assert torch.equal(fresh.blocks3[0].attn.qkv.weight, model.blocks3[0].attn.qkv.weight)


def test_run_stopped_by_the_time_budget_resumes_inside_the_epoch(toy_dir, tmp_path):
    first = run_pretraining(_cfg(toy_dir, tmp_path, epochs=3, max_minutes=0))
    # budget spent after one step: a resume point one iteration into epoch 0
    assert first == str(tmp_path / "checkpoint-0000-iter000001.pth")
    ckpt = torch.load(first, weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["train_state"]["epoch_iter"] == 1
    last = run_pretraining(_cfg(toy_dir, tmp_path, epochs=3, resume=True))
    assert last == str(tmp_path / "checkpoint-0002.pth")
    rows = [json.loads(x) for x in open(tmp_path / "metrics.json")]
    assert [x["iteration"] for x in rows] == [0, 1, 2, 3, 4, 5]  # each iteration logged once


class _NaNModel(nn.Module):
    def __init__(self, bad_calls):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3, 3))
        self.bad_calls, self.calls = bad_calls, 0

    def forward(self, imgs):
        self.calls += 1
        loss = (self.w * imgs.mean()).sum() ** 2
        if self.calls in self.bad_calls:
            loss = loss * float("nan")
        return {"loss": loss}


def test_non_finite_loss_skips_the_step_and_gives_up_when_persistent(toy_dir, tmp_path):
    model = _NaNModel(bad_calls={1})
    cfg = _cfg(toy_dir, tmp_path / "a", epochs=1)
    cfg["model"] = model
    before = model.w.detach().clone()
    run_pretraining(cfg)
    assert model.calls == 2 and torch.isfinite(model.w).all()
    assert not torch.equal(model.w, before)  # the second, finite step was taken
    cfg = _cfg(toy_dir, tmp_path / "b", epochs=3, max_nonfinite=3)
    cfg["model"] = _NaNModel(bad_calls=set(range(1, 100)))
    with pytest.raises(FloatingPointError, match="3 consecutive non-finite"):
        run_pretraining(cfg)


def test_mor_training_updates_the_ema_target(toy_dir, tmp_path):
    cfg = _cfg(toy_dir, tmp_path, epochs=1)
    cfg["model"]["mor"] = dict(head_depth=1, ema=dict(momentum=0.5))
    path = run_pretraining(cfg)
    state = torch.load(path, weights_only=True)["model"]
    online, ema = (
        state["blocks3.0.attn.qkv.weight"],
        state["mor.ema.encoder.blocks3.0.attn.qkv.weight"],
    )
    assert not torch.equal(online, ema)  # the target lags behind the online encoder
    assert "mor.heads.ema.pred.weight" in state
    official = official_model_state(state)
    build_pretrain_model("fastconvmae_toy").load_state_dict(official, strict=True)


def _toy_detector() -> nn.Module:
    """The demo's toy paper detector (configs/toy/mask_rcnn_convvitdet_toy.py)."""
    from detectron2.config import instantiate

    from convmae_det.model_from_config import load_any_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg, _ = load_any_config(os.path.join(root, "configs", "toy", "mask_rcnn_convvitdet_toy.py"))
    return instantiate(cfg.model)


@pytest.mark.parametrize("mor", [None, dict(head_depth=1)])
def test_demo_checkpoint_hands_off_to_a_detector_with_no_missing_encoder_keys(
    toy_dir, tmp_path, mor
):
    from convmae_det.checkpoint import convert_checkpoint, load_checkpoint_file

    if mor is None:
        path = run_pretrain_demo(toy_dir, str(tmp_path), epochs=1, batch_size=8)
    else:  # a MoR checkpoint carries mor.* keys next to the official ones
        cfg = _cfg(toy_dir, tmp_path, epochs=1)
        cfg["model"]["mor"] = mor
        path = run_pretraining(cfg)
    detector = _toy_detector()
    state, report = convert_checkpoint(load_checkpoint_file(path), detector, strict=True)
    assert report.missing_encoder_keys == [] and not report.unexpected and not report.mismatched
    encoder_keys = [k for k in detector.state_dict() if k.startswith("backbone.bottom_up.")]
    not_loaded = [k for k in encoder_keys if k not in state]
    assert not_loaded and all("rel_pos_bias" in k for k in not_loaded)  # born downstream
    # the 4x4 pretraining table resized to the detector's 12x12 grid
    assert state["backbone.bottom_up.pos_embed"].shape == (
        1,
        144,
        TOY_ENCODER_KWARGS["embed_dims"][2],
    )
    ckpt = torch.load(path, weights_only=True)["model"]
    assert torch.equal(
        state["backbone.bottom_up.blocks3.1.attn.qkv.weight"], ckpt["blocks3.1.attn.qkv.weight"]
    )
    detector.load_state_dict(state, strict=False)


def test_two_process_cpu_ddp_with_accumulation_through_the_tool(toy_dir, tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [
        sys.executable,
        os.path.join(root, "tools", "pretrain.py"),
        "--config-file",
        os.path.join(root, "configs", "pretrain", "fastconvmae_toy.py"),
        "--num-gpus",
        "2",
        "--dist-url",
        "auto",
        "--data-path",
        toy_dir,
        "--output-dir",
        str(tmp_path),
        "train.epochs=1",
        "train.batch_size=8",
        "train.accum_iter=2",
        "train.log_period=2",
    ]
    env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "checkpoint-0000.pth", weights_only=True)
    assert ckpt["args"]["train"]["accum_iter"] == 2 and ckpt["epoch"] == 0
    lines = [json.loads(x) for x in open(tmp_path / "metrics.json")]
    # 16 images / (2 processes x 2 images) = 4 iterations, 2 optimizer steps
    assert [x["iteration"] for x in lines] == [1, 3]
    assert all(math.isfinite(x["total_loss"]) for x in lines)
    log = open(tmp_path / "log.txt").read()
    assert "iter: 3" in log and "total_loss" in log
