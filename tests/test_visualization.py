"""Overlays, palettes, the two-config-kind predictor, reconstruction grids and curves (CPU, tiny)."""

import json
import os

import numpy as np
import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.structures import Boxes, Instances

import convmae_det  # noqa: F401
from convmae_det.visualization import draw_instances, draw_semantic, Predictor
from convmae_det.visualization.curves import plot_metrics, read_metrics
from convmae_det.visualization.overlay import draw_prediction
from convmae_det.visualization.palette import (
    ade20k_colors,
    class_colors,
    coco_thing_colors,
    instance_colors,
    toy_ade20k_colors,
    toy_coco_colors,
)
from convmae_det.visualization.reconstruction import COLUMNS, reconstruction_grid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _image(h=48, w=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _instances(h=48, w=64):
    inst = Instances((h, w))
    masks = torch.zeros(2, h, w, dtype=torch.bool)
    masks[0, 5:20, 5:25] = True
    masks[1, 25:40, 30:60] = True
    inst.pred_masks = masks
    inst.pred_boxes = Boxes(torch.tensor([[5.0, 5, 25, 20], [30, 25, 60, 40]]))
    inst.pred_classes = torch.tensor([0, 3])
    inst.scores = torch.tensor([0.9, 0.3])
    return inst


def test_instance_overlay_differs_from_input_exactly_where_a_mask_lies():
    img, inst = _image(), _instances()
    out = draw_instances(
        img, inst, None, draw_boxes=False, draw_labels=False, draw_outlines=False, alpha=0.6
    )
    changed = (out != img).any(-1)
    union = inst.pred_masks.any(0).numpy()
    assert out.shape == img.shape
    assert not changed[~union].any()
    # a pixel may coincide with its colour; nearly all mask pixels change
    assert changed[union].mean() > 0.95


def test_full_overlay_keeps_image_size_and_colours_masks_with_class_colours():
    meta = MetadataCatalog.get("toy_coco_val")
    img = np.full((48, 64, 3), 128, np.uint8)
    out = draw_instances(img, _instances(), meta, alpha=1.0, draw_outlines=False)
    assert out.shape == img.shape
    assert tuple(out[17, 15]) == tuple(toy_coco_colors()[0])


def test_confidence_threshold_drops_low_scores():
    img = np.full((48, 64, 3), 128, np.uint8)
    out = draw_prediction(img, {"instances": _instances()}, None, confidence_threshold=0.5)
    assert (out[38, 55] == img[38, 55]).all()  # 0.3-score mask, clear of the label
    assert (out[12, 10] != img[12, 10]).any()


def test_instance_colour_mode_differs_from_class_mode():
    img = np.full((48, 64, 3), 128, np.uint8)
    inst = _instances()
    inst.pred_classes = torch.tensor([2, 2])
    kw = dict(alpha=1.0, draw_boxes=False, draw_labels=False, draw_outlines=False)
    by_class = draw_instances(img, inst, None, color_mode="class", **kw)
    by_inst = draw_instances(img, inst, None, color_mode="instance", **kw)
    assert (by_class[12, 10] == by_class[32, 45]).all()
    assert (by_inst[12, 10] != by_inst[32, 45]).any()


def test_palettes_are_fixed_and_match_registered_metadata():
    assert len(coco_thing_colors()) == 80 and len(ade20k_colors()) == 150
    assert coco_thing_colors()[0] == (220, 20, 60)  # detectron2's COCO "person"
    assert ade20k_colors() == ade20k_colors()
    assert instance_colors(5) == instance_colors(5)
    assert class_colors(MetadataCatalog.get("toy_ade20k_sem_seg_val"), stuff=True)[:6] == (
        toy_ade20k_colors()
    )
    assert class_colors(MetadataCatalog.get("toy_coco_val")) == toy_coco_colors()


def test_semantic_overlay_colours_by_class_and_appends_a_legend():
    meta = MetadataCatalog.get("toy_ade20k_sem_seg_val")
    img = np.full((40, 50, 3), 128, np.uint8)
    seg = np.zeros((40, 50), np.int64)
    seg[20:] = 3
    seg[:5, :5] = 255
    out = draw_semantic(img, seg, meta, alpha=1.0)
    assert out.shape[0] == 40 and out.shape[1] > 50
    assert tuple(out[30, 10]) == toy_ade20k_colors()[3]
    assert tuple(out[10, 10]) == toy_ade20k_colors()[0]
    assert (out[2, 2] == 128).all()  # ignored pixels keep the image
    no_legend = draw_semantic(img, seg, meta, alpha=1.0, legend=False)
    assert (out[:, :50] == no_legend).all()


@pytest.mark.parametrize(
    "config,opts,key",
    [
        ("configs/toy/mask_rcnn_convvitdet_toy.py", [], "instances"),
        ("configs/ADE20K/upernet_convmae_toy.yaml", ["MODEL.DEVICE", "cpu"], "sem_seg"),
    ],
)
def test_predictor_loads_both_config_kinds_and_predicts_at_image_size(config, opts, key):
    torch.manual_seed(0)
    pred = Predictor(config_file=os.path.join(REPO, config), opts=opts, device="cpu")
    assert pred.task == key and pred.input_format in ("RGB", "BGR")
    img = _image(72, 96)
    out = pred(img)
    assert key in out
    if key == "instances":
        assert out["instances"].image_size == (72, 96)
    else:
        assert out["sem_seg"].shape[-2:] == (72, 96)
    picture = draw_prediction(img, out, pred.metadata, confidence_threshold=0.0)
    assert picture.shape[0] == 72


def test_predictor_bgr_input_equals_rgb_input():
    torch.manual_seed(0)
    pred = Predictor(
        config_file=os.path.join(REPO, "configs/ADE20K/upernet_convmae_toy.yaml"),
        opts=["MODEL.DEVICE", "cpu"],
        device="cpu",
    )
    img = _image(64, 64)
    a = pred(img, image_format="RGB")["sem_seg"]
    b = pred(np.ascontiguousarray(img[:, :, ::-1]), image_format="BGR")["sem_seg"]
    assert torch.allclose(a, b)


@pytest.mark.parametrize("name,rows", [("fastconvmae_toy", 4), ("convmae_toy", 1)])
def test_reconstruction_grid_layout_and_pasted_visible_patches_equal_input(name, rows):
    from convmae_det.modeling.pretrain import build_pretrain_model

    torch.manual_seed(0)
    model = build_pretrain_model(name).eval()
    grid, panels = reconstruction_grid(model, _image(64, 64), seed=1, pad=2)
    assert panels.shape == (rows, len(COLUMNS), 64, 64, 3)
    assert grid.shape == (rows * 66 - 2, 4 * 66 - 2, 3)
    for r in range(rows):
        visible = ~(panels[r, 1] == 127).all(-1)
        assert 0 < visible.mean() < 1
        assert (panels[r, 3][visible] == panels[r, 0][visible]).all()
        assert (panels[r, 1][visible] == panels[r, 0][visible]).all()
    if rows > 1:  # complementary masks: every pixel visible in exactly one row
        vis = np.stack([~(panels[r, 1] == 127).all(-1) for r in range(rows)])
        assert (vis.sum(0) == 1).mean() > 0.99


def test_curves_are_written_from_metrics_json(tmp_path):
    lines = [{"iteration": i, "total_loss": 2.0 / (i + 1), "lr": 0.001} for i in range(0, 50, 10)]
    lines.append({"iteration": 49, "bbox/AP": 12.5, "segm/AP": 10.0})
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(x) for x in lines))
    series = read_metrics(str(tmp_path))
    assert series["bbox/AP"] == [(49.0, 12.5)] and len(series["total_loss"]) == 5
    paths = plot_metrics(str(tmp_path), str(tmp_path / "plots"))
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["curves.png", "eval.png", "losses.png", "lr.png"]
    from PIL import Image

    assert all(Image.open(p).size[0] > 100 for p in paths)
