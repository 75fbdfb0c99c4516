"""``tools/demo.py`` says what it shows: the checkpoint report (and a loud warning for a mostly
random model), refused override typos, the classes the model knows, instances per image and a
summary; legend swatches in the colours seen on the overlay; labels that do not pile up.

Toy detector / segmenter on CPU; the tool runs in a subprocess where its printed lines and exit
code are the point, in-process (``main``) or at library level otherwise.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from typing import List

import numpy as np
import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.structures import Boxes, Instances
from PIL import Image

import convmae_det  # noqa: F401
from convmae_det.model_from_config import ConfigError, build_model_from_config, load_any_config
from convmae_det.visualization.overlay import (
    blend_masks,
    draw_instances_with_labels,
    draw_semantic,
    legend_colors,
)
from convmae_det.visualization.palette import toy_ade20k_colors
from convmae_det.visualization.predictor import Predictor, count_instances, weights_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DET_TOY = os.path.join(ROOT, "configs/toy/mask_rcnn_convvitdet_toy.py")
SEG_TOY = os.path.join(ROOT, "configs/ADE20K/upernet_convmae_toy.yaml")
TOY_CLASSES = "circle, triangle, square, star, cross"


def run_demo(args: List[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "demo.py"), "--device", "cpu"] + args,
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout,
    )  # fmt: skip


def _demo_module():
    spec = importlib.util.spec_from_file_location("_demo_tool", os.path.join(ROOT, "tools/demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_images(folder, n: int, h: int = 96, w: int = 128) -> List[str]:
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n):
        path = os.path.join(folder, f"img{i}.png")
        rgb = np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The toy detector's own weights, its encoder alone, and the toy segmenter's weights."""
    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    cfg, kind = load_any_config(DET_TOY)
    det = build_model_from_config(cfg, kind)
    cfg, kind = load_any_config(SEG_TOY, ["MODEL.DEVICE", "cpu"])
    seg = build_model_from_config(cfg, kind)
    out = {
        "det": str(folder / "det.pth"),
        "encoder": str(folder / "encoder.pth"),
        "seg": str(folder / "seg.pth"),
    }
    torch.save({"model": det.state_dict()}, out["det"])
    torch.save({"model": det.backbone.bottom_up.state_dict()}, out["encoder"])
    torch.save({"model": seg.state_dict()}, out["seg"])
    return out


# ------------------------------------------------------------------ 1. checkpoint report, typos
def test_demo_refuses_a_typo_in_an_override_with_did_you_mean(tmp_path):
    img = _write_images(tmp_path / "in", 1)[0]
    out = tmp_path / "out.png"
    proc = run_demo(["--config-file", DET_TOY, "--input", img, "--output", str(out),
                     "--opts", "train.init_chekpoint=model_final.pth"])  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: unknown config key 'train.init_chekpoint'")
    assert "did you mean train.init_checkpoint" in lines[0]
    assert not out.exists()


@pytest.mark.parametrize(
    "config,opts,message",
    [
        (DET_TOY, ["train.max_iter=abc"], "'train.max_iter' expects int"),
        (DET_TOY, ["model.roi_heads.num_clases=3"], "did you mean model.roi_heads.num_classes"),
        (SEG_TOY, ["MODEL.WEIGTHS", "w.pth"], "did you mean MODEL.WEIGHTS"),
        (SEG_TOY, ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", "many"], "MODEL.SEM_SEG_HEAD.NUM_CLASSES"),
    ],
)
def test_predictor_overrides_are_checked_like_the_trainers(config, opts, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        Predictor(config_file=config, opts=opts, device="cpu")
    assert "\n" not in str(info.value)


def test_demo_without_weights_warns_and_names_classes_instances_and_summary(tmp_path):
    images = _write_images(tmp_path / "in", 2)
    proc = run_demo(["--config-file", DET_TOY, "--input", *images, "--output",
                     str(tmp_path / "out"), "--confidence-threshold", "0.0"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        "WARNING: no weights given (--weights, or train.init_checkpoint / MODEL.WEIGHTS of the "
        "config, is empty): the pictures show a randomly initialised model" in proc.stderr
    )
    out = proc.stdout.splitlines()
    assert f"model: 5 classes of toy_coco_val: {TOY_CLASSES}" in out
    per_image = [line for line in out if line.startswith(tuple(images))]
    assert len(per_image) == 2, out
    totals = 0
    for path, line in zip(images, per_image):
        m = re.match(rf"{re.escape(path)}: (\d+) instances? >= 0\.00 \((.*)\), [\d.]+ s -> ", line)
        assert m, line
        by_class = {name: int(n) for n, name in re.findall(r"(\d+) (\w+)", m.group(2))}
        assert sum(by_class.values()) == int(m.group(1)) > 0
        assert set(by_class) <= set(TOY_CLASSES.split(", "))
        totals += int(m.group(1))
    summary = [line for line in out if line.startswith("summary: ")]
    assert len(summary) == 1 and summary[0].startswith(
        f"summary: 2 images drawn, {totals} instances >= 0.00: "
    ), summary
    assert sorted(os.listdir(tmp_path / "out")) == ["img0.png", "img1.png"]


def test_demo_with_the_models_own_checkpoint_reports_one_line(tmp_path, checkpoints, capsys):
    img = _write_images(tmp_path / "in", 1)[0]
    status = _demo_module().main(["--config-file", DET_TOY, "--device", "cpu", "--input", img,
                                  "--output", str(tmp_path / "o.png"),
                                  "--weights", checkpoints["det"]])  # fmt: skip
    captured = capsys.readouterr()
    assert status == 0
    assert "WARNING" not in captured.err and "WARNING" not in captured.out
    weights = [line for line in captured.out.splitlines() if line.startswith("weights: ")]
    assert weights == [
        f"weights: {checkpoints['det']} (format: detectron2_convvitdet_fpn): 123 tensors loaded, "
        "100% of the model's parameters"
    ]
    assert re.search(rf"{re.escape(img)}: \d+ instances? >= 0\.50", captured.out)


def test_demo_with_another_models_checkpoint_warns_mostly_random(tmp_path, checkpoints, capsys):
    img = _write_images(tmp_path / "in", 1)[0]
    status = _demo_module().main(["--config-file", DET_TOY, "--device", "cpu", "--input", img,
                                  "--output", str(tmp_path / "o.png"),
                                  "--weights", checkpoints["seg"]])  # fmt: skip
    captured = capsys.readouterr()
    assert status == 0
    warning = [line for line in captured.err.splitlines() if line.startswith("WARNING")]
    assert len(warning) == 1
    source = re.escape(checkpoints["seg"])
    assert re.match(
        rf"WARNING: (>99|9\d)% of the model's parameters were not in {source}: the pictures show "
        r"a mostly random model \(not loaded: ",
        warning[0],
    ), warning
    assert re.search(r"checkpoint keys unused, \d+ with another shape", captured.out)


def test_weights_report_of_an_encoder_checkpoint_names_the_random_parts(checkpoints):
    pred = Predictor(config_file=DET_TOY, weights=checkpoints["encoder"], device="cpu")
    report = pred.weights_report
    model = pred.model
    encoder = sum(p.numel() for p in model.backbone.bottom_up.parameters())
    assert report.loaded_params == encoder
    assert report.total_params == sum(p.numel() for p in model.parameters())
    assert set(report.random_parts) == {"backbone", "proposal_generator", "roi_heads"}
    lines = report.lines()
    assert len(lines) == 2 and lines[1].startswith("WARNING: ")
    pct = round(100 * (1 - encoder / report.total_params))
    assert f"WARNING: {pct}% of the model's parameters were not in" in lines[1]
    assert ("mostly random" in lines[1]) == (pct >= 50)


def test_weights_report_counts_parameters_not_tensors():
    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 2))

    class _Report:
        format, unexpected, mismatched = "x", [], []
        loaded = ["0.weight", "0.bias"]

    report = weights_report(model, "w.pth", _Report())
    assert (report.loaded_params, report.total_params) == (110, 132)
    assert report.random_parts == {"1": 22}
    assert report.lines()[1] == (
        "WARNING: 17% of the model's parameters were not in w.pth: those parts are random "
        "(not loaded: 1 17%)"
    )


def test_demo_missing_weights_file_is_one_line_exit_2(tmp_path):
    img = _write_images(tmp_path / "in", 1)[0]
    proc = run_demo(["--config-file", SEG_TOY, "--input", img, "--output",
                     str(tmp_path / "o.png"), "--weights", str(tmp_path / "nope.pth")])  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"error: weights: no such checkpoint file: {tmp_path / 'nope.pth'}"]


# ------------------------------------------------------------------ 2. what the model knows
def test_segmenter_describes_its_classes_and_counts_pixels():
    pred = Predictor(config_file=SEG_TOY, opts=["MODEL.DEVICE", "cpu"], device="cpu")
    assert pred.describe_model() == [
        "model: 6 classes of toy_ade20k_sem_seg_val: sky, grass, road, ball, box, tent"
    ]
    out = pred(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    counts = count_instances(out, 0.5)
    assert sum(counts.values()) == 40 * 56 and set(counts) <= set(range(6))


def test_class_count_mismatch_with_the_metadata_is_a_warning():
    pred = Predictor(config_file=DET_TOY, opts=["model.roi_heads.num_classes=7"], device="cpu")
    lines = pred.describe_model()
    assert lines[0] == f"model: 7 classes of toy_coco_val: {TOY_CLASSES}"
    assert lines[1].startswith("WARNING: the model predicts 7 classes but toy_coco_val names 5")
    assert pred.class_name(6) == "6" and pred.class_name(1) == "triangle"


# ------------------------------------------------------------------ 3. legend and labels
@pytest.mark.parametrize("alpha", [0.3, 0.6])
def test_legend_swatches_have_the_colours_seen_on_the_overlay(alpha):
    meta = MetadataCatalog.get("toy_ade20k_sem_seg_val")
    img = np.full((60, 50, 3), 128, np.uint8)
    img[30:] = (20, 200, 90)
    seg = np.zeros((60, 50), np.int64)
    seg[30:] = 3
    out = draw_semantic(img, seg, meta, alpha=alpha)
    overlay, panel = out[:, :50], out[:, 50:]
    palette = toy_ade20k_colors()
    for cls, (row, bg) in {0: (10, (128, 128, 128)), 3: (45, (20, 200, 90))}.items():
        expected = tuple(
            int(v) for v in np.rint((1 - alpha) * np.array(bg) + alpha * np.array(palette[cls]))
        )
        assert tuple(overlay[row, 25]) == expected  # what a person sees on the overlay ...
        swatch = (panel == np.array(expected, np.uint8)).all(-1)
        assert swatch.sum() >= 50, f"class {cls}: no swatch of the blended colour {expected}"
        raw = (panel == np.array(palette[cls], np.uint8)).all(-1)  # ... not the raw colour
        assert not raw.any()


def test_legend_colour_of_a_textured_region_is_its_mean_overlay_colour():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    seg = np.zeros((40, 40), np.int64)
    seg[:, 25:] = 1
    colors = [(200, 30, 30), (30, 30, 200)]
    out = blend_masks(img, [seg == 0, seg == 1], colors, 0.5)  # what draw_semantic blends
    seen = legend_colors(img, [seg == 0, seg == 1], colors, 0.5)
    for c in (0, 1):
        mean = out[seg == c].astype(np.float64).mean(0)
        assert np.abs(np.array(seen[c]) - mean).max() <= 1.0


def _crowded_instances(h: int, w: int, n: int) -> Instances:
    """What a low threshold gives: many boxes, a third of them on the same spot."""
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
    wh = torch.rand(n, 2, generator=g) * 60 + 10
    boxes = torch.cat([xy, xy + wh], 1)
    boxes[: n // 3] = torch.tensor([20.0, 20.0, 90.0, 80.0])
    inst = Instances((h, w))
    inst.pred_boxes = Boxes(boxes)
    inst.pred_classes = torch.randint(0, 5, (n,), generator=g)
    inst.scores = torch.rand(n, generator=g)
    return inst


def test_labels_at_threshold_zero_do_not_pile_up_and_stay_inside_the_picture():
    h, w = 192, 256
    inst = _crowded_instances(h, w, 60)
    meta = MetadataCatalog.get("toy_coco_val")
    picture, labels = draw_instances_with_labels(np.full((h, w, 3), 90, np.uint8), inst, meta)
    assert picture.shape == (h, w, 3)
    assert 5 <= len(labels) < 60
    positions = {tuple(round(v, 1) for v in lab.position) for lab in labels}
    assert len(positions) == len(labels), "two labels at the same spot"
    for i, a in enumerate(labels):
        x0, y0, x1, y1 = a.extent
        assert -0.5 <= x0 < x1 <= w + 0.5 and -0.5 <= y0 < y1 <= h + 0.5, a
        for b in labels[i + 1 :]:
            overlap_w = min(a.extent[2], b.extent[2]) - max(a.extent[0], b.extent[0])
            overlap_h = min(a.extent[3], b.extent[3]) - max(a.extent[1], b.extent[1])
            assert overlap_w <= 0 or overlap_h <= 0, (a, b)
    # the most confident instance is labelled first, at its box corner (Visualizer's choice)
    best = int(inst.scores.argmax())
    assert labels[0].instance == best
    assert labels[0].text.startswith(meta.thing_classes[int(inst.pred_classes[best])])


def test_label_font_grows_with_the_box_like_visualizer():
    h, w = 400, 400
    inst = Instances((h, w))
    inst.pred_boxes = Boxes(torch.tensor([[10.0, 10, 60, 40], [100, 100, 390, 390]]))
    inst.pred_classes = torch.tensor([0, 1])
    inst.scores = torch.tensor([0.9, 0.8])
    _, labels = draw_instances_with_labels(np.zeros((h, w, 3), np.uint8), inst, None)
    small, large = sorted(labels, key=lambda lab: lab.instance)
    assert large.font_size > small.font_size
    assert large.position == (100.0, 100.0)  # top-left corner of a large box
    assert small.position == (10.0, 40.0)  # under a small box (Visualizer's small-object rule)
