"""ImageNet classification end to end: the meta-architecture, the linear probe, the fine-tuning
parameter groups and schedule of the Base recipe, checkpoint reports of classifier heads, and the
tools (train / resume / eval-only, demo, benchmark) on the toy shapes set."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.config import instantiate
from PIL import Image
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

from convmae_det.checkpoint import ConvMAECheckpointer
from convmae_det.checkpoint.convert import _FRESH_HEAD
from convmae_det.engine import load_lazy_config
from convmae_det.modeling.classifier import ConvViTClassifierNet, ImageClassifier
from convmae_det.modeling.pretrain import TOY_ENCODER_KWARGS, build_pretrain_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_TOOL = os.path.join(ROOT, "tools/lazyconfig_train_net.py")
DEMO_TOOL = os.path.join(ROOT, "tools/demo.py")
BENCH_TOOL = os.path.join(ROOT, "tools/benchmark.py")
TOY_FT = os.path.join(ROOT, "configs/toy/convvit_toy_finetune.py")
TOY_LP = os.path.join(ROOT, "configs/toy/convvit_toy_linprobe.py")
BASE_FT = os.path.join(ROOT, "configs/ImageNet/convvit_b_finetune_100ep.py")
TOY_CLASS_NAMES = ("circle", "triangle", "square", "star", "cross")
BASE_LR = 5e-4 * 1024 / 256  # 2e-3
MIN_LR = 1e-6
DECAY = 0.65


@pytest.fixture(scope="module", autouse=True)
def data_root(tmp_path_factory):
    """Every dataset of this module (the generated toy set included) lives in a temporary folder,
    for this process and the tools it starts."""
    root = str(tmp_path_factory.mktemp("d2datasets"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DETECTRON2_DATASETS", root)
        yield root


def run(tool, args, *, datasets=None, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    env.pop("CONVMAE_DET_DEBUG", None)
    if datasets is not None:
        env["DETECTRON2_DATASETS"] = datasets
    return subprocess.run(
        [sys.executable, tool, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


def toy_net(**kwargs):
    return ConvViTClassifierNet(num_classes=5, pos_embed_hw=(4, 4), **TOY_ENCODER_KWARGS, **kwargs)


def toy_batch(n, size=64, *, labels=True):
    gen = torch.Generator().manual_seed(n)
    batch = [{"image": torch.randn(3, size, size, generator=gen)} for _ in range(n)]
    if labels:
        for i, d in enumerate(batch):
            d["label"] = i % 5
    return batch


# --------------------------------------------------------------------------- meta-architecture
def test_training_returns_a_scalar_cross_entropy_with_grad():
    model = ImageClassifier(net=toy_net()).train()
    batch = toy_batch(4)
    out = model(batch)
    assert set(out) == {"loss_cls"}
    loss = out["loss_cls"]
    assert loss.dim() == 0 and loss.requires_grad and torch.isfinite(loss)
    images = torch.stack([d["image"] for d in batch])
    expected = F.cross_entropy(model.net(images), torch.tensor([0, 1, 2, 3]))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert model.net.head.weight.grad is not None
    assert model.net.patch_embed1.proj.weight.grad.abs().sum() > 0


def test_evaluation_returns_logits_scores_and_the_argmax_per_image():
    model = ImageClassifier(net=toy_net()).eval()
    batch = toy_batch(3, labels=False)
    with torch.no_grad():
        out = model(batch)
        logits = model.net(torch.stack([d["image"] for d in batch]))
    assert isinstance(out, list) and len(out) == 3
    for i, res in enumerate(out):
        assert set(res) == {"logits", "scores", "pred_class"}
        assert res["logits"].shape == (5,) and res["scores"].shape == (5,)
        assert res["scores"].dtype == torch.float32
        torch.testing.assert_close(res["logits"], logits[i])
        torch.testing.assert_close(res["scores"], logits[i].softmax(-1))
        assert float(res["scores"].sum()) == pytest.approx(1.0, abs=1e-6)
        assert res["pred_class"].dim() == 0 and res["pred_class"].dtype == torch.int64
        assert int(res["pred_class"]) == int(res["logits"].argmax())


def _mixup(num_classes=5):
    return Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=num_classes)


def test_mixup_needs_an_even_batch():
    model = ImageClassifier(net=toy_net(), criterion=SoftTargetCrossEntropy(), mixup=_mixup())
    model.train()
    with pytest.raises(ValueError, match="even, got 3"):
        model(toy_batch(3))
    loss = model(toy_batch(4))["loss_cls"]
    assert loss.dim() == 0 and torch.isfinite(loss)


def test_mixup_class_count_must_equal_the_net_class_count():
    with pytest.raises(ValueError, match=r"mixup\.num_classes=10 but the classifier has 5"):
        ImageClassifier(net=toy_net(), criterion=SoftTargetCrossEntropy(), mixup=_mixup(10))


@pytest.mark.parametrize("training", [True, False])
def test_images_of_different_sizes_in_one_batch_are_refused(training):
    model = ImageClassifier(net=toy_net()).train(training)
    batch = toy_batch(1) + toy_batch(1, size=96)
    with pytest.raises(ValueError, match="share a size") as info:
        model(batch)
    assert "(3, 64, 64)" in str(info.value) and "(3, 96, 96)" in str(info.value)


# --------------------------------------------------------------------------- linear probe
@pytest.fixture(scope="module")
def linprobe_cfg():
    return load_lazy_config(TOY_LP, [])


def test_linear_probe_trains_only_the_linear_head(linprobe_cfg):
    model = instantiate(linprobe_cfg.model)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["net.head.1.bias", "net.head.1.weight"]
    bn = model.net.head[0]
    assert type(bn) is nn.BatchNorm1d
    assert bn.affine is False and bn.eps == 1e-6 and bn.num_features == 128
    assert isinstance(model.net.head[1], nn.Linear) and model.net.head[1].out_features == 5

    model.eval()
    model.train()
    assert model.training and model.net.training
    for name, child in model.net.named_children():
        modes = {m.training for m in child.modules()}
        assert modes == ({True} if name == "head" else {False}), name


def test_linear_probe_step_changes_only_the_head(linprobe_cfg):
    torch.manual_seed(0)
    model = instantiate(linprobe_cfg.model)
    model.train()
    linprobe_cfg.optimizer.params.model = model
    optimizer = instantiate(linprobe_cfg.optimizer)
    name_of = {id(p): n for n, p in model.named_parameters()}
    groups = {tuple(name_of[id(p)] for p in g["params"]): g for g in optimizer.param_groups}
    assert set(groups) == {("net.head.1.weight",), ("net.head.1.bias",)}
    weight, bias = groups[("net.head.1.weight",)], groups[("net.head.1.bias",)]
    assert weight["always_adapt"] is True and bias["always_adapt"] is False
    assert weight["weight_decay"] == 0.0 and bias["weight_decay"] == 0.0
    assert weight["lr"] == bias["lr"] == pytest.approx(6.4)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = model(toy_batch(8))["loss_cls"]
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert "net.head.1.weight" in changed and "net.head.1.bias" in changed
    assert "net.head.0.running_mean" in changed  # the probe's BatchNorm follows the batch
    assert all(k.startswith("net.head.") for k in changed), changed
    encoder = [k for k in before if not k.startswith("net.head.")]
    assert len(encoder) > 50
    for k in encoder:
        assert torch.equal(before[k], after[k]), k


# --------------------------------------------------------------------------- Base fine-tuning
@pytest.fixture(scope="module")
def base_finetune():
    cfg = load_lazy_config(BASE_FT, [])
    model = instantiate(cfg.model)
    cfg.optimizer.params.model = model
    return cfg, model, instantiate(cfg.optimizer)


def _official_layer_id(name: str, num_layers: int = 12) -> int:
    """``get_layer_id_for_convvit`` of the official ConvMAE fine-tuning code."""
    if name in ("cls_token", "pos_embed"):
        return 0
    if name.startswith(("patch_embed", "blocks1", "blocks2")):
        return 0
    if name.startswith("blocks3"):
        return int(name.split(".")[1]) + 1
    return num_layers


def test_base_finetune_groups_are_the_official_layer_decay(base_finetune):
    _, model, optimizer = base_finetune
    assert isinstance(optimizer, torch.optim.AdamW)
    assert len(model.net.blocks3) == 11
    name_of = {id(p): n for n, p in model.named_parameters()}
    where = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = name_of[id(p)]
            assert name not in where, f"{name} in two groups"
            where[name] = group
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(where) == trainable and len(trainable) == len(list(model.parameters()))

    lr = lambda n: where[n]["lr"]  # noqa: E731
    low = BASE_LR * DECAY**12
    for name in ("net.patch_embed1.proj.weight", "net.pos_embed", "net.patch_embed4.weight"):
        assert lr(name) == pytest.approx(low, rel=1e-9), name
    assert [n for n in where if n.startswith("net.blocks1.0.")]
    for name in (n for n in where if n.startswith(("net.blocks1.", "net.blocks2."))):
        assert lr(name) == pytest.approx(low, rel=1e-9), name
    for i in range(11):
        names = [n for n in where if n.startswith(f"net.blocks3.{i}.")]
        assert names
        for name in names:
            assert lr(name) == pytest.approx(BASE_LR * DECAY ** (11 - i), rel=1e-9), name
    for name in ("net.fc_norm.weight", "net.fc_norm.bias", "net.head.weight", "net.head.bias"):
        assert lr(name) == pytest.approx(BASE_LR, rel=1e-12), name

    num_layers = len(model.net.blocks3) + 1
    for name, p in model.named_parameters():
        rel = name[len("net.") :]
        scale = DECAY ** (num_layers - _official_layer_id(rel, num_layers))
        assert lr(name) == pytest.approx(BASE_LR * scale, rel=1e-9), name
        no_decay = p.ndim == 1 or rel in ("pos_embed", "cls_token")
        assert where[name]["weight_decay"] == (0.0 if no_decay else 0.05), name
    assert where["net.pos_embed"]["weight_decay"] == 0.0
    assert where["net.blocks3.3.attn.qkv.weight"]["weight_decay"] == 0.05
    assert where["net.blocks3.3.attn.qkv.bias"]["weight_decay"] == 0.0


def test_base_finetune_lr_schedule_is_warmup_then_half_cosine(base_finetune):
    cfg, _, _ = base_finetune
    sched = instantiate(cfg.lr_multiplier)
    floor = MIN_LR / BASE_LR
    assert sched(0.0) == pytest.approx(0.0, abs=1e-12)
    assert sched(0.025) == pytest.approx(0.5, abs=1e-9)
    assert sched(0.05) == pytest.approx(1.0, abs=1e-9)
    assert sched(0.05 + 0.95 / 2) == pytest.approx((1 + floor) / 2, abs=1e-6)
    assert sched(1.0) == pytest.approx(floor, rel=1e-6)
    last = (cfg.train.max_iter - 1) / cfg.train.max_iter
    assert sched(last) == pytest.approx(floor, rel=1e-3)
    # cosine, not linear: a quarter into the post-warm-up interval
    quarter = 0.05 + 0.95 / 4
    expected = floor + (1 - floor) * (1 + math.cos(math.pi / 4)) / 2
    assert sched(quarter) == pytest.approx(expected, abs=1e-6)


# --------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def toy_cfg():
    return load_lazy_config(TOY_FT, [])


@pytest.fixture(scope="module")
def pretrain_file(tmp_path_factory):
    torch.manual_seed(1)
    pre = build_pretrain_model("convmae_toy")
    path = str(tmp_path_factory.mktemp("ckpt") / "pretrain.pth")
    torch.save({"model": pre.state_dict()}, path)
    return path, pre.state_dict()


def _head_keys():
    return ["net.fc_norm.weight", "net.fc_norm.bias", "net.head.weight", "net.head.bias"]


@pytest.mark.parametrize("strict", [False, True])
def test_pretraining_file_fills_the_encoder_and_leaves_a_fresh_head(toy_cfg, pretrain_file, strict):
    path, pre_state = pretrain_file
    model = instantiate(toy_cfg.model)
    checkpointer = ConvMAECheckpointer(model, strict=strict)
    checkpointer.load(path)
    report = checkpointer.last_report
    assert report.format == "convmae_pretrain"
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    assert report.problems == 0
    assert sorted(report.initialised[_FRESH_HEAD]) == sorted(_head_keys())
    assert "pretraining decoder" in report.ignored
    encoder = [k for k in model.state_dict() if k not in _head_keys()]
    assert sorted(report.loaded) == sorted(encoder)
    state = model.state_dict()
    for key in ("patch_embed1.proj.weight", "pos_embed", "blocks3.2.mlp.fc1.weight"):
        torch.testing.assert_close(state["net." + key], pre_state[key], rtol=0, atol=0)
    head = model.net.head.weight.detach()
    assert 1.5e-5 < float(head.std()) < 2.5e-5  # trunc-normal, std 2e-5
    assert torch.equal(model.net.head.bias, torch.zeros(5))
    assert torch.equal(model.net.fc_norm.weight, torch.ones(128))
    assert _FRESH_HEAD in report.summary()


def test_a_ten_class_head_loads_fresh_into_a_five_class_model(toy_cfg, tmp_path):
    cfg10 = load_lazy_config(TOY_FT, ["model.net.num_classes=10"])
    torch.manual_seed(2)
    ten = instantiate(cfg10.model)
    assert ten.mixup.num_classes == 10
    nn.init.normal_(ten.net.fc_norm.weight)
    path = str(tmp_path / "ten.pth")
    torch.save({"model": ten.state_dict()}, path)

    model = instantiate(toy_cfg.model)
    fresh_head = model.net.head.weight.detach().clone()
    checkpointer = ConvMAECheckpointer(model)
    checkpointer.load(path)
    report = checkpointer.last_report
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    assert sorted(report.initialised[_FRESH_HEAD]) == ["net.head.bias", "net.head.weight"]
    other = [g for g in report.ignored if g.startswith("classification head of another size")]
    assert sorted(k for g in other for k in report.ignored[g]) == [
        "net.head.bias",
        "net.head.weight",
    ]
    text = report.summary()
    assert "file (10, 128), model (5, 128)" in text and "file (10,), model (5,)" in text
    assert "net.fc_norm.weight" in report.loaded
    assert "net.blocks3.2.attn.qkv.weight" in report.loaded
    assert len(report.loaded) == len(model.state_dict()) - 2
    torch.testing.assert_close(model.net.fc_norm.weight, ten.net.fc_norm.weight)
    torch.testing.assert_close(
        model.net.blocks3[2].attn.qkv.weight, ten.net.blocks3[2].attn.qkv.weight
    )
    assert torch.equal(model.net.head.weight, fresh_head)


# --------------------------------------------------------------------------- tools
@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, data_root):
    """tools/lazyconfig_train_net.py: 6 toy fine-tuning iterations, checkpoints every 3."""
    out = str(tmp_path_factory.mktemp("toy_run") / "run")
    opts = ["train.max_iter=6", "train.checkpointer.period=3", "train.log_period=1"]
    proc = run(TRAIN_TOOL, ["--config-file", TOY_FT, *opts, f"train.output_dir={out}"])
    return out, opts, proc


def test_training_tool_writes_checkpoints_and_top1_top5(toy_run, data_root):
    out, _, proc = toy_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("model_0000002.pth", "model_0000005.pth", "model_final.pth", "last_checkpoint"):
        assert os.path.isfile(os.path.join(out, name)), name
    with open(os.path.join(out, "final_metrics.json")) as f:
        results = json.load(f)
    assert set(results) == {"classification"}
    cls = results["classification"]
    assert set(cls) == {"top1", "top5", "loss", "num_images"}
    assert cls["num_images"] == 120
    assert cls["top5"] == 100.0  # five classes: the true one is always among the top five
    assert 0.0 <= cls["top1"] <= 100.0
    assert round(cls["top1"] * 1.2, 6) == round(cls["top1"] * 1.2)  # a count of 120 images
    assert 0 < cls["loss"] < 10
    assert "copypaste: top1,top5,loss,num_images" in proc.stdout + proc.stderr
    rows = read_metrics(out)
    assert [r["iteration"] for r in rows if "total_loss" in r] == list(range(6))
    evals = [r for r in rows if "classification/top1" in r]
    assert len(evals) == 1 and evals[0]["classification/top1"] == cls["top1"]
    assert os.path.isdir(os.path.join(data_root, "toy_imagenet", "val", "star"))


def test_resume_continues_from_iteration_6(toy_run, tmp_path):
    out, opts, proc = toy_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = str(tmp_path / "run")
    shutil.copytree(out, again)
    resumed = run(
        TRAIN_TOOL,
        [
            "--config-file",
            TOY_FT,
            "--resume",
            *opts,
            "train.max_iter=8",
            f"train.output_dir={again}",
        ],
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    with open(os.path.join(again, "log.txt")) as f:
        log = f.read()
    assert re.search(r"Resuming from \S*model_final\.pth at iteration 6", log)
    assert "Training iterations 6..7" in log
    rows = read_metrics(again)
    assert [r["iteration"] for r in rows if "total_loss" in r] == list(range(8))
    with open(os.path.join(again, "final_metrics.json")) as f:
        assert json.load(f)["classification"]["num_images"] == 120
    # the finished run's final evaluation (at its max_iter 6) stays; the extension adds one at 8
    assert [r["iteration"] for r in rows if "classification/top1" in r] == [6, 8]


def test_eval_only_reproduces_the_final_evaluation(toy_run, tmp_path):
    out, _, proc = toy_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = str(tmp_path / "eval")
    result = run(
        TRAIN_TOOL,
        [
            "--config-file",
            TOY_FT,
            "--eval-only",
            f"train.init_checkpoint={out}/model_final.pth",
            f"train.output_dir={ev}",
        ],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(out, "final_metrics.json")) as f:
        trained = json.load(f)["classification"]
    with open(os.path.join(ev, "final_metrics.json")) as f:
        evaluated = json.load(f)["classification"]
    assert evaluated["num_images"] == 120
    assert evaluated["top1"] == trained["top1"]
    assert evaluated["top5"] == trained["top5"]
    assert evaluated["loss"] == pytest.approx(trained["loss"], abs=1e-5)


def _one_error_line(proc):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def test_a_wrong_type_override_is_refused(tmp_path):
    proc = run(
        TRAIN_TOOL,
        ["--config-file", TOY_FT, "model.net.num_classes=abc", f"train.output_dir={tmp_path}/o"],
    )
    line = _one_error_line(proc)
    assert "model.net.num_classes" in line and "expects int" in line and "'abc'" in line
    assert not os.path.exists(tmp_path / "o" / "model_final.pth")


def test_a_missing_imagenet_folder_is_named(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run(
        TRAIN_TOOL,
        [
            "--config-file",
            TOY_FT,
            "dataloader.train.dataset.names=imagenet_train",
            "dataloader.test.dataset.names=imagenet_val",
            f"train.output_dir={tmp_path}/o",
        ],
        datasets=str(empty),
    )
    line = _one_error_line(proc)
    assert "imagenet_train" in line
    assert os.path.join(str(empty), "imagenet", "train") in line
    assert os.listdir(empty) == []


def test_demo_prints_the_top5_and_draws_a_panel(toy_run, data_root, tmp_path):
    out, _, proc = toy_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    val = os.path.join(data_root, "toy_imagenet", "val")
    inputs = [
        os.path.join(val, "star", "star_0000.png"),
        os.path.join(val, "cross", "cross_0001.png"),
    ]
    dest = str(tmp_path / "demo")
    demo = run(
        DEMO_TOOL,
        ["--config-file", TOY_FT, "--weights", f"{out}/model_final.pth", "--device", "cpu"]
        + ["--input", *inputs, "--output", dest],
    )
    assert demo.returncode == 0, demo.stderr[-3000:]
    lines = [line for line in demo.stdout.splitlines() if "top-5" in line]
    assert len(lines) == 2, demo.stdout
    names = "|".join(TOY_CLASS_NAMES)
    for path, line in zip(inputs, lines):
        assert line.startswith(path + ": ")
        entries = re.findall(rf"\b({names}) (\d+\.\d)%", line.split("top-5:")[1])
        assert len(entries) == 5 and line.count("%") == 5, line
        assert sorted(n for n, _ in entries) == sorted(TOY_CLASS_NAMES)
        probs = [float(p) for _, p in entries]
        assert probs == sorted(probs, reverse=True)
        assert sum(probs) == pytest.approx(100.0, abs=0.3)
        top1 = line[len(path) + 2 :].split(" ")[0]
        assert top1 == entries[0][0]
    assert "summary: 2 images classified" in demo.stdout
    assert "100% of the model's parameters" in demo.stdout
    written = sorted(os.listdir(dest))
    assert written == ["cross_0001.png", "star_0000.png"]
    for name, src in zip(written, sorted(inputs)):
        picture, source = Image.open(os.path.join(dest, name)), Image.open(src)
        assert picture.width > source.width and picture.height >= source.height


@pytest.mark.parametrize("mode", ["train", "inference"])
def test_benchmark_times_the_classifier(mode, tmp_path):
    result = str(tmp_path / "bench.json")
    proc = run(
        BENCH_TOOL,
        ["--config-file", TOY_FT, "--mode", mode, "--batch-size", "2", "--size", "64"]
        + ["--iters", "2", "--warmup", "1", "--device", "cpu", "--peak-tflops", "0"]
        + ["--output", result],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(result) as f:
        data = json.load(f)
    assert data["mode"] == mode and data["batch_size"] == 2 and data["image_size"] == [64, 64]
    assert data["ms_per_img"] > 0 and data["img_per_s"] > 0
    assert data["img_per_s"] == pytest.approx(1000.0 / data["ms_per_img"])
    assert data["flops_per_img"] > 0
    assert data["params"] == sum(
        p.numel() for p in instantiate(load_lazy_config(TOY_FT).model).parameters()
    )


def test_benchmark_refuses_an_odd_training_batch_with_mixup():
    proc = run(
        BENCH_TOOL,
        ["--config-file", TOY_FT, "--mode", "train", "--batch-size", "3", "--size", "64"]
        + ["--iters", "1", "--warmup", "0", "--device", "cpu", "--peak-tflops", "0"],
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "--batch-size 3" in proc.stderr and "even batch size" in proc.stderr
    assert "mixup" in proc.stderr
