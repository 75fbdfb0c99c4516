"""tools/benchmark.py --data: the training mappers on realistic synthetic inputs."""

import json
import os
import subprocess
import sys

import torch

import convmae_det  # noqa: F401
from convmae_det.benchmark.data_loading import _MAPPERS, synthetic_mapper_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_synthetic_inputs_go_through_the_shipped_training_mappers(tmp_path):
    torch.manual_seed(0)
    det = _MAPPERS["detection"]()(synthetic_mapper_inputs("detection", str(tmp_path), 1)[0])
    assert det["image"].dtype == torch.uint8 and max(det["image"].shape[1:]) <= 1024
    instances = det["instances"]
    assert len(instances) == len(instances.gt_masks) and instances.gt_boxes.tensor.shape[1] == 4
    record = synthetic_mapper_inputs("detection", str(tmp_path), 1, seed=1)[0]
    assert 5 <= len(record["annotations"]) <= 30
    assert all(16 <= len(a["segmentation"][0]) <= 80 for a in record["annotations"])

    seg = _MAPPERS["segmentation"]()(synthetic_mapper_inputs("segmentation", str(tmp_path), 1)[0])
    assert seg["image"].shape == (3, 512, 512) and seg["sem_seg"].shape == (512, 512)
    labels = set(seg["sem_seg"].unique().tolist())
    assert labels <= set(range(150)) | {255} and len(labels) > 1

    pre = _MAPPERS["pretrain"]()(synthetic_mapper_inputs("pretrain", str(tmp_path), 1)[0])
    assert pre.shape == (3, 224, 224) and pre.dtype == torch.float32


def test_data_benchmark_maps_every_subject_and_reports_a_rate(tmp_path):
    out = tmp_path / "data.json"
    proc = subprocess.run(
        [sys.executable, "tools/benchmark.py", "--data", "all", "--data-images", "2",
         "--output", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result) == {"detection", "segmentation", "pretrain"}
    for subject, r in result.items():
        assert r["images_per_second_per_core"] > 0 and r["num_images"] == 2, subject
        assert f"{subject} mapper:" in proc.stdout
