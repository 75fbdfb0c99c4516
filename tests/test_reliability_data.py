"""Bad detection data through the toy training pipeline (configs/common/toy_coco_loader.py):
grayscale / alpha / palette / CMYK images become the RGB image PIL converts them to; instances
without a usable mask are dropped whole (box, class, mask) with a warning naming the file and the
annotation; images without instances train.

Also covered elsewhere: a truncated / unreadable image names the file
(``test_reliability_faults.py::test_bad_sample_error_names_the_file``) and a missing annotation
file or image folder is named before training
(``test_det_train.py::test_missing_or_unregistered_dataset_is_named``)."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import uuid

import numpy as np
import pytest
import torch
from detectron2.config import instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.coco import load_coco_json
from detectron2.utils.events import EventStorage
from PIL import Image, ImageDraw

from convmae_det.data.annotation_checks import drop_invalid_instances, polygon_area
from convmae_det.data.detection_mapper import DetectionDatasetMapper
from convmae_det.engine import lazy_train, load_lazy_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_TOY = os.path.join(ROOT, "configs/toy/mask_rcnn_convvitdet_toy.py")
SQUARE = [8.0, 8.0, 40.0, 8.0, 40.0, 40.0, 8.0, 40.0]  # 32 x 32 px
TRIANGLE = [44.0, 10.0, 60.0, 10.0, 52.0, 30.0]


def _picture(width=64, height=48):
    """(H, W, 3) uint8: a gradient background with a red square, an alpha ramp (H, W)."""
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([xx * 3 % 256, yy * 5 % 256, (xx + yy) * 2 % 256], -1).astype(np.uint8)
    rgb[8:40, 8:40] = (220, 20, 60)
    return rgb, (xx * 255 // (width - 1)).astype(np.uint8)


def _save_image(path, mode):
    rgb, alpha = _picture()
    image = Image.fromarray(rgb)
    if mode in ("RGBA", "LA"):
        image = image.convert(mode[:-1])
        image.putalpha(Image.fromarray(alpha))
    elif mode == "P":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    else:
        image = image.convert(mode)
    image.save(path, quality=95) if path.endswith(".jpg") else image.save(path)
    assert Image.open(path).mode == mode
    return image.size


def _ann(ann_id, image_id, category, segmentation, bbox=None):
    if bbox is None:
        xs, ys = segmentation[0][0::2], segmentation[0][1::2]
        bbox = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
    return {"id": ann_id, "image_id": image_id, "category_id": category, "iscrowd": 0,
            "segmentation": segmentation, "bbox": bbox, "area": bbox[2] * bbox[3]}  # fmt: skip


@pytest.fixture
def coco_dataset(tmp_path):
    """Write a COCO-format dataset into tmp_path and register it under a unique name (removed
    afterwards). Call with {file name: image mode} and annotations by file name."""
    names = []

    def make(images, annotations=None):
        root = tmp_path / f"set{len(names)}"
        os.makedirs(root / "images")
        entries = []
        for i, (file_name, mode) in enumerate(images.items()):
            width, height = _save_image(str(root / "images" / file_name), mode)
            entries.append({"id": i + 1, "file_name": file_name, "width": width, "height": height})
        ids = {e["file_name"]: e["id"] for e in entries}
        annos = [
            {**a, "image_id": ids[f]} for f, items in (annotations or {}).items() for a in items
        ]
        categories = [{"id": 1, "name": "square"}, {"id": 2, "name": "other"}]
        coco = {"images": entries, "annotations": annos, "categories": categories}
        json_file = str(root / "instances.json")
        with open(json_file, "w") as f:
            json.dump(coco, f)
        name = f"reldata_{uuid.uuid4().hex[:8]}"
        image_root = str(root / "images")
        DatasetCatalog.register(
            name, lambda: load_coco_json(json_file, image_root, name, extra_annotation_keys=["id"])
        )
        MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root,
                                      evaluator_type="coco")  # fmt: skip
        names.append(name)
        return name

    yield make
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _toy_cfg(name, *extra):
    return load_lazy_config(
        PAPER_TOY, [f"dataloader.train.dataset.names={name}", "dataloader.train.seed=0"]
        + list(extra),
    )  # fmt: skip


MODES = {"gray.jpg": "L", "gray.png": "L", "gray_alpha.png": "LA", "rgba.png": "RGBA",
         "palette.png": "P", "cmyk.jpg": "CMYK", "rgb.jpg": "RGB"}  # fmt: skip


def test_grayscale_alpha_palette_and_cmyk_images_become_the_rgb_image_pil_gives(coco_dataset):
    square = {f: [_ann(i + 1, 0, 1, [SQUARE])] for i, f in enumerate(MODES)}
    name = coco_dataset(MODES, square)
    cfg = _toy_cfg(name, "dataloader.train.mapper.augmentations=[]")
    mapper = instantiate(cfg.dataloader.train.mapper)
    records = DatasetCatalog.get(name)
    assert len(records) == len(MODES)
    for record in records:
        image = mapper(copy.deepcopy(record))["image"]
        expected = np.array(Image.open(record["file_name"]).convert("RGB"))
        assert image.dtype == torch.uint8 and image.shape == (3, 48, 64), record["file_name"]
        assert torch.equal(image, torch.from_numpy(expected).permute(2, 0, 1).contiguous())
    # and through the toy loader with its augmentations (flip, resize, crop to 192)
    loader = instantiate(
        _toy_cfg(name, f"dataloader.train.total_batch_size={len(MODES)}").dataloader.train
    )
    batch = next(iter(loader))
    assert sorted(os.path.basename(d["file_name"]) for d in batch) == sorted(MODES)
    for data in batch:
        assert data["image"].dtype == torch.uint8 and data["image"].shape[0] == 3
        assert len(data["instances"]) == 1 and data["instances"].gt_classes.tolist() == [0]


ZERO_AREA = [0.0, 0.0, 10.0, 10.0, 20.0, 20.0]  # collinear: a box, but an empty mask
INVALID = {
    "a.png": [
        _ann(11, 0, 1, [SQUARE]),
        _ann(12, 0, 2, [], bbox=[30.0, 30.0, 10.0, 10.0]),  # empty segmentation list
        _ann(13, 0, 2, [[1.0, 1.0, 30.0, 30.0]], bbox=[1.0, 1.0, 29.0, 29.0]),  # 2 points
        _ann(14, 0, 2, [ZERO_AREA]),
        _ann(15, 0, 2, [TRIANGLE, [5.0, 5.0, 5.0, 5.0, 5.0, 5.0]]),  # one valid part
    ],
    "b.png": [_ann(21, 0, 1, [ZERO_AREA])],  # nothing left: the image leaves the training set
    "c.png": [_ann(31, 0, 2, [TRIANGLE])],
}


def test_instances_without_a_usable_mask_are_dropped_whole_and_named(coco_dataset, caplog):
    name = coco_dataset(dict.fromkeys(INVALID, "RGB"), INVALID)
    cfg = _toy_cfg(name, "dataloader.train.mapper.augmentations=[]",
                   "dataloader.train.total_batch_size=2")  # fmt: skip
    with caplog.at_level(logging.WARNING):
        loader = instantiate(cfg.dataloader.train)
    assert "Dropped 3 training instance(s) without a usable mask" in caplog.text
    assert "1 image(s) left without instances" in caplog.text
    assert (
        "a.png' annotation id 12 (category 1, bbox [30.0, 30.0, 10.0, 10.0]): empty " in caplog.text
    )
    assert "a.png' annotation id 14" in caplog.text and "b.png' annotation id 21" in caplog.text
    assert "zero area" in caplog.text
    assert sorted(os.path.basename(r["file_name"]) for r in loader.dataset) == ["a.png", "c.png"]

    batch = {os.path.basename(d["file_name"]): d for d in next(iter(loader))}
    instances = batch["a.png"]["instances"]
    assert instances.gt_classes.tolist() == [0, 1]  # ids 11 and 15 (ids 12, 13, 14 dropped)
    assert len(instances.gt_boxes) == len(instances.gt_masks) == 2
    assert [len(p) for p in instances.gt_masks.polygons] == [1, 1]
    np.testing.assert_allclose(instances.gt_masks.polygons[1][0], TRIANGLE)
    boxes = instances.gt_boxes.tensor.tolist()  # recomputed from the masks
    assert boxes == [[8.0, 8.0, 40.0, 40.0], [44.0, 10.0, 60.0, 30.0]]
    assert (instances.gt_masks.area() > 0).all()
    assert batch["c.png"]["instances"].gt_classes.tolist() == [1]


def test_instance_check_keeps_valid_parts_crowds_rle_and_box_only_training_sets():
    nan_polygon = [0.0, 0.0, 10.0, math.nan, 20.0, 0.0]
    annos = [
        {"category_id": 0, "bbox": [0, 0, 9, 9], "segmentation": [[0, 0, 9, 0, 9, 9]]},
        {"category_id": 1, "bbox": [0, 0, 5, 5], "segmentation": []},
        {"category_id": 1, "bbox": [0, 0, 5, 5], "segmentation": [[0, 0, 9, 0, 9]]},  # odd
        {"category_id": 1, "bbox": [0, 0, 5, 5], "segmentation": [nan_polygon]},
        {"category_id": 1, "bbox": [0, 0, 5, 5], "segmentation": [[0, 0, 5, 0, 5, 5], ZERO_AREA]},
        {"category_id": 1, "bbox": [0, 0, 5, 5], "iscrowd": 1},  # crowd: the mapper drops it
        {"category_id": 1, "bbox": [0, 0, 5, 5], "segmentation": {"size": [9, 9], "counts": "a"}},
    ]
    records = [{"file_name": "x.jpg", "annotations": annos}, {"file_name": "y.jpg"}]
    original = copy.deepcopy(records)
    kept = drop_invalid_instances(records)
    assert records == original  # input untouched
    assert [r["file_name"] for r in kept] == ["x.jpg", "y.jpg"]
    out = kept[0]["annotations"]
    assert [a["bbox"] for a in out] == [annos[0]["bbox"], annos[4]["bbox"], annos[5]["bbox"],
                                        annos[6]["bbox"]]  # fmt: skip
    assert out[1]["segmentation"] == [[0, 0, 5, 0, 5, 5]]  # the zero-area part is gone
    assert drop_invalid_instances(records, with_masks=False) is records
    box_only = [{"file_name": "z.jpg", "annotations": [{"category_id": 0, "bbox": [0, 0, 1, 1]}]}]
    assert drop_invalid_instances(box_only) is box_only
    assert polygon_area(SQUARE) == 32 * 32 and polygon_area(ZERO_AREA) == 0


def test_instance_check_names_file_and_position_when_annotations_have_no_id(caplog):
    annos = [
        {"category_id": 0, "bbox": [0, 0, 9, 9], "segmentation": [[0, 0, 9, 0, 9, 9]]},
        {"category_id": 3, "bbox": [1, 2, 3, 4], "segmentation": [[0, 0, 1, 1, 2, 2]]},
    ]
    records = [{"file_name": "x.jpg", "annotations": annos}]
    with caplog.at_level(logging.WARNING):
        drop_invalid_instances(records)
    assert "'x.jpg' annotation #1 of the image (category 3, bbox [1, 2, 3, 4]): zero area" in (
        caplog.text
    )


def test_images_without_instances_train_and_give_zero_foreground_losses(coco_dataset, tmp_path):
    name = coco_dataset(
        {"empty.png": "RGB", "one.png": "L"}, {"one.png": [_ann(1, 0, 1, [SQUARE])]}
    )
    out = str(tmp_path / "run")
    cfg = _toy_cfg(
        name, "dataloader.train.dataset.filter_empty=False", "dataloader.train.total_batch_size=2",
        f"dataloader.test.dataset.names={name}", "train.max_iter=2", "train.log_period=1",
        f"train.output_dir={out}", "model.roi_heads.num_classes=2",
    )  # fmt: skip
    results = lazy_train(cfg)
    assert {"bbox", "segm"} <= set(results)
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = [json.loads(line) for line in f if line.strip()]
    losses = [m["total_loss"] for m in metrics if "total_loss" in m]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)

    # a batch of the empty image alone: only background terms
    model = instantiate(cfg.model).train()
    loader = instantiate(cfg.dataloader.train)
    empty = next(d for d in next(iter(loader)) if d["file_name"].endswith("empty.png"))
    assert len(empty["instances"]) == 0
    with EventStorage():
        loss_dict = model([empty])
    assert loss_dict["loss_mask"].item() == 0 and loss_dict["loss_box_reg"].item() == 0
    assert loss_dict["loss_rpn_loc"].item() == 0 and loss_dict["loss_cls"].item() > 0
    total = sum(loss_dict.values())
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("mask_format", ["polygon", "bitmask"])
def test_mapper_gives_empty_instances_without_objects_only_crowds_or_no_annotations_key(
    coco_dataset, mask_format
):
    name = coco_dataset({"one.png": "RGB"}, {"one.png": [_ann(1, 0, 1, [SQUARE])]})
    cfg = _toy_cfg(name, f"dataloader.train.mapper.instance_mask_format={mask_format}")
    mapper = instantiate(cfg.dataloader.train.mapper)
    assert type(mapper) is DetectionDatasetMapper
    (record,) = DatasetCatalog.get(name)
    crowd = {**record["annotations"][0], "iscrowd": 1}
    for variant in ({**record, "annotations": []}, {**record, "annotations": [crowd]},
                    {k: v for k, v in record.items() if k != "annotations"}):  # fmt: skip
        out = mapper(copy.deepcopy(variant))
        instances = out["instances"]
        assert len(instances) == 0 and instances.image_size == tuple(out["image"].shape[1:])
        assert instances.gt_boxes.tensor.shape == (0, 4) and instances.gt_classes.shape == (0,)
        assert len(instances.gt_masks) == 0
        if mask_format == "bitmask":
            assert instances.gt_masks.tensor.shape == (0, *out["image"].shape[1:])
    with_object = mapper(copy.deepcopy(record))["instances"]
    assert len(with_object) == 1 and with_object.gt_masks.get_bounding_boxes().tensor.numel() == 4
