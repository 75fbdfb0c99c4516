"""Bad data that used to slip through: a truncated test image (evaluation), unreadable demo
inputs, malformed COCO annotations (2-point polygon, negative box) that crashed COCO evaluation
after training, and a missing ADE20K folder found only after the model was built."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import torch
from detectron2.config import instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances
from PIL import Image
from pycocotools import mask as mask_util

import convmae_det.data  # noqa: F401
from convmae_det.data.annotation_checks import drop_invalid_instances
from convmae_det.data.datasets.toy_coco import ensure_toy_split, register_toy_coco
from convmae_det.data.detection_mapper import DetectionDatasetMapper
from convmae_det.engine import lazy_eval_only, load_lazy_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAZY_TOOL = os.path.join(ROOT, "tools/lazyconfig_train_net.py")
SEG_TOOL = os.path.join(ROOT, "tools/plain_train_net.py")
PAPER_TOY = os.path.join(ROOT, "configs/toy/mask_rcnn_convvitdet_toy.py")
ADE20K_CFG = os.path.join(ROOT, "configs/ADE20K/upernet_convmae_b_512_160k.yaml")
MINI = [
    "dataloader.train.dataset.names=toy_coco_mini",
    "dataloader.test.dataset.names=toy_coco_mini",
]


def _run(tool, args, data_root, **env):
    env = {**os.environ, "DETECTRON2_DATASETS": str(data_root), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": ROOT, **env}  # fmt: skip
    return subprocess.run([sys.executable, tool] + list(args), capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)  # fmt: skip


def _truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


@pytest.fixture(scope="module")
def toy_mini(tmp_path_factory):
    """The toy_coco_mini split (16 images), generated once; copy it with ``copy_of``."""
    base = tmp_path_factory.mktemp("bad_data_base")
    ensure_toy_split("toy_coco_mini", str(base / "toy_coco"))
    return base


@pytest.fixture
def data_copy(toy_mini, tmp_path):
    """A private copy of the toy data root (``$DETECTRON2_DATASETS``), toy_coco_mini registered
    there in this process for the test (restored afterwards)."""
    root = tmp_path / "d2"
    shutil.copytree(toy_mini, root)
    register_toy_coco(["toy_coco_mini"], root=str(root / "toy_coco"))
    yield root
    register_toy_coco(["toy_coco_mini"])


# ------------------------------------------------------------------ 1. truncated test image
def test_mapper_names_a_truncated_or_non_image_file(data_copy, tmp_path):
    from convmae_det.data.detection_mapper import UnreadableImageError

    image = data_copy / "toy_coco" / "mini" / "mini_000003.jpg"
    _truncate(image)
    mapper = DetectionDatasetMapper(is_train=False, augmentations=[], image_format="RGB")
    record = {"file_name": str(image), "image_id": 4, "height": 1, "width": 1}
    with pytest.raises(UnreadableImageError, match=r"mini_000003\.jpg: cannot read.*truncated"):
        mapper(record)
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(OSError, match=r"notes\.jpg: cannot read the image: not an image"):
        mapper({**record, "file_name": str(text)})


def test_truncated_test_image_stops_evaluation_with_one_line_naming_it(data_copy, tmp_path):
    _truncate(data_copy / "toy_coco" / "mini" / "mini_000003.jpg")
    out = tmp_path / "eval"
    proc = _run(LAZY_TOOL, ["--config-file", PAPER_TOY, "--eval-only", *MINI,
                            f"train.output_dir={out}"], data_copy)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "mini_000003.jpg" in errors[0] and "truncated" in errors[0]
    assert "dataloader.test.skip_bad_samples=True" in errors[0]
    assert not (out / "final_metrics.json").exists()


def test_skip_option_leaves_the_image_out_of_the_metrics_and_counts_it(data_copy, tmp_path, caplog):
    """4 of the toy images, one truncated, evaluated in this process with the skip option."""
    _truncate(data_copy / "toy_coco" / "mini" / "mini_000003.jpg")
    with open(data_copy / "toy_coco" / "annotations" / "instances_mini.json") as f:
        coco = json.load(f)
    coco["images"] = coco["images"][:4]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] <= 4]
    json_file = str(tmp_path / "four.json")
    with open(json_file, "w") as f:
        json.dump(coco, f)
    name = _register(json_file, str(data_copy / "toy_coco" / "mini"))
    try:
        cfg = load_lazy_config(PAPER_TOY, [f"dataloader.test.dataset.names={name}",
                                           "dataloader.test.skip_bad_samples=True",
                                           f"train.output_dir={tmp_path}"])  # fmt: skip
        with caplog.at_level(logging.WARNING):
            results = lazy_eval_only(cfg)
    finally:
        _unregister(name)
    assert results["skipped_test_images"] == 1 and {"bbox", "segm"} <= set(results)
    assert "Skipped test image" in caplog.text and "mini_000003.jpg (truncated)" in caplog.text


# ------------------------------------------------------------------ 2. demo inputs
def _demo_module():
    spec = importlib.util.spec_from_file_location("_demo_tool", os.path.join(ROOT, "tools/demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_names_skips_and_counts_unreadable_inputs(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.full((48, 64, 3), 128, np.uint8)).save(folder / "good.png")
    Image.fromarray(np.full((48, 64, 3), 90, np.uint8)).save(folder / "trunc.jpg", quality=95)
    _truncate(folder / "trunc.jpg")
    (folder / "notes.txt").write_text("not an image")
    demo = _demo_module()
    common = ["--config-file", PAPER_TOY, "--device", "cpu"]
    status = demo.main(common + ["--input", str(folder / "*"), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 0
    assert os.listdir(tmp_path / "out") == ["good.png"]
    warnings = [line for line in err.splitlines() if line.startswith("warning: skipped")]
    assert len(warnings) == 2
    assert any("notes.txt: not an image" in w for w in warnings)
    assert any("trunc.jpg: truncated" in w for w in warnings)
    assert (
        f"2 of 3 inputs could not be read: {folder / 'notes.txt'} (not an image), "
        f"{folder / 'trunc.jpg'} (truncated)" in err
    )
    status = demo.main(common + ["--input", str(folder / "*.txt"), str(folder / "trunc.jpg"),
                                 "--output", str(tmp_path / "none")])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 2 and "2 of 2 inputs could not be read" in err
    assert os.listdir(tmp_path / "none") == []


# ------------------------------------------------------------------ 3. malformed annotations
def _corrupt_annotations(json_file):
    """Annotation id 1: a 2-point polygon; id 2: bbox [x, y, -5, 10]."""
    with open(json_file) as f:
        coco = json.load(f)
    first, second = coco["annotations"][0], coco["annotations"][1]
    assert (first["id"], second["id"]) == (1, 2)
    first["segmentation"] = [[10.0, 10.0, 30.0, 30.0]]
    second["bbox"] = [second["bbox"][0], second["bbox"][1], -5, 10]
    with open(json_file, "w") as f:
        json.dump(coco, f)
    files = {img["id"]: img["file_name"] for img in coco["images"]}
    return files[first["image_id"]], files[second["image_id"]]


def test_malformed_annotations_are_named_at_loading_and_dropped_from_training(data_copy, caplog):
    """The toy (and builtin COCO) datasets are loaded with load_coco_json_checked."""
    json_file = str(data_copy / "toy_coco" / "annotations" / "instances_mini.json")
    image1, image2 = _corrupt_annotations(json_file)
    with caplog.at_level(logging.WARNING):
        records = DatasetCatalog.get("toy_coco_mini")
    assert f"{json_file}: 2 annotation(s) cannot be used as written" in caplog.text
    assert (
        f"annotation id 1 (image '{image1}'): polygon 1 of 1: fewer than 3 points (2)"
        in caplog.text
    )
    assert (
        f"annotation id 2 (image '{image2}'): bbox of negative width or height (-5 x 10)"
        in caplog.text
    )
    ids = {a["id"] for r in records for a in r["annotations"]}
    assert 1 not in ids and 2 in ids  # detectron2 drops the 2-point polygon, keeps the box
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        kept = drop_invalid_instances(records)
    assert 2 not in {a["id"] for r in kept for a in r["annotations"]}
    assert f"{image2}' annotation id 2" in caplog.text and "negative width" in caplog.text


def _register(json_file, image_root):
    """A COCO json registered under a new name (detectron2's loader); returns the name."""
    from detectron2.data.datasets.coco import load_coco_json

    name = f"badgt_{uuid.uuid4().hex[:8]}"
    DatasetCatalog.register(name, lambda: load_coco_json(json_file, image_root, name))
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco")
    return name


def _unregister(name):
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def _polygon_mask(polygons, height, width):
    """The mask COCO evaluation rasterises for ``polygons`` (H, W) bool."""
    rle = mask_util.merge(mask_util.frPyObjects(polygons, height, width))
    return torch.from_numpy(mask_util.decode(rle).astype(bool))


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_evaluation_ignores_malformed_ground_truth_instead_of_crashing(
    tmp_path, monkeypatch, backend, caplog
):
    """Detections equal to every valid ground-truth instance score AP 100: the 2-point polygon
    and the negative box are ignored regions (neither missed nor false positives)."""
    monkeypatch.setenv("CONVMAE_COCOEVAL", backend)
    square = [8.0, 8.0, 40.0, 8.0, 40.0, 40.0, 8.0, 40.0]
    tri = [44.0, 10.0, 60.0, 10.0, 52.0, 30.0]
    annos = [  # (id, segmentation, bbox)
        (1, [[10.0, 10.0, 30.0, 30.0]], [10.0, 10.0, 20.0, 20.0]),  # 2-point polygon
        (2, [tri], [44.0, 10.0, -5, 10]),  # negative width
        (3, [square], [8.0, 8.0, 32.0, 32.0]),
        (4, [tri], [44.0, 10.0, 16.0, 20.0]),
    ]
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "height": 48, "width": 64}],
        "annotations": [{"id": i, "image_id": 1, "category_id": 1, "iscrowd": 0,
                         "segmentation": s, "bbox": b, "area": 100.0} for i, s, b in annos],
        "categories": [{"id": 1, "name": "thing"}],
    }  # fmt: skip
    json_file = str(tmp_path / "gt.json")
    with open(json_file, "w") as f:
        json.dump(coco, f)
    name = _register(json_file, str(tmp_path))
    MetadataCatalog.get(name).set(thing_classes=["thing"], thing_dataset_id_to_contiguous_id={1: 0})
    cfg = load_lazy_config(PAPER_TOY, [f"dataloader.test.dataset.names={name}"])
    cfg.dataloader.evaluator.update(output_dir=str(tmp_path), distributed=False)
    try:
        with caplog.at_level(logging.WARNING):
            evaluator = instantiate(cfg.dataloader.evaluator)  # what the toy config evaluates with
        assert "2 malformed annotation(s)" in caplog.text and json_file in caplog.text
        assert "annotation id 1 (image 'a.png')" in caplog.text
        valid = [a for a in annos if a[0] in (3, 4)]
        pred = Instances((48, 64))
        pred.pred_boxes = Boxes(torch.tensor([[8.0, 8.0, 40.0, 40.0], [44.0, 10.0, 60.0, 30.0]]))
        pred.scores = torch.tensor([0.9, 0.8])
        pred.pred_classes = torch.tensor([0, 0])
        pred.pred_masks = torch.stack([_polygon_mask(a[1], 48, 64) for a in valid])
        evaluator.reset()
        evaluator.process([{"image_id": 1, "file_name": "a.png"}], [{"instances": pred}])
        results = evaluator.evaluate()
    finally:
        _unregister(name)
    assert results["bbox"]["AP"] == pytest.approx(100.0)
    assert results["segm"]["AP"] == pytest.approx(100.0)


def test_training_with_malformed_annotations_ends_with_final_metrics(data_copy, tmp_path):
    """The reported run: training, then COCO evaluation with pycocotools, final_metrics.json."""
    json_file = data_copy / "toy_coco" / "annotations" / "instances_mini.json"
    _corrupt_annotations(str(json_file))
    out = tmp_path / "run"
    args = ["--config-file", PAPER_TOY, *MINI, "dataloader.train.total_batch_size=2",
            "train.max_iter=2", "train.log_period=1", f"train.output_dir={out}"]  # fmt: skip
    proc = _run(LAZY_TOOL, args, data_copy, CONVMAE_COCOEVAL="pycocotools")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "final_metrics.json") as f:
        assert {"bbox", "segm"} <= set(json.load(f))
    log = (out / "log.txt").read_text()
    assert "annotation id 1 (image 'mini_000000.jpg'): polygon 1 of 1: fewer than 3" in log
    assert "Evaluation ground truth of 'toy_coco_mini'" in log and "annotation id 2" in log


# ------------------------------------------------------------------ 4. missing ADE20K
def test_missing_ade20k_stops_the_segmentation_tool_before_any_model_is_built(tmp_path):
    out = tmp_path / "run"
    start = time.perf_counter()
    proc = _run(SEG_TOOL, ["--config-file", ADE20K_CFG, "OUTPUT_DIR", str(out)], tmp_path / "none")
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Model:" not in proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: ade20k_sem_seg_train")
    expected = os.path.join(str(tmp_path / "none"), "ADEChallengeData2016", "images", "training")
    assert expected in lines[0] and "datasets/prepare_ade20k_sem_seg.py" in lines[0]
    assert not out.exists()  # default_setup (config dump, log.txt) never ran
    assert elapsed < 120
