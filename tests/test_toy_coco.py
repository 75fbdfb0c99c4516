"""The embedded toy shapes dataset: deterministic, valid COCO, modal masks, registered names."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

import convmae_det.data  # noqa: F401  (registers the toy datasets)
from convmae_det.data.datasets.toy_coco import (
    TOY_CLASSES,
    TOY_SPLITS,
    generate_toy_split,
    register_toy_coco,
    toy_coco_root,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _digest(folder: str) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            h.update(name.encode() + f.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def val_split(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("toy"))
    json_file = generate_toy_split(root, "val", 60, seed=TOY_SPLITS["toy_coco_val"][2])
    return root, json_file


def test_generation_is_deterministic_by_seed(tmp_path):
    a = generate_toy_split(str(tmp_path / "a"), "mini", 6, seed=7)
    b = generate_toy_split(str(tmp_path / "b"), "mini", 6, seed=7)
    c = generate_toy_split(str(tmp_path / "c"), "mini", 6, seed=8)
    assert open(a).read() == open(b).read()
    assert _digest(str(tmp_path / "a" / "mini")) == _digest(str(tmp_path / "b" / "mini"))
    assert open(a).read() != open(c).read()


def test_annotations_are_valid_coco_with_boxes_matching_polygons(val_split):
    root, json_file = val_split
    coco = COCO(json_file)
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(TOY_CLASSES)
    assert len(coco.getImgIds()) == 60
    for img in coco.loadImgs(coco.getImgIds()):
        with Image.open(os.path.join(root, "val", img["file_name"])) as im:
            assert im.size == (img["width"], img["height"]) and im.mode == "RGB"
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
        assert 1 <= len(anns) <= 8
        for ann in anns:
            pts = np.concatenate([np.asarray(p).reshape(-1, 2) for p in ann["segmentation"]])
            x, y, w, h = ann["bbox"]
            assert pts[:, 0].min() == pytest.approx(x, abs=0.02)
            assert pts[:, 1].min() == pytest.approx(y, abs=0.02)
            assert pts[:, 0].max() == pytest.approx(x + w, abs=0.02)
            assert pts[:, 1].max() == pytest.approx(y + h, abs=0.02)
            assert 0 <= x and 0 <= y and x + w <= img["width"] + 1e-6
            assert y + h <= img["height"] + 1e-6
            assert ann["iscrowd"] == 0 and ann["area"] > 0


def test_masks_describe_visible_parts_without_overlap(val_split):
    """Later shapes occlude earlier ones: the visible masks of one image are (almost) disjoint,
    while the objects themselves do overlap (their boxes intersect) in some images."""
    _, json_file = val_split
    coco = COCO(json_file)
    overlapping_pairs = 0
    for img in coco.loadImgs(coco.getImgIds()):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
        masks = np.stack([coco.annToMask(a) for a in anns]).astype(np.int32)
        assert (masks.sum(0) > 1).sum() <= 0.02 * masks.sum() + 8  # shared edges only
        boxes = [a["bbox"] for a in anns]
        ious = mask_util.iou(boxes, boxes, [0] * len(boxes))
        overlapping_pairs += int((np.triu(np.asarray(ious), 1) > 0).sum())
    assert overlapping_pairs >= 5


def test_object_sizes_span_tiny_to_large_and_all_classes_appear(val_split):
    _, json_file = val_split
    anns = json.load(open(json_file))["annotations"]
    sides = np.sqrt([a["area"] for a in anns])
    assert sides.min() < 12 and sides.max() > 80
    assert (sides < 32).mean() > 0.2 and (sides >= 32).mean() > 0.2
    assert {a["category_id"] for a in anns} == set(range(1, len(TOY_CLASSES) + 1))


def test_registered_split_is_generated_on_first_use(tmp_path):
    register_toy_coco(["toy_coco_mini"], root=str(tmp_path / "toy_coco"))
    try:
        json_file = str(tmp_path / "toy_coco" / "annotations" / "instances_mini.json")
        meta = MetadataCatalog.get("toy_coco_mini")
        assert meta.json_file == json_file and not os.path.exists(json_file)
        dicts = DatasetCatalog.get("toy_coco_mini")
        assert os.path.isfile(json_file)
        assert len(dicts) == TOY_SPLITS["toy_coco_mini"][1]
        assert all(d["file_name"].startswith(str(tmp_path)) for d in dicts)
        assert all(len(d["annotations"]) >= 1 for d in dicts)
        assert meta.thing_classes == list(TOY_CLASSES) and meta.evaluator_type == "coco"
        assert {"toy_coco_train", "toy_coco_val", "toy_coco_mini"} <= set(DatasetCatalog.list())
    finally:
        register_toy_coco(["toy_coco_mini"])  # back to the default root


def test_default_root_follows_detectron2_datasets(monkeypatch, tmp_path):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    assert toy_coco_root() == str(tmp_path / "toy_coco")


def test_train_and_val_images_differ():
    train = np.random.default_rng([TOY_SPLITS["toy_coco_train"][2], 0]).random(4)
    val = np.random.default_rng([TOY_SPLITS["toy_coco_val"][2], 0]).random(4)
    assert not np.allclose(train, val)


def test_cli_writes_the_requested_split(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "datasets/generate_toy_coco.py"), "--root",
         str(tmp_path), "--splits", "toy_coco_mini"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "toy_coco_mini" in proc.stdout
    assert len(os.listdir(tmp_path / "mini")) == TOY_SPLITS["toy_coco_mini"][1]
