"""ADE20K data: label preparation, checks, augmentation, the toy dataset and mIoU evaluation."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
from detectron2.data import transforms as T
from detectron2.evaluation import SemSegEvaluator, inference_on_dataset
from PIL import Image
from seg_toy_fixtures import ROOT, TOY_CFG, toy_root  # noqa: F401  (fixture)

from convmae_det.data.datasets.ade20k import (
    ADE20K_PALETTE,
    convert_ade20k_label,
    datasets_root,
    register_ade20k,
)
from convmae_det.data.sem_seg_mapper import RandomRatioResize, SemSegDatasetMapper, read_label
from convmae_det.data.toy_ade20k import generate_toy_ade20k
from convmae_det.engine.seg_demo import ConstantSegmenter, evaluate_constant_baseline
from convmae_det.engine.seg_train_loop import get_seg_cfg


def test_prepare_maps_other_to_ignore_and_shifts_classes_down():
    raw = np.array([[0, 1, 2], [150, 0, 75]], dtype=np.uint8)
    assert convert_ade20k_label(raw).tolist() == [[255, 0, 1], [149, 255, 74]]


def test_prepare_script_converts_every_split(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    for split in ("training", "validation"):
        (base / "annotations" / split).mkdir(parents=True)
        Image.fromarray(np.full((4, 5), 3, np.uint8)).save(base / "annotations" / split / "a.png")
    script = os.path.join(ROOT, "datasets", "prepare_ade20k_sem_seg.py")
    proc = subprocess.run(
        [sys.executable, script, "--root", str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    out = np.asarray(Image.open(base / "annotations_detectron2" / "validation" / "a.png"))
    assert np.all(out == 2)
    missing = subprocess.run(
        [sys.executable, script, "--root", str(tmp_path / "nope")], capture_output=True, text=True
    )
    assert missing.returncode == 2 and "annotations/training not found" in missing.stderr


def test_builtin_ade20k_has_150_distinct_colours():
    meta = MetadataCatalog.get("ade20k_sem_seg_val")
    assert len(meta.stuff_colors) == len(meta.stuff_classes) == 150
    assert len({tuple(c) for c in meta.stuff_colors}) == 150 and [0, 0, 0] not in ADE20K_PALETTE


def test_missing_ade20k_names_the_expected_folder_and_the_prepare_script(tmp_path):
    register_ade20k(str(tmp_path))
    try:
        with pytest.raises(FileNotFoundError) as err:
            DatasetCatalog.get("ade20k_sem_seg_train")
        msg = str(err.value)
        assert os.path.join(str(tmp_path), "ADEChallengeData2016", "images", "training") in msg
        assert "datasets/prepare_ade20k_sem_seg.py" in msg
        (tmp_path / "ADEChallengeData2016" / "images" / "validation").mkdir(parents=True)
        with pytest.raises(FileNotFoundError, match="prepared labels not found.*prepare_ade20k"):
            DatasetCatalog.get("ade20k_sem_seg_val")
    finally:
        register_ade20k(datasets_root())


def test_toy_dataset_is_deterministic_and_has_several_classes_and_ignore_pixels(tmp_path):
    generate_toy_ade20k(str(tmp_path / "a"))
    generate_toy_ade20k(str(tmp_path / "b"))
    rel = os.path.join("annotations_detectron2", "training", "ADE_toy_train_00000003.png")
    la, lb = read_label(str(tmp_path / "a" / rel)), read_label(str(tmp_path / "b" / rel))
    assert np.array_equal(la, lb)
    img = os.path.join("images", "validation", "ADE_toy_val_00000002.jpg")
    assert open(tmp_path / "a" / img, "rb").read() == open(tmp_path / "b" / img, "rb").read()
    values = set()
    for name in sorted(os.listdir(tmp_path / "a" / "annotations_detectron2" / "training")):
        values |= set(
            np.unique(
                read_label(str(tmp_path / "a" / "annotations_detectron2" / "training" / name))
            ).tolist()
        )
    assert values == {0, 1, 2, 3, 4, 5, 255}
    raw = read_label(str(tmp_path / "a" / rel.replace("annotations_detectron2", "annotations")))
    assert np.array_equal(convert_ade20k_label(raw), la)


def _write_pair(tmp_path, label, size=None):
    h, w = label.shape
    img = tmp_path / "img.jpg"
    Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(img)
    lab = tmp_path / "lab.png"
    Image.fromarray(label.astype(np.uint8)).save(lab)
    return {"file_name": str(img), "sem_seg_file_name": str(lab), "height": h, "width": w}


def test_label_outside_the_classes_is_an_error_naming_the_file(tmp_path):
    cfg = get_seg_cfg(TOY_CFG)
    label = np.zeros((40, 50))
    label[3, 4] = 7  # toy has 6 classes
    record = _write_pair(tmp_path, label)
    for is_train in (True, False):
        with pytest.raises(ValueError, match=r"lab\.png: label values \[7\] are outside \[0, 6\)"):
            SemSegDatasetMapper(cfg, is_train)(record)


def test_images_smaller_than_the_crop_are_padded_with_ignore_and_the_mean(tmp_path):
    cfg = get_seg_cfg(
        TOY_CFG, ["INPUT.SEM_SEG.RATIO_RANGE", "[0.25, 0.25]", "INPUT.SEM_SEG.PHOTOMETRIC", "False"]
    )
    label = np.ones((40, 60))
    label[:, :5] = 255
    out = SemSegDatasetMapper(cfg, True)(_write_pair(tmp_path, label))
    image, seg = out["image"], out["sem_seg"]
    assert image.shape == (3, 128, 128) and seg.shape == (128, 128) and seg.dtype == torch.int64
    # scale (512, 128) * 0.25 -> long side 128, short side 32: a 32x48 image, aspect kept
    assert set(torch.unique(seg[:32, :48]).tolist()) <= {1, 255}
    assert torch.all(seg[32:] == 255) and torch.all(seg[:, 48:] == 255)
    assert image[:, 100, 100].tolist() == [124, 116, 104]  # round(pixel mean)


def test_ratio_resize_keeps_aspect_within_the_scaled_box():
    aug = RandomRatioResize((2048, 512), (0.5, 2.0))
    image = np.zeros((300, 400, 3), np.uint8)
    for _ in range(20):
        t = aug.get_transform(image)
        assert isinstance(t, T.ResizeTransform)
        assert 256 <= min(t.new_h, t.new_w) <= 1024 and abs(t.new_w / t.new_h - 4 / 3) < 0.01


class _Oracle(torch.nn.Module):
    """Predicts the ground truth (read from disk) as one-hot scores."""

    def __init__(self, num_classes):
        super().__init__()
        self.k = num_classes
        self.gt = {
            d["file_name"]: d["sem_seg_file_name"]
            for d in DatasetCatalog.get("toy_ade20k_sem_seg_val")
        }

    def forward(self, inputs):
        outs = []
        for x in inputs:
            gt = torch.as_tensor(read_label(self.gt[x["file_name"]]).astype(np.int64))
            assert gt.shape == (x["height"], x["width"])
            scores = torch.nn.functional.one_hot(gt.clamp(max=self.k - 1), self.k).permute(2, 0, 1)
            outs.append({"sem_seg": scores.float()})
        return outs


def test_evaluating_the_ground_truth_gives_miou_100_and_constant_prediction_much_less(
    toy_root,
):  # noqa: F811
    cfg = get_seg_cfg(TOY_CFG)
    name = "toy_ade20k_sem_seg_val"
    loader = build_detection_test_loader(cfg, name, mapper=SemSegDatasetMapper(cfg, False))
    res = inference_on_dataset(_Oracle(6), loader, SemSegEvaluator(name, distributed=False))
    assert res["sem_seg"]["mIoU"] == pytest.approx(100.0)
    assert res["sem_seg"]["pACC"] == pytest.approx(100.0)
    base = evaluate_constant_baseline(cfg, name)
    assert base["class_id"] == 0  # sky covers most of the toy training pixels
    assert 0 < base["mIoU"] < 100 / 6 and base["mIoU"] == pytest.approx(base["IoU-sky"] / 6)
    const = inference_on_dataset(
        ConstantSegmenter(6, 0), loader, SemSegEvaluator(name, distributed=False)
    )
    assert const["sem_seg"]["mIoU"] == pytest.approx(base["mIoU"])
